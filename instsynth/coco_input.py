"""Stage 1 on your own dataset: read a COCO / LVIS instance-segmentation file, select and crop instances.

``select_coco_instances(coco_json, images_dir, ...)`` is :func:`instsynth.selection.select_instances`
for a COCO-format dataset: per image the k largest non-crowd annotations of the chosen categories
(by rasterised pixel count, ties broken by the smaller annotation id, at least ``min_area`` pixels)
get the same square crop box and the same two crop PNGs, and the same ``metadata.json``,
``cropped_region_coordinates.json`` and ``selection_report.json`` are written. Segmentations may be
polygons, uncompressed RLE (``counts`` a list) or compressed RLE (``counts`` a string); images may
have any size and format OpenCV reads and lie in nested folders; categories come from the file.
LVIS files (categories with ``synonyms``, ``def``, ``frequency``; images with
``not_exhaustive_category_ids``) are read the same way, and ``frequency`` selects categories by
LVIS frequency (``r``, ``c``, ``f``).

In a COCO ``metadata.json`` (``"format": "coco"``) an instance's ``instance_id`` is its annotation
id, ``label_id`` its category id, ``class`` the category name, ``image_id`` the image file's stem,
``city`` the image's folder relative to ``images_dir`` (``images`` at the top level), ``image`` its
``file_name`` and ``coco_image_id`` the image's id in the file; the key is ``<stem>_<annotation id>``.

The file is checked before any work: duplicate image / annotation / category ids, annotations that
point to an unknown image or category, polygons with fewer than 3 points, RLE of another size, boxes
outside their image and missing image files raise an InstSynthError naming the file and the id; with
``skip_bad`` the offending annotation (or image) is left out and counted in selection_report.json.
The source JSON and images are only read.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .formats.coco import (BOX_TOLERANCE, LVIS_FREQUENCIES, TOP_LEVEL_FOLDER, CocoSource,  # noqa: F401 (names kept)
                           _annotation_problem, _read_image, annotation_mask, image_location, load_coco_source,
                           segmentation_rle, select_categories)
from .io import InstSynthError, default_workers, get_logger, progress, write_if_changed
from .parallel import ordered_map
from .selection import (CROPS_DIR, DEFAULT_MIN_AREA, METADATA_VERSION, SKIP_REASONS, ImageResult,
                        SelectionSummary, encode_crop, square_crop_box, write_selection)

COCO_FORMAT = "coco"
"""Value of ``format`` in a metadata.json written from a COCO file (Cityscapes metadata has none)."""

log = get_logger("instsynth.coco_input")


# --------------------------------------------------------------------------- per image
@dataclass(frozen=True)
class CocoParams:
    """What to select in a COCO dataset: the k largest annotations of ``category_ids``."""

    k: int
    category_ids: tuple[int, ...]
    min_area: int
    context: float


def rank_annotations(areas: dict[int, int], anns: list[dict], params: CocoParams
                     ) -> tuple[list[tuple[dict, int]], Counter]:
    """The selected ``[(annotation, area), ...]`` (largest first, ties by id) and skip counts by reason.

    ``areas``: rasterised pixel count of every non-crowd annotation of the chosen categories."""
    skipped = Counter()
    candidates = []
    for ann in anns:
        if ann.get("iscrowd", 0):
            skipped["group_region"] += 1
        elif ann["category_id"] not in params.category_ids:
            skipped["class_not_selected"] += 1
        else:
            area = areas[ann["id"]]
            if area < max(params.min_area, 1):
                skipped["below_min_area"] += 1
            else:
                candidates.append((ann, area))
    candidates.sort(key=lambda pair: (-pair[1], pair[0]["id"]))
    skipped["beyond_k"] = max(0, len(candidates) - params.k)
    return candidates[: params.k], skipped


def select_in_coco_image(img: dict, anns: list[dict], images_dir: Path, split: str, params: CocoParams,
                         categories: dict[int, str], out: Path) -> ImageResult:
    """Select, crop and write the instances of one COCO image; returns their metadata entries."""
    city, stem = image_location(img["file_name"])
    height, width = img["height"], img["width"]
    wanted = [a for a in anns if not a.get("iscrowd", 0) and a["category_id"] in params.category_ids]
    rles = {a["id"]: segmentation_rle(a["segmentation"], height, width) for a in wanted}
    areas = {i: int(mask_utils.area(rle)) for i, rle in rles.items()}  # pixel counts without decoding
    chosen, skipped = rank_annotations(areas, anns, params)
    result = ImageResult(stem, skipped=skipped)
    if not chosen:
        return result
    bgr = _read_image(images_dir / img["file_name"], img)
    for ann, area in chosen:
        mask = mask_utils.decode(rles[ann["id"]]).astype(bool)  # only the chosen ones are decoded
        x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
        bbox = (x, y, x + w, y + h)
        x0, y0, x1, y1 = crop = square_crop_box(bbox, width, height, params.context)
        key = f"{stem}_{ann['id']}"
        folder = f"{CROPS_DIR}/{split}/{city}_syn"
        rgb_rel, mask_rel = f"{folder}/{key}_rgb.png", f"{folder}/{key}_mask.png"
        result.crops_written += write_if_changed(out / rgb_rel, encode_crop(bgr[y0:y1, x0:x1]))
        result.crops_written += write_if_changed(out / mask_rel, encode_crop(mask[y0:y1, x0:x1].astype(np.uint8) * 255))
        result.instances.append({
            "key": key, "image_id": stem, "city": city, "instance_id": int(ann["id"]),
            "label_id": int(ann["category_id"]), "class": categories[ann["category_id"]], "area": area,
            "bbox": list(map(int, bbox)), "crop_box": list(map(int, crop)), "image": img["file_name"],
            "coco_image_id": int(img["id"]), "crop_rgb": rgb_rel, "crop_mask": mask_rel})
    return result


def _select_task(task: tuple) -> ImageResult:
    """Worker entry point: bad input becomes ``ImageResult.error``."""
    try:
        return select_in_coco_image(*task)
    except InstSynthError as exc:
        return ImageResult(image_location(task[0]["file_name"])[1], error=(str(exc.path), exc.problem))


# --------------------------------------------------------------------------- the stage
def default_out(coco_json: str | os.PathLike, split: str) -> Path:
    """Default output folder of stage 1 on a COCO file: ``<folder of the JSON>/instsynth_<split>``."""
    return Path(coco_json).resolve().parent / f"instsynth_{split}"


def select_coco_instances(coco_json: str | os.PathLike, images_dir: str | os.PathLike, split: str = "train",
                          k: int = 3, classes: Sequence[str] | None = None, frequency: Sequence[str] | None = None,
                          min_area: int = DEFAULT_MIN_AREA, context: float = 1.0,
                          out: str | os.PathLike | None = None, workers: int | None = None,
                          skip_bad: bool = False) -> SelectionSummary:
    """Run stage 1 on a COCO / LVIS file; write crops and the three JSON files to ``out``.

    ``out`` defaults to :func:`default_out`. Bad input raises InstSynthError naming the file and id;
    with ``skip_bad`` bad annotations, images and unreadable image files are skipped and listed in
    ``selection_report.json``. The JSON files are written only after every image was handled.
    """
    if not isinstance(k, int) or k < 1:
        raise InstSynthError(coco_json, f"k must be an integer >= 1, got {k!r}")
    if min_area < 0 or not context >= 1.0:
        raise InstSynthError(coco_json, f"min_area must be >= 0 and context >= 1.0, got {min_area}, {context}")
    source = load_coco_source(coco_json, images_dir, skip_bad)
    if not source.images:
        raise InstSynthError(source.json_path, "no image listed (empty dataset?)")
    params = CocoParams(k, select_categories(source, classes, frequency), int(min_area), float(context))
    out = Path(out).resolve() if out is not None else default_out(source.json_path, split)
    names = {i: c["name"] for i, c in source.categories.items()}
    tasks = [(img, source.annotations[img["id"]], source.images_dir, split, params, names, out) for img in source.images]
    workers = default_workers() if workers is None else max(1, int(workers))

    instances, bad_images, without, fewer = [], [], [], 0
    skipped = Counter(dict.fromkeys(SKIP_REASONS, 0))
    crops_written = 0
    results = ordered_map(_select_task, tasks, workers)
    with contextlib.closing(results):
        for img, result in zip(source.images, progress(results, "stage 1: selecting", len(tasks))):
            if result.error is not None:
                path, problem = result.error
                if not skip_bad:
                    raise InstSynthError(path, problem)
                log.warning("skipping image id %s: %s: %s", img["id"], path, problem)
                bad_images.append({"image_id": img["id"], "path": path, "problem": problem})
                continue
            instances += result.instances
            skipped.update(result.skipped)
            crops_written += result.crops_written
            fewer += len(result.instances) < params.k
            if not result.instances:
                without.append(img["file_name"])

    header = {"version": METADATA_VERSION, "format": COCO_FORMAT, "dataset_root": str(source.images_dir),
              "split": split, "coco_json": str(source.json_path)}
    metadata = {**header, "k": k, "categories": [source.categories[i] for i in sorted(source.categories)],
                "instances": instances}
    coordinates = [{"key": i["key"], "cropped_instance_mask": i["crop_mask"], "bbox_coordinate": i["crop_box"]}
                   for i in instances]
    report = {**header, "params": {"k": k, "classes": [names[i] for i in params.category_ids],
                                   "frequency": list(frequency or []), "min_area": params.min_area,
                                   "context": params.context},
              "images_seen": len(source.images), "images_with_instances": len(source.images) - len(bad_images) - len(without),
              "instances_selected": len(instances), "images_with_fewer_than_k": fewer,
              "images_without_instances": without, "instances_skipped": dict(skipped),
              "bad_images": bad_images, "bad_annotations": [b for b in source.bad if b["kind"] == "annotation"],
              "bad_image_entries": [b for b in source.bad if b["kind"] == "image"]}
    paths, stale = write_selection(out, metadata, coordinates, report)
    log.info("stage 1 (COCO): %d instances from %d images (%d crop files written, %d bad items) -> %s",
             len(instances), len(source.images), crops_written, len(source.bad) + len(bad_images), paths[0])
    return SelectionSummary(*paths, images=len(source.images), instances=len(instances), crops_written=crops_written,
                            bad_images=len(bad_images) + len(source.bad), stale_removed=len(stale))


def is_coco_metadata(meta: dict) -> bool:
    """True for a metadata.json written by :func:`select_coco_instances`."""
    return meta.get("format") == COCO_FORMAT
