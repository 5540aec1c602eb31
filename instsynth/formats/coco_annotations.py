"""The annotations of a COCO / LVIS output: masks from segmentations, exact segmentations of new masks,
the annotations a new image keeps, its file name, and the merged file (the source plus the new images).

:mod:`instsynth.formats.coco` re-exports every name here.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from instsynth.core.imageops import crop_resize_labels, segmentation_of
from .base import output_suffix

SYNTHETIC_FOLDER = "instsynth_syn"
"""Folder of the new images inside ``OUT/images`` (next to the linked originals)."""
LVIS_IMAGE_FIELDS = ("not_exhaustive_category_ids", "neg_category_ids")
"""Per-image LVIS fields a new image inherits from its source image (still true of its pixels)."""


# --------------------------------------------------------------------------- masks
def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """pycocotools RLE of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of an annotation, rasterised by pycocotools."""
    return mask_utils.decode(segmentation_rle(ann["segmentation"], height, width)).astype(bool)


# --------------------------------------------------------------------------- names and exact annotations
def merged_json_path(out: str | Path, split: str) -> Path:
    """``OUT/annotations/instances_<split>_instsynth.json``."""
    return Path(out) / "annotations" / f"instances_{split}_instsynth.json"


def synthetic_file_name(split: str, file_name: str, annotation_id: int, sample: int, crop: int) -> str:
    """File name (relative to ``OUT/images``) of a new image: unique per (annotation, sample, crop); a JPEG
    source gives a JPEG (:func:`~instsynth.formats.base.output_suffix`)."""
    path = PurePosixPath(file_name)
    name = f"{path.stem}_{annotation_id}_{sample:04d}_{crop:02d}{output_suffix(file_name)}"
    return (PurePosixPath(SYNTHETIC_FOLDER) / split / path.parent / name).as_posix()


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a boolean mask's pixels."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return [float(x), float(y), float(w), float(h)]


def exact_segmentation(mask: np.ndarray, crowd: bool = False) -> Any:
    """COCO segmentation that pycocotools rasterises to exactly ``mask``: polygons where exact, else RLE."""
    height, width = mask.shape
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    local = mask[y:y + h, x:x + w]
    seg, _ = segmentation_of(local, y, x, height, width, "rle" if crowd else "polygon")
    if isinstance(seg, list) and not np.array_equal(annotation_mask({"segmentation": seg}, height, width), mask):
        seg, _ = segmentation_of(local, y, x, height, width, "rle")
    return seg


def instance_map(anns: list[dict], masks: dict[int, np.ndarray], height: int, width: int) -> np.ndarray:
    """uint16 label map of an image's annotations (``1000 + index``, larger painted first, smaller on top).

    The context-crop rule of :func:`instsynth.stages.pasting.choose_context_crop` reads this map."""
    labels = np.zeros((height, width), np.uint16)
    order = sorted(range(len(anns)), key=lambda j: -int(masks[anns[j]["id"]].sum()))
    for j in order:
        labels[masks[anns[j]["id"]]] = 1000 + j
    return labels


def panorama_annotations(anns: list[dict], pasted_id: int) -> list[dict]:
    """Copies of every source annotation (segmentation unchanged), without ids."""
    return [{**{k: v for k, v in a.items() if k not in ("id", "image_id")},
             "source_annotation_id": a["id"], "pasted": a["id"] == pasted_id} for a in anns]


def crop_annotations(anns: list[dict], masks: dict[int, np.ndarray], box, size, pasted_id: int) -> list[dict]:
    """Every annotation that survives ``box`` resized to ``size``, with exact segmentations, without ids."""
    out = []
    for a in anns:
        mask = crop_resize_labels(masks[a["id"]].view(np.uint8), box, size).astype(bool)
        if not mask.any():
            continue
        crowd = bool(a.get("iscrowd", 0))
        out.append({"segmentation": exact_segmentation(mask, crowd), "area": int(mask.sum()), "bbox": mask_bbox(mask),
                    "iscrowd": int(crowd), "category_id": a["category_id"], "source_annotation_id": a["id"],
                    "pasted": a["id"] == pasted_id})
    return out


def inherited_fields(src: dict, anns: list[dict]) -> dict:
    """The LVIS image fields a new image keeps from its source image; a category annotated in the new
    image (pasted there) is no longer one of its ``neg_category_ids``."""
    fields = {k: src[k] for k in LVIS_IMAGE_FIELDS if k in src}
    present = {a["category_id"] for a in anns}
    if isinstance(fields.get("neg_category_ids"), list) and present & set(fields["neg_category_ids"]):
        fields["neg_category_ids"] = [c for c in fields["neg_category_ids"] if c not in present]
    return fields


def merge_coco(source: Any, entries: list[dict], info: dict) -> dict:
    """The source file (a :class:`~instsynth.formats.coco.CocoSource`: its valid images and annotations
    untouched) plus the new images and annotations.

    New ids count up from the source's largest image / annotation id, in entry order."""
    data = source.data
    kept_images = {img["id"] for img in source.images}
    kept_anns = {a["id"] for anns in source.annotations.values() for a in anns}
    images = [img for img in data["images"] if img.get("id") in kept_images]
    annotations = [a for a in data["annotations"] if isinstance(a, dict) and a.get("id") in kept_anns]
    by_id = {img["id"]: img for img in images}
    next_image = max((i["id"] for i in data["images"]), default=0) + 1
    next_ann = max((a["id"] for a in data["annotations"]), default=0) + 1
    info = {**info, "first_synthetic_image_id": next_image if entries else None,
            "first_synthetic_annotation_id": next_ann if entries else None}
    for entry in entries:
        src = by_id[entry["source_image_id"]]
        images.append({"id": next_image, "file_name": entry["file_name"], "width": entry["width"],
                       "height": entry["height"], **inherited_fields(src, entry["annotations"]),
                       "source_image_id": src["id"]})
        for ann in entry["annotations"]:
            annotations.append({"id": next_ann, "image_id": next_image, **ann})
            next_ann += 1
        next_image += 1
    rest = {k: v for k, v in data.items() if k not in ("info", "images", "annotations")}
    source_info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return {"info": {**source_info, "instsynth": info}, **rest, "images": images, "annotations": annotations}
