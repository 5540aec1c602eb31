"""Checkpoints in Detectron2's layout: ``model_XXXXXXX.pth`` / ``model_final.pth`` plus a
``last_checkpoint`` file naming the newest, and loading of ``MODEL.WEIGHTS``.

A checkpoint holds ``{"model", "optimizer", "scheduler", "scaler", "iteration", "rng"}``; everything is
stored as tensors and plain Python values so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from instsynth.io import InstSynthError, atomic_path, get_logger, write_bytes

log = get_logger("instsynth.engine")
LAST_CHECKPOINT = "last_checkpoint"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint saved after ``iteration`` (0-based) iterations' updates."""
    return f"model_{iteration:07d}.pth"


def save_torch(data, path: str | Path) -> Path:
    """``torch.save(data)`` to ``path`` atomically; a full disk is reported as such by
    :func:`~instsynth.io.atomic_path` (torch's error has no errno)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def save_checkpoint(output_dir: str | Path, name: str, model: nn.Module, optimizer=None, scheduler=None,
                    scaler=None, iteration: int = -1) -> Path:
    """Write ``output_dir/name`` atomically and point ``last_checkpoint`` at it."""
    output_dir = Path(output_dir)
    data = {"model": model.state_dict(), "iteration": iteration, "rng": rng_state()}
    if optimizer is not None:
        data["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        data["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        data["scaler"] = scaler.state_dict()
    path = save_torch(data, output_dir / name)
    write_bytes(output_dir / LAST_CHECKPOINT, name.encode())
    log.info("saved checkpoint %s", path)
    return path


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``output_dir/last_checkpoint``, or None when there is none."""
    marker = Path(output_dir) / LAST_CHECKPOINT
    if not marker.is_file():
        return None
    path = Path(output_dir) / marker.read_text().strip()
    if not path.is_file():
        raise InstSynthError(marker, f"names {path.name}, which does not exist")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The content of a checkpoint file (``torch.load(weights_only=True)``; Detectron2 ``.pkl`` pickles of
    numpy arrays are read without running code)."""
    from instsynth.modeling.convert import read_weights

    return read_weights(path)


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl")


def maybe_load_weights(model: nn.Module, weights: str) -> bool:
    """Load ``MODEL.WEIGHTS`` unless it is empty or a folder / hub id that the model's builder loads
    itself (models that can do so set ``loads_own_weights = True``). Returns whether it loaded."""
    if not weights:
        return False
    path = Path(weights)
    if path.suffix not in CHECKPOINT_SUFFIXES and not path.is_file() and getattr(model, "loads_own_weights", False):
        return False
    load_model_weights(model, path)
    return True


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model``: ours (``{"model": ...}`` or a plain state dict), an official
    FastInst / Detectron2 checkpoint, Detectron2's torchvision-converted ``R-50.pkl`` or a torchvision
    ResNet (into the backbone); see :mod:`instsynth.modeling.convert`. Tensors of another shape (e.g. the
    class heads of a model with another number of classes) keep their fresh initialisation, with a warning
    naming them."""
    from instsynth.modeling.convert import load_project_state

    if not Path(path).is_file():
        raise InstSynthError(path, "MODEL.WEIGHTS not found. For the ImageNet ResNet-50 of the Cityscapes configs: "
                                   "mkdir -p weights && wget -P weights https://download.pytorch.org/models/"
                                   "resnet50-0676ba61.pth (or pass MODEL.WEIGHTS '' to train from scratch)")
    state, fmt = load_project_state(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if skipped:
        log.warning("%s: re-initialised %d tensors whose shape differs from the checkpoint's (e.g. class heads "
                    "of another number of classes): %s", path, len(skipped),
                    ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in skipped))
    for k in skipped:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0:
        raise InstSynthError(path, f"no parameter of the checkpoint ({fmt} names) matches this model")
    log.info("loaded %d tensors from %s (%s names; %d model tensors not in it, %d checkpoint tensors unused)",
             loaded, path, fmt, len(result.missing_keys), len(result.unexpected_keys))
