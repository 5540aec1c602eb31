"""Split one COCO / LVIS instances file into train and val by image, with a seed.

    python -m instsynth.data.split trainval.json --out DIR --val-fraction 0.2 --seed 0

writes ``DIR/<stem>_train.json`` and ``DIR/<stem>_val.json``. Every image goes to one file with all its
annotations; every top-level field, category and image object is kept verbatim (LVIS ``frequency``,
``synonyms``, ``neg_category_ids``, ...), except LVIS categories' ``image_count`` / ``instance_count``,
counted again per file. Images are drawn in a seeded random order, and every category with at least
two images keeps one in each file where possible: first each category (rarest first) gets a val image
that is not its last train image, then val is filled up to ``round(fraction x images)`` with images
whose move keeps every category in train; only if that is not enough does it take the rest. The file
is checked as stage 1 checks it (:func:`instsynth.formats.coco.load_coco_source`, without images).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instsynth.core.io import InstSynthError, get_logger, write_json
from instsynth.formats.coco import load_coco_source

SPLITS = ("train", "val")
COUNT_FIELDS = ("image_count", "instance_count")
"""LVIS category fields that describe the file they are in."""

log = get_logger("instsynth.data.split")


@dataclass
class SplitSummary:
    """What :func:`split_coco` wrote: paths and counts per split, categories found in only one split."""

    paths: dict[str, Path]
    images: dict[str, int]
    annotations: dict[str, int]
    only_in: dict[str, list[str]]  # split -> names of categories found in it and not in the other


def choose_val(image_ids: list[int], categories_of: dict[int, set[int]], n_val: int, seed: int) -> set[int]:
    """The val image ids: ``n_val`` of ``image_ids`` in a seeded order, keeping each category in both where possible."""
    order = [image_ids[i] for i in np.random.default_rng(seed).permutation(len(image_ids))]
    train_count = Counter(c for i in image_ids for c in categories_of[i])
    val: set[int] = set()

    def keeps_train(image: int) -> bool:
        return all(train_count[c] > 1 for c in categories_of[image])

    def move(image: int) -> None:
        val.add(image)
        train_count.subtract(categories_of[image])

    for category in sorted(train_count, key=lambda c: (train_count[c], c)):  # rarest first
        if len(val) >= n_val or any(category in categories_of[i] for i in val):
            continue
        image = next((i for i in order if category in categories_of[i] and i not in val and keeps_train(i)), None)
        if image is not None:
            move(image)
    for strict in (True, False):
        for image in order:
            if len(val) >= n_val:
                return val
            if image not in val and (keeps_train(image) or not strict):
                move(image)
    return val


def split_file(data: dict, image_ids: set[int]) -> dict:
    """The COCO dict of the images ``image_ids`` (top-level fields kept; LVIS counts per file)."""
    annotations = [a for a in data["annotations"] if a["image_id"] in image_ids]
    out = {**data, "images": [img for img in data["images"] if img["id"] in image_ids], "annotations": annotations}
    if any(k in c for c in data["categories"] for k in COUNT_FIELDS):
        images = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in annotations})
        instances = Counter(a["category_id"] for a in annotations)
        out["categories"] = [{**c, **({"image_count": images[c["id"]]} if "image_count" in c else {}),
                              **({"instance_count": instances[c["id"]]} if "instance_count" in c else {})}
                             for c in data["categories"]]
    return out


def split_coco(coco_json: str | Path, out: str | Path | None = None, val_fraction: float = 0.2,
               seed: int = 0) -> SplitSummary:
    """Write ``OUT/<stem>_train.json`` and ``OUT/<stem>_val.json`` (``out`` defaults to the file's folder)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    source = load_coco_source(coco_json, ".", check_images=False)
    data, path = source.data, source.json_path
    if len(data["images"]) < 2:
        raise InstSynthError(path, f"{len(data['images'])} image(s): a split needs at least 2")
    categories_of: dict[int, set[int]] = {img["id"]: set() for img in data["images"]}
    for ann in data["annotations"]:
        categories_of[ann["image_id"]].add(ann["category_id"])
    ids = [img["id"] for img in data["images"]]
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val = choose_val(ids, categories_of, n_val, seed)
    parts = {"train": set(ids) - val, "val": val}
    out = Path(out) if out is not None else path.parent
    paths, images, annotations, present = {}, {}, {}, {}
    for split in SPLITS:
        content = split_file(data, parts[split])
        paths[split] = write_json(out / f"{path.stem}_{split}.json", content, indent=None)
        images[split], annotations[split] = len(content["images"]), len(content["annotations"])
        present[split] = {a["category_id"] for a in content["annotations"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    only_in = {s: sorted(names[c] for c in present[s] - present[t]) for s, t in (SPLITS, SPLITS[::-1])}
    for split, missing in only_in.items():
        if missing:
            log.warning("%d categories only in %s (too few images to be in both): %s", len(missing), split,
                        ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    return SplitSummary(paths, images, annotations, only_in)
