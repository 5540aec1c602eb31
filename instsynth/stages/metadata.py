"""Reading back stage 1's ``metadata.json``, whatever the dataset format (data contract 1).

The common fields of every instance are checked here; the format named by the file's ``format``
(absent: a Cityscapes tree) checks its own header fields and each instance's identity (key, class and
files agree with its ids), see ``Dataset.metadata_checker`` in :mod:`instsynth.formats`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from instsynth.core.paths import confined, plain_name, relative_name
from ..formats import FORMATS, Dataset, SourceImage, open_dataset
from ..formats.base import check_fields
from instsynth.core.io import InstSynthError, get_logger, read_json

log = get_logger("instsynth.integration")
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


def _crop_path(folder: Path, value: str, path: Path, field: str) -> Path:
    """A crop file: an absolute path (a metadata moved away from its crops; only read) or one confined to ``folder``."""
    return Path(value) if Path(value).is_absolute() else confined(folder, value, path, field)


def _add_paths(path: Path, n: int, inst: dict, root: Path, fmt) -> None:
    """Check the instance's names (split-like fields plain, files confined to their roots) and add its paths."""
    where = lambda name: f"instances[{n}].{name}"  # noqa: E731
    (plain_name if fmt.plain_folders else relative_name)(path, where("city"), inst["city"])
    plain_name(path, where("image_id"), inst["image_id"])
    inst.update(image_path=confined(root, inst["image"], path, where("image")),
                crop_rgb_path=_crop_path(path.parent, inst["crop_rgb"], path, where("crop_rgb")),
                crop_mask_path=_crop_path(path.parent, inst["crop_mask"], path, where("crop_mask")))
    inst.update({to: confined(root, inst[name], path, where(name)) for name, to in fmt.metadata_paths.items()})


def load_metadata(path: str | os.PathLike, check_files: bool = True) -> dict:
    """Read and validate a stage-1 ``metadata.json``.

    Adds absolute :class:`~pathlib.Path` fields ``image_path`` (from ``dataset_root``), the format's label
    file (Cityscapes ``instance_ids_path``, folder ``instances_path``; a COCO file has none) and
    ``crop_rgb_path``, ``crop_mask_path`` (from the metadata folder) to every instance. With
    ``check_files`` those files must exist. ``split``, ``image_id`` and a Cityscapes ``city`` must be
    plain names; every file must resolve inside its root (:mod:`instsynth.core.paths`). Bad input raises
    InstSynthError.
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
    plain_name(path, "split", meta["split"])
    identity = fmt.metadata_checker(path, meta)
    root, keys = Path(meta["dataset_root"]), set()
    files = ("image_path", *fmt.metadata_paths.values(), "crop_rgb_path", "crop_mask_path")
    for n, inst in enumerate(meta["instances"]):
        _check_instance(path, n, inst, identity)
        if inst["key"] in keys:
            raise InstSynthError(path, f"duplicate instance key {inst['key']!r}")
        keys.add(inst["key"])
        _add_paths(path, n, inst, root, fmt)
        if check_files:
            for name in files:
                if not inst[name].is_file():
                    raise InstSynthError(path, f"instance {inst['key']!r}: {name[:-5]} file {inst[name]} not found")
    return meta


def metadata_dataset(meta: dict, skip_bad: bool = False, stage: str = "stage 2") -> Dataset:
    """The dataset a stage-1 metadata was selected from, opened in its format (of a COCO file whose fingerprint
    is the one stage 1 recorded only the annotations of the selected images are checked again; ``stage``
    names the reader in the log)."""
    kind = metadata_format(meta)
    if kind != "coco":
        return open_dataset(kind, meta["dataset_root"])
    dataset = open_dataset("coco", meta["coco_json"], meta["dataset_root"], skip_bad=skip_bad,
                           trusted=meta.get("coco_json_fingerprint"),
                           needed={inst["coco_image_id"] for inst in meta["instances"]})
    if dataset.source.trusted:
        log.info("%s: %s is the file stage 1 checked (size, mtime and sha256 unchanged): only the annotations "
                 "of the images it integrates are checked again", stage, dataset.where)
    elif "coco_json_fingerprint" in meta:
        log.info("%s: %s changed since stage 1 checked it: checked again", stage, dataset.where)
    return dataset


def image_index(dataset: Dataset, split: str) -> tuple[dict[tuple, SourceImage], tuple[str, ...]]:
    """The split's images by (relative path, the format's metadata fields), and those fields' names."""
    images = dataset.images(split)
    fields = tuple(sorted(images[0].metadata_fields())) if images else ()
    return {(im.relative, *(im.metadata_fields()[f] for f in fields)): im for im in images}, fields
