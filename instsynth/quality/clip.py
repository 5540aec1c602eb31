"""CLIP image and text embeddings for prompt, class and source similarities."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError
from instsynth.quality.fid import _looks_like_path


CLIP_DOWNLOAD_HINT = ("download it once where there is network, e.g. `huggingface-cli download "
                      "openai/clip-vit-base-patch32 --local-dir weights/clip-vit-base-patch32`, "
                      "and pass that folder (--clip weights/clip-vit-base-patch32)")


# --------------------------------------------------------------------------- CLIP
def _unit_rows(features) -> np.ndarray:
    """Rows scaled to unit length (float64 numpy) of a tensor or a transformers output holding one."""
    if not hasattr(features, "shape"):  # transformers >= 5 returns an output object
        features = features.pooler_output
    features = features.double().cpu().numpy()
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass
class ClipScorer:
    """A CLIP model and processor; embeddings are unit vectors, so dot products are cosines in [-1, 1]."""

    model: Any
    processor: Any
    source: str
    device: str = "cpu"
    batch_size: int = 16

    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) unit image embeddings of RGB uint8 arrays."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out.append(_unit_rows(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, 0))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit text embeddings (each text tokenised alone, so results do not depend on batching)."""
        import torch

        out = []
        for text in texts:
            tokens = self.processor(text=[text], return_tensors="pt", truncation=True)
            with torch.no_grad():
                out.append(_unit_rows(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                                   attention_mask=tokens["attention_mask"].to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, 0))


def load_clip(name: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> ClipScorer:
    """transformers CLIPModel + CLIPProcessor from a ``save_pretrained`` folder or a hub id.

    A hub id is looked up in the local cache and fetched only when not offline (``HF_HUB_OFFLINE``);
    when it cannot be loaded the InstSynthError says what to download and where.
    """
    from transformers import CLIPModel, CLIPProcessor

    text = str(name)
    path = Path(text).expanduser()
    if not path.exists() and _looks_like_path(text):
        raise InstSynthError(path, f"CLIP model folder not found; {CLIP_DOWNLOAD_HINT}")
    source = str(path) if path.exists() else text
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=path.exists())
        processor = CLIPProcessor.from_pretrained(source, local_files_only=path.exists())
    except (OSError, ValueError) as exc:
        where = "folder is not a complete CLIP save_pretrained folder" if path.exists() else \
            "is not a local folder and could not be loaded from the Hugging Face hub (offline or not cached)"
        raise InstSynthError(text, f"CLIP model {where} ({exc.__class__.__name__}); {CLIP_DOWNLOAD_HINT}") from None
    return ClipScorer(model.eval().to(device), processor, text, device, batch_size)


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when available, else ``cpu``."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
