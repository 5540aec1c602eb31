"""Hungarian matching and set losses of FastInst.

Matching cost per (query, instance): class (-p[class]), mask BCE and dice on shared random points,
and a large location cost unless the query's pixel lies inside the instance. The proposal head
(class-activation map) is matched per pixel with the class and location costs. Losses: class
cross-entropy (no-object down-weighted), mask BCE and dice on importance-sampled points, proposal
cross-entropy over all pixels of the 1/16 map.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .points import point_sample, uncertain_point_coords

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def pair_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of every prediction [Q, P] against every target [N, P] -> [Q, N]."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pair_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def _assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cost = cost.float().cpu()
    cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


class HungarianMatcher(nn.Module):
    """Costs are computed in fp32 with autocast disabled, as in the official code: under fp16 autocast the
    BCE cost (a sum over ``num_points`` points) overflows to inf and the assignment becomes arbitrary."""

    def __init__(self, cost_class: float, cost_mask: float, cost_dice: float, cost_location: float, num_points: int):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_location, self.num_points = cost_location, num_points

    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, locations: torch.Tensor, labels: torch.Tensor,
                    tmask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """fp32 [Q, N] cost of one image: logits [Q, C+1], masks [Q, h, w], locations [Q, 2], target labels [N]
        and masks [N, H, W], shared point coordinates [1, P, 2]."""
        with torch.autocast(masks.device.type, enabled=False):
            tmask = tmask.float()
            cost_class = -logits.float().softmax(-1)[:, labels]
            inside = point_sample(tmask[None], locations.float()[None])[0] > 0  # N, Q
            t_pts = point_sample(tmask[None], coords.float())[0]  # N, P
            p_pts = point_sample(masks.float()[None], coords.float())[0]  # Q, P
            return (self.cost_class * cost_class + self.cost_mask * pair_bce_cost(p_pts, t_pts)
                    + self.cost_dice * pair_dice_cost(p_pts, t_pts) - self.cost_location * inside.T.float())

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, masks: torch.Tensor, locations: torch.Tensor,
                targets: list[dict]) -> Indices:
        """logits [B, Q, C+1], masks [B, Q, h, w], locations [B, Q, 2]; targets: {"labels", "masks"}."""
        out = []
        for b, tgt in enumerate(targets):
            labels = tgt["labels"]
            if len(labels) == 0:
                out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            coords = torch.rand(1, self.num_points, 2, device=masks.device)
            out.append(_assign(self.cost_matrix(logits[b], masks[b], locations[b], labels, tgt["masks"], coords)))
        return out

    @torch.no_grad()
    def match_proposals(self, proposal_logits: torch.Tensor, targets: list[dict]) -> Indices:
        """One pixel of the 1/16 class-activation map per instance: likely class, inside the instance."""
        size = proposal_logits.shape[-2:]
        out = []
        for b, tgt in enumerate(targets):
            labels = tgt["labels"]
            if len(labels) == 0:
                out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            with torch.autocast(proposal_logits.device.type, enabled=False):
                prob = proposal_logits[b].float().flatten(1).T.softmax(-1)  # HW, C+1
                inside = F.adaptive_avg_pool2d(tgt["masks"][None].float(), size)[0] > 0  # N, h, w
                cost = -self.cost_class * prob[:, labels] - self.cost_location * inside.flatten(1).T.float()
            out.append(_assign(cost))
        return out


def _src_index(indices: Indices):
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def _matched_labels(targets: list[dict], indices: Indices, device) -> torch.Tensor:
    return torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(device)


class SetCriterion(nn.Module):
    """Losses of all prediction sets (final, intermediate, GT mask-guided) and of the proposals."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, no_object_weight: float, num_points: int,
                 oversample_ratio: float, importance_ratio: float):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.num_points, self.oversample, self.importance = num_points, oversample_ratio, importance_ratio
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("class_weight", weight, persistent=False)

    def loss_labels(self, logits, targets, indices) -> torch.Tensor:
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        target[_src_index(indices)] = _matched_labels(targets, indices, logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), target, self.class_weight)

    def loss_masks(self, masks, targets, indices, num_masks: float) -> dict[str, torch.Tensor]:
        src = masks[_src_index(indices)][:, None].float()  # M, 1, h, w
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])[:, None].float()
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample, self.importance)
            labels = point_sample(tgt, coords)[:, 0]
        points = point_sample(src, coords)[:, 0]
        return {"loss_mask": bce_loss(points, labels, num_masks), "loss_dice": dice_loss(points, labels, num_masks)}

    def loss_proposals(self, proposal_logits, targets, indices) -> torch.Tensor:
        logits = proposal_logits.float().flatten(2)  # B, C+1, HW
        target = torch.full((logits.shape[0], logits.shape[2]), self.num_classes, dtype=torch.long,
                            device=logits.device)
        target[_src_index(indices)] = _matched_labels(targets, indices, logits.device)
        return F.cross_entropy(logits, target)

    def num_masks(self, targets, device) -> float:
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted losses: ``loss_ce``, ``loss_mask``, ``loss_dice`` (suffix ``_i`` for the i-th auxiliary
        prediction set) and ``loss_proposal``."""
        locations = outputs["query_locations"]
        num_masks = self.num_masks(targets, locations.device)
        losses = {}
        sets = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for suffix, pred in sets:
            indices = pred.get("matching") or self.matcher(pred["pred_logits"], pred["pred_masks"], locations, targets)
            losses["loss_ce" + suffix] = self.loss_labels(pred["pred_logits"], targets, indices)
            for k, v in self.loss_masks(pred["pred_masks"], targets, indices, num_masks).items():
                losses[k + suffix] = v
        prop_indices = self.matcher.match_proposals(outputs["proposal_logits"], targets)
        losses["loss_proposal"] = self.loss_proposals(outputs["proposal_logits"], targets, prop_indices)
        return losses
