"""FastInst query proposals and the dual-path transformer decoder (batch-first tensors throughout).

- Instance activation-guided queries: a small head predicts a class-activation map (C + 1 classes)
  on the 1/16 features; the top-k pixels (local maxima first) become the object queries and their
  positional embeddings.
- Auxiliary learnable queries are appended; they take part in attention but make no predictions.
- Each decoder layer updates the pixel features (pixel path: pixels attend to queries, FFN) and then
  the queries (query path: masked cross-attention to pixels, self-attention, FFN). The attention mask
  of a layer comes from the previous layer's mask predictions (or, for GT mask-guided learning, from
  the matched ground-truth masks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int, layers: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class AttentionBlock(nn.Module):
    """Post-norm (or pre-norm) residual multi-head attention; self-attention when ``memory`` is None."""

    def __init__(self, dim: int, heads: int, pre_norm: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        for p in self.attn.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x, pos, memory=None, memory_pos=None, attn_mask=None):
        h = self.norm(x) if self.pre_norm else x
        if memory is None:
            memory, memory_pos = h, pos
        out = self.attn(h + pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        x = x + out
        return x if self.pre_norm else self.norm(x)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, pre_norm: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x):
        h = self.norm(x) if self.pre_norm else x
        x = x + self.fc2(F.relu(self.fc1(h)))
        return x if self.pre_norm else self.norm(x)


class QueryProposal(nn.Module):
    """Instance activation-guided queries: top-k pixels of the class-activation map."""

    def __init__(self, dim: int, num_queries: int, num_classes: int):
        super().__init__()
        self.num_queries, self.num_classes = num_queries, num_classes
        self.cls_head = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(dim, num_classes + 1, 1))

    @torch.no_grad()
    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, k] flat pixel indices: highest foreground probability, local maxima of their class first."""
        probs = logits.float().softmax(1)[:, :-1]  # B, C, H, W
        best, cls = probs.max(1, keepdim=True)
        per_class = probs * F.one_hot(cls[:, 0], self.num_classes).permute(0, 3, 1, 2)
        peaks = (per_class == F.max_pool2d(per_class, 3, 1, 1)) & (per_class > 1e-6)
        score = (per_class + peaks.to(per_class)).amax(1).flatten(1)  # B, HW
        return score.topk(self.num_queries, dim=1).indices

    def forward(self, x: torch.Tensor, pos: torch.Tensor):
        """x: [B, D, H, W] 1/16 features; pos: [1, D, H, W]. Returns queries [B, k, D], their positional
        embeddings [B, k, D], locations [B, k, 2] (x, y in [0, 1], pixel centres) and the logits."""
        b, d, h, w = x.shape
        if h * w < self.num_queries:
            raise ValueError(f"input too small: the 1/16 feature map has {h * w} pixels but "
                             f"NUM_OBJECT_QUERIES is {self.num_queries}")
        logits = self.cls_head(x)
        idx = self.select(logits)  # B, k
        queries = torch.gather(x.flatten(2), 2, idx.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)
        query_pos = pos.flatten(2).expand(b, -1, -1).gather(2, idx.unsqueeze(1).expand(-1, d, -1)).transpose(1, 2)
        locations = torch.stack([((idx % w).float() + 0.5) / w, ((idx // w).float() + 0.5) / h], dim=-1)
        return queries, query_pos, locations, logits


class DualPathLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, pre_norm: bool):
        super().__init__()
        self.pixel_cross = AttentionBlock(dim, heads, pre_norm)
        self.pixel_ffn = FFN(dim, ffn_dim, pre_norm)
        self.query_cross = AttentionBlock(dim, heads, pre_norm)
        self.query_self = AttentionBlock(dim, heads, pre_norm)
        self.query_ffn = FFN(dim, ffn_dim, pre_norm)

    def forward(self, queries, pixels, query_pos, pixel_pos, attn_mask):
        pixels = self.pixel_ffn(self.pixel_cross(pixels, pixel_pos, queries, query_pos))
        queries = self.query_cross(queries, query_pos, pixels, pixel_pos, attn_mask)
        queries = self.query_ffn(self.query_self(queries, query_pos))
        return queries, pixels


class FastInstDecoder(nn.Module):
    """Query proposal + ``num_layers`` dual-path layers + prediction heads after every layer."""

    def __init__(self, dim: int, num_classes: int, num_queries: int, num_aux_queries: int, heads: int,
                 ffn_dim: int, num_layers: int, mask_dim: int, pre_norm: bool = False):
        super().__init__()
        self.num_queries, self.num_aux, self.heads, self.num_layers = num_queries, num_aux_queries, heads, num_layers
        side = max(1, int(round(math.sqrt(num_queries))))
        self.meta_pos = nn.Parameter(torch.randn(1, dim, side, side) * 0.02)
        self.proposal = QueryProposal(dim, num_queries, num_classes)
        if num_aux_queries:
            self.aux_feat = nn.Embedding(num_aux_queries, dim)
            self.aux_pos = nn.Embedding(num_aux_queries, dim)
        self.layers = nn.ModuleList(DualPathLayer(dim, heads, ffn_dim, pre_norm) for _ in range(num_layers))
        n_heads = num_layers + 1
        self.query_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_heads))
        self.class_embed = nn.ModuleList(MLP(dim, dim, num_classes + 1, 3) for _ in range(n_heads))
        self.mask_embed = nn.ModuleList(MLP(dim, dim, mask_dim, 3) for _ in range(n_heads))
        self.pixel_embed = nn.ModuleList(nn.Linear(dim, mask_dim) for _ in range(n_heads))

    def _pos(self, size) -> torch.Tensor:
        return F.interpolate(self.meta_pos, size=size, mode="bilinear", align_corners=False)

    def predict(self, k: int, queries, pixels, size, with_class: bool = True):
        """Class logits [B, Q, C+1] (or None) and mask logits [B, Q, H, W] from head ``k``."""
        q = self.query_norm[k](queries[:, :self.num_queries])
        logits = self.class_embed[k](q) if with_class else None
        masks = torch.einsum("bqc,blc->bql", self.mask_embed[k](q), self.pixel_embed[k](pixels))
        return logits, masks.reshape(masks.shape[0], self.num_queries, *size)

    def attention_mask(self, blocked: torch.Tensor) -> torch.Tensor:
        """[B*heads, Q+aux, HW] attention mask from [B, Q, HW] blocked pixels; aux queries see all pixels,
        and a query that would see nothing sees everything."""
        blocked = F.pad(blocked, (0, 0, 0, self.num_aux), value=False)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.repeat_interleave(self.heads, dim=0).detach()

    def forward(self, features: list[torch.Tensor], match_fn=None):
        """``features``: [1/32, 1/16, 1/8] maps. ``match_fn(outputs) -> (indices, gt_masks)`` is given in
        training to enable GT mask-guided learning. Returns the outputs dict (see FastInst.criterion)."""
        feat16, feat8 = features[1], features[2]
        b = feat8.shape[0]
        size = feat8.shape[-2:]
        queries, query_pos, locations, proposal_logits = self.proposal(feat16, self._pos(feat16.shape[-2:]))
        if self.num_aux:
            queries = torch.cat([queries, self.aux_feat.weight.expand(b, -1, -1)], 1)
            query_pos = torch.cat([query_pos, self.aux_pos.weight.expand(b, -1, -1)], 1)
        pixels = feat8.flatten(2).transpose(1, 2)
        pixel_pos = self._pos(size).flatten(2).transpose(1, 2)

        training = self.training
        logits, masks = self.predict(0, queries, pixels, size, with_class=training)
        preds = [(logits, masks)]
        memory = [(queries, pixels)]
        for i, layer in enumerate(self.layers):
            attn = self.attention_mask((masks < 0).flatten(2))
            queries, pixels = layer(queries, pixels, query_pos, pixel_pos, attn)
            last = i == self.num_layers - 1
            logits, masks = self.predict(i + 1, queries, pixels, size, with_class=training or last)
            preds.append((logits, masks))
            memory.append((queries, pixels))

        out = {"proposal_logits": proposal_logits, "query_locations": locations,
               "pred_logits": preds[-1][0], "pred_masks": preds[-1][1], "matching": None,
               "aux_outputs": [{"pred_logits": lg, "pred_masks": mk, "matching": None} for lg, mk in preds[:-1]]}
        if training and match_fn is not None:
            guided = self.guided_outputs(out, memory, query_pos, pixel_pos, size, match_fn)
            out["aux_outputs"] = guided + out["aux_outputs"]
        return out

    def guided_outputs(self, out, memory, query_pos, pixel_pos, size, match_fn) -> list[dict]:
        """GT mask-guided learning: rerun each layer on its own output with the matched ground-truth
        masks (of the last layer's matching) as attention masks; those predictions share that matching."""
        indices, gt_masks = match_fn(out)
        b = out["pred_masks"].shape[0]
        blocked = torch.zeros(b, self.num_queries, size[0] * size[1], dtype=torch.bool, device=out["pred_masks"].device)
        for i, (src, tgt) in enumerate(indices):
            if len(src):
                small = F.interpolate(gt_masks[i][tgt][:, None].float(), size=size, mode="nearest")[:, 0]
                blocked[i, src.to(blocked.device)] = ~small.flatten(1).bool()
        attn = self.attention_mask(blocked)
        guided = []
        for i, layer in enumerate(self.layers):
            queries, pixels = layer(*memory[i + 1], query_pos, pixel_pos, attn)
            logits, masks = self.predict(i + 1, queries, pixels, size)
            guided.append({"pred_logits": logits, "pred_masks": masks, "matching": indices})
        out["matching"] = indices
        return guided
