"""Stage 4: crop gtFine labelIds and color to match the image/label pairs written by stage 2.

Stage 2 (:mod:`instsynth.stages.integration`) writes every new image with its instanceIds and records, in
``OUT/cropped_region_coordinates.json``, which source label files and which box it came from.
:func:`drop_color_and_label_ids` reads that file and writes the matching ``_gtFine_labelIds.png`` and
``_gtFine_color.png``: the source maps cut with the same box and resized to the same size with the
same nearest-neighbour rule as the instanceIds (:func:`crop_resize_labels`), so the three label maps
of a new image always agree. A source without ``_gtFine_color.png`` gets its colours from the cut
labelIds and cityscapesScripts' label table (:func:`instsynth.labels.colorize`); a source without
``_gtFine_labelIds.png`` gets its labels from its instanceIds, which hold them. A box covering the whole
image at the same size (a panorama) copies the source file's bytes. Reruns skip images recorded in ``label_crops_done.json`` (same entry, files
present) and rewrite no file whose bytes are already right.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


from instsynth.formats.cityscapes import COORDINATES_VERSION
from instsynth.core.imageops import crop_resize_labels, crop_resize_rgb  # noqa: F401 (names of this module too)
from instsynth.core.parallel import ordered_map
from instsynth.core.labels import INSTANCE_ID_OFFSET, colorize, instance_ids_to_label_ids
from instsynth.core.io import (GT_SUFFIXES, InstSynthError, default_workers, encode_png, get_logger, progress, read_json, read_png,
                               write_if_changed)
from instsynth.core.lock import holds_output
from instsynth.core.paths import confined, within

DONE_NAME = "label_crops_done.json"
"""Hash of every coordinates entry whose labels were written: a rerun skips those (files present)."""
STAGE4_KINDS = ("labelIds", "color")
"""Label maps written by stage 4 (stage 2 writes leftImg8bit and instanceIds itself)."""

log = get_logger("instsynth.label_crops")


# --------------------------------------------------------------------------- crop + resize
def is_identity(box: Sequence[int], size: tuple[int, int], source_shape: tuple[int, ...]) -> bool:
    """True when ``box`` is the whole source image and ``size`` its own size (a panorama)."""
    h, w = source_shape[:2]
    return list(map(int, box)) == [0, 0, w, h] and tuple(size) == (w, h)


def label_bytes(source: Path, box: Sequence[int], size: tuple[int, int]) -> bytes:
    """PNG bytes of a source label file cut with ``box`` and resized to ``size`` (the source bytes if unchanged);
    a labelIds file the source lacks is derived from its instanceIds (:func:`read_label_ids`)."""
    labels = read_label_ids(source) if source.name.endswith(GT_SUFFIXES["labelIds"]) else read_png(source)
    if is_identity(box, size, labels.shape):
        return source.read_bytes() if source.is_file() else encode_png(labels)
    return encode_png(cut_labels(source, labels, box, size))


def read_label_ids(path: Path) -> np.ndarray:
    """A labelIds map: the file, or where the source has none, its instanceIds map read as labels (Cityscapes
    encodes a thing instance as ``labelId * 1000 + k`` and every other pixel as its labelId)."""
    ids_path = path.with_name(path.name.removesuffix(GT_SUFFIXES["labelIds"]) + GT_SUFFIXES["instanceIds"])
    if path.is_file() or not ids_path.is_file():
        return read_png(path)
    ids = read_png(ids_path)
    if ids.ndim != 2 or int(ids.max(initial=0)) // INSTANCE_ID_OFFSET > 255:
        raise InstSynthError(ids_path, "not a Cityscapes instanceIds map (single channel, labelId * 1000 + k)")
    return instance_ids_to_label_ids(ids)


def cut_labels(source: Path, labels: np.ndarray, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """``labels`` (read from ``source``) cut with ``box`` and resized to ``size``; a box outside raises InstSynthError."""
    x0, y0, x1, y1 = map(int, box)
    h, w = labels.shape[:2]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise InstSynthError(source, f"box {list(box)} is not inside the {w}x{h} image")
    return crop_resize_labels(labels, box, size)


def color_bytes(source: Path, label_ids: Path, box: Sequence[int], size: tuple[int, int]) -> bytes:
    """The color PNG of a new image: the source color file cut like the labels, or, where the source has
    none, the cut labelIds in the Cityscapes colours (RGB, as cityscapesScripts' palette)."""
    if source.is_file():
        return label_bytes(source, box, size)
    labels = read_label_ids(label_ids)
    if labels.ndim != 2:
        raise InstSynthError(label_ids, f"expected a single-channel labelIds image, found {labels.shape[2]} channels")
    if not is_identity(box, size, labels.shape):
        labels = cut_labels(label_ids, labels, box, size)
    return encode_png(colorize(labels))


# --------------------------------------------------------------------------- the coordinates file
def check_coordinates(path: Path, data: object) -> list[dict]:
    """The ``images`` list of a stage-2 cropped_region_coordinates.json, validated."""
    if not isinstance(data, dict) or data.get("version") != COORDINATES_VERSION or not isinstance(data.get("images"), list):
        raise InstSynthError(path, "not a stage-2 cropped_region_coordinates.json (expected an object with "
                                   f"version {COORDINATES_VERSION} and an 'images' list; stage 1's file of the "
                                   "same name is the input of inpainted_integration.py, not of this command)")
    for n, entry in enumerate(data["images"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("image_id"), str)
              and isinstance(entry.get("bbox_coordinate"), list) and len(entry["bbox_coordinate"]) == 4
              and isinstance(entry.get("size"), list) and len(entry["size"]) == 2
              and all(isinstance(entry.get("source", {}).get(k), str) for k in STAGE4_KINDS)
              and all(isinstance(entry.get("output", {}).get(k), str) for k in STAGE4_KINDS))
        if not ok:
            raise InstSynthError(path, f"images[{n}] lacks image_id, bbox_coordinate, size or source/output "
                                       f"paths of {', '.join(STAGE4_KINDS)}")
        for kind in STAGE4_KINDS:  # writes stay in the file's folder, reads in the dataset
            confined(path.parent, entry["output"][kind], path, f"images[{n}].output.{kind}")
            if isinstance(data.get("dataset_root"), str):
                within(data["dataset_root"], entry["source"][kind], path, f"images[{n}].source.{kind}")
    return data["images"]


def _output_of(args: dict) -> tuple[Path, list[Path]]:
    """(the coordinates file's folder, the dataset root it names): stage 4's output and the tree it may not overlap."""
    path = Path(args["coordinates_path"]).resolve()
    data = read_json(path)
    root = data.get("dataset_root") if isinstance(data, dict) else None
    return path.parent, [Path(root)] if isinstance(root, str) else []


def entry_hash(entry: dict) -> str:
    """SHA-256 of a coordinates entry: equal hashes mean equal label files."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def finished_entries(path: Path) -> dict[str, str]:
    """``{image_id: entry hash}`` of images an earlier run finished (empty if none or unreadable)."""
    try:
        images = read_json(path)["images"]
        return images if isinstance(images, dict) else {}
    except (InstSynthError, KeyError, TypeError):
        return {}


@dataclass
class _LabelResult:
    written: int = 0
    existing: int = 0
    error: tuple[str, str] | None = None


def _write_entry_labels(task: tuple[dict, Path]) -> _LabelResult:
    """Worker: write labelIds and color of one new image (errors returned, not raised)."""
    entry, folder = task
    result = _LabelResult()
    try:
        box, size = entry["bbox_coordinate"], tuple(entry["size"])
        for kind in STAGE4_KINDS:
            source = Path(entry["source"][kind])
            data = (color_bytes(source, Path(entry["source"]["labelIds"]), box, size) if kind == "color"
                    else label_bytes(source, box, size))
            if write_if_changed(folder / entry["output"][kind], data):
                result.written += 1
            else:
                result.existing += 1
    except InstSynthError as exc:
        result.error = (str(exc.path), exc.problem)
    return result


def _run(tasks: list[tuple[dict, Path]], workers: int) -> Iterator[_LabelResult]:
    return ordered_map(_write_entry_labels, tasks, workers, chunksize=4)


@dataclass
class LabelCropSummary:
    """What stage 4 did."""

    images: int
    files_written: int
    files_existing: int
    bad: list[dict] = field(default_factory=list)


@holds_output(_output_of)
def drop_color_and_label_ids(coordinates_path: str | os.PathLike, workers: int | None = None,
                             skip_bad: bool = False) -> LabelCropSummary:
    """Write labelIds and color of every image listed in a stage-2 ``cropped_region_coordinates.json``.

    Output paths in the file are relative to its folder. Bad input raises InstSynthError naming the
    file; with ``skip_bad`` the image is skipped with a warning and listed in the returned summary.
    """
    path = Path(coordinates_path).resolve()
    entries = check_coordinates(path, read_json(path))
    workers = default_workers() if workers is None else max(1, int(workers))
    done_path = path.parent / DONE_NAME
    done = finished_entries(done_path)
    hashes = {e["image_id"]: entry_hash(e) for e in entries}
    counts, bad, finished = Counter(), [], {}
    todo = []
    for entry in entries:
        if done.get(entry["image_id"]) == hashes[entry["image_id"]] and all(
                (path.parent / entry["output"][k]).is_file() for k in STAGE4_KINDS):
            finished[entry["image_id"]] = hashes[entry["image_id"]]
            counts["existing"] += len(STAGE4_KINDS)
        else:
            todo.append(entry)
    tasks = [(entry, path.parent) for entry in todo]
    for entry, result in zip(todo, progress(_run(tasks, workers), "stage 4: label crops", len(tasks))):
        if result.error is not None:
            if not skip_bad:
                raise InstSynthError(*result.error)
            log.warning("skipping %s: %s: %s", entry["image_id"], *result.error)
            bad.append({"image_id": entry["image_id"], "path": result.error[0], "problem": result.error[1]})
        else:
            finished[entry["image_id"]] = hashes[entry["image_id"]]
        counts.update(written=result.written, existing=result.existing)
    ordered = {e["image_id"]: finished[e["image_id"]] for e in entries if e["image_id"] in finished}
    write_if_changed(done_path, (json.dumps({"version": COORDINATES_VERSION, "images": ordered}, indent=1) + "\n").encode())
    log.info("stage 4: %d images, %d label files written, %d already up to date, %d bad",
             len(entries), counts["written"], counts["existing"], len(bad))
    return LabelCropSummary(len(entries), counts["written"], counts["existing"], bad)
