"""Model registry: ``build_model(cfg)`` builds ``MODEL.META_ARCHITECTURE`` ("FastInst", "OneFormer", ...).

Every model follows one interface: ``model(batched_inputs)`` where each input is a dict
``{"image": uint8 CHW tensor, "height", "width", "instances": {"gt_classes": LongTensor (contiguous
0..C-1), "gt_masks": BoolTensor[N, H, W]}}``. In training mode it returns a dict of scalar losses;
in eval mode a list of ``{"instances": {"pred_masks": BoolTensor[N, height, width],
"pred_classes": LongTensor, "scores": FloatTensor}}``, one per input, at the original size.
Register a model with ``@register_model("Name")`` on a ``builder(cfg) -> nn.Module``.

``MODEL.WEIGHTS``: the trainer loads a checkpoint file (``.pth``/``.pkl``: ours, a plain state dict, an
official FastInst / Detectron2 checkpoint, Detectron2's R-50.pkl or a torchvision ResNet; see
:mod:`instsynth.modeling.convert`). A model whose builder loads a folder or hub id itself (``from_pretrained``) sets
the attribute ``loads_own_weights = True``; the trainer then leaves such a value to it. A model whose every
trainable parameter gets a gradient in each training step sets ``every_parameter_gets_gradient = True``, and
DDP then runs with ``find_unused_parameters=False`` (faster; otherwise True).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable

from torch import nn

from instsynth.core.io import InstSynthError

_MODELS: dict[str, Callable] = {}
_MODEL_MODULES = ("instsynth.modeling.fastinst", "instsynth.modeling.oneformer")
"""Modules that register models; a missing optional module is skipped."""


def register_model(name: str) -> Callable:
    """Decorator registering ``builder(cfg) -> nn.Module`` under ``MODEL.META_ARCHITECTURE == name``."""
    def deco(builder: Callable) -> Callable:
        _MODELS[name] = builder
        return builder
    return deco


def _import_model_modules() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but one of its imports is missing
                raise


def registered_models() -> list[str]:
    _import_model_modules()
    return sorted(_MODELS)


def build_model(cfg) -> nn.Module:
    """The (randomly initialised) model named by ``cfg.MODEL.META_ARCHITECTURE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    valid = registered_models()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InstSynthError("MODEL.META_ARCHITECTURE", f"unknown model {name!r}.{hint} Registered models: "
                                                        f"{', '.join(valid)}")
    return _MODELS[name](cfg)
