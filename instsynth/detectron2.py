"""Register an InstSynth output in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` (needs Detectron2).

The official FastInst, OneFormer and Mask2Former repositories are Detectron2 projects: they train on any
dataset name registered there. One line in their ``train_net.py`` (before ``launch``) makes this project's
output trainable by name:

    from instsynth.detectron2 import register_instsynth
    register_instsynth("datasets/cityscapes_instsynth")   # -> cityscapes_instsynth_train, ..._val (+ _coco_*)

and ``DATASETS.TRAIN ("cityscapes_instsynth_train",)`` in their config. What gets registered:

- a **Cityscapes tree** (stage 3's ``cityscapes_instsynth``: ``leftImg8bit/``, ``gtFine/``): ``<name>_<split>``
  read by Detectron2's own ``load_cityscapes_instances`` (instanceIds PNGs by default, ``from_json=True`` for
  the ``gtFine_polygons.json`` files), ``evaluator_type`` ``cityscapes_instance`` with ``gt_dir``, the 8
  evaluated thing classes and their label id -> contiguous index map; and ``<name>_coco_<split>`` for each
  COCO file stage 5 wrote (``annotations/instancesonly_filtered_gtFine_<split>.json``);
- a **COCO / LVIS output** (``images/`` + ``annotations/instances_<split>_instsynth.json`` of the COCO path):
  ``<name>_<split>``, ``evaluator_type`` ``coco``.

COCO names get ``thing_classes`` (the file's categories sorted by id) and
``thing_dataset_id_to_contiguous_id`` at once, the values Detectron2's ``load_coco_json`` sets when it reads the
file. Nothing in ``instsynth`` imports this module, so the package never needs Detectron2.
"""
from __future__ import annotations

import json
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.cityscapes import load_cityscapes_instances

from instsynth.core.io import InstSynthError
from instsynth.core.labels import EVAL_THING_CLASSES, name2label

CITYSCAPES_COCO = "annotations/instancesonly_filtered_gtFine_{split}.json"
INSTSYNTH_COCO = "annotations/instances_{split}_instsynth.json"


def coco_metadata(json_file: str | Path) -> dict:
    """``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` of a COCO file, as ``load_coco_json`` sets them."""
    try:
        categories = json.loads(Path(json_file).read_text())["categories"]
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstSynthError(json_file, f"not a COCO instances file with categories ({exc})") from None
    return {"thing_classes": [n for _, n in pairs],
            "thing_dataset_id_to_contiguous_id": {cid: i for i, (cid, _) in enumerate(pairs)}}


def register_coco(name: str, json_file: str | Path, image_root: str | Path) -> str:
    """Register a COCO / LVIS instances file (e.g. the merged ``instances_train_instsynth.json``)."""
    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    meta = coco_metadata(json_file)
    DatasetCatalog.register(name, lambda: load_coco_json(str(json_file), str(image_root), name))
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco", **meta)
    return name


def cityscapes_metadata() -> dict:
    """The 8 evaluated Cityscapes thing classes and label id -> contiguous index (Detectron2's builtin order)."""
    return {"thing_classes": list(EVAL_THING_CLASSES),
            "thing_dataset_id_to_contiguous_id": {name2label[n].id: i for i, n in enumerate(EVAL_THING_CLASSES)}}


def register_cityscapes(name: str, root: str | Path, split: str, from_json: bool = False,
                        to_polygons: bool = True) -> str:
    """Register one split of a Cityscapes tree, read by Detectron2's ``load_cityscapes_instances``
    (``from_json``: from ``gtFine_polygons.json`` instead of the instanceIds PNGs)."""
    root = Path(root).resolve()
    image_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, gt_dir):
        if not folder.is_dir():
            raise InstSynthError(folder, f"split {split!r} of the Cityscapes tree not found")
    DatasetCatalog.register(name, lambda: load_cityscapes_instances(str(image_dir), str(gt_dir), from_json,
                                                                    to_polygons))
    MetadataCatalog.get(name).set(image_dir=str(image_dir), gt_dir=str(gt_dir),
                                  evaluator_type="cityscapes_instance", **cityscapes_metadata())
    return name


def register_instsynth(root: str | Path, name: str | None = None, from_json: bool = False) -> list[str]:
    """Register every split of an InstSynth output folder under ``name`` (default: the folder's name);
    see the module docstring. Returns the registered names."""
    root = Path(root)
    name = name or root.resolve().name
    names = []
    if (root / "leftImg8bit").is_dir():
        for split_dir in sorted(p for p in (root / "leftImg8bit").iterdir() if p.is_dir()):
            split = split_dir.name
            if (root / "gtFine" / split).is_dir():
                names.append(register_cityscapes(f"{name}_{split}", root, split, from_json))
            coco = root / CITYSCAPES_COCO.format(split=split)
            if coco.is_file():
                names.append(register_coco(f"{name}_coco_{split}", coco, split_dir))
    else:
        for coco in sorted((root / "annotations").glob(INSTSYNTH_COCO.format(split="*"))):
            split = coco.name[len("instances_"):-len("_instsynth.json")]
            names.append(register_coco(f"{name}_{split}", coco, root / "images"))
    if not names:
        raise InstSynthError(root, "no InstSynth output here: expected a Cityscapes tree (leftImg8bit/, gtFine/) or "
                                   "annotations/instances_<split>_instsynth.json with images/")
    return names
