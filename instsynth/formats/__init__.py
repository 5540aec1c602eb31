"""Dataset formats behind one interface (:mod:`instsynth.formats.base`): a table and :func:`open_dataset`.

``cityscapes``: a Cityscapes tree (``--train_folder``); ``coco``: a COCO / LVIS instances file and its
image folder (``--coco`` / ``--images``); ``folder``: ``images/`` + one instance-id PNG per image in
``instances/`` + ``categories.json`` (``--folder``). A new format is one module and one row here.
"""
from __future__ import annotations

from .base import (Annotations, Box, Category, Dataset, DatasetWriter, Instance, NewImage, NewInstance,  # noqa: F401
                   SourceImage, WrittenImage, mask_box, painted_masks)
from .cityscapes import CityscapesDataset
from .coco import CocoDataset
from .folder import FolderDataset

FORMATS: dict[str, type[Dataset]] = {"cityscapes": CityscapesDataset, "coco": CocoDataset, "folder": FolderDataset}


def open_dataset(kind: str, *args, **kwargs) -> Dataset:
    """The dataset of format ``kind``: ``("cityscapes", root)``, ``("coco", coco_json, images_dir, skip_bad=...)``
    or ``("folder", root)``; an unknown kind raises ValueError naming the known ones."""
    try:
        cls = FORMATS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset format {kind!r}; choose from {sorted(FORMATS)}") from None
    return cls(*args, **kwargs)


def dataset_from_args(args) -> Dataset:
    """The dataset named by a CLI's flags: ``--folder DIR``, ``--coco FILE --images DIR`` or ``--train_folder ROOT``."""
    if getattr(args, "folder", None):
        return open_dataset("folder", args.folder)
    if getattr(args, "coco", None):
        return open_dataset("coco", args.coco, args.images, skip_bad=getattr(args, "skip_bad", False))
    return open_dataset("cityscapes", args.train_folder)
