"""A tiny FastInst trained on a few images of a Cityscapes tree: the mask model of the quality-gate tests.

:func:`train_tiny_mask_model` converts the chosen images' annotations to COCO (nothing is written
into the tree), registers them as a dataset and trains the quick FastInst schedule
(``configs/quick_schedules/fastinst_R50_quick.yaml``: ResNet-18, 32 queries, here one decoder
layer and one image per batch) on them at a fixed scale, without crops or flips, so that a few
dozen CPU iterations overfit those images. The result
is a ``train_net.py`` output folder (``config.yaml``, ``model_final.pth``, ``last_checkpoint``)
that ``generation/filter_generation.py --mask_model`` loads like any trained run. Seeded: the same
call gives the same weights. On the 512x256 demo images one image and 80 iterations (about 25 s on
one CPU core) give IoU 0.78-0.95 with the right class on its three largest instances, and no
overlapping prediction (IoU 0.00) once they are replaced by background.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from instsynth.stages.coco_conversion import ConversionOptions, coco_categories, convert_image
from instsynth.core.io import InstSynthError, iter_cityscapes_images, write_json
from instsynth.core.labels import REPO_ROOT

QUICK_CONFIG = REPO_ROOT / "configs" / "quick_schedules" / "fastinst_R50_quick.yaml"


def coco_of_images(dataset_root: str | Path, split: str, image_ids: Sequence[str], out: str | Path) -> Path:
    """COCO instances JSON of some images of a Cityscapes tree, written to ``out`` (the tree is only read)."""
    images = {im.image_id: im for im in iter_cityscapes_images(Path(dataset_root), split)}
    missing = [i for i in image_ids if i not in images]
    if missing:
        raise InstSynthError(dataset_root, f"images {missing} not in split {split}")
    options = ConversionOptions(write_polygons=False)
    coco = {"images": [], "annotations": [], "categories": coco_categories()}
    for n, image_id in enumerate(image_ids, 1):
        result = convert_image(images[image_id], options)
        coco["images"].append({"id": n, "file_name": result["file_name"], "width": result["width"],
                               "height": result["height"]})
        coco["annotations"] += [{"id": len(coco["annotations"]) + k, "image_id": n, **ann}
                                for k, ann in enumerate(result["annotations"], 1)]
    return write_json(out, coco, indent=None)


def train_tiny_mask_model(dataset_root: str | Path, image_ids: Sequence[str], out: str | Path, split: str = "train",
                          iterations: int = 80, base_lr: float = 0.002, short_side: int = 128, seed: int = 0,
                          opts: Sequence[str] = ()) -> Path:
    """Train the quick FastInst on ``image_ids`` of ``dataset_root``; returns the output folder ``out``.

    ``opts``: further ``KEY VALUE`` config overrides."""
    from ..config import load_config
    from ..data.catalog import register_coco_instances
    from ..engine.trainer import run

    out = Path(out).resolve()
    json_file = coco_of_images(dataset_root, split, image_ids, out / "train_coco.json")
    name = f"tiny_mask_model_{abs(hash(str(out)))}"
    register_coco_instances(name, json_file, Path(dataset_root) / "leftImg8bit" / split)
    cfg = load_config(QUICK_CONFIG, [
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "INPUT.CROP.ENABLED", "False",
        "INPUT.MIN_SIZE_TRAIN", f"({short_side},)", "INPUT.MIN_SIZE_TEST", str(short_side),
        "INPUT.RANDOM_FLIP", "none", "MODEL.FASTINST.DEC_LAYERS", "1",
        "SOLVER.IMS_PER_BATCH", str(min(2, len(image_ids))), "SOLVER.MAX_ITER", str(iterations), "SOLVER.BASE_LR", str(base_lr),
        "SOLVER.CHECKPOINT_PERIOD", str(iterations + 1), "LOG_PERIOD", "20", "SEED", str(seed),
        "OUTPUT_DIR", str(out), *opts])
    try:
        run(cfg)
    finally:  # leave no process-wide state behind: accelerate's singleton, the log.txt handler
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        root = logging.getLogger("instsynth")
        for handler in [h for h in root.handlers if getattr(h, "baseFilename", "").startswith(str(out))]:
            root.removeHandler(handler)
            handler.close()
    return out
