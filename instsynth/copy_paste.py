"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): new training images made of original instances only.

New image ``j`` takes target image ``j mod n`` of the split (sorted order) and a source image drawn at
random among the others that hold thing instances. The source is flipped horizontally with
probability 1/2, rescaled by a factor drawn uniformly from ``scale_range`` (the paper's large scale
jitter is 0.1 to 2.0) and placed at a random offset over the target; a random subset of its
instances (each kept with probability ``keep_prob``, at least one, at most ``max_objects``) is
pasted through their masks. Pasted instances take fresh instance ids of their class, target
instances they cover lose those pixels (a fully covered one disappears), and labelIds / color are
derived from the new instanceIds, so every label file agrees. Pasted instances with fewer than
``min_pixels`` visible pixels are not pasted; a draw without any instance left is redrawn
(``max_tries``), then falls back to the unscaled, unflipped source at offset 0.

Outputs, named and placed like stage 2's (:func:`instsynth.integration.output_paths`):
``OUT/{leftImg8bit,gtFine}/<split>/<city>_syn/<city>_<seq>_<frame>00000<repeat:04d>00_*.png`` with
leftImg8bit, instanceIds, labelIds and color, plus ``OUT/copy_paste.json`` (per new image: target,
source, flip, scale, offset, pasted instance ids) and ``OUT/copy_paste_report.json``. Each image's
draws come from a generator seeded by (seed, index), so outputs do not depend on ``workers``; reruns
rewrite no file whose bytes are already right and remove the files of images no longer produced.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from instsynth.cli import command
from instsynth.core.seeds import stable_seed
from instsynth.integration import new_image_id, output_paths
from instsynth.core.io import (CityscapesImage, InstSynthError, default_workers, encode_png, get_logger,
                               iter_cityscapes_images, progress, read_json, read_png, write_if_changed, write_json)
from instsynth.core.labels import INSTANCE_ID_OFFSET, THING_LABEL_IDS, colorize, instance_ids_to_label_ids
from instsynth.core.parallel import ordered_map

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
    target: CityscapesImage
    source: CityscapesImage
    repeat: int
    params: CopyPasteParams
    out: Path


def thing_instances(instance_ids: np.ndarray) -> np.ndarray:
    """Sorted instance-id values of the individual thing instances (ids >= 1000) of a map."""
    values = np.unique(instance_ids[instance_ids >= INSTANCE_ID_OFFSET])
    return values[np.isin(values // INSTANCE_ID_OFFSET, THING_LABEL_IDS)]


def warp(image: np.ndarray, scale: float, offset: tuple[int, int], flip: bool, size: tuple[int, int],
         nearest: bool) -> np.ndarray:
    """``image`` flipped, scaled about the origin and shifted by ``offset`` (x, y) onto a (width, height) canvas."""
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    matrix = np.float32([[scale, 0, offset[0]], [0, scale, offset[1]]])
    return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def draw_paste(rng: np.random.Generator, src_ids: np.ndarray, size: tuple[int, int], params: CopyPasteParams
               ) -> tuple[float, bool, tuple[int, int], np.ndarray, list[int]]:
    """(scale, flip, offset, warped source ids, pasted instance values) of one random draw; the list may be empty."""
    height, width = src_ids.shape
    scale = float(rng.uniform(*params.scale_range))
    flip = bool(params.flip and rng.random() < 0.5)
    sw, sh = round(width * scale), round(height * scale)
    ox = int(rng.integers(min(0, size[0] - sw), max(0, size[0] - sw) + 1))
    oy = int(rng.integers(min(0, size[1] - sh), max(0, size[1] - sh) + 1))
    values = thing_instances(src_ids)
    keep = values[rng.random(len(values)) < params.keep_prob] if len(values) else values
    if len(values) and not len(keep):
        keep = values[[rng.integers(len(values))]]
    if params.max_objects is not None and len(keep) > params.max_objects:
        keep = np.sort(rng.choice(keep, params.max_objects, replace=False))
    warped = warp(src_ids, scale, (ox, oy), flip, size, nearest=True)
    counts = np.bincount(warped.ravel(), minlength=1 << 16)
    return scale, flip, (ox, oy), warped, [int(v) for v in keep if counts[v] >= params.min_pixels]


def fresh_ids(target_ids: np.ndarray, pasted: Sequence[int]) -> dict[int, int]:
    """New instance-id values for pasted instances: the next free indices of their class in the target."""
    used = {int(v) for v in np.unique(target_ids[target_ids >= INSTANCE_ID_OFFSET])}
    next_index = {}
    for v in used:
        label = v // INSTANCE_ID_OFFSET
        next_index[label] = max(next_index.get(label, 0), v % INSTANCE_ID_OFFSET + 1)
    mapping = {}
    for v in pasted:
        label = v // INSTANCE_ID_OFFSET
        index = next_index.get(label, 0)
        if index >= INSTANCE_ID_OFFSET:
            continue  # the class has no free instance id left in this image
        mapping[v] = label * INSTANCE_ID_OFFSET + index
        next_index[label] = index + 1
    return mapping


def copy_paste_image(task: _Task) -> dict:
    """Worker: build and write one new image; its copy_paste.json entry (with ``written`` file count)."""
    p = task.params
    rgb = read_png(task.target.left, rgb=True)
    ids = read_png(task.target.gt("instanceIds"), dtype=np.uint16, shape=rgb.shape[:2])
    src_rgb = read_png(task.source.left, rgb=True)
    src_ids = read_png(task.source.gt("instanceIds"), dtype=np.uint16, shape=src_rgb.shape[:2])
    size = (rgb.shape[1], rgb.shape[0])
    rng = np.random.default_rng(stable_seed(p.seed, "copy-paste", task.index))
    fallback = False
    for _ in range(p.max_tries):
        scale, flip, offset, warped_ids, pasted = draw_paste(rng, src_ids, size, p)
        if pasted:
            break
    else:
        fallback, scale, flip, offset = True, 1.0, False, (0, 0)
        warped_ids = warp(src_ids, scale, offset, flip, size, nearest=True)
        counts = np.bincount(warped_ids.ravel(), minlength=1 << 16)
        pasted = [int(v) for v in thing_instances(src_ids) if counts[v] >= p.min_pixels]
    mapping = fresh_ids(ids, pasted)
    warped_rgb = warp(src_rgb, scale, offset, flip, size, nearest=False)
    new_ids = ids.copy()
    for old, new in mapping.items():
        mask = warped_ids == old
        rgb[mask] = warped_rgb[mask]
        new_ids[mask] = new
    labels = instance_ids_to_label_ids(new_ids)
    image_id = new_image_id(task.target.image_id, 0, task.repeat, 0)
    paths = output_paths(task.target.split, task.target.city, image_id)
    data = {"leftImg8bit": encode_png(rgb), "instanceIds": encode_png(new_ids), "labelIds": encode_png(labels),
            "color": encode_png(colorize(labels))}
    written = sum(write_if_changed(task.out / paths[k], v) for k, v in data.items())
    return {"image_id": image_id, "target_image_id": task.target.image_id, "source_image_id": task.source.image_id,
            "city": task.target.city, "flip": flip, "scale": scale, "offset": list(offset), "fallback": fallback,
            "pasted": {str(k): v for k, v in mapping.items()}, "outputs": paths, "written": written}


def plan_tasks(root: Path, split: str, num_images: int, params: CopyPasteParams, out: Path) -> list[_Task]:
    """One task per new image: targets cycle over the split, sources drawn among images with instances."""
    images = iter_cityscapes_images(root, split)
    if not images:
        raise InstSynthError(root / "gtFine" / split, "no annotated images")
    with_things = [i for i, im in enumerate(images)
                   if len(thing_instances(read_png(im.gt("instanceIds"), dtype=np.uint16)))]
    if not with_things:
        raise InstSynthError(root / "gtFine" / split, "no image holds a thing instance to paste")
    tasks = []
    for j in range(num_images):
        t = j % len(images)
        rng = np.random.default_rng(stable_seed(params.seed, "copy-paste-source", j))
        others = [i for i in with_things if i != t] or with_things
        tasks.append(_Task(j, images[t], images[others[int(rng.integers(len(others)))]], j // len(images), params, out))
    return tasks


def remove_stale(previous_path: Path, entries: list[dict], out: Path) -> list[str]:
    """Delete the files of images an earlier run listed that this run no longer produces; their ids."""
    try:
        previous = {e["image_id"]: e for e in read_json(previous_path)["images"]}
    except (InstSynthError, KeyError, TypeError):
        return []
    stale = sorted(set(previous) - {e["image_id"] for e in entries})
    for image_id in stale:
        for rel in previous[image_id].get("outputs", {}).values():
            if (out / rel).is_file():
                (out / rel).unlink()
    return stale


def copy_paste_dataset(dataset_root: str | os.PathLike, out: str | os.PathLike, num_images: int,
                       split: str = "train", params: CopyPasteParams = CopyPasteParams(),
                       workers: int | None = None) -> dict:
    """Write ``num_images`` Simple Copy-Paste images of ``dataset_root``'s split under ``out`` (module doc);
    returns the report (also written to ``out/copy_paste_report.json``)."""
    root, out = Path(dataset_root).resolve(), Path(out).resolve()
    params.validate(out)
    if num_images < 0:
        raise InstSynthError(out, f"num_images must be >= 0, got {num_images}")
    tasks = plan_tasks(root, split, num_images, params, out) if num_images else []
    workers = default_workers() if workers is None else max(1, int(workers))
    entries = list(progress(ordered_map(copy_paste_image, tasks, workers), "copy-paste", total=len(tasks)))
    written = sum(e.pop("written") for e in entries)
    stale = remove_stale(out / COPY_PASTE_NAME, entries, out)
    header = {"version": 1, "dataset_root": str(root), "split": split, "params": asdict(params)}
    write_json(out / COPY_PASTE_NAME, {**header, "images": entries}, indent=1)
    report = {**header, "new_images": len(entries), "instances_pasted": sum(len(e["pasted"]) for e in entries),
              "fallbacks": sum(e["fallback"] for e in entries), "files_written": written, "stale_images_removed": stale}
    write_json(out / REPORT_NAME, report)
    log.info("copy-paste: %d new images, %d instances pasted, %d files written -> %s", len(entries),
             report["instances_pasted"], written, out)
    return report


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.copy_paste", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--out", required=True, help="output root for the new <city>_syn pairs")
    parser.add_argument("--num_images", type=int, required=True, help="new images to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale_range", type=float, nargs=2, default=(0.1, 2.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--no_flip", action="store_true", help="never flip the source")
    parser.add_argument("--keep_prob", type=float, default=0.5, help="probability to paste each source instance")
    parser.add_argument("--max_objects", type=int, default=None, help="most instances pasted per image")
    parser.add_argument("--min_pixels", type=int, default=16, help="smallest visible pasted instance")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    params = CopyPasteParams(seed=args.seed, scale_range=tuple(args.scale_range), flip=not args.no_flip,
                             keep_prob=args.keep_prob, max_objects=args.max_objects, min_pixels=args.min_pixels)
    report = copy_paste_dataset(args.dataset, args.out, args.num_images, args.split, params, args.workers)
    print(f"{report['new_images']} images, {report['instances_pasted']} instances pasted -> {args.out}")


if __name__ == "__main__":
    main()
