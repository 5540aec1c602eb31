"""Stage 1: pick the k largest thing instances of every image and cut a square crop around each.

For every ``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` (city folders written by InstSynth,
``*_syn`` / ``*_inpainted``, are skipped) the k largest instances (id >= 1000, of the chosen thing
classes, area >= ``min_area``) are selected by pixel count, ties broken by the smaller instance id.
Each gets a square crop box (side ``ceil(max(box w, box h) * context)``) centred on its box and
shifted to lie inside the image; only when the image is smaller than the square is the box clamped
(and then not square). Per instance two PNGs are written under ``<out>/crops/<split>/<city>_syn/``:
``<key>_rgb.png`` (RGB crop of leftImg8bit) and ``<key>_mask.png`` (0/255, exactly that instance's
pixels), with ``key = <image_id>_<instance_id>``.

Each image is decoded once: one histogram of the instanceIds map gives every area; each selected
instance's box comes from one vectorised compare plus ``cv2.boundingRect``, and all further work is
local to that box. Crops are PNGs encoded for speed: RGB crops are stored without deflate (about
10x faster to write than zlib level 1, files about 1.5x larger: these are intermediate files), masks
with run-length deflate (a few kB each). Images are processed by worker processes in order, so the output does
not depend on ``workers``. Reruns rewrite only files whose bytes would change and remove the crops
an earlier run of the same split listed but this one does not; the three JSON files
(``metadata.json``, ``cropped_region_coordinates.json``, ``selection_report.json``) are written
atomically, after every image was handled.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from .formats.cityscapes import COORDINATES_NAME, pixel_counts
from .parallel import ordered_map
from .io import (CityscapesImage, InstSynthError, default_workers, get_logger, image_id_of,
                 iter_cityscapes_images, progress, read_json, read_png, write_if_changed)
from .labels import INSTANCE_ID_OFFSET, THING_CLASSES, THING_LABEL_IDS, class_name, label_id

METADATA_VERSION = 1
METADATA_NAME = "metadata.json"
REPORT_NAME = "selection_report.json"
CROPS_DIR = "crops"
DEFAULT_MIN_AREA = 64
"""Instances smaller than this many pixels (an 8x8 patch) are too small to regenerate usefully."""

SKIP_REASONS = ("group_region", "class_not_selected", "below_min_area", "beyond_k")
"""Why a thing region of an image was not selected (counted in selection_report.json)."""

_INSTANCE_FIELDS = {"key": str, "image_id": str, "city": str, "instance_id": int, "label_id": int,
                    "class": str, "area": int, "bbox": list, "crop_box": list, "image": str,
                    "instance_ids": str, "crop_rgb": str, "crop_mask": str}
_COCO_INSTANCE_FIELDS = {**{k: v for k, v in _INSTANCE_FIELDS.items() if k != "instance_ids"}, "coco_image_id": int}
"""Fields of an instance of a COCO-format metadata.json (``"format": "coco"``, see instsynth.coco_input)."""

log = get_logger("instsynth.selection")


@dataclass(frozen=True)
class SelectionParams:
    """What to select: the k largest instances of ``label_ids`` with at least ``min_area`` pixels."""

    k: int = 3
    label_ids: tuple[int, ...] = THING_LABEL_IDS
    min_area: int = DEFAULT_MIN_AREA
    context: float = 1.0
    k_per_class: tuple[tuple[int, int], ...] = ()  # (label id, k) of classes with their own budget

    def k_of(self, label: int) -> int:
        """Instances per image of class ``label``: one of the k_c largest of its image (default k)."""
        return dict(self.k_per_class).get(label, self.k)

    def as_json(self) -> dict:
        extra = {"k_per_class": {class_name(i): k for i, k in self.k_per_class}} if self.k_per_class else {}
        return {"k": self.k, "classes": [class_name(i) for i in self.label_ids],
                "min_area": self.min_area, "context": self.context, **extra}


@dataclass
class ImageResult:
    """What one worker found in one image (or the error that stopped it)."""

    image_id: str
    instances: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    class_counts: Counter = field(default_factory=Counter)  # instances per selected class, any area
    crops_written: int = 0
    error: tuple[str, str] | None = None  # (path, problem)


@dataclass
class SelectionSummary:
    """Where stage 1 wrote its files and what it did."""

    metadata: Path
    coordinates: Path
    report: Path
    images: int
    instances: int
    crops_written: int
    bad_images: int
    stale_removed: int = 0


# --------------------------------------------------------------------------- per-image steps
def read_image_pair(image: CityscapesImage) -> tuple[np.ndarray, np.ndarray]:
    """(instanceIds uint16 HxW, leftImg8bit HxWx3 in OpenCV's BGR order) of one image, validated.

    BGR: the stage only cuts crops and re-encodes them with OpenCV, so no colour conversion is needed."""
    ids_path = image.gt("instanceIds")
    instance_ids = read_png(ids_path, dtype=np.uint16)
    if instance_ids.ndim != 2:
        raise InstSynthError(ids_path, f"expected a single-channel instanceIds image, found {instance_ids.shape[2]} channels")
    bgr = read_png(image.left, rgb=True, bgr=True)
    if bgr.shape[:2] != instance_ids.shape:
        (h, w), (lh, lw) = instance_ids.shape, bgr.shape[:2]
        raise InstSynthError(ids_path, f"size {w}x{h} differs from its image {image.left} ({lw}x{lh})")
    return instance_ids, bgr


def rank_instances(instance_ids: np.ndarray, params: SelectionParams) -> tuple[list[tuple[int, int]], Counter]:
    """The selected ``[(instance id, area), ...]`` (largest first, ties by id) and skip counts by reason."""
    counts = pixel_counts(instance_ids)
    present = np.flatnonzero(counts)
    values, areas = present[present >= INSTANCE_ID_OFFSET], counts[present[present >= INSTANCE_ID_OFFSET]]
    skipped = Counter(group_region=int(np.isin(present, THING_LABEL_IDS).sum()))
    wanted = np.isin(values // INSTANCE_ID_OFFSET, params.label_ids)
    skipped["class_not_selected"] = int((~wanted).sum())
    big = areas >= params.min_area
    skipped["below_min_area"] = int((wanted & ~big).sum())
    values, areas = values[wanted & big], areas[wanted & big]
    order = np.lexsort((values, -areas))  # area descending, then id ascending
    if params.k_per_class:  # an instance of class c is kept when it is among the k_c largest
        limits = np.array([params.k_of(int(v) // INSTANCE_ID_OFFSET) for v in values[order]], dtype=np.int64)
        chosen = order[np.arange(len(order)) < limits]
    else:
        chosen = order[: params.k]
    skipped["beyond_k"] = len(order) - len(chosen)
    return [(int(values[i]), int(areas[i])) for i in chosen], skipped


def class_counts(instance_ids: np.ndarray, params: SelectionParams) -> Counter:
    """Instances (ids >= 1000, any area) per selected class name in one instanceIds map."""
    present = np.flatnonzero(pixel_counts(instance_ids))
    labels = present[present >= INSTANCE_ID_OFFSET] // INSTANCE_ID_OFFSET
    return Counter(class_name(int(lab)) for lab in labels if lab in params.label_ids)


def instance_box(instance_ids: np.ndarray, value: int) -> tuple[int, int, int, int]:
    """Half-open box (x0, y0, x1, y1) of the pixels equal to ``value`` (which must occur)."""
    x, y, w, h = cv2.boundingRect((instance_ids == value).view(np.uint8))
    return x, y, x + w, y + h


def square_crop_box(bbox: Sequence[int], width: int, height: int, context: float = 1.0) -> tuple[int, int, int, int]:
    """Square box of side ``ceil(max(w, h) * context)`` centred on ``bbox``, shifted inside the image.

    Where the image is smaller than the square, that side is clamped to the image (not square then).
    """
    x0, y0, x1, y1 = bbox
    side = math.ceil(max(x1 - x0, y1 - y0) * context - 1e-9)

    def place(lo: int, hi: int, size: int) -> tuple[int, int]:
        extent = min(side, size)
        start = lo - (extent - (hi - lo)) // 2
        start = min(max(start, 0), size - extent)
        return start, start + extent

    (cx0, cx1), (cy0, cy1) = place(x0, x1, width), place(y0, y1, height)
    return cx0, cy0, cx1, cy1


def crop_paths(image: CityscapesImage, key: str) -> tuple[str, str]:
    """(crop_rgb, crop_mask) paths of an instance, relative to the output folder."""
    folder = f"{CROPS_DIR}/{image.split}/{image.city}_syn"
    return f"{folder}/{key}_rgb.png", f"{folder}/{key}_mask.png"


_NO_FILTER = (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE) if hasattr(cv2, "IMWRITE_PNG_FILTER") else ()
_PNG_PARAMS = {  # by channel count: stored (no deflate) for RGB photos, run-length deflate for 0/255 masks
    3: [cv2.IMWRITE_PNG_COMPRESSION, 0, *_NO_FILTER],
    1: [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE, *_NO_FILTER],
}


def encode_crop(image: np.ndarray) -> bytes:
    """PNG bytes of a BGR (H, W, 3) or mask (H, W) uint8 crop, encoded for speed (see the module docstring)."""
    channels = 3 if image.ndim == 3 else 1
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), _PNG_PARAMS[channels])
    if not ok:  # pragma: no cover - OpenCV failure
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def select_in_image(image: CityscapesImage, params: SelectionParams, out: Path) -> ImageResult:
    """Select, crop and write the instances of one image; returns their metadata entries."""
    instance_ids, bgr = read_image_pair(image)
    height, width = instance_ids.shape
    chosen, skipped = rank_instances(instance_ids, params)
    result = ImageResult(image.image_id, skipped=skipped, class_counts=class_counts(instance_ids, params))
    if not chosen:
        return result
    for value, area in chosen:
        bbox = instance_box(instance_ids, value)
        crop = square_crop_box(bbox, width, height, params.context)
        x0, y0, x1, y1 = crop
        mask = (instance_ids[y0:y1, x0:x1] == value).astype(np.uint8) * 255
        key = f"{image.image_id}_{value}"
        rgb_rel, mask_rel = crop_paths(image, key)
        result.crops_written += write_if_changed(out / rgb_rel, encode_crop(bgr[y0:y1, x0:x1]))
        result.crops_written += write_if_changed(out / mask_rel, encode_crop(mask))
        result.instances.append({
            "key": key, "image_id": image.image_id, "city": image.city, "instance_id": value,
            "label_id": value // INSTANCE_ID_OFFSET, "class": class_name(value // INSTANCE_ID_OFFSET),
            "area": area, "bbox": list(map(int, bbox)), "crop_box": list(map(int, crop)),
            "image": image.relative(image.left), "instance_ids": image.relative(image.gt("instanceIds")),
            "crop_rgb": rgb_rel, "crop_mask": mask_rel})
    return result


def _select_task(task: tuple[CityscapesImage, SelectionParams, Path]) -> ImageResult:
    """Worker entry point: bad input becomes ``ImageResult.error`` (the error type does not pickle)."""
    image = task[0]
    try:
        return select_in_image(*task)
    except InstSynthError as exc:
        return ImageResult(image.image_id, error=(str(exc.path), exc.problem))


# --------------------------------------------------------------------------- the stage
def make_params(root: Path, k: int = 3, classes: Sequence[str] | None = None,
                min_area: int = DEFAULT_MIN_AREA, context: float = 1.0) -> SelectionParams:
    """Validated :class:`SelectionParams`; bad values raise InstSynthError naming the dataset root."""
    if not isinstance(k, int) or k < 1:
        raise InstSynthError(root, f"k must be an integer >= 1, got {k!r}")
    if min_area < 0:
        raise InstSynthError(root, f"min_area must be >= 0, got {min_area}")
    if not context >= 1.0:
        raise InstSynthError(root, f"context must be >= 1.0 (the crop must contain the instance), got {context}")
    classes = list(THING_CLASSES) if not classes else list(dict.fromkeys(classes))
    unknown = [c for c in classes if c not in THING_CLASSES]
    if unknown:
        raise InstSynthError(root, f"unknown thing classes {unknown}; choose from {list(THING_CLASSES)}")
    ids = tuple(sorted(label_id(c) for c in classes))
    return SelectionParams(k=k, label_ids=ids, min_area=int(min_area), context=float(context))


def _iter_results(tasks: list, workers: int):
    return ordered_map(_select_task, tasks, workers)


def _count_task(task: tuple[CityscapesImage, SelectionParams]) -> Counter | tuple[str, str]:
    """Worker: the class counts of one image, or (path, problem)."""
    image, params = task
    try:
        return class_counts(read_png(image.gt("instanceIds"), dtype=np.uint16), params)
    except InstSynthError as exc:
        return str(exc.path), exc.problem


def split_class_counts(images: list[CityscapesImage], params: SelectionParams, workers: int,
                       skip_bad: bool) -> dict[str, int]:
    """Instances per selected class over the split (reads only the instanceIds maps)."""
    total = Counter()
    results = ordered_map(_count_task, [(image, params) for image in images], workers)
    with contextlib.closing(results):
        for result in progress(results, "stage 1: counting classes", len(images)):
            if isinstance(result, tuple):
                if not skip_bad:
                    raise InstSynthError(*result)
                continue
            total.update(result)
    return {class_name(i): total.get(class_name(i), 0) for i in params.label_ids}


def apply_budget(params: SelectionParams, budget: dict | None) -> SelectionParams:
    """``params`` with the per-class k of a resolved budget (:func:`instsynth.budget.class_budget`)."""
    if not budget:
        return params
    per_class = tuple((label_id(n), k) for n, k in budget["per_class"].items() if label_id(n) in params.label_ids)
    return SelectionParams(params.k, params.label_ids, params.min_area, params.context, tuple(sorted(per_class)))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


@dataclass
class _Gathered:
    """Results of all images, in image order."""

    instances: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    without_instances: list[str] = field(default_factory=list)
    fewer_than_k: int = 0
    skipped: Counter = field(default_factory=lambda: Counter(dict.fromkeys(SKIP_REASONS, 0)))
    crops_written: int = 0
    class_counts: Counter = field(default_factory=Counter)


def _gather(images: list[CityscapesImage], params: SelectionParams, out: Path, workers: int,
            skip_bad: bool) -> _Gathered:
    """Run every image; the first bad one raises unless ``skip_bad`` (then it is logged and listed)."""
    got = _Gathered()
    results = _iter_results([(image, params, out) for image in images], workers)
    with contextlib.closing(results):  # on error, stop the workers before the exception propagates
        for image, result in zip(images, progress(results, "stage 1: selecting", len(images))):
            if result.error is not None:
                path, problem = result.error
                if not skip_bad:
                    raise InstSynthError(path, problem)
                log.warning("skipping %s: %s: %s", image.image_id, path, problem)
                got.bad.append({"image_id": image.image_id, "path": path, "problem": problem})
                continue
            got.instances += result.instances
            got.skipped.update(result.skipped)
            got.class_counts.update(result.class_counts)
            got.crops_written += result.crops_written
            got.fewer_than_k += len(result.instances) < params.k
            if not result.instances:
                got.without_instances.append(image.image_id)
    return got


def select_instances(dataset_root: str | os.PathLike, split: str = "train", k: int = 3,
                     classes: Sequence[str] | None = None, min_area: int = DEFAULT_MIN_AREA,
                     context: float = 1.0, out: str | os.PathLike | None = None,
                     workers: int | None = None, skip_bad: bool = False,
                     k_per_class: str | dict | None = None, balance: str = "none",
                     balance_power: float | None = None, max_factor: float | None = None,
                     baseline_metrics: str | os.PathLike | None = None) -> SelectionSummary:
    """Run stage 1 on ``dataset_root/gtFine/<split>``; write crops and the three JSON files to ``out``.

    ``out`` defaults to the dataset root (as the paper's pipeline expects). Bad input raises
    InstSynthError naming the file; with ``skip_bad`` the image is skipped with a warning and listed
    in ``selection_report.json``. The JSON files are written only after every image was handled.
    Per-class budgets (:mod:`instsynth.budget`): ``k_per_class`` (``"truck=6,bus=6"``) and/or
    ``balance="inverse_freq"`` (from the split's instances per class, counted in a first pass) or
    ``balance="ap"`` (from the per-class AP of ``baseline_metrics``) let an
    instance of class c be selected when it is among the k_c largest of its image.
    """
    from .budget import DEFAULT_MAX_FACTOR, DEFAULT_POWER, class_budget

    root = Path(dataset_root).resolve()
    params = make_params(root, k, classes, min_area, context)
    out = Path(out).resolve() if out is not None else root
    images = iter_cityscapes_images(root, split)
    if not images:
        raise InstSynthError(root / "gtFine" / split, "no *_gtFine_instanceIds.png found (empty dataset?)")
    workers = default_workers() if workers is None else max(1, int(workers))
    counts = split_class_counts(images, params, workers, skip_bad) if balance == "inverse_freq" else None
    try:
        budget = class_budget(params.k, k_per_class, balance, counts, DEFAULT_POWER if balance_power is None
                              else balance_power, DEFAULT_MAX_FACTOR if max_factor is None else max_factor, "k_per_class",
                              baseline_metrics)
    except ValueError as exc:
        raise InstSynthError(root, str(exc)) from None
    params = apply_budget(params, budget)
    got = _gather(images, params, out, workers, skip_bad)

    header = {"version": METADATA_VERSION, "dataset_root": str(root), "split": split}
    per_class = {class_name(i): got.class_counts.get(class_name(i), 0) for i in params.label_ids}
    metadata = {**header, "k": params.k, "class_counts": per_class, **({"class_budget": budget} if budget else {}),
                "instances": got.instances}
    coordinates = [{"key": i["key"], "cropped_instance_mask": i["crop_mask"], "bbox_coordinate": i["crop_box"]}
                   for i in got.instances]
    report = {**header, "params": params.as_json(), "images_seen": len(images),
              "images_with_instances": len(images) - len(got.bad) - len(got.without_instances),
              "instances_selected": len(got.instances), "images_with_fewer_than_k": got.fewer_than_k,
              "instances_per_class": per_class,
              "selected_per_class": dict(Counter(i["class"] for i in got.instances)),
              "images_without_instances": got.without_instances, "instances_skipped": dict(got.skipped),
              "bad_images": got.bad}
    paths, stale = write_selection(out, metadata, coordinates, report)
    if not got.instances:
        log.warning("no instance selected in %s (split %s)", root, split)
    log.info("stage 1: %d instances from %d images (%d crop files written, %d stale removed, %d bad images) -> %s",
             len(got.instances), len(images), got.crops_written, len(stale), len(got.bad), paths[0])
    return SelectionSummary(*paths, images=len(images), instances=len(got.instances),
                            crops_written=got.crops_written, bad_images=len(got.bad), stale_removed=len(stale))


def write_selection(out: Path, metadata: dict, coordinates: list, report: dict) -> tuple[tuple[Path, ...], list[Path]]:
    """Write stage 1's three JSON files (unchanged ones untouched) and delete the crops no longer listed.

    Returns the paths (metadata, coordinates, report) and the stale crops removed."""
    paths = out / METADATA_NAME, out / COORDINATES_NAME, out / REPORT_NAME
    stale = stale_crops(paths[0], metadata)
    for path, obj in zip(paths, (metadata, coordinates, report)):
        write_if_changed(path, _json_bytes(obj))
    for path in stale:
        path.unlink(missing_ok=True)
    return paths, stale


def stale_crops(metadata_path: Path, metadata: dict) -> list[Path]:
    """Crop files listed by the previous metadata.json at ``metadata_path`` but not by ``metadata``.

    Only a previous run of the same dataset root and split counts (another split's crops are kept,
    with a warning that its metadata.json is being replaced); only files under ``crops/`` are listed.
    """
    try:
        previous = read_json(metadata_path)
        old = {(i["crop_rgb"], i["crop_mask"]) for i in previous["instances"]}
        same_run = (previous["dataset_root"], previous["split"]) == (metadata["dataset_root"], metadata["split"])
    except (InstSynthError, KeyError, TypeError):
        return []
    if not same_run:
        log.warning("%s: replacing the metadata of %s split %s", metadata_path, previous["dataset_root"], previous["split"])
        return []
    crops = (metadata_path.parent / CROPS_DIR).resolve()
    new = {(i["crop_rgb"], i["crop_mask"]) for i in metadata["instances"]}
    paths = [(metadata_path.parent / rel).resolve() for pair in sorted(old - new) for rel in pair]
    return [p for p in paths if p.is_relative_to(crops)]


# --------------------------------------------------------------------------- reading it back
def _check_box(path: Path, key: str, name: str, box: Any) -> None:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
            and box[0] < box[2] and box[1] < box[3] and min(box) >= 0):
        raise InstSynthError(path, f"instance {key!r}: {name} must be [x0, y0, x1, y1] with x0 < x1, y0 < y1, got {box!r}")


def _check_instance(path: Path, n: int, inst: Any, fields: dict = _INSTANCE_FIELDS, identity=None) -> None:
    if not isinstance(inst, dict):
        raise InstSynthError(path, f"instances[{n}] is not an object")
    for name, kind in fields.items():
        if not isinstance(inst.get(name), kind) or isinstance(inst.get(name), bool):
            raise InstSynthError(path, f"instances[{n}]: field {name!r} missing or not {kind.__name__}")
    key = inst["key"]
    _check_box(path, key, "bbox", inst["bbox"])
    _check_box(path, key, "crop_box", inst["crop_box"])
    (bx0, by0, bx1, by1), (cx0, cy0, cx1, cy1) = inst["bbox"], inst["crop_box"]
    if not (cx0 <= bx0 and cy0 <= by0 and bx1 <= cx1 and by1 <= cy1):
        raise InstSynthError(path, f"instance {key!r}: crop_box {inst['crop_box']} does not contain bbox {inst['bbox']}")
    (identity or _check_identity)(path, n, inst)


def _check_coco_identity(categories: dict[int, str], path: Path, n: int, inst: dict) -> None:
    """A COCO metadata's instance: key ``<stem>_<annotation id>``, ``image`` a file of that stem, and
    ``label_id`` / ``class`` a category of the file (see instsynth.coco_input)."""
    where = f"instances[{n}] ({inst['key']!r})"
    if inst["key"] != f"{inst['image_id']}_{inst['instance_id']}" or Path(inst["image"]).stem != inst["image_id"]:
        raise InstSynthError(path, f"{where}: key, image_id and image disagree with annotation {inst['instance_id']}; "
                                   "was the file edited by hand?")
    if categories.get(inst["label_id"]) != inst["class"]:
        raise InstSynthError(path, f"{where}: class {inst['class']!r} is not category {inst['label_id']} of the "
                                   "file's categories; was the file edited by hand?")


def _check_identity(path: Path, n: int, inst: dict) -> None:
    """key, label_id, class and file names must agree with instance_id and image_id, as stage 1 writes
    them: a hand edit would give the instance another class's prompt and label."""
    iid, image_id = inst["instance_id"], inst["image_id"]
    where = f"instances[{n}] ({inst['key']!r})"
    label = iid // INSTANCE_ID_OFFSET
    if label not in THING_LABEL_IDS:
        raise InstSynthError(path, f"{where}: instance_id {iid} is not a thing instance "
                                   f"(labelId x {INSTANCE_ID_OFFSET} + k with a thing labelId {THING_LABEL_IDS})")
    found = {"key": inst["key"], "label_id": inst["label_id"], "class": inst["class"]}
    expected = {"key": f"{image_id}_{iid}", "label_id": label, "class": class_name(label)}
    for name, value in found.items():
        if value != expected[name]:
            raise InstSynthError(path, f"{where}: {name} {value!r} disagrees with instance_id {iid} of image "
                                       f"{image_id!r} (expected {expected[name]!r}: label {label} = "
                                       f"{class_name(label)!r} in instanceIds); was the file edited by hand?")
    for name in ("image", "instance_ids"):
        try:
            of = image_id_of(inst[name])
        except InstSynthError:
            of = None
        if of != image_id:
            raise InstSynthError(path, f"{where}: {name} {inst[name]!r} is not a file of image_id {image_id!r}")


def load_metadata(path: str | os.PathLike, check_files: bool = True) -> dict:
    """Read and validate a stage-1 ``metadata.json``.

    Adds absolute :class:`~pathlib.Path` fields ``image_path``, ``instance_ids_path`` (from
    ``dataset_root``) and ``crop_rgb_path``, ``crop_mask_path`` (from the metadata folder) to every
    instance. With ``check_files`` those four files must exist. Bad input raises InstSynthError.
    A COCO-format metadata (``"format": "coco"``) has no instanceIds: its instances carry their
    annotation id as ``instance_id`` and ``coco_image_id``, and ``coco_json`` names the source file.
    """
    path = Path(path).resolve()
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("version") != METADATA_VERSION:
        raise InstSynthError(path, f"not an InstSynth stage-1 metadata file (expected an object with version {METADATA_VERSION})")
    for name, kind in (("dataset_root", str), ("split", str), ("k", int), ("instances", list)):
        if not isinstance(meta.get(name), kind):
            raise InstSynthError(path, f"field {name!r} missing or not {kind.__name__}")
    coco = meta.get("format") == "coco"
    if coco and not isinstance(meta.get("coco_json"), str):
        raise InstSynthError(path, "field 'coco_json' missing or not str")
    fields, files = ((_COCO_INSTANCE_FIELDS, ("image_path", "crop_rgb_path", "crop_mask_path")) if coco else
                     (_INSTANCE_FIELDS, ("image_path", "instance_ids_path", "crop_rgb_path", "crop_mask_path")))
    identity = None
    if coco:
        if not (isinstance(meta.get("categories"), list) and all(isinstance(c, dict) for c in meta["categories"])):
            raise InstSynthError(path, "field 'categories' missing or not a list of objects")
        identity = functools.partial(_check_coco_identity, {c.get("id"): c.get("name") for c in meta["categories"]})
    root, folder, keys = Path(meta["dataset_root"]), path.parent, set()
    for n, inst in enumerate(meta["instances"]):
        _check_instance(path, n, inst, fields, identity)
        if inst["key"] in keys:
            raise InstSynthError(path, f"duplicate instance key {inst['key']!r}")
        keys.add(inst["key"])
        inst.update(image_path=root / inst["image"], crop_rgb_path=folder / inst["crop_rgb"],
                    crop_mask_path=folder / inst["crop_mask"])
        if not coco:
            inst["instance_ids_path"] = root / inst["instance_ids"]
        if check_files:
            for name in files:
                if not inst[name].is_file():
                    raise InstSynthError(path, f"instance {inst['key']!r}: {name[:-5]} file {inst[name]} not found")
    return meta
