"""A folder of images with one instance-id PNG each: the simplest export of any labelling tool.

```
DIR/categories.json          {"1": "car", "2": "person"}  (or .yaml; or a list of {"id", "name", ...})
DIR/images/<name>.<ext>      any image OpenCV reads (png, jpg, ...), subfolders allowed
DIR/instances/<name>.png     uint16 or uint8, one value per instance, 0 = background
DIR/instances/<name>.json    optional: {"<value>": <category id or name>} or {"<value>": {"category": ..., "crowd": true}}
```

Without the JSON sidecar every value encodes its category as Cityscapes does: ``category_id * 1000 + k``
(uint16; k counts the category's instances from 0). With it (the way to go for uint8 PNGs and tools that
number instances 1, 2, 3, ...) the sidecar gives each value's category; ``crowd`` marks a group region.
Every nonzero value must map to a category of ``categories``; anything else is an InstSynthError naming
the file. Images are listed in sorted order of their path under ``images/``; ``split`` only names outputs.

New images go to ``OUT/images/instsynth_syn/<split>/<folder>/<stem>_<instance>_<sample:04d>_<crop:02d>.png``
with their instance PNG (and sidecar, where the source had one) at the same path under ``OUT/instances/``;
``finish`` writes ``OUT/categories.json``, so ``OUT`` is itself a folder dataset.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from instsynth.core.imageops import crop_resize_labels
from instsynth.core.io import InstSynthError, encode_png, read_json, read_png, read_yaml, write_json
from instsynth.core.labels import INSTANCE_ID_OFFSET
from .base import (Annotations, Box, Category, Dataset, DatasetWriter, Instance, NewImage, SourceImage, WrittenImage,
                   fresh_instance_ids)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CATEGORY_FILES = ("categories.json", "categories.yaml", "categories.yml")
SYNTHETIC_FOLDER = "instsynth_syn"
TOP_LEVEL_FOLDER = "images"
"""``folder`` of images at the top level of ``images/``."""


# --------------------------------------------------------------------------- categories
def _category_list(path: Path, data: Any) -> list[dict]:
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        data = data["categories"]
    if isinstance(data, dict):
        items = []
        for key, name in data.items():
            try:
                items.append({"id": int(key), "name": name})
            except (TypeError, ValueError):
                raise InstSynthError(path, f"category id {key!r} is not an integer") from None
        return items
    if isinstance(data, list) and all(isinstance(c, dict) for c in data):
        return data
    raise InstSynthError(path, "expected {id: name, ...} or a list of {\"id\", \"name\"} objects")


def read_categories(root: Path) -> tuple[Path, list[Category]]:
    """The dataset's categories file and its categories, sorted by id (checked: positive unique ids and names)."""
    path = next((root / n for n in CATEGORY_FILES if (root / n).is_file()), None)
    if path is None:
        raise InstSynthError(root, f"no {' or '.join(CATEGORY_FILES)} (a folder dataset needs its category names)")
    data = read_json(path) if path.suffix == ".json" else read_yaml(path)
    cats, names = {}, set()
    for n, cat in enumerate(_category_list(path, data)):
        cid, name = cat.get("id"), cat.get("name")
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1 or not isinstance(name, str) or not name:
            raise InstSynthError(path, f"category {n} needs a positive integer id and a name, got {cid!r}, {name!r}")
        if cid in cats or name in names:
            raise InstSynthError(path, f"duplicate category id {cid} or name {name!r}")
        cats[cid] = Category(cid, name, dict(cat))
        names.add(name)
    if not cats:
        raise InstSynthError(path, "no category")
    return path, [cats[i] for i in sorted(cats)]


# --------------------------------------------------------------------------- one image
def _value_categories(path: Path, sidecar: Any, categories: dict[int, str]) -> dict[int, tuple[int, bool]]:
    """{value: (category id, crowd)} of a sidecar JSON."""
    by_name = {name: cid for cid, name in categories.items()}
    if not isinstance(sidecar, dict):
        raise InstSynthError(path, "expected {\"<value>\": <category id or name>, ...}")
    out = {}
    for key, spec in sidecar.items():
        crowd = False
        if isinstance(spec, dict):
            crowd, spec = bool(spec.get("crowd", False)), spec.get("category")
        cid = by_name.get(spec) if isinstance(spec, str) else spec
        if not (isinstance(key, str) and key.isdigit() and 0 < int(key) < 1 << 16) or cid not in categories:
            raise InstSynthError(path, f"entry {key!r}: {spec!r} is not a category of the dataset (or the value is "
                                       "not an integer 1..65535)")
        out[int(key)] = (int(cid), crowd)
    return out


def _decode_values(path: Path, values: Sequence[int], mapping: dict[int, tuple[int, bool]] | None,
                   categories: dict[int, str]) -> dict[int, tuple[int, bool]]:
    """{value: (category id, crowd)} of the values present in an instance PNG."""
    out = {}
    for v in values:
        if mapping is not None:
            if v not in mapping:
                raise InstSynthError(path, f"value {v} is not in its sidecar {path.with_suffix('.json').name}")
            out[v] = mapping[v]
        elif v < INSTANCE_ID_OFFSET or v // INSTANCE_ID_OFFSET not in categories:
            raise InstSynthError(path, f"value {v} is not category_id * 1000 + k of a category in the categories file "
                                       f"(ids {sorted(categories)}); number instances 1, 2, ... with a sidecar "
                                       f"{path.with_suffix('.json').name} instead")
        else:
            out[v] = (v // INSTANCE_ID_OFFSET, False)
    return out


def _instance(ids: np.ndarray, counts: np.ndarray, value: int, category: int, crowd: bool) -> Instance:
    def mask_of(box: Box | None) -> np.ndarray:
        if box is None:
            return ids == value
        return ids[box[1]:box[3], box[0]:box[2]] == value

    return Instance(value, category, crowd, lambda: counts[value], mask_of)


@dataclass(frozen=True)
class FolderImage(SourceImage):
    """One image of a folder dataset and its instance PNG (``labels``)."""

    labels: Path = Path(".")
    categories: dict = field(default_factory=dict, compare=False)  # id -> name

    def annotations(self) -> Annotations:
        ids = read_png(self.labels)
        if ids.ndim != 2 or ids.dtype not in (np.uint8, np.uint16):
            raise InstSynthError(self.labels, f"expected a single-channel uint8 or uint16 PNG, found {ids.dtype} "
                                              f"with shape {ids.shape}")
        sidecar = self.labels.with_suffix(".json")
        mapping = _value_categories(sidecar, read_json(sidecar), self.categories) if sidecar.is_file() else None
        counts = np.bincount(ids.ravel(), minlength=1 << 16)
        decoded = _decode_values(self.labels, [int(v) for v in np.flatnonzero(counts[1:]) + 1], mapping, self.categories)
        instances = [_instance(ids, counts, v, c, crowd) for v, (c, crowd) in decoded.items()]
        height, width = ids.shape
        return Annotations(self, height, width, instances, lambda: _label_map(ids, decoded, mapping is not None),
                           native=(ids, mapping))

    def read_pixels(self, bgr: bool = False, shape: tuple[int, int] | None = None) -> np.ndarray:
        pixels = read_png(self.path, rgb=True, bgr=bgr)
        if shape is not None and pixels.shape[:2] != tuple(shape):
            raise InstSynthError(self.path, f"size {pixels.shape[1]}x{pixels.shape[0]} differs from its instance PNG "
                                            f"{self.labels} ({shape[1]}x{shape[0]})")
        return pixels

    def metadata_fields(self) -> dict:
        return {"instances": f"instances/{PurePosixPath(self.relative).relative_to('images').with_suffix('.png')}"}


def _label_map(ids: np.ndarray, decoded: dict[int, tuple[int, bool]], renumber: bool) -> np.ndarray:
    """uint16 map with instances >= 1000 (the context-crop rule's convention), group regions 0."""
    lut = np.zeros(1 << 16, np.uint16)
    things = [v for v, (_, crowd) in decoded.items() if not crowd]
    lut[things] = [INSTANCE_ID_OFFSET + j for j in range(len(things))] if renumber else things
    return lut[ids]


# --------------------------------------------------------------------------- the dataset
class FolderDataset(Dataset):
    """``root/images``, ``root/instances`` and the categories file (module docstring)."""

    kind = "folder"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.categories_file, self._categories = read_categories(self.root)
        if not (self.root / "images").is_dir():
            raise InstSynthError(self.root / "images", "folder not found (a folder dataset has images/ and instances/)")

    def images(self, split: str, include_generated: bool = False) -> list[FolderImage]:
        """Every image under ``images/`` in sorted path order (InstSynth's own ``instsynth_syn/`` unless ``include_generated``)."""
        names = {c.id: c.name for c in self._categories}
        files = sorted(p for p in (self.root / "images").rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        out, seen = [], {}
        for path in files:
            rel = PurePosixPath(path.relative_to(self.root / "images").as_posix())
            if rel.parts[0] == SYNTHETIC_FOLDER and not include_generated:
                continue
            labels = self.root / "instances" / rel.with_suffix(".png")
            if rel.with_suffix("") in seen:
                raise InstSynthError(path, f"{seen[rel.with_suffix('')]} has the same name: both would use {labels}")
            seen[rel.with_suffix("")] = path.name
            if not labels.is_file():
                raise InstSynthError(labels, f"file not found (the instance PNG of {path})")
            folder = TOP_LEVEL_FOLDER if rel.parent.as_posix() == "." else rel.parent.as_posix()
            out.append(FolderImage(split, folder, rel.stem, path, f"images/{rel.as_posix()}", labels, names))
        if not out:
            raise InstSynthError(self.root / "images", f"no image found ({', '.join(IMAGE_SUFFIXES)})")
        return out

    def categories(self) -> list[Category]:
        return list(self._categories)

    metadata_paths = {"instances": "instances_path"}

    def writer(self, out: str | Path, split: str) -> "FolderWriter":
        return FolderWriter(out, split, [c.as_dict() for c in self._categories])


class FolderWriter(DatasetWriter):
    """Writes new images and their instance PNGs (and sidecars) into ``OUT`` as a folder dataset."""

    def __init__(self, out: str | Path, split: str, categories: list[dict]):
        super().__init__(out, split)
        self.categories = categories

    def new_name(self, source: SourceImage, instance_id: int, sample: int, crop: int) -> str:
        rel = PurePosixPath(source.relative).relative_to("images")
        return (PurePosixPath(SYNTHETIC_FOLDER) / self.split / rel.parent /
                f"{rel.stem}_{instance_id}_{sample:04d}_{crop:02d}").as_posix()

    @staticmethod
    def labels(image: NewImage) -> tuple[np.ndarray, dict | None]:
        """The new image's instance PNG values and sidecar (None: values encode categories)."""
        ids, mapping = image.source.native
        if image.pasted:
            sidecar = None if mapping is None else dict(mapping)
            if sidecar is None:
                values = fresh_instance_ids(ids, [p.category_id for p in image.pasted])
            else:
                start = max([int(ids.max()), *sidecar]) + 1
                values = list(range(start, start + len(image.pasted)))
            ids = ids.astype(np.uint16)
            for new, value in zip(image.pasted, values):
                if value is not None and value < 1 << 16:
                    ids[new.mask] = value
                    if sidecar is not None:
                        sidecar[value] = (new.category_id, new.crowd)
            mapping = sidecar
        out = {str(v): ({"category": c, "crowd": True} if crowd else c) for v, (c, crowd) in mapping.items()} \
            if mapping is not None else None
        return crop_resize_labels(ids, image.box, image.size), out

    def write(self, image: NewImage) -> WrittenImage:
        labels, sidecar = self.labels(image)
        paths = {"image": f"images/{image.name}.png", "instances": f"instances/{image.name}.png"}
        files = [(paths["image"], encode_png(image.rgb)), (paths["instances"], encode_png(labels))]
        if sidecar is not None:
            paths["sidecar"] = f"instances/{image.name}.json"
            files.append((paths["sidecar"], (json.dumps(sidecar, indent=1) + "\n").encode()))
        return WrittenImage(image.name, {"outputs": paths}).put(self.out, files)

    def finish(self, entries: list[dict], info: dict) -> list[Path]:
        """``OUT/categories.json`` (the source's categories), so that ``OUT`` reads as a folder dataset."""
        return [write_json(self.out / "categories.json", {"categories": self.categories})]
