"""Dataset dict -> model input: decode the image, resize, crop, flip, rasterise instance masks.

Training applies multi-scale shortest-edge resize (``INPUT.MIN_SIZE_TRAIN``), an optional random crop
(``INPUT.CROP``), optionally SSD colour distortion (``INPUT.COLOR_AUG_SSD``, as Mask2Former's Cityscapes
recipe) and a horizontal flip; polygons are transformed as coordinates and rasterised at the
output size with pycocotools, RLE masks are decoded and transformed as arrays. Crowd annotations
(``iscrowd: 1``, Cityscapes group regions) and instances that leave the crop are not targets.
All randomness comes from the ``rng`` argument, so a sample depends only on its seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from instsynth.core.io import InstSynthError

CROP_TYPES = ("absolute", "relative", "relative_range", "absolute_range")


def read_image(path: str) -> np.ndarray:
    """RGB uint8 HxWx3 array of an image file (clear error when missing or unreadable)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InstSynthError(path, "image missing or not readable")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) with the short side ``short`` and the long side at most ``max_size``."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


@dataclass(frozen=True)
class Geometry:
    """Resize to (rh, rw), crop the box (x0, y0, ch, cw) of the resized image, then maybe flip."""
    src_h: int
    src_w: int
    rh: int
    rw: int
    x0: int
    y0: int
    ch: int
    cw: int
    flip: bool

    def _warp(self, array: np.ndarray, interpolation: int) -> np.ndarray:
        """Resize and crop in one step: only the (ch, cw) output pixels are computed. Pixel centres
        map as in a resize ((x + 0.5) / scale - 0.5), so images, masks and polygons stay aligned."""
        if (self.rh, self.rw) == array.shape[:2]:
            return array[self.y0:self.y0 + self.ch, self.x0:self.x0 + self.cw]
        sx, sy = self.rw / self.src_w, self.rh / self.src_h
        matrix = np.array([[sx, 0, 0.5 * sx - 0.5 - self.x0], [0, sy, 0.5 * sy - 0.5 - self.y0]])
        return cv2.warpAffine(array, matrix, (self.cw, self.ch), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)

    def image(self, img: np.ndarray) -> np.ndarray:
        img = self._warp(img, cv2.INTER_LINEAR)
        return np.ascontiguousarray(img[:, ::-1] if self.flip else img)

    def polygons(self, polys: list) -> list:
        sx, sy = self.rw / self.src_w, self.rh / self.src_h
        out = []
        for poly in polys:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            x, y = xy[:, 0] * sx - self.x0, xy[:, 1] * sy - self.y0
            if self.flip:
                x = self.cw - x
            out.append(np.stack([x, y], 1).ravel().tolist())
        return out

    def mask(self, mask: np.ndarray) -> np.ndarray:
        mask = self._warp(mask, cv2.INTER_NEAREST)
        return mask[:, ::-1] if self.flip else mask


def _scale(channel: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(channel.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def color_aug_ssd(img: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32, contrast=(0.5, 1.5),
                  saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """SSD's photometric distortion (Detectron2's ColorAugSSDTransform) of an RGB uint8 image: each of brightness
    (+-32), contrast and saturation (x0.5..1.5) and hue (+-18 of OpenCV's 180) with probability 1/2, contrast
    first or last."""
    def contrast_step(x):
        return _scale(x, alpha=rng.uniform(*contrast)) if rng.integers(2) else x

    def hsv_steps(x):
        do_sat, do_hue = rng.integers(2), rng.integers(2)
        if not (do_sat or do_hue):
            return x
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        if do_sat:
            hsv[..., 1] = _scale(hsv[..., 1], alpha=rng.uniform(*saturation))
        if do_hue:
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-hue_delta, hue_delta + 1))) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    if rng.integers(2):
        img = _scale(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    return hsv_steps(contrast_step(img)) if rng.integers(2) else contrast_step(hsv_steps(img))


def annotation_mask(segm, geo: Geometry) -> np.ndarray:
    """Binary uint8 (ch, cw) mask of one annotation's polygons or RLE after the geometry."""
    if isinstance(segm, list):
        polys = [p for p in geo.polygons(segm) if len(p) >= 6]
        if not polys:
            return np.zeros((geo.ch, geo.cw), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, geo.ch, geo.cw))
        return mask_utils.decode(rle)
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            segm = mask_utils.frPyObjects(segm, *segm["size"])
        return np.ascontiguousarray(geo.mask(mask_utils.decode(segm)))
    raise ValueError(f"unsupported segmentation type {type(segm).__name__}")


class DatasetMapper:
    """Callable turning a dataset dict into ``{"image": uint8 CHW, "height", "width", "instances"}``."""

    def __init__(self, cfg, is_train: bool, label_id_to_contiguous: dict[int, int]):
        self.is_train = is_train
        self.to_contiguous = label_id_to_contiguous
        inp = cfg.INPUT
        self.min_sizes = tuple(inp.MIN_SIZE_TRAIN) if is_train else (inp.MIN_SIZE_TEST,)
        self.sampling = inp.MIN_SIZE_TRAIN_SAMPLING if is_train else "choice"
        self.max_size = inp.MAX_SIZE_TRAIN if is_train else inp.MAX_SIZE_TEST
        self.crop = is_train and inp.CROP.ENABLED
        self.crop_type, self.crop_size = inp.CROP.TYPE, tuple(inp.CROP.SIZE)
        self.flip = is_train and inp.RANDOM_FLIP == "horizontal"
        self.color_aug = is_train and inp.COLOR_AUG_SSD
        if self.sampling not in ("choice", "range"):
            raise InstSynthError("INPUT.MIN_SIZE_TRAIN_SAMPLING", f"must be 'choice' or 'range', got {self.sampling!r}")
        if self.crop and self.crop_type not in CROP_TYPES:
            raise InstSynthError("INPUT.CROP.TYPE", f"must be one of {CROP_TYPES}, got {self.crop_type!r}")
        if inp.RANDOM_FLIP not in ("horizontal", "none"):
            raise InstSynthError("INPUT.RANDOM_FLIP", f"must be 'horizontal' or 'none', got {inp.RANDOM_FLIP!r}")

    def _crop_hw(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        a, b = self.crop_size
        if self.crop_type == "absolute":
            ch, cw = a, b
        elif self.crop_type == "relative":
            ch, cw = int(h * a + 0.5), int(w * b + 0.5)
        elif self.crop_type == "relative_range":
            ch, cw = int(h * rng.uniform(a, 1) + 0.5), int(w * rng.uniform(b, 1) + 0.5)
        else:  # absolute_range: both sides drawn from [a, b]
            ch = int(rng.integers(min(h, a), min(h, b) + 1))
            cw = int(rng.integers(min(w, a), min(w, b) + 1))
        return max(1, min(h, ch)), max(1, min(w, cw))

    def geometry(self, h: int, w: int, rng: np.random.Generator | None) -> Geometry:
        """The random (training) or fixed (test) geometry for an image of size (h, w)."""
        if self.is_train and self.sampling == "range":
            short = int(rng.integers(self.min_sizes[0], self.min_sizes[-1] + 1))
        elif self.is_train:
            short = int(self.min_sizes[rng.integers(len(self.min_sizes))])
        else:
            short = self.min_sizes[0]
        rh, rw = shortest_edge_size(h, w, short, self.max_size)
        y0 = x0 = 0
        ch, cw = rh, rw
        if self.crop:
            ch, cw = self._crop_hw(rh, rw, rng)
            y0, x0 = int(rng.integers(rh - ch + 1)), int(rng.integers(rw - cw + 1))
        flip = bool(self.flip and rng.random() < 0.5)
        return Geometry(h, w, rh, rw, x0, y0, ch, cw, flip)

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        image = read_image(record["file_name"])
        h, w = image.shape[:2]
        if (h, w) != (record["height"], record["width"]):
            raise InstSynthError(record["file_name"], f"image is {w}x{h} but its annotation says "
                                                      f"{record['width']}x{record['height']}")
        geo = self.geometry(h, w, rng)
        image = geo.image(image)
        if self.color_aug:
            image = color_aug_ssd(image, rng)
        out = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
               "height": h, "width": w, "image_id": record["image_id"], "file_name": record["file_name"]}
        if self.is_train:
            out["instances"] = self.targets(record.get("annotations", []), geo)
        return out

    def targets(self, annotations: list[dict], geo: Geometry) -> dict:
        """Non-crowd instances that keep at least one pixel: contiguous classes and bool masks."""
        classes, masks = [], []
        for ann in annotations:
            if ann.get("iscrowd", 0) or ann["category_id"] not in self.to_contiguous:
                continue
            mask = annotation_mask(ann["segmentation"], geo)
            if mask.any():
                classes.append(self.to_contiguous[ann["category_id"]])
                masks.append(mask)
        masks_t = (torch.from_numpy(np.stack(masks)).bool() if masks
                   else torch.zeros((0, geo.ch, geo.cw), dtype=torch.bool))
        return {"gt_classes": torch.tensor(classes, dtype=torch.long), "gt_masks": masks_t}
