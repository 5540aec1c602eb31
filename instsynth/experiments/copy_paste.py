"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): new training images made of original instances only.

Works on any dataset format (:mod:`instsynth.formats`): a Cityscapes tree, a COCO / LVIS file or an
image + instance-PNG folder. New image ``j`` takes target image ``j mod n`` of the split (its order)
and a source image drawn at random among the others that hold instances to paste (not crowd / group
regions, of a category of the dataset). The source is flipped horizontally with probability 1/2,
rescaled by a factor drawn uniformly from ``scale_range`` (the paper's large scale jitter is 0.1 to
2.0) and placed at a random offset over the target; a random subset of its instances (each kept with
probability ``keep_prob``, at least one, at most ``max_objects``) is pasted through their masks.
Pasted instances with fewer than ``min_pixels`` visible pixels are not pasted; a draw without any
instance left is redrawn (``max_tries``), then falls back to the unscaled, unflipped source at offset 0.
The format's own writer (:class:`~instsynth.formats.NewInstance`) gives pasted instances fresh ids of
their class; target instances they cover lose those pixels (a fully covered one disappears).

Outputs follow the source's format:
- Cityscapes: ``OUT/{leftImg8bit,gtFine}/<split>/<city>_syn/<city>_<seq>_<frame>00000<repeat:04d>00_*.png``
  with leftImg8bit, instanceIds, labelIds and color (derived from the new instanceIds, so every label
  file agrees);
- COCO / LVIS: ``OUT/images/instsynth_syn/<split>/...png``, the originals hard-linked into ``OUT/images``
  and ``OUT/annotations/instances_<split>_instsynth.json`` (the source file plus the new images with
  exact annotations, ``pasted: true`` on pasted ones; LVIS fields kept);
- folder: ``OUT/images/instsynth_syn/...`` + ``OUT/instances/...`` + ``OUT/categories.json``.

Plus ``OUT/copy_paste.json`` (per new image: target, source, flip, scale, offset, pasted instance ids
``{source id: new id}``; COCO's new ids are the pasted annotations' order, the merged file numbers them)
and ``OUT/copy_paste_report.json``. Each image's draws come from a generator seeded by (seed, index), so
outputs do not depend on ``workers``; reruns rewrite no file whose bytes are already right and remove
the files of images no longer produced.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import cv2
import numpy as np

from instsynth.core.io import (GENERATED_FOLDER_SUFFIXES, InstSynthError, default_workers, get_logger, progress,
                               read_json, write_json)
from instsynth.core.lock import stage_output
from instsynth.core.paths import remove_stale_files
from instsynth.core.parallel import ordered_map
from instsynth.core.seeds import stable_seed
from instsynth.formats import (Annotations, Dataset, DatasetWriter, Instance, NewImage, NewInstance, SourceImage,
                               open_dataset)

COPY_PASTE_NAME = "copy_paste.json"
REPORT_NAME = "copy_paste_report.json"
log = get_logger("instsynth.copy_paste")


@dataclass(frozen=True)
class CopyPasteParams:
    """How objects are pasted (recorded in copy_paste.json)."""

    seed: int = 1
    scale_range: tuple[float, float] = (0.1, 2.0)
    flip: bool = True
    keep_prob: float = 0.5
    max_objects: int | None = None
    min_pixels: int = 16
    max_tries: int = 20

    def validate(self, where: Path) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise InstSynthError(where, f"scale_range must be 0 < low <= high, got {list(self.scale_range)}")
        if not 0 < self.keep_prob <= 1 or self.min_pixels < 1 or self.max_tries < 1:
            raise InstSynthError(where, "keep_prob must be in (0, 1], min_pixels and max_tries >= 1")
        if self.max_objects is not None and self.max_objects < 1:
            raise InstSynthError(where, f"max_objects must be >= 1, got {self.max_objects}")


@dataclass(frozen=True)
class _Task:
    index: int
    target: SourceImage
    source: SourceImage
    repeat: int
    params: CopyPasteParams
    writer: DatasetWriter
    categories: frozenset[int]  # categories whose instances may be pasted


def pasteable(annotations: Annotations, categories: frozenset[int]) -> list[Instance]:
    """The instances of an image that may be pasted (in the format's order): not crowd, of a listed category."""
    return [inst for inst in annotations.instances if not inst.crowd and inst.category_id in categories]


def index_map(annotations: Annotations, instances: Sequence[Instance]) -> np.ndarray:
    """uint16 map of ``instances``: value ``j + 1`` for instance ``j`` (later ones on top where they overlap)."""
    if len(instances) >= 1 << 16:
        raise InstSynthError(annotations.image.path, f"{len(instances)} instances: at most 65535 can be pasted")
    labels = np.zeros((annotations.height, annotations.width), np.uint16)
    for j, inst in enumerate(instances):
        labels[inst.mask()] = j + 1
    return labels


def warp(image: np.ndarray, scale: float, offset: tuple[int, int], flip: bool, size: tuple[int, int],
         nearest: bool) -> np.ndarray:
    """``image`` flipped, scaled about the origin and shifted by ``offset`` (x, y) onto a (width, height) canvas."""
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    matrix = np.float32([[scale, 0, offset[0]], [0, scale, offset[1]]])
    return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def visible(warped: np.ndarray, values, min_pixels: int) -> list[int]:
    """The ``values`` with at least ``min_pixels`` pixels in ``warped``."""
    counts = np.bincount(warped.ravel(), minlength=1 << 16)
    return [int(v) for v in values if counts[v] >= min_pixels]


def draw_paste(rng: np.random.Generator, src_map: np.ndarray, size: tuple[int, int], params: CopyPasteParams
               ) -> tuple[float, bool, tuple[int, int], np.ndarray, list[int]]:
    """(scale, flip, offset, warped source map, pasted values) of one random draw over an :func:`index_map`;
    the list may be empty."""
    height, width = src_map.shape
    scale = float(rng.uniform(*params.scale_range))
    flip = bool(params.flip and rng.random() < 0.5)
    sw, sh = round(width * scale), round(height * scale)
    ox = int(rng.integers(min(0, size[0] - sw), max(0, size[0] - sw) + 1))
    oy = int(rng.integers(min(0, size[1] - sh), max(0, size[1] - sh) + 1))
    values = np.arange(1, int(src_map.max()) + 1)
    keep = values[rng.random(len(values)) < params.keep_prob] if len(values) else values
    if len(values) and not len(keep):
        keep = values[[rng.integers(len(values))]]
    if params.max_objects is not None and len(keep) > params.max_objects:
        keep = np.sort(rng.choice(keep, params.max_objects, replace=False))
    warped = warp(src_map, scale, (ox, oy), flip, size, nearest=True)
    return scale, flip, (ox, oy), warped, visible(warped, keep, params.min_pixels)


def outputs_of(fields: dict) -> dict[str, str]:
    """Files (relative to OUT) a writer wrote for one image: its ``outputs``, or COCO's image file."""
    if "outputs" in fields:
        return fields["outputs"]
    return {"image": (PurePosixPath("images") / fields["file_name"]).as_posix()}


def copy_paste_image(task: _Task) -> dict:
    """Worker: build and write one new image; its copy_paste.json entry (with ``written`` file count and the
    writer's ``fields``)."""
    p = task.params
    target = task.target.annotations()
    rgb = task.target.read_pixels(shape=(target.height, target.width))
    source = task.source.annotations()
    src_rgb = task.source.read_pixels(shape=(source.height, source.width))
    things = pasteable(source, task.categories)
    src_map = index_map(source, things)
    size = (target.width, target.height)
    rng = np.random.default_rng(stable_seed(p.seed, "copy-paste", task.index))
    fallback = False
    for _ in range(p.max_tries):
        scale, flip, offset, warped, chosen = draw_paste(rng, src_map, size, p)
        if chosen:
            break
    else:
        fallback, scale, flip, offset = True, 1.0, False, (0, 0)
        warped = warp(src_map, scale, offset, flip, size, nearest=True)
        chosen = visible(warped, range(1, len(things) + 1), p.min_pixels)
    pasted = [NewInstance(warped == v, things[v - 1].category_id) for v in chosen]
    new_ids = task.writer.pasted_ids(target, pasted)
    kept = [(things[v - 1].id, new, i) for v, new, i in zip(chosen, pasted, new_ids) if i is not None]
    warped_rgb = warp(src_rgb, scale, offset, flip, size, nearest=False)
    for _, new, _ in kept:
        rgb[new.mask] = warped_rgb[new.mask]
    name = task.writer.new_name(task.target, 0, task.repeat, 0)
    written = task.writer.write(NewImage(name, target, rgb, (0, 0, *size), tuple(new for _, new, _ in kept)))
    return {"image_id": name, "target_image_id": task.target.report_id, "source_image_id": task.source.report_id,
            "city": task.target.folder, "flip": flip, "scale": scale, "offset": list(offset), "fallback": fallback,
            "pasted": {str(old): i for old, _, i in kept}, "outputs": outputs_of(written.fields),
            "written": written.written, "fields": written.fields}


def plan_tasks(dataset: Dataset, split: str, num_images: int, params: CopyPasteParams, writer: DatasetWriter
               ) -> list[_Task]:
    """One task per new image: targets cycle over the split, sources drawn among images with instances."""
    images = dataset.images(split)
    if not images:
        raise InstSynthError(dataset.where, f"split {split!r}: no annotated images")
    categories = frozenset(dataset.category_ids())
    with_things = [i for i, im in enumerate(images) if pasteable(im.annotations(), categories)]
    if not with_things:
        raise InstSynthError(dataset.where, f"split {split!r}: no image holds an instance to paste")
    tasks = []
    for j in range(num_images):
        t = j % len(images)
        rng = np.random.default_rng(stable_seed(params.seed, "copy-paste-source", j))
        others = [i for i in with_things if i != t] or with_things
        tasks.append(_Task(j, images[t], images[others[int(rng.integers(len(others)))]], j // len(images), params,
                           writer, categories))
    return tasks


def remove_stale(previous_path: Path, entries: list[dict], out: Path) -> list[str]:
    """Delete the files of images an earlier run listed that this run no longer produces; their ids."""
    try:
        previous = {e["image_id"]: e for e in read_json(previous_path)["images"]}
    except (InstSynthError, KeyError, TypeError):
        return []
    stale = sorted(set(previous) - {e["image_id"] for e in entries})
    records = [(f"images[{image_id!r}].outputs.{kind}", rel) for image_id in stale
               for kind, rel in (previous[image_id].get("outputs") or {}).items()]
    remove_stale_files(out, records, (".png", ".json"), previous_path, GENERATED_FOLDER_SUFFIXES)
    return stale


def link_source_images(dataset: Dataset, out: Path) -> dict:
    """COCO: hard-link (or copy) the originals into ``OUT/images``, as integration's COCO output has them."""
    if dataset.kind != "coco":
        return {}
    from instsynth.stages.integration_records import link_originals

    return link_originals(dataset, out)


def as_dataset(dataset: Dataset | str | os.PathLike) -> Dataset:
    """A Dataset as given, or the Cityscapes tree at a path."""
    return dataset if isinstance(dataset, Dataset) else open_dataset("cityscapes", dataset)


def copy_paste_dataset(dataset: Dataset | str | os.PathLike, out: str | os.PathLike, num_images: int,
                       split: str = "train", params: CopyPasteParams = CopyPasteParams(),
                       workers: int | None = None) -> dict:
    """Write ``num_images`` Simple Copy-Paste images of ``dataset``'s split (a Dataset, or a Cityscapes root)
    under ``out`` in its format (module doc); returns the report (also written to ``out/copy_paste_report.json``)."""
    dataset, out = as_dataset(dataset), Path(out).resolve()
    params.validate(out)
    if num_images < 0:
        raise InstSynthError(out, f"num_images must be >= 0, got {num_images}")
    with stage_output(out, dataset.input_paths()):  # no overlap with the dataset, one writer, own leftovers gone
        return _copy_paste(dataset, out, num_images, split, params, workers)


def _copy_paste(dataset: Dataset, out: Path, num_images: int, split: str, params: CopyPasteParams,
                workers: int | None) -> dict:
    """The body of :func:`copy_paste_dataset`, run while ``out`` is held."""
    writer = dataset.writer(out, split, complete=True)
    tasks = plan_tasks(dataset, split, num_images, params, writer) if num_images else []
    workers = default_workers() if workers is None else max(1, int(workers))
    linked = link_source_images(dataset, out)
    entries = list(progress(ordered_map(copy_paste_image, tasks, workers), "copy-paste", total=len(tasks)))
    written = sum(e.pop("written") for e in entries)
    fields = [{**e.pop("fields"), "source_image_id": t.target.report_id} for e, t in zip(entries, tasks)]
    stale = remove_stale(out / COPY_PASTE_NAME, entries, out)
    header = {"version": 1, **dataset.selection_header(split), "params": asdict(params)}
    files = writer.finish(fields, {"method": "copy_paste", **header, "synthetic_images": len(entries)})
    write_json(out / COPY_PASTE_NAME, {**header, "images": entries}, indent=1)
    report = {**header, "new_images": len(entries), "instances_pasted": sum(len(e["pasted"]) for e in entries),
              "fallbacks": sum(e["fallback"] for e in entries), "files_written": written, "stale_images_removed": stale}
    if dataset.kind != "cityscapes":
        report.update(written_files=[str(f) for f in files], original_images_linked=linked)
    write_json(out / REPORT_NAME, report)
    log.info("copy-paste: %d new images, %d instances pasted, %d files written -> %s", len(entries),
             report["instances_pasted"], written, out)
    return report
