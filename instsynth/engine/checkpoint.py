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

from instsynth.core.io import InstSynthError, get_logger, save_torch, write_bytes
from instsynth.modeling.convert import CHECKPOINT_SUFFIXES

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


class CheckpointKeeper:
    """Detectron2 ``PeriodicCheckpointer(max_to_keep=keep)`` semantics: after each periodic checkpoint this
    run saves, the oldest ones it saved beyond the newest ``keep`` are deleted (``keep`` <= 0: none).
    Files of earlier runs and ``model_final.pth`` are never touched."""

    def __init__(self, output_dir: str | Path, keep: int):
        self.output_dir, self.keep, self.recent = Path(output_dir), int(keep), []

    def saved(self, name: str) -> list[str]:
        """Record checkpoint ``name``; returns the names deleted."""
        self.recent.append(name)
        if self.keep <= 0 or len(self.recent) <= self.keep:
            return []
        old, self.recent = self.recent[:-self.keep], self.recent[-self.keep:]
        for gone in old:
            (self.output_dir / gone).unlink(missing_ok=True)
        log.info("deleted %s (SOLVER.CHECKPOINT_KEEP %d)", ", ".join(old), self.keep)
        return old


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


BACKBONE_FORMATS = ("d2_resnet", "torchvision")  # files that hold only a backbone (see modeling.convert)
COUNTER_SUFFIX = "num_batches_tracked"  # BatchNorm step counters: buffers, not weights


def group_keys(keys) -> str:
    """``decoder.layers.1 (30 tensors), ...``: keys grouped by their prefix up to the first number (a layer
    of a stack) or, without one, by their module."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        cut = next((i + 1 for i, p in enumerate(parts[:-1]) if p.isdigit()), max(len(parts) - 1, 1))
        prefix = ".".join(parts[:cut])
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{p} ({n} tensor{'s' if n != 1 else ''})" for p, n in groups.items())


def load_model_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a checkpoint into ``model``: ours (``{"model": ...}`` or a plain state dict), an official
    FastInst / Detectron2 checkpoint, Detectron2's torchvision-converted ``R-50.pkl`` or a torchvision
    ResNet (into the backbone); see :mod:`instsynth.modeling.convert`.

    Loud about what it leaves out: tensors of another shape (e.g. the class heads of a model with another
    number of classes) keep their fresh initialisation, and model tensors the file does not have (e.g.
    decoder layers 1-2 of a D3 model loaded from a D1 checkpoint) stay random; both are logged as WARNINGs
    naming them, grouped by prefix. A backbone-only file leaves the rest of the model fresh as expected (INFO).
    BatchNorm ``num_batches_tracked`` counters are neither counted as loaded nor as missing. Returns
    ``{"loaded", "reinitialised", "missing", "unused"}`` key lists."""
    from instsynth.modeling.convert import load_project_state

    if not Path(path).is_file():
        raise InstSynthError(path, "MODEL.WEIGHTS not found. For the ImageNet ResNet-50 of the Cityscapes configs: "
                                   "mkdir -p weights && wget -P weights https://download.pytorch.org/models/"
                                   "resnet50-0676ba61.pth (or pass MODEL.WEIGHTS '' to train from scratch)")
    state, fmt = load_project_state(path)
    own = model.state_dict()
    report = _compare_states(own, state)
    if not report["loaded"]:
        raise InstSynthError(path, f"no parameter of the checkpoint ({fmt} names) matches this model")
    if report["reinitialised"]:
        log.warning("%s: re-initialised %d tensors whose shape differs from the checkpoint's (e.g. class heads "
                    "of another number of classes): %s", path, len(report["reinitialised"]),
                    ", ".join(f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in report["reinitialised"]))
    load = {k: state[k] for k in report["loaded"]}
    counters = {k: state[k] for k in state if k.endswith(COUNTER_SUFFIX) and k in own and own[k].shape == state[k].shape}
    model.load_state_dict({**load, **counters}, strict=False)
    _log_missing(path, fmt, report["missing"])
    log.info("loaded %d of %d model tensors from %s (%s names); %d model tensors not in the file, %d re-initialised "
             "for another shape, %d checkpoint tensors unused", len(report["loaded"]),
             sum(not k.endswith(COUNTER_SUFFIX) for k in own), path, fmt, len(report["missing"]),
             len(report["reinitialised"]), len(report["unused"]))
    return report


def _compare_states(own: dict, state: dict) -> dict[str, list[str]]:
    """Keys (BatchNorm counters left out) that load, that differ in shape, that the model has and the file
    has not, and that the file has and the model has not."""
    def weights(d):
        return [k for k in d if not k.endswith(COUNTER_SUFFIX)]
    return {"loaded": [k for k in weights(state) if k in own and own[k].shape == state[k].shape],
            "reinitialised": [k for k in weights(state) if k in own and own[k].shape != state[k].shape],
            "missing": [k for k in weights(own) if k not in state],
            "unused": [k for k in weights(state) if k not in own]}


def _log_missing(path, fmt: str, missing: list[str]) -> None:
    """WARNING for model tensors the file should have had; INFO for the non-backbone part after a backbone file."""
    expected_fresh = [k for k in missing if fmt in BACKBONE_FORMATS and not k.startswith("backbone.")]
    unloaded = [k for k in missing if k not in expected_fresh]
    if unloaded:
        log.warning("%s: %d tensors of this model are not in the checkpoint and keep their random initialisation: "
                    "%s", path, len(unloaded), group_keys(unloaded))
    if expected_fresh:
        log.info("%s holds a backbone only (%s): %d tensors outside the backbone start fresh", path, fmt,
                 len(expected_fresh))
