"""Training visualisation (``VIS_PERIOD``): ground truth next to the current predictions of one image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from instsynth.core.io import write_png

PALETTE = np.random.default_rng(0).integers(40, 256, size=(256, 3))


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` (HxWx3 uint8) with each mask of ``masks`` [N, H, W] blended in its own colour."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        out[mask] = out[mask] * (1 - alpha) + PALETTE[i % len(PALETTE)] * alpha
    return out.astype(np.uint8)


@torch.no_grad()
def save_training_visual(model: torch.nn.Module, sample: dict, path: str | Path, score_threshold: float = 0.5) -> Path:
    """Write ``[ground truth | predictions with score > threshold]`` of one mapped training sample."""
    was_training = model.training
    model.eval()
    try:
        h, w = sample["image"].shape[-2:]
        pred = model([{"image": sample["image"], "height": h, "width": w}])[0]["instances"]
    finally:
        model.train(was_training)
    image = sample["image"].permute(1, 2, 0).cpu().numpy()
    keep = pred["scores"] > score_threshold
    gt = overlay(image, sample["instances"]["gt_masks"].cpu().numpy())
    predicted = overlay(image, pred["pred_masks"][keep].cpu().numpy())
    return write_png(path, np.concatenate([gt, predicted], axis=1))
