"""Stage 2's pixel work: paste a sample through its instance's mask, and draw the paper's context crops.

``blend``: ``hard`` (outside the mask the source, byte for byte), ``feather`` (alpha ramping from the
mask edge to 1 over ``feather_pixels`` pixels inside the mask; outside still the source) or
``normalized`` (the paper's colour correction: the mean sample - source difference on the box's
background pixels is subtracted inside the mask).

Context crops (crop index 1, 2, ...) as in the paper: the image's aspect ratio, area r x the area of
the aspect-shaped box around the instance with r = max(1, ceil(N(3, 1))) redrawn until the crop fits
in the image, placed uniformly at random so that it contains the whole instance box and stays inside
the image, then resized to the full image size (RGB: area/bilinear filter; labels: nearest). A crop
is redrawn while it cuts an instance down to a fragment of fewer than ``min_instance_pixels`` pixels
in the written label map (instances it leaves whole are never a reason). After ``max_tries`` rejected
draws the fallback is the smallest crop (r = 1) centred on the instance box. Every draw of crop c of
sample s of instance ``key`` comes from its own generator seeded by (seed, key, s, c).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from instsynth.core.imageops import crop_resize_labels
from instsynth.core.io import InstSynthError
from instsynth.core.seeds import stable_seed
from instsynth.formats.cityscapes import MAX_CROPS_PER_SAMPLE

BLENDS = ("hard", "feather", "normalized")


@dataclass(frozen=True)
class IntegrationParams:
    """How samples are pasted and cropped (recorded in integration.json; part of every fingerprint)."""

    blend: str = "hard"
    crops_per_sample: int = 1
    seed: int = 1
    min_instance_pixels: int = 4
    max_tries: int = 100
    feather_pixels: int = 3

    def validate(self, where: Path) -> None:
        if self.blend not in BLENDS:
            raise InstSynthError(where, f"blend must be one of {BLENDS}, got {self.blend!r}")
        if not 0 <= self.crops_per_sample <= MAX_CROPS_PER_SAMPLE:
            raise InstSynthError(where, f"crops_per_sample must be in [0, {MAX_CROPS_PER_SAMPLE}], "
                                        f"got {self.crops_per_sample}")
        if self.min_instance_pixels < 0 or self.max_tries < 1 or self.feather_pixels < 1:
            raise InstSynthError(where, "min_instance_pixels must be >= 0, max_tries and feather_pixels >= 1")


# --------------------------------------------------------------------------- pasting
def as_rgb_sample(image: np.ndarray, path: Path) -> tuple[np.ndarray, str | None]:
    """An RGB uint8 sample and what was converted (grayscale/RGBA -> RGB), or InstSynthError."""
    if image.dtype != np.uint8:
        raise InstSynthError(path, f"sample must be 8-bit, found {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), "grayscale -> RGB"
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB), "RGBA -> RGB (alpha dropped)"
    if image.shape[2] != 3:
        raise InstSynthError(path, f"sample must be RGB, found {image.shape[2]} channels")
    return image, None


def feather_alpha(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Alpha in (0, 1] inside ``mask`` rising with the distance to its edge (1 from ``pixels`` in), 0 outside."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(distance / float(pixels), 0.0, 1.0) * mask


def normalize_colors(sample: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``sample`` minus its mean per-channel difference to ``source`` over the background (``~mask``) pixels."""
    background = ~mask
    if not background.any():
        return sample
    offset = (sample[background].astype(np.float32) - source[background].astype(np.float32)).mean(axis=0)
    return np.clip(np.rint(sample.astype(np.float32) - offset), 0, 255).astype(np.uint8)


def paste(image: np.ndarray, sample: np.ndarray, mask: np.ndarray, box: Sequence[int], blend: str = "hard",
          feather_pixels: int = 3) -> np.ndarray:
    """A copy of ``image`` with ``sample`` (box-sized, RGB) pasted through ``mask`` into ``box``.

    Pixels outside the mask are always the image's own.
    """
    x0, y0, x1, y1 = box
    source = image[y0:y1, x0:x1]
    if blend == "normalized":
        sample = normalize_colors(sample, source, mask)
    if blend == "feather":
        alpha = feather_alpha(mask, feather_pixels)[..., None]
        mixed = np.rint(alpha * sample + (1.0 - alpha) * source).astype(np.uint8)
    elif blend in ("hard", "normalized"):
        mixed = sample
    else:
        raise ValueError(f"unknown blend {blend!r}; choose from {BLENDS}")
    out = image.copy()
    out[y0:y1, x0:x1] = np.where(mask[..., None], mixed, source)
    return out


# --------------------------------------------------------------------------- context crops
@dataclass
class ContextCrop:
    """A chosen context crop: its box, its ratio r, draws made, and whether it is the fallback."""

    box: tuple[int, int, int, int]
    ratio: int
    tries: int
    fallback: bool
    labels: np.ndarray | None = field(default=None, repr=False)  # resized instanceIds, if computed


def aspect_box_area(bbox: Sequence[int], aspect: float) -> float:
    """Area of the smallest box of width/height ``aspect`` around ``bbox``."""
    x0, y0, x1, y1 = bbox
    height = max(y1 - y0, (x1 - x0) / aspect)
    return height * height * aspect


def crop_size(area: float, ratio: float, aspect: float) -> tuple[int, int]:
    """(width, height) of a crop of width/height ``aspect`` and area ``ratio`` x ``area`` (rounded up)."""
    height = math.ceil(math.sqrt(ratio * area / aspect) - 1e-9)
    return math.ceil(height * aspect - 1e-9), height


def place_crop(rng: np.random.Generator, bbox: Sequence[int], size: tuple[int, int],
               image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A uniformly placed crop of ``size`` (w, h) containing ``bbox`` inside the image (w, h)."""
    (w, h), (width, height) = size, image_size
    x0, y0, x1, y1 = bbox
    cx = int(rng.integers(max(0, x1 - w), min(x0, width - w) + 1))
    cy = int(rng.integers(max(0, y1 - h), min(y0, height - h) + 1))
    return cx, cy, cx + w, cy + h


def centred_crop(bbox: Sequence[int], size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop of ``size`` centred on ``bbox``, shifted inside the image."""
    (w, h), (width, height) = size, image_size
    x0, y0, x1, y1 = bbox
    cx = min(max((x0 + x1 - w) // 2, 0), width - w)
    cy = min(max((y0 + y1 - h) // 2, 0), height - h)
    return cx, cy, cx + w, cy + h


def smallest_crop_size(bbox: Sequence[int], image_size: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the r = 1 crop around ``bbox``, never larger than the image."""
    width, height = image_size
    aspect = width / height
    w, h = crop_size(aspect_box_area(bbox, aspect), 1, aspect)
    return min(w, width), min(h, height)


def draw_crop_size(rng: np.random.Generator, bbox: Sequence[int], image_size: tuple[int, int],
                   max_tries: int) -> tuple[tuple[int, int], int]:
    """((w, h), r): r = max(1, ceil(N(3, 1))) redrawn until the crop fits; r = 1 after ``max_tries`` misfits."""
    width, height = image_size
    aspect = width / height
    area = aspect_box_area(bbox, aspect)
    for _ in range(max_tries):
        ratio = max(1, math.ceil(rng.normal(3.0, 1.0)))
        w, h = crop_size(area, ratio, aspect)
        if w <= width and h <= height:
            return (w, h), ratio
    return smallest_crop_size(bbox, image_size), 1


def cut_fragments(instance_ids: np.ndarray, box: Sequence[int], size: tuple[int, int],
                  source_counts: np.ndarray, min_pixels: int) -> tuple[bool, np.ndarray | None]:
    """(True if the crop leaves no cut instance with 0 < pixels < ``min_pixels``, resized labels or None).

    An instance is cut when the box holds only part of it. Enlarging with nearest neighbour never
    loses a pixel, so only instances with fewer than ``min_pixels`` pixels inside the box need the
    resized map, which is then computed once and returned for reuse.
    """
    x0, y0, x1, y1 = box
    inside = np.bincount(instance_ids[y0:y1, x0:x1].ravel(), minlength=len(source_counts))
    ids = np.flatnonzero(inside[1000:]) + 1000
    cut = ids[inside[ids] < source_counts[ids]]
    suspects = cut[inside[cut] < min_pixels]
    if suspects.size == 0:
        return True, None
    labels = crop_resize_labels(instance_ids, box, size)
    resized = np.bincount(labels.ravel(), minlength=len(source_counts))
    return bool((resized[suspects] >= min_pixels).all()), labels


def choose_context_crop(instance_ids: np.ndarray, bbox: Sequence[int], seed: int, params: IntegrationParams,
                        source_counts: np.ndarray | None = None) -> ContextCrop:
    """The paper's random context crop around ``bbox`` (see the module docstring), seeded by ``seed``."""
    height, width = instance_ids.shape
    if source_counts is None:
        source_counts = np.bincount(instance_ids.ravel())
    rng = np.random.default_rng(seed)
    for tries in range(1, params.max_tries + 1):
        size, ratio = draw_crop_size(rng, bbox, (width, height), params.max_tries)
        box = place_crop(rng, bbox, size, (width, height))
        ok, labels = cut_fragments(instance_ids, box, (width, height), source_counts, params.min_instance_pixels)
        if ok:
            return ContextCrop(box, ratio, tries, False, labels)
    box = centred_crop(bbox, smallest_crop_size(bbox, (width, height)), (width, height))
    return ContextCrop(box, 1, params.max_tries, True)


def crop_seed(seed: int, key: str, sample: int, crop: int) -> int:
    """Seed of crop ``crop`` of sample ``sample`` of instance ``key`` (a stable hash, order-independent)."""
    return stable_seed(seed, "context-crop", key, sample, crop)
