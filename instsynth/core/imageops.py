"""Pixel operations shared by formats and stages: crop + resize of images and label maps, COCO mask geometry.

Label maps are cut and resized with nearest neighbour at pixel centres, so every output value exists in
the source; COCO polygons trace pixel edges, so pycocotools rasterises them back to exactly the mask.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils


# --------------------------------------------------------------------------- crop + resize
def crop_resize_labels(labels: np.ndarray, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Cut ``box`` (x0, y0, x1, y1, half-open) out of a label map and resize it to ``size`` (w, h).

    Nearest neighbour with pixel-centre sampling (``INTER_NEAREST_EXACT``), so every label value in
    the output exists in the source and all channels (color) and dtypes (uint16 instanceIds) map
    their pixels identically. When enlarging, every source pixel of the box appears in the output.
    """
    x0, y0, x1, y1 = map(int, box)
    crop = labels[y0:y1, x0:x1]
    if crop.shape[1::-1] == tuple(size):
        return crop.copy()
    return cv2.resize(crop, tuple(size), interpolation=cv2.INTER_NEAREST_EXACT)


def crop_resize_rgb(rgb: np.ndarray, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Cut ``box`` out of an RGB image and resize it to ``size`` (w, h): area filter to shrink, bilinear to enlarge."""
    x0, y0, x1, y1 = map(int, box)
    crop = rgb[y0:y1, x0:x1]
    w, h = size
    if crop.shape[:2] == (h, w):
        return crop.copy()
    shrink = w * h < crop.shape[0] * crop.shape[1]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- COCO mask geometry
def corner_polygons(mask: np.ndarray) -> tuple[list[np.ndarray], bool]:
    """Pixel-edge polygons of a binary mask: ``([(N, 2) int corner points per external contour], has_holes)``.

    Coordinates are pixel corners relative to the mask's top-left corner (pixel (x, y) spans
    ``[x, x+1] x [y, y+1]``), the convention pycocotools rasterises polygons with.
    """
    h, w = mask.shape
    up = np.zeros((2 * h + 2, 2 * w + 2), np.uint8)
    up[1:-1, 1:-1] = cv2.resize(mask.astype(np.uint8), (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return [], False
    parents = hierarchy[0][:, 3]
    polygons = []
    for contour, parent in zip(contours, parents):
        if parent != -1:
            continue
        corners = contour[:, 0, :] // 2  # ((c - 1) + 1) // 2: undo the padding, then snap to corners
        keep = np.r_[True, np.any(corners[1:] != corners[:-1], axis=1)]
        corners = corners[keep]
        if len(corners) > 1 and (corners[0] == corners[-1]).all():
            corners = corners[:-1]
        polygons.append(corners)
    return polygons, bool((parents != -1).any())


def rle_encode(mask: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
    """Exact COCO RLE (``counts`` as str) of a bbox-local ``mask`` placed at (top, left) in a height x width image."""
    strip = np.zeros((mask.shape[1], height), np.uint8)  # columns left..right, column-major order
    strip[:, top:top + mask.shape[0]] = mask.T
    flat = strip.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.r_[0, edges, flat.size]).tolist()
    if flat[0]:  # COCO RLE starts with a run of zeros
        counts.insert(0, 0)
    counts[0] += left * height  # columns before the strip
    trail = (width - left - mask.shape[1]) * height  # columns after it
    if flat[-1] and trail:
        counts.append(trail)
    elif not flat[-1]:
        counts[-1] += trail
    rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def segmentation_of(local: np.ndarray, top: int, left: int, height: int, width: int, fmt: str) -> tuple[object, bool]:
    """(COCO segmentation, has_holes) of a bbox-local mask: pixel-edge polygons, or RLE for
    ``fmt="rle"`` and for masks with holes (so a hole is never filled)."""
    if fmt == "polygon":
        polys, has_holes = corner_polygons(local)
        if not has_holes:
            return [(p + (left, top)).ravel().astype(float).tolist() for p in polys], False
        return rle_encode(local, top, left, height, width), True
    return rle_encode(local, top, left, height, width), False


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to (height, width): INTER_AREA to shrink, INTER_CUBIC to enlarge."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image.copy()
    shrink = h * w < image.shape[0] * image.shape[1]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return out  # uint8 input: OpenCV saturates cubic overshoot


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to (height, width); a shrunk pixel is inside if any source pixel was.

    Shrinking uses the covered fraction (INTER_AREA) so thin parts survive; enlarging thresholds a
    bilinear resize at 0.5. The generated region thus covers the instance; the final composite uses
    the original-resolution mask anyway.
    """
    h, w = size
    m = mask.astype(np.float32)
    if m.shape[:2] == (h, w):
        return mask.astype(bool)
    if h * w < m.shape[0] * m.shape[1]:
        return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) > 1e-3
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
