"""Mask-consistency gate: does an instance-segmentation model still see the instance inside its mask?

Every generated sample is pasted (hard, through the instance mask) into its full source image, and an
instance-segmentation model of this project (FastInst or OneFormer, e.g. one trained on the original
data with ``train_net.py``) is run on that image at its test resolution. Per sample:

- ``mask_iou``: IoU of the best-matching predicted mask with the instance's mask, over the
  predictions scoring at least ``min_score`` (0 when there is none);
- ``mask_class`` / ``mask_class_ok``: the class of that prediction and whether it is the instance's;
- ``mask_score``: its detection score.

The untouched source image is scored the same way once per instance (``mask_iou_source``, ...), so a
failure can be told apart from an instance the model never found. The gate of the integration stage
(``min_mask_iou``) passes a sample when ``mask_iou >= min_mask_iou`` and ``mask_class_ok``.

``sam:ID_OR_FOLDER`` specs load a promptable SAM instead (:mod:`instsynth.sam_gate`: no training,
prompted with the instance's box; it judges the shape, CLIP's class margin the class).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError, progress
from instsynth.core.labels import EVAL_THING_CLASSES, THING_CLASSES


MASK_SCORE_NAMES = ("mask_iou", "mask_class", "mask_class_ok", "mask_score")
"""Per-sample scores written by the mask gate (``entry["scores"][i]``); per instance the same with ``_source``."""
DEFAULT_MIN_SCORE = 0.3
"""Predictions scoring below this are not candidates for the best match."""
CHECKPOINT_NAMES = ("model_final.pth",)


@dataclass
class MaskModel:
    """A loaded instance-segmentation model, its test-time resizing and its class names (contiguous order)."""

    model: Any
    mapper: Any
    classes: tuple[str, ...]
    source: str
    device: str = "cpu"

    def predict(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Per RGB uint8 image: ``{"masks": bool tensor (N, H, W) on the model's device, "classes": [names],
        "scores": float (N,)}``."""
        import torch

        inputs = []
        for image in images:
            h, w = image.shape[:2]
            geometry = self.mapper.geometry(h, w, None)
            chw = torch.from_numpy(np.ascontiguousarray(geometry.image(image).transpose(2, 0, 1)))
            inputs.append({"image": chw, "height": h, "width": w})
        with torch.no_grad():
            outputs = self.model(inputs)
        result = []
        for out in outputs:
            inst = out["instances"]
            result.append({"masks": inst["pred_masks"].bool(),
                           "classes": [self.classes[int(c)] for c in inst["pred_classes"].cpu()],
                           "scores": inst["scores"].float().cpu().numpy()})
        return result

    def predict_instance(self, images: Sequence[np.ndarray], mask: np.ndarray,
                         crop_box: Sequence[int] | None = None) -> list[dict]:
        """:meth:`predict` (an instance-segmentation model needs no prompt; the SAM gate's interface)."""
        return self.predict(images)


def _config_and_weights(spec: Path, weights: str | None) -> tuple[Path, str]:
    """(config.yaml, checkpoint) of a train_net.py OUTPUT_DIR, a checkpoint beside its config.yaml, or a config."""
    from instsynth.engine.checkpoint import last_checkpoint

    if spec.is_dir():
        config = spec / "config.yaml"
        found = last_checkpoint(spec) or next((spec / n for n in CHECKPOINT_NAMES if (spec / n).is_file()), None)
        if not config.is_file() or (found is None and weights is None):
            raise InstSynthError(spec, "not a train_net.py output folder (needs config.yaml and last_checkpoint "
                                       "or model_final.pth)")
        return config, weights or str(found)
    if spec.suffix in (".yaml", ".yml"):
        return spec, weights or ""  # "": the config's own MODEL.WEIGHTS
    config = spec.parent / "config.yaml"
    if not config.is_file():
        raise InstSynthError(spec, "a checkpoint needs the config.yaml of its run beside it "
                                   "(or pass the config YAML with --mask_weights CHECKPOINT)")
    return config, weights or str(spec)


def model_classes(cfg, model, where: str) -> tuple[str, ...]:
    """Class names of a model's contiguous outputs: OneFormer's ``CLASS_NAMES``, otherwise the COCO
    converter's categories (sorted by label id) of the model's number of classes."""
    if cfg.MODEL.META_ARCHITECTURE == "OneFormer":
        from instsynth.modeling.oneformer import class_names

        return tuple(class_names(cfg))
    num_classes = int(getattr(model, "num_classes", 0))
    for names in (EVAL_THING_CLASSES, THING_CLASSES):
        if len(names) == num_classes:
            return tuple(names)
    raise InstSynthError(where, f"the model predicts {num_classes} classes; expected {len(EVAL_THING_CLASSES)} "
                                f"({', '.join(EVAL_THING_CLASSES)}) or {len(THING_CLASSES)} (with caravan, trailer)")


def load_mask_model(spec: str | os.PathLike, weights: str | None = None, device: str = "cpu"):
    """A trained FastInst / OneFormer for the mask gate, or a SAM gate for ``sam:ID_OR_FOLDER``.

    ``spec``: a ``train_net.py`` OUTPUT_DIR (its ``config.yaml`` and last checkpoint), a checkpoint
    ``.pth`` with the run's ``config.yaml`` beside it, or a config YAML (weights from ``weights`` or
    its ``MODEL.WEIGHTS``). Bad input raises InstSynthError naming the file.
    """
    from .sam_gate import is_sam_spec, load_sam_gate

    if is_sam_spec(spec):
        if weights:
            raise InstSynthError(spec, "--mask_weights is for FastInst / OneFormer configs, not for sam: models")
        return load_sam_gate(spec, device)
    from instsynth.config import load_config
    from instsynth.data.mapper import DatasetMapper
    from instsynth.engine.checkpoint import maybe_load_weights
    from instsynth.modeling import build_model

    path = Path(spec).expanduser()
    if not path.exists():
        raise InstSynthError(path, "mask model not found: pass a train_net.py OUTPUT_DIR, a checkpoint beside its "
                                   "config.yaml, or a config YAML")
    config, checkpoint = _config_and_weights(path, weights)
    cfg = load_config(config, ["MODEL.DEVICE", device, *(["MODEL.WEIGHTS", checkpoint] if checkpoint else [])])
    model = build_model(cfg)
    if not maybe_load_weights(model, cfg.MODEL.WEIGHTS) and not getattr(model, "loads_own_weights", False):
        raise InstSynthError(config, "no weights for the mask model (MODEL.WEIGHTS is empty); pass a checkpoint")
    classes = model_classes(cfg, model, str(config))
    return MaskModel(model.eval().to(device), DatasetMapper(cfg, False, {}), classes, str(spec), device)


def best_match(prediction: dict, mask: np.ndarray, class_name: str, min_score: float = DEFAULT_MIN_SCORE) -> dict:
    """The mask-gate scores of one instance mask (full image, bool) against one image's predictions.

    IoUs are computed where the predicted masks are (a torch tensor, e.g. on the GPU). A prediction
    of class None (SAM: no classes) has ``mask_class`` null and ``mask_class_ok`` true."""
    import torch

    keep = prediction["scores"] >= min_score
    none = {"mask_iou": 0.0, "mask_class": None, "mask_class_ok": False, "mask_score": None}
    if not keep.any() or not mask.any():
        return none
    masks = torch.as_tensor(prediction["masks"])
    masks = masks[torch.from_numpy(keep).to(masks.device)]
    target = torch.as_tensor(mask, device=masks.device)
    inter = (masks & target).flatten(1).sum(1)
    union = masks.flatten(1).sum(1) + target.sum() - inter
    iou = (inter.double() / union.clamp(min=1).double()).cpu().numpy()
    scores = prediction["scores"][keep]
    best = int(np.lexsort((-scores, -iou))[0])  # highest IoU, then highest score
    if iou[best] == 0:
        return none
    name = [c for c, k in zip(prediction["classes"], keep) if k][best]
    return {"mask_iou": float(iou[best]), "mask_class": name, "mask_class_ok": name is None or name == class_name,
            "mask_score": float(scores[best])}


def pasted_image(source: np.ndarray, sample: np.ndarray, mask: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """The full source image with ``sample`` (crop-sized RGB, resized if not) pasted hard through ``mask``."""
    from instsynth.core.imageops import resize_image
    from instsynth.stages.pasting import paste

    x0, y0, x1, y1 = crop_box
    if sample.shape[:2] != (y1 - y0, x1 - x0):
        sample = resize_image(sample, (y1 - y0, x1 - x0))
    return paste(source, sample, mask[y0:y1, x0:x1], crop_box, "hard")


class SourceReader:
    """Full source images and instance masks of a stage-1 metadata's instances, read through the
    dataset's own format (a Cityscapes tree, a COCO / LVIS file or a folder), one image at a time."""

    def __init__(self, meta: dict):
        from instsynth.stages.metadata import image_index, metadata_dataset

        self.dataset = metadata_dataset(meta, stage="quality filter")
        self.images, self.fields = image_index(self.dataset, meta["split"])
        self.current: tuple[Any, Any, np.ndarray | None] = (None, None, None)

    def __call__(self, inst: dict) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 image, bool mask of the whole image) of a metadata instance entry."""
        image = self.images.get((inst["image"], *(inst[f] for f in self.fields)))
        if image is None:
            raise InstSynthError(self.dataset.where, f"image {inst['image']} of {inst['key']} is not (or no longer) "
                                                     "in the dataset")
        if self.current[0] is not image:  # instances of one image follow each other: read it once
            ann = image.annotations()
            self.current = (image, ann, image.read_pixels(shape=(ann.height, ann.width)))
        _, ann, source = self.current
        found = ann.by_id.get(inst["instance_id"])
        mask = None if found is None else found.mask()
        if mask is None or not mask.any():
            raise InstSynthError(image.path, f"instance {inst['instance_id']} ({inst['key']}) has no pixel")
        return source, mask


def score_instances(groups: dict[str, list], meta: dict, model,
                    min_score: float = DEFAULT_MIN_SCORE, batch_size: int = 4) -> tuple[dict, dict]:
    """Mask-gate scores ``({(key, index): scores}, {key: source scores})`` of sample refs grouped by instance.

    ``meta``: the stage-1 metadata (:func:`~instsynth.stages.metadata.load_metadata`); each source image
    is read once per instance through its dataset's format and scored untouched, then with each of its
    samples pasted in. ``model``: a :class:`MaskModel` or a :class:`~instsynth.quality.sam_gate.SamGate`
    (prompted with the instance).
    """
    from instsynth.quality.runs import read_sample

    instances = {i["key"]: i for i in meta["instances"]}
    read_source = SourceReader(meta)
    by_sample, by_instance = {}, {}
    for key, refs in progress(groups.items(), "scoring (mask model)", len(groups)):
        inst = instances[key]
        source, mask = read_source(inst)
        images = [source] + [pasted_image(source, read_sample(ref), mask, inst["crop_box"]) for ref in refs]
        predictions = []
        for start in range(0, len(images), max(1, batch_size)):
            predictions += model.predict_instance(images[start:start + max(1, batch_size)], mask, inst["crop_box"])
        scores = [best_match(p, mask, inst["class"], min_score) for p in predictions]
        by_instance[key] = {f"{name}_source": value for name, value in scores[0].items()}
        by_sample.update({(key, ref.index): s for ref, s in zip(refs, scores[1:])})
    return by_sample, by_instance
