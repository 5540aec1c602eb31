"""Zero-shot mask gate: SAM, prompted with the instance's box, on the image with the sample pasted in.

``--mask_model sam:ID_OR_FOLDER`` (e.g. ``sam:facebook/sam-vit-base`` or a folder saved with
``save_pretrained``) loads transformers' ``SamModel`` / ``SamProcessor`` (``Sam2Model`` /
``Sam2Processor`` for a SAM 2 folder, when the installed transformers has them). No training on
the user's classes is needed: SAM answers "is there still an object of this shape in this box?".

Per image SAM sees the instance's stage-1 crop window (the square around the instance with its
context, widened to hold the whole mask), so small instances keep their detail; it is prompted with
the instance's tight box (optionally also with the mask's innermost point) and returns one mask
with its predicted IoU. The gate's ``mask_iou`` is that mask's IoU with the instance mask;
``mask_score`` the predicted IoU (below ``--mask_min_score``: no match). SAM has no classes:
``mask_class`` is null and ``mask_class_ok`` true; the class check is CLIP's ``--min_clip_margin``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError

SAM_PREFIX = "sam:"
PROMPTS = ("box", "box+point")
SAM_DOWNLOAD_HINT = ("download it once where there is network, e.g. `huggingface-cli download facebook/sam-vit-base "
                     "--local-dir weights/sam-vit-base`, and pass --mask_model sam:weights/sam-vit-base")


def is_sam_spec(spec: str | os.PathLike) -> bool:
    """True for ``sam:ID_OR_FOLDER`` mask-model specs."""
    return str(spec).startswith(SAM_PREFIX)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1), exclusive ends, of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def inner_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from its boundary (inside even for concave shapes)."""
    import cv2

    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def window_of(mask: np.ndarray, crop_box: Sequence[int] | None) -> tuple[int, int, int, int]:
    """The stage-1 crop window, widened to contain the whole mask (the mask's box when there is no crop)."""
    x0, y0, x1, y1 = mask_box(mask)
    if crop_box is None:
        return x0, y0, x1, y1
    h, w = mask.shape
    cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
    return max(0, min(x0, cx0)), max(0, min(y0, cy0)), min(w, max(x1, cx1)), min(h, max(y1, cy1))


@dataclass
class SamGate:
    """A loaded SAM / SAM 2 and its processor; the mask gate's model for ``sam:`` specs."""

    model: Any
    processor: Any
    source: str
    device: str = "cpu"
    prompt: str = "box"
    classes: tuple[str, ...] = ()

    def predict_instance(self, images: Sequence[np.ndarray], mask: np.ndarray,
                         crop_box: Sequence[int] | None = None) -> list[dict]:
        """Per RGB uint8 full image: ``{"masks": (1, H, W) bool tensor, "classes": [None], "scores": (1,)}``."""
        import torch

        x0, y0, x1, y1 = window_of(mask, crop_box)
        local = mask[y0:y1, x0:x1]
        box = [float(v) for v in mask_box(local)]
        crops = [np.ascontiguousarray(image[y0:y1, x0:x1]) for image in images]
        prompts: dict = {"input_boxes": [[box] for _ in crops]}
        if self.prompt == "box+point":
            prompts.update(input_points=[[[list(inner_point(local))]] for _ in crops],
                           input_labels=[[[1]] for _ in crops])
        inputs = self.processor(images=crops, return_tensors="pt", **prompts)
        model_inputs = {k: v.to(self.device) for k, v in inputs.items()
                        if k in ("pixel_values", "input_boxes", "input_points", "input_labels")}
        with torch.no_grad():
            out = self.model(**model_inputs, multimask_output=False)
        masks = self.post_process(out.pred_masks.cpu(), inputs)
        results = []
        for image, local_mask, score in zip(images, masks, out.iou_scores.cpu().float().numpy().reshape(len(images), -1)):
            full = torch.zeros((1, *image.shape[:2]), dtype=torch.bool)
            full[0, y0:y1, x0:x1] = torch.as_tensor(local_mask).reshape(y1 - y0, x1 - x0).bool()
            results.append({"masks": full, "classes": [None], "scores": score[:1].astype(np.float64)})
        return results

    def post_process(self, pred_masks, inputs) -> list:
        """Binary masks at each crop's size: SAM's processor undoes its resizing and padding (it needs
        ``reshaped_input_sizes``), SAM 2's its plain square resize (``original_sizes`` only)."""
        post = self.processor.post_process_masks
        if "reshaped_input_sizes" in inputs:
            return post(pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        return post(pred_masks, inputs["original_sizes"])


def sam_classes(model_type: str):
    """(model class, processor class) of a config's ``model_type`` (SAM 2 only in transformers that have it)."""
    import transformers

    names = {"sam": ("SamModel", "SamProcessor"), "sam2": ("Sam2Model", "Sam2Processor")}.get(model_type)
    if names is None or not all(hasattr(transformers, n) for n in names):
        return None
    return tuple(getattr(transformers, n) for n in names)


def load_sam_gate(spec: str | os.PathLike, device: str = "cpu", prompt: str = "box") -> SamGate:
    """A SAM gate from ``sam:ID_OR_FOLDER`` (a local save_pretrained folder or a Hugging Face hub id)."""
    if prompt not in PROMPTS:
        raise ValueError(f"SAM prompt must be one of {PROMPTS}, got {prompt!r}")
    name = str(spec)[len(SAM_PREFIX):] if is_sam_spec(spec) else str(spec)
    local = Path(name).expanduser()
    if not name or (name.startswith((".", "/", "~")) and not local.is_dir()):
        raise InstSynthError(spec, f"SAM model folder not found; {SAM_DOWNLOAD_HINT}")
    source = str(local.resolve()) if local.is_dir() else name
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InstSynthError(spec, f"cannot read the SAM config ({type(exc).__name__}); {SAM_DOWNLOAD_HINT}") from None
    classes = sam_classes(getattr(config, "model_type", ""))
    if classes is None:
        raise InstSynthError(spec, f"not a SAM model (model_type {getattr(config, 'model_type', None)!r}; this "
                                   "transformers loads sam" + (" and sam2)" if sam_classes("sam2") else ")"))
    model_class, processor_class = classes
    try:
        model = model_class.from_pretrained(source)
        processor = processor_class.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InstSynthError(spec, f"cannot load {model_class.__name__} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}); {SAM_DOWNLOAD_HINT}") from None
    return SamGate(model.eval().to(device), processor, str(spec), device, prompt)
