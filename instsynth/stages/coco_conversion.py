"""Stage 5: Cityscapes instanceIds -> Cityscapes ``_gtFine_polygons.json`` and COCO instance JSON.

For every image under ``DIR/gtFine/<split>/<city>/`` (original and ``*_syn`` folders) the
``_gtFine_instanceIds.png`` is the one source of truth for instances; an existing polygons.json is
never read for COCO. Per split it writes

- ``DIR/annotations/instancesonly_filtered_gtFine_<split>.json`` (COCO instances),
- ``DIR/annotations/conversion_report_<split>.json`` (counts per class, dropped instances, skipped images),
- ``_gtFine_polygons.json`` next to each instanceIds PNG that has none (synthetic images).

Polygons trace pixel *edges*: each mask is upsampled x2 so that the left/right (top/bottom) boundary
pixels of every source pixel are distinct, its contour is traced with OpenCV and every contour point
``c`` is mapped to the pixel corner ``(c + 1) // 2``. pycocotools rasterises such a polygon back to
exactly the source pixels. Every external contour becomes one polygon (split instances keep all
parts); an instance with a hole is written as RLE so the hole is never filled; group regions
(thing ids < 1000) are ``iscrowd: 1`` RLE. Source files are never modified. Every leftImg8bit PNG
is decoded once (as training will read it), so an image damaged anywhere is reported here, by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from instsynth.core.imageops import (corner_polygons, rle_encode, segmentation_of)  # noqa: F401 (names of this module too)
from instsynth.core.parallel import ordered_map
from instsynth.core.io import (CityscapesImage, InstSynthError, default_workers, get_logger, iter_cityscapes_images,
                               progress, read_json, read_png, report_generated_images, write_json)
from instsynth.core.labels import (EVAL_THING_CLASSES, THING_CLASSES, THING_LABEL_IDS, class_name, decode_instance_id,
                                   label_id)

FORMATS = ("polygon", "rle")
MIN_THING_VALUE = min(THING_LABEL_IDS)
"""instanceIds values >= this are thing pixels (group regions 24..33, instances >= 24000)."""
MAX_LABEL_ID = max(THING_LABEL_IDS)

log = get_logger("instsynth.coco")


def coco_json_path(datadir: str | Path, split: str) -> Path:
    return Path(datadir) / "annotations" / f"instancesonly_filtered_gtFine_{split}.json"


def report_path(datadir: str | Path, split: str) -> Path:
    return Path(datadir) / "annotations" / f"conversion_report_{split}.json"


def coco_categories(include_ignored: bool = False) -> list[dict]:
    """COCO categories: the 8 evaluated thing classes (+ caravan, trailer); id = Cityscapes label id."""
    names = THING_CLASSES if include_ignored else EVAL_THING_CLASSES
    return [{"id": label_id(n), "name": n, "supercategory": "thing"} for n in names]


# --------------------------------------------------------------------------- mask geometry
def centre_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours through boundary-pixel centres (Cityscapes polygons.json convention)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # 1- and 2-point contours (one pixel, a thin line) are closed to 3 points so that PIL can draw them
    return [c[:, 0, :] if len(c) >= 3 else np.resize(c[:, 0, :], (3, 2)) for c in contours]


# --------------------------------------------------------------------------- per image
@dataclass(frozen=True)
class ConversionOptions:
    fmt: str = "polygon"
    category_ids: frozenset = frozenset(label_id(n) for n in EVAL_THING_CLASSES)
    min_area: int = 4
    write_polygons: bool = True
    skip_bad: bool = False


def _check_left(image: CityscapesImage, shape: tuple[int, int]) -> None:
    """Decode the image's leftImg8bit PNG once, as training will, and check its size against ``shape``
    (height, width): a file damaged anywhere (not only its header or end) raises InstSynthError here."""
    if not image.left.is_file():
        raise InstSynthError(image.left, "file not found (every annotated image needs its leftImg8bit PNG)")
    left = read_png(image.left, rgb=True, bgr=True)
    if left.shape[:2] != shape:
        raise InstSynthError(image.left, f"size {left.shape[1]}x{left.shape[0]} does not match "
                                         f"{image.gt('instanceIds').name} ({shape[1]}x{shape[0]})")


def _check_polygons_json(path: Path) -> None:
    data = read_json(path)
    if not isinstance(data, dict) or not {"imgHeight", "imgWidth", "objects"} <= set(data):
        raise InstSynthError(path, "not a Cityscapes polygons file (needs imgHeight, imgWidth, objects)")


def _cityscapes_label(value: int) -> str:
    lab, index = decode_instance_id(value)
    name = class_name(lab)
    return name if index is not None or lab not in THING_LABEL_IDS else name + "group"


def polygons_json(instance_ids: np.ndarray, regions: dict[int, tuple]) -> dict:
    """Cityscapes polygons.json content of an instanceIds map (stuff and things, larger objects first).

    ``regions`` maps each value present to its bounding slices (see :func:`image_regions`).
    Cityscapes draws objects in order with no holes, so objects are ordered by decreasing area: what
    fills another object's hole is smaller and is drawn later. Label 0 (unlabeled) has no region.
    """
    objects = []
    for value, sl in regions.items():
        local = instance_ids[sl] == value
        area = int(np.count_nonzero(local))
        offset = np.array([sl[1].start, sl[0].start])
        for poly in centre_polygons(local):
            objects.append((area, value, {"label": _cityscapes_label(value), "polygon": (poly + offset).tolist()}))
    objects.sort(key=lambda o: (-o[0], o[1]))
    h, w = instance_ids.shape
    return {"imgHeight": int(h), "imgWidth": int(w), "objects": [o[2] for o in objects]}


def image_regions(instance_ids: np.ndarray, path: Path) -> dict[int, tuple]:
    """``{value: (row slice, column slice)}`` of every nonzero value in an instanceIds map, in value order.

    Raises InstSynthError (naming ``path``) for a value that is neither a label id nor a thing instance.
    """
    slices = ndimage.find_objects(instance_ids) if instance_ids.max() > 0 else []
    regions = {value: sl for value, sl in enumerate(slices, start=1) if sl is not None}
    for value in regions:
        if MAX_LABEL_ID < value and decode_instance_id(value)[0] not in THING_LABEL_IDS:
            raise InstSynthError(path, f"value {value} is neither a Cityscapes label id nor a thing instance id")
    return regions


def convert_image(image: CityscapesImage, options: ConversionOptions) -> dict:
    """COCO annotations (without ids) of one image, plus what was dropped and written.

    Returns ``{"file_name", "height", "width", "annotations", "dropped", "polygons_written",
    "holes_as_rle"}``; with ``options.skip_bad`` bad input returns ``{"skipped": reason, "image"}`` instead.
    """
    try:
        return _convert_image(image, options)
    except InstSynthError as exc:
        if not options.skip_bad:
            raise
        return {"skipped": str(exc), "image": image.relative(image.gt("instanceIds"))}


def _read_instance_ids(image: CityscapesImage) -> np.ndarray:
    """The image's instanceIds map, after decoding its leftImg8bit PNG and checking any existing polygons.json."""
    inst_path = image.gt("instanceIds")
    instance_ids = read_png(inst_path, dtype=np.uint16)
    if instance_ids.ndim != 2:
        raise InstSynthError(inst_path, f"expected a single-channel instanceIds PNG, found shape {instance_ids.shape}")
    _check_left(image, instance_ids.shape)
    if image.gt("polygons").exists():
        _check_polygons_json(image.gt("polygons"))
    return instance_ids


def _convert_image(image: CityscapesImage, options: ConversionOptions) -> dict:
    instance_ids = _read_instance_ids(image)
    regions = image_regions(instance_ids, image.gt("instanceIds"))
    height, width = instance_ids.shape
    file_name = f"{image.city}/{image.left.name}"
    anns, dropped, holes = [], [], 0
    for value, sl in regions.items():
        if value < MIN_THING_VALUE:
            continue
        lab, index = decode_instance_id(value)
        local = instance_ids[sl] == value
        area, crowd = int(np.count_nonzero(local)), index is None
        info = {"image": file_name, "instance_id": value, "class": class_name(lab), "iscrowd": int(crowd), "area": area}
        if lab not in options.category_ids:
            dropped.append({**info, "reason": "class not in categories (see --include-ignored)"})
            continue
        if area < options.min_area:
            dropped.append({**info, "reason": f"area {area} < min_area {options.min_area}"})
            continue
        top, left = sl[0].start, sl[1].start
        segmentation, has_holes = segmentation_of(local, top, left, height, width, "rle" if crowd else options.fmt)
        holes += has_holes
        bbox = [float(left), float(top), float(sl[1].stop - left), float(sl[0].stop - top)]
        anns.append({"category_id": int(lab), "segmentation": segmentation, "area": area, "bbox": bbox,
                     "iscrowd": int(crowd), "instance_id": int(value)})
    written = options.write_polygons and not image.gt("polygons").exists()
    if written:
        write_json(image.gt("polygons"), polygons_json(instance_ids, regions), indent=None)
    return {"file_name": file_name, "height": int(height), "width": int(width), "annotations": anns,
            "dropped": dropped, "polygons_written": written, "holes_as_rle": holes}


# --------------------------------------------------------------------------- per split
def _convert_in_worker(args) -> dict:
    """convert_image for a worker process; InstSynthError travels back as data (it does not unpickle)."""
    try:
        return convert_image(*args)
    except InstSynthError as exc:
        return {"error": (str(exc.path), exc.problem)}


def _raise_errors(results):
    for result in results:
        if "error" in result:
            raise InstSynthError(*result["error"])
        yield result


def _map_images(images: list[CityscapesImage], options: ConversionOptions, workers: int, desc: str) -> list[dict]:
    """convert_image results in image order, computed by ``workers`` processes when > 1."""
    chunksize = max(1, min(16, len(images) // (max(1, workers) * 4)))
    jobs = ordered_map(_convert_in_worker, [(image, options) for image in images], workers, chunksize)
    return list(_raise_errors(progress(jobs, desc, total=len(images))))


def convert_split(datadir: str | Path, split: str, options: ConversionOptions, categories: list[dict],
                  workers: int) -> Path:
    """Convert one split; write its COCO JSON and conversion report; return the COCO JSON path."""
    datadir = Path(datadir)
    images = iter_cityscapes_images(datadir, split, include_generated=True)
    coco_images, coco_anns, dropped, skipped = [], [], [], []
    polygons_written = holes = 0
    names = {c["id"]: c["name"] for c in categories}
    counts = {n: {"instances": 0, "crowd": 0} for n in names.values()}
    for result in _map_images(images, options, workers, f"COCO {split}"):
        if "skipped" in result:
            skipped.append({"image": result["image"], "reason": result["skipped"]})
            continue
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": result["file_name"], "width": result["width"],
                            "height": result["height"]})
        for ann in result["annotations"]:
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id, **ann})
            counts[names[ann["category_id"]]]["crowd" if ann["iscrowd"] else "instances"] += 1
        dropped += result["dropped"]
        polygons_written += result["polygons_written"]
        holes += result["holes_as_rle"]
    coco = {"info": {"description": f"Cityscapes instances, split {split} (InstSynth stage 5)",
                     "version": "1.0"},
            "licenses": [], "images": coco_images, "annotations": coco_anns, "categories": categories}
    out = write_json(coco_json_path(datadir, split), coco, indent=None)
    report = {"version": 1, "datadir": str(datadir.resolve()), "split": split, "format": options.fmt,
              "min_area": options.min_area, "categories": [c["name"] for c in categories],
              "images": len(coco_images), "annotations": len(coco_anns), "counts": counts,
              "instances_with_holes_written_as_rle": holes, "polygons_json_written": polygons_written,
              "num_dropped": len(dropped), "num_skipped_images": len(skipped),
              "dropped": dropped, "skipped_images": skipped}
    write_json(report_path(datadir, split), report)
    log.info("%s: %d images, %d annotations, %d dropped, %d skipped images -> %s", split, len(coco_images),
             len(coco_anns), len(dropped), len(skipped), out)
    return out


def convert_cityscapes_to_coco(datadir: str | Path, splits=("train", "val"), fmt: str = "polygon",
                               include_ignored: bool = False, min_area: int = 4, workers: int | None = None,
                               skip_bad: bool = False, write_polygons: bool = True) -> dict[str, Path]:
    """Convert every image of ``DIR/gtFine/<split>/`` (original and ``_syn`` cities) to COCO.

    Returns ``{split: DIR/annotations/instancesonly_filtered_gtFine_<split>.json}``. Bad input
    (missing leftImg8bit, corrupt PNG, unreadable existing polygons.json) raises InstSynthError
    naming the file; with ``skip_bad`` the image is left out and listed in the split's report.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}")
    categories = coco_categories(include_ignored)
    options = ConversionOptions(fmt=fmt, category_ids=frozenset(c["id"] for c in categories), min_area=min_area,
                                write_polygons=write_polygons, skip_bad=skip_bad)
    workers = default_workers() if workers is None else max(1, int(workers))
    report_generated_images(log, datadir, splits, "stage 5")
    return {split: convert_split(datadir, split, options, categories, workers) for split in splits}
