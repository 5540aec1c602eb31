"""Reading back stage 1's ``metadata.json``, whatever the dataset format (data contract 1).

The common fields of every instance are checked here; the format named by the file's ``format``
(absent: a Cityscapes tree) checks its own header fields and each instance's identity (key, class and
files agree with its ids), see ``Dataset.metadata_checker`` in :mod:`instsynth.formats`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..formats import FORMATS
from ..formats.base import check_fields
from instsynth.core.io import InstSynthError, read_json

METADATA_VERSION = 1
METADATA_NAME = "metadata.json"

INSTANCE_FIELDS = {"key": str, "image_id": str, "city": str, "instance_id": int, "label_id": int,
                   "class": str, "area": int, "bbox": list, "crop_box": list, "image": str,
                   "crop_rgb": str, "crop_mask": str}
"""Fields of every instance of a metadata.json (each format adds its own, e.g. Cityscapes ``instance_ids``)."""


def metadata_format(meta: dict) -> str:
    """The dataset format of a metadata (``cityscapes`` when the file names none)."""
    return meta.get("format", "cityscapes")


def _check_box(path: Path, key: str, name: str, box: Any) -> None:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
            and box[0] < box[2] and box[1] < box[3] and min(box) >= 0):
        raise InstSynthError(path, f"instance {key!r}: {name} must be [x0, y0, x1, y1] with x0 < x1, y0 < y1, got {box!r}")


def _check_instance(path: Path, n: int, inst: Any, identity) -> None:
    if not isinstance(inst, dict):
        raise InstSynthError(path, f"instances[{n}] is not an object")
    check_fields(path, n, inst, INSTANCE_FIELDS)
    key = inst["key"]
    _check_box(path, key, "bbox", inst["bbox"])
    _check_box(path, key, "crop_box", inst["crop_box"])
    (bx0, by0, bx1, by1), (cx0, cy0, cx1, cy1) = inst["bbox"], inst["crop_box"]
    if not (cx0 <= bx0 and cy0 <= by0 and bx1 <= cx1 and by1 <= cy1):
        raise InstSynthError(path, f"instance {key!r}: crop_box {inst['crop_box']} does not contain bbox {inst['bbox']}")
    identity(n, inst)


def load_metadata(path: str | os.PathLike, check_files: bool = True) -> dict:
    """Read and validate a stage-1 ``metadata.json``.

    Adds absolute :class:`~pathlib.Path` fields ``image_path`` (from ``dataset_root``), the format's label
    file (Cityscapes ``instance_ids_path``, folder ``instances_path``; a COCO file has none) and
    ``crop_rgb_path``, ``crop_mask_path`` (from the metadata folder) to every instance. With
    ``check_files`` those files must exist. Bad input raises InstSynthError.
    """
    path = Path(path).resolve()
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("version") != METADATA_VERSION:
        raise InstSynthError(path, f"not an InstSynth stage-1 metadata file (expected an object with version {METADATA_VERSION})")
    for name, kind in (("dataset_root", str), ("split", str), ("k", int), ("instances", list)):
        if not isinstance(meta.get(name), kind):
            raise InstSynthError(path, f"field {name!r} missing or not {kind.__name__}")
    fmt = FORMATS.get(metadata_format(meta))
    if fmt is None:
        raise InstSynthError(path, f"unknown dataset format {meta['format']!r}; choose from {sorted(FORMATS)}")
    identity = fmt.metadata_checker(path, meta)
    root, folder, keys = Path(meta["dataset_root"]), path.parent, set()
    files = ("image_path", *fmt.metadata_paths.values(), "crop_rgb_path", "crop_mask_path")
    for n, inst in enumerate(meta["instances"]):
        _check_instance(path, n, inst, identity)
        if inst["key"] in keys:
            raise InstSynthError(path, f"duplicate instance key {inst['key']!r}")
        keys.add(inst["key"])
        inst.update(image_path=root / inst["image"], crop_rgb_path=folder / inst["crop_rgb"],
                    crop_mask_path=folder / inst["crop_mask"])
        inst.update({to: root / inst[name] for name, to in fmt.metadata_paths.items()})
        if check_files:
            for name in files:
                if not inst[name].is_file():
                    raise InstSynthError(path, f"instance {inst['key']!r}: {name[:-5]} file {inst[name]} not found")
    return meta
