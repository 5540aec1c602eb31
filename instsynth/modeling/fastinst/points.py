"""Point sampling for mask losses (PointRend / Mask2Former style): losses on K points, not all pixels."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` [N, C, H, W] at ``coords`` [N, P, 2] (x, y in [0, 1]) -> [N, C, P]."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # N, P, 1, 2
    return F.grid_sample(maps, grid.to(maps.dtype), align_corners=False).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Higher for logits near the decision boundary (0)."""
    return -logits.abs()


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_ratio: float, score: Callable = uncertainty) -> torch.Tensor:
    """[N, num_points, 2] coordinates: the most uncertain of ``oversample_ratio * num_points`` random
    points (``importance_ratio`` of them) plus uniformly random points for the rest."""
    n = logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, sampled, 2, device=logits.device)
    point_unc = score(point_sample(logits, coords))[:, 0]  # N, sampled
    k = int(importance_ratio * num_points)
    idx = point_unc.topk(k, dim=1).indices
    chosen = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    rest = num_points - k
    if rest > 0:
        chosen = torch.cat([chosen, torch.rand(n, rest, 2, device=logits.device)], dim=1)
    return chosen
