"""PPM-FPN pixel decoder: an FPN over res3..res5 whose coarsest level goes through a pyramid pooling module."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "":
        return nn.Identity()
    raise ValueError(f"pixel decoder norm must be GN, BN or '', got {norm!r}")


def conv_norm(cin: int, cout: int, kernel: int, norm: str, relu: bool) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "")
    nn.init.kaiming_uniform_(conv.weight, a=1)  # Caffe2-style Xavier fill
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv, make_norm(norm, cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PyramidPooling(nn.Module):
    """Concatenate the input with its average-pooled (1, 2, 3, 6 bins) context and fuse with a 1x1 conv."""

    def __init__(self, channels: int, bins=(1, 2, 3, 6)):
        super().__init__()
        inner = max(1, channels // 4)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(channels, inner, 1), nn.ReLU(inplace=True))
            for b in bins)
        self.fuse = nn.Sequential(nn.Conv2d(channels + len(bins) * inner, channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.fuse(torch.cat(pooled + [x], dim=1))


class PPMFPN(nn.Module):
    """Returns the FPN outputs ``[1/32, 1/16, 1/8]`` (coarse to fine), each with ``channels`` channels."""

    def __init__(self, in_channels: list[int], channels: int, norm: str = "GN"):
        super().__init__()
        self.lateral = nn.ModuleList(conv_norm(c, channels, 1, norm, relu=False) for c in in_channels)
        self.output = nn.ModuleList(conv_norm(channels, channels, 3, norm, relu=True) for _ in in_channels)
        self.ppm = PyramidPooling(channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``features``: fine to coarse (res3, res4, res5)."""
        outs, y = [], None
        for i in reversed(range(len(features))):
            lat = self.lateral[i](features[i])
            if y is None:
                y = self.ppm(lat)
            else:
                y = lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output[i](y)
            outs.append(y)
        return outs
