"""torchvision ResNet backbone returning Detectron2-named feature maps (``res2`` .. ``res5``)."""
from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from instsynth.core.io import InstSynthError

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
_STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
DEPTHS = (18, 34, 50, 101, 152)


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """A ``channels -> module`` factory for ``MODEL.RESNETS.NORM``."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm in ("BN", "SyncBN"):  # SyncBN: converted by the trainer when running distributed
        return nn.BatchNorm2d
    if norm == "GN":
        return lambda c: nn.GroupNorm(32, c)
    raise InstSynthError("MODEL.RESNETS.NORM", f"must be FrozenBN, BN, SyncBN or GN, got {norm!r}")


class ResNetBackbone(nn.Module):
    """ResNet-{18..152} body; ``forward`` returns ``{name: feature}`` for ``out_features``."""

    def __init__(self, depth: int = 50, out_features=("res3", "res4", "res5"), norm: str = "FrozenBN",
                 freeze_at: int = 0):
        super().__init__()
        if depth not in DEPTHS:
            raise InstSynthError("MODEL.RESNETS.DEPTH", f"must be one of {DEPTHS}, got {depth}")
        unknown = set(out_features) - set(STRIDES)
        if unknown:
            raise InstSynthError("MODEL.RESNETS.OUT_FEATURES", f"unknown {sorted(unknown)}; valid: {list(STRIDES)}")
        self.body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer(norm))
        del self.body.fc, self.body.avgpool
        self.out_features = tuple(out_features)
        width = 64 if depth < 50 else 256
        self.channels = {name: width * 2 ** i for i, name in enumerate(STRIDES)}
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        groups = [[self.body.conv1, self.body.bn1], [self.body.layer1], [self.body.layer2],
                  [self.body.layer3], [self.body.layer4]]
        for group in groups[:freeze_at]:
            for module in group:
                for p in module.parameters():
                    p.requires_grad_(False)

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """``{name: (channels, stride)}`` of the returned features."""
        return {n: (self.channels[n], STRIDES[n]) for n in self.out_features}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        out, last = {}, max(STRIDES[n] for n in self.out_features)
        for name, stage in _STAGES.items():
            x = getattr(b, stage)(x)
            if name in self.out_features:
                out[name] = x
            if STRIDES[name] == last:
                break
        return out


def build_resnet_backbone(cfg) -> ResNetBackbone:
    if cfg.MODEL.BACKBONE.NAME != "build_resnet_backbone":
        raise InstSynthError("MODEL.BACKBONE.NAME", f"only 'build_resnet_backbone' is available, got "
                                                    f"{cfg.MODEL.BACKBONE.NAME!r}")
    r = cfg.MODEL.RESNETS
    return ResNetBackbone(r.DEPTH, tuple(r.OUT_FEATURES), r.NORM, cfg.MODEL.BACKBONE.FREEZE_AT)
