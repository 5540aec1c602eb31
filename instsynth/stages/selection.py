"""Stage 1: pick the k largest instances of every image and cut a square crop around each, in any format.

Written once against the format interface (:mod:`instsynth.formats`): a Cityscapes tree
(:func:`select_instances`), a COCO / LVIS file (:func:`select_coco_instances`) or an image + instance-PNG
folder all go through :func:`select_from_dataset`. Per image the k largest non-crowd instances of the
chosen categories with at least ``min_area`` pixels (Cityscapes: thing instances, id >= 1000; COCO:
annotations by rasterised pixel count) are selected, ties broken by the smaller instance id; per-class
budgets (:mod:`instsynth.budget`, ``k_per_class`` / ``balance``) keep an instance of class c when it is
among the k_c largest of its image. Each gets a square crop box (side ``ceil(max(box w, box h) * context)``)
centred on its box and shifted inside the image; only when the image is smaller than the square is the box
clamped (and then not square). Per instance two PNGs are written under
``<out>/crops/<split>/<folder>_syn/``: ``<key>_rgb.png`` (RGB crop) and ``<key>_mask.png`` (0/255, exactly
that instance's pixels), with ``key = <stem>_<instance id>`` (Cityscapes: ``<image_id>_<instance_id>``, the
folder its city).

Areas come without decoding any mask (one histogram of the label map; COCO: RLE areas); only the selected
instances' masks are decoded (a COCO image's pixels are read only when it has a selected instance). Crops are
PNGs encoded for speed: RGB crops without deflate (about 10x faster to write than zlib level 1, files about
1.5x larger: intermediate files), masks with run-length deflate. Images are processed by worker processes
in order, so the output does not depend on ``workers``. Reruns rewrite only files whose bytes would change
and remove the crops an earlier run of the same split listed but this one does not; the three JSON files
(``metadata.json``, ``cropped_region_coordinates.json``, ``selection_report.json``) are written atomically,
after every image was handled. What each format records besides the common fields (COCO: the source file
and categories; Cityscapes: the instanceIds files and class counts) comes from the format object.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from instsynth.core.lock import stage_output
from instsynth.core.paths import confined
from ..formats import Dataset, Instance, SourceImage, open_dataset
from ..formats.cityscapes import COORDINATES_NAME, map_instances
from instsynth.core.io import InstSynthError, default_workers, get_logger, progress, read_json, write_if_changed
from instsynth.core.labels import THING_LABEL_IDS, class_name
from instsynth.core.parallel import ordered_map
from .metadata import METADATA_NAME, METADATA_VERSION, load_metadata  # noqa: F401 (names kept)

REPORT_NAME = "selection_report.json"
CROPS_DIR = "crops"
DEFAULT_MIN_AREA = 64
"""Instances smaller than this many pixels (an 8x8 patch) are too small to regenerate usefully."""

SKIP_REASONS = ("group_region", "class_not_selected", "below_min_area", "beyond_k")
"""Why an instance of an image was not selected (counted in selection_report.json)."""

log = get_logger("instsynth.stages.selection")


@dataclass(frozen=True)
class SelectionParams:
    """What to select: the k largest instances of ``category_ids`` with at least ``min_area`` pixels."""

    k: int = 3
    category_ids: tuple[int, ...] = THING_LABEL_IDS
    min_area: int = DEFAULT_MIN_AREA
    context: float = 1.0
    k_per_class: tuple[tuple[int, int], ...] = ()  # (category id, k) of classes with their own budget
    frequency: tuple[str, ...] | None = None  # LVIS frequencies asked for (recorded in the report)

    @cached_property
    def selected(self) -> frozenset[int]:
        """``category_ids`` as a set (1,200 LVIS ids are too many for a tuple lookup per instance)."""
        return frozenset(self.category_ids)

    def k_of(self, category: int) -> int:
        """Instances per image of class ``category``: one of the k_c largest of its image (default k)."""
        return self._k_by_class.get(category, self.k)

    @cached_property
    def _k_by_class(self) -> dict[int, int]:
        return dict(self.k_per_class)

    def as_json(self, names: dict[int, str] | None = None) -> dict:
        """The report's ``params`` (``names``: category names by id, default the Cityscapes labels)."""
        name = (names or {}).get if names else class_name
        extra = {"k_per_class": {name(i): k for i, k in self.k_per_class}} if self.k_per_class else {}
        freq = {} if self.frequency is None else {"frequency": list(self.frequency)}
        return {"k": self.k, "classes": [name(i) for i in self.category_ids], **freq,
                "min_area": self.min_area, "context": self.context, **extra}


@dataclass
class ImageResult:
    """What one worker found in one image (or the error that stopped it)."""

    image_id: str
    instances: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    class_counts: Counter = field(default_factory=Counter)  # non-crowd instances per selected category id, any area
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
def rank(instances: Sequence[Instance], params: SelectionParams) -> tuple[list[Instance], Counter]:
    """The selected instances (largest first, ties by id) and skip counts by reason."""
    skipped, candidates = Counter(), []
    for inst in instances:
        if inst.crowd:
            skipped["group_region"] += 1
        elif inst.category_id not in params.selected:
            skipped["class_not_selected"] += 1
        elif inst.area < max(params.min_area, 1):
            skipped["below_min_area"] += 1
        else:
            candidates.append(inst)
    candidates.sort(key=lambda inst: (-inst.area, inst.id))
    # kept when among the k_c largest of its image (every class: k)
    chosen = [inst for n, inst in enumerate(candidates) if n < params.k_of(inst.category_id)]
    skipped["beyond_k"] = len(candidates) - len(chosen)
    return chosen, skipped


def rank_instances(instance_ids: np.ndarray, params: SelectionParams) -> tuple[list[tuple[int, int]], Counter]:
    """:func:`rank` on a Cityscapes instanceIds map: ``[(instance id, area), ...]`` and skip counts."""
    chosen, skipped = rank(map_instances(instance_ids), params)
    return [(inst.id, inst.area) for inst in chosen], skipped


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


def crop_paths(image: SourceImage, key: str) -> tuple[str, str]:
    """(crop_rgb, crop_mask) paths of an instance, relative to the output folder."""
    folder = f"{CROPS_DIR}/{image.split}/{image.folder}_syn"
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


def class_counts(instances: Sequence[Instance], params: SelectionParams) -> Counter:
    """Non-crowd instances (any area) per selected category id."""
    return Counter(i.category_id for i in instances if not i.crowd and i.category_id in params.selected)


def select_in_image(image: SourceImage, params: SelectionParams, names: dict[int, str], out: Path) -> ImageResult:
    """Select, crop and write the instances of one image; returns their metadata entries."""
    ann = image.annotations()
    chosen, skipped = rank(ann.instances, params)
    result = ImageResult(image.stem, skipped=skipped, class_counts=class_counts(ann.instances, params))
    if not chosen and not image.pixels_checked:
        return result
    bgr = image.read_pixels(bgr=True, shape=(ann.height, ann.width))
    extra = image.metadata_fields()
    for inst in chosen:
        bbox = inst.bbox
        x0, y0, x1, y1 = crop = square_crop_box(bbox, ann.width, ann.height, params.context)
        key = f"{image.stem}_{inst.id}"
        rgb_rel, mask_rel = crop_paths(image, key)
        result.crops_written += write_if_changed(out / rgb_rel, encode_crop(bgr[y0:y1, x0:x1]))
        result.crops_written += write_if_changed(out / mask_rel, encode_crop(inst.mask(crop).view(np.uint8) * 255))
        result.instances.append({
            "key": key, "image_id": image.stem, "city": image.folder, "instance_id": int(inst.id),
            "label_id": int(inst.category_id), "class": names[inst.category_id], "area": inst.area,
            "bbox": list(map(int, bbox)), "crop_box": list(map(int, crop)), "image": image.relative,
            **extra, "crop_rgb": rgb_rel, "crop_mask": mask_rel})
    return result


def _select_task(shared: tuple[SelectionParams, dict[int, str], Path], image: SourceImage) -> ImageResult:
    """Worker entry point (``shared``: params, names, out, sent once per worker): bad input becomes
    ``ImageResult.error`` (the error type does not pickle)."""
    try:
        return select_in_image(image, *shared)
    except InstSynthError as exc:
        return ImageResult(image.stem, error=(str(exc.path), exc.problem))


def _count_task(params: SelectionParams, image: SourceImage) -> Counter | tuple[str, str]:
    """Worker: the class counts of one image (its labels only), or (path, problem)."""
    try:
        return class_counts(image.annotations().instances, params)
    except InstSynthError as exc:
        return str(exc.path), exc.problem


# --------------------------------------------------------------------------- the stage
def task_chunk(tasks: int, workers: int) -> int:
    """Images per worker round trip: enough to amortise it, small enough to balance (about 16 per worker)."""
    return max(1, min(32, tasks // (16 * max(1, workers))))


def check_params(where: Any, k: int, min_area: int, context: float) -> None:
    """Bad k, min_area or context raise InstSynthError naming ``where`` (the dataset)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InstSynthError(where, f"k must be an integer >= 1, got {k!r}")
    if min_area < 0:
        raise InstSynthError(where, f"min_area must be >= 0, got {min_area}")
    if not context >= 1.0:
        raise InstSynthError(where, f"context must be >= 1.0 (the crop must contain the instance), got {context}")


def split_class_counts(images: list[SourceImage], params: SelectionParams, names: dict[int, str], workers: int,
                       skip_bad: bool) -> dict[str, int]:
    """Instances per selected class over the split (reads only the labels)."""
    total = Counter()
    results = ordered_map(_count_task, images, workers, task_chunk(len(images), workers), shared=params)
    with contextlib.closing(results):
        for result in progress(results, "stage 1: counting classes", len(images)):
            if isinstance(result, tuple):
                if not skip_bad:
                    raise InstSynthError(*result)
                continue
            total.update(result)
    return {names[i]: total.get(i, 0) for i in params.category_ids}


def apply_budget(params: SelectionParams, budget: dict | None, names: dict[int, str]) -> SelectionParams:
    """``params`` with the per-class k of a resolved budget (:func:`instsynth.budget.class_budget`)."""
    if not budget:
        return params
    ids = {names[i]: i for i in params.category_ids}
    per_class = tuple(sorted((ids[n], k) for n, k in budget["per_class"].items() if n in ids))
    return SelectionParams(params.k, params.category_ids, params.min_area, params.context, per_class, params.frequency)


def resolve_budget(dataset: Dataset, images: list[SourceImage], params: SelectionParams, names: dict[int, str],
                   workers: int, skip_bad: bool, budget_args: dict) -> dict | None:
    """The resolved per-class budget of ``budget_args`` (k_per_class, balance, balance_power, max_factor)."""
    from instsynth.stages.budget import DEFAULT_MAX_FACTOR, DEFAULT_POWER, class_budget

    balance = budget_args.get("balance") or "none"
    counts = split_class_counts(images, params, names, workers, skip_bad) if balance == "inverse_freq" else None
    power, factor = budget_args.get("balance_power"), budget_args.get("max_factor")
    try:
        return class_budget(params.k, budget_args.get("k_per_class"), balance, counts,
                            DEFAULT_POWER if power is None else power, DEFAULT_MAX_FACTOR if factor is None else factor,
                            "k_per_class", budget_args.get("baseline_metrics"), classes=list(names.values()))
    except ValueError as exc:
        raise InstSynthError(dataset.where, str(exc)) from None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


@dataclass
class _Gathered:
    """Results of all images, in image order."""

    instances: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    without_instances: list = field(default_factory=list)
    fewer_than_k: int = 0
    skipped: Counter = field(default_factory=lambda: Counter(dict.fromkeys(SKIP_REASONS, 0)))
    crops_written: int = 0
    class_counts: Counter = field(default_factory=Counter)


def _gather(images: list[SourceImage], params: SelectionParams, names: dict[int, str], out: Path, workers: int,
            skip_bad: bool) -> _Gathered:
    """Run every image; the first bad one raises unless ``skip_bad`` (then it is logged and listed)."""
    got = _Gathered()
    shared = params, {i: names[i] for i in params.category_ids}, out
    results = ordered_map(_select_task, images, workers, task_chunk(len(images), workers), shared=shared)
    with contextlib.closing(results):  # on error, stop the workers before the exception propagates
        for image, result in zip(images, progress(results, "stage 1: selecting", len(images))):
            if result.error is not None:
                path, problem = result.error
                if not skip_bad:
                    raise InstSynthError(path, problem)
                log.warning("skipping %s: %s: %s", image.relative, path, problem)
                got.bad.append({"image_id": image.report_id, "path": path, "problem": problem})
                continue
            got.instances += result.instances
            got.skipped.update(result.skipped)
            got.class_counts.update(result.class_counts)
            got.crops_written += result.crops_written
            got.fewer_than_k += len(result.instances) < params.k
            if not result.instances:
                got.without_instances.append(image.report_name)
    return got


def select_from_dataset(dataset: Dataset, split: str = "train", k: int = 3, classes: Sequence[str] | None = None,
                        min_area: int = DEFAULT_MIN_AREA, context: float = 1.0, out: str | os.PathLike | None = None,
                        workers: int | None = None, skip_bad: bool = False, frequency: Sequence[str] | None = None,
                        **budget_args) -> SelectionSummary:
    """Run stage 1 on ``split`` of any dataset; write crops and the three JSON files to ``out`` (default: its root).

    ``classes``: category names (default all); ``frequency``: LVIS frequencies (COCO files only). Bad
    input raises InstSynthError naming the file; with ``skip_bad`` the image is skipped with a warning and
    listed in ``selection_report.json``. ``budget_args``: ``k_per_class`` (``"truck=6,bus=6"``),
    ``balance`` (``"inverse_freq"``: from the split's instances per class, counted in a first pass; ``"ap"``:
    from the per-class AP of ``baseline_metrics``), ``balance_power``, ``max_factor`` (:mod:`instsynth.budget`).
    """
    check_params(dataset.where, k, min_area, context)
    ids = dataset.category_ids(classes, frequency) if frequency is not None else dataset.category_ids(classes)
    names = dataset.category_names()
    params = SelectionParams(k, tuple(ids), int(min_area), float(context),
                             frequency=None if frequency is None else tuple(frequency))
    out = Path(out if out is not None else default_out(dataset, split)).resolve()
    images = dataset.images(split)
    if not images:
        raise InstSynthError(dataset.where, f"no image in split {split!r} (empty dataset?)")
    workers = default_workers() if workers is None else max(1, int(workers))
    with stage_output(out, dataset.input_paths()):  # no overlap with the dataset, one writer, own leftovers gone
        return _select(dataset, split, params, out, images, workers, skip_bad, budget_args)


def _select(dataset: Dataset, split: str, params: SelectionParams, out: Path, images: list[SourceImage],
            workers: int, skip_bad: bool, budget_args: dict) -> SelectionSummary:
    """The body of :func:`select_from_dataset`, run while ``out`` is held."""
    names = dataset.category_names()
    for line in dataset.stage_inputs(images):
        log.info("stage 1: %s", line)
    budget = resolve_budget(dataset, images, params, names, workers, skip_bad, budget_args)
    params = apply_budget(params, budget, names)
    got = _gather(images, params, names, out, workers, skip_bad)
    metadata, coordinates, report = selection_records(dataset, split, params, budget, names, images, got)
    paths, stale = write_selection(out, metadata, coordinates, report)
    if not got.instances:
        log.warning("no instance selected in %s (split %s)", dataset.where, split)
    log.info("stage 1: %d instances from %d images (%d crop files written, %d stale removed, %d bad images) -> %s",
             len(got.instances), len(images), got.crops_written, len(stale), len(got.bad), paths[0])
    bad = len(got.bad) + len(getattr(dataset, "bad", ()))
    return SelectionSummary(*paths, images=len(images), instances=len(got.instances),
                            crops_written=got.crops_written, bad_images=bad, stale_removed=len(stale))


def selection_records(dataset: Dataset, split: str, params: SelectionParams, budget: dict | None,
                      names: dict[int, str], images: list, got: _Gathered) -> tuple[dict, list, dict]:
    """(metadata, coordinates, report) of a run; the format adds its own fields."""
    header = {"version": METADATA_VERSION, **dataset.selection_header(split)}
    per_class = {names[i]: got.class_counts.get(i, 0) for i in params.category_ids}
    metadata = {**header, "k": params.k, **dataset.selection_fields(per_class),
                **({"class_budget": budget} if budget else {}), "instances": got.instances}
    coordinates = [{"key": i["key"], "cropped_instance_mask": i["crop_mask"], "bbox_coordinate": i["crop_box"]}
                   for i in got.instances]
    selected = dict(Counter(i["class"] for i in got.instances))
    report = {**header, "params": params.as_json(names), "images_seen": len(images),
              "images_with_instances": len(images) - len(got.bad) - len(got.without_instances),
              "instances_selected": len(got.instances), "images_with_fewer_than_k": got.fewer_than_k,
              **dataset.selection_counts(per_class, selected),
              "images_without_instances": got.without_instances, "instances_skipped": dict(got.skipped),
              "bad_images": got.bad, **dataset.selection_extras()}
    return metadata, coordinates, report


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
    new = {(i["crop_rgb"], i["crop_mask"]) for i in metadata["instances"]}
    return [path for pair in sorted(old - new) for rel in pair
            if (path := _stale_crop(metadata_path, rel)) is not None]


def _stale_crop(metadata_path: Path, rel: Any) -> Path | None:
    """The crop ``rel`` of a previous metadata.json if stage 1 may delete it: confined to ``crops/``, a PNG."""
    try:
        path = confined(metadata_path.parent / CROPS_DIR, str(rel).removeprefix(CROPS_DIR + "/"), metadata_path,
                        "crop_rgb/crop_mask")
    except InstSynthError as exc:
        log.warning("not deleting a stale crop: %s", exc)
        return None
    ok = str(rel).startswith(CROPS_DIR + "/") and path.suffix == ".png" and not path.is_symlink()
    return path if ok else None


# --------------------------------------------------------------------------- the three formats' entry points
def select_instances(dataset_root: str | os.PathLike, split: str = "train", k: int = 3,
                     classes: Sequence[str] | None = None, min_area: int = DEFAULT_MIN_AREA,
                     context: float = 1.0, out: str | os.PathLike | None = None,
                     workers: int | None = None, skip_bad: bool = False, **budget_args) -> SelectionSummary:
    """Stage 1 on the Cityscapes tree ``dataset_root`` (``gtFine/<split>``); ``out`` defaults to the root."""
    root = Path(dataset_root).resolve()
    check_params(root, k, min_area, context)
    dataset = open_dataset("cityscapes", root)
    if not dataset.images(split):
        raise InstSynthError(root / "gtFine" / split, "no *_gtFine_instanceIds.png found (empty dataset?)")
    return select_from_dataset(dataset, split, k, classes, min_area, context, out, workers, skip_bad, **budget_args)


def default_out(dataset: Dataset | str | os.PathLike, split: str) -> Path:
    """Default output folder of stage 1, never inside the dataset: on a COCO file (or its path)
    ``<folder of the JSON>/instsynth_<split>``; on a tree (Cityscapes, folder) ``<root>_selection_<split>`` beside it."""
    if not isinstance(dataset, Dataset):
        return Path(dataset).resolve().parent / f"instsynth_{split}"
    if dataset.where != dataset.root:  # the annotation file of a COCO dataset
        return default_out(dataset.where, split)
    return dataset.root.parent / f"{dataset.root.name}_selection_{split}"


def select_coco_instances(coco_json: str | os.PathLike, images_dir: str | os.PathLike, split: str = "train",
                          k: int = 3, classes: Sequence[str] | None = None, frequency: Sequence[str] | None = None,
                          min_area: int = DEFAULT_MIN_AREA, context: float = 1.0,
                          out: str | os.PathLike | None = None, workers: int | None = None,
                          skip_bad: bool = False, **budget_args) -> SelectionSummary:
    """Stage 1 on a COCO / LVIS file (checked before any work, see :mod:`instsynth.formats.coco`); ``out``
    defaults to :func:`default_out`; ``skip_bad`` also leaves out bad annotations and image entries."""
    check_params(coco_json, k, min_area, context)
    dataset = open_dataset("coco", coco_json, images_dir, skip_bad=skip_bad)
    if not dataset.source.images:
        raise InstSynthError(dataset.where, "no image listed (empty dataset?)")
    log.info("stage 1: %s is split %r (--split; it names the outputs, e.g. instances_%s_instsynth.json; "
             "python -m instsynth.data.split makes train and val files of one file)", dataset.where, split, split)
    return select_from_dataset(dataset, split, k, classes, min_area, context, out, workers, skip_bad,
                               frequency=list(frequency or []), **budget_args)
