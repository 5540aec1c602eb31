"""The FastInst meta-architecture: normalise and pad images, run backbone, pixel decoder and decoder,
compute the weighted losses in training or per-instance masks, classes and scores in inference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instsynth.modeling import register_model
from instsynth.modeling.backbone import build_resnet_backbone

from .criterion import HungarianMatcher, SetCriterion
from .decoder import FastInstDecoder
from .pixel_decoder import PPMFPN


def pad_batch(images: list[torch.Tensor], divisibility: int) -> torch.Tensor:
    """Stack CHW images into one zero-padded batch whose size is a multiple of ``divisibility``."""
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    if divisibility > 1:
        h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for b, im in enumerate(images):
        batch[b, :, :im.shape[-2], :im.shape[-1]] = im
    return batch


class FastInst(nn.Module):
    backbone_prefix = "backbone"  # parameters that get SOLVER.BACKBONE_MULTIPLIER

    def __init__(self, backbone: nn.Module, pixel_decoder: nn.Module, decoder: FastInstDecoder,
                 criterion: SetCriterion, loss_weights: dict[str, float], pixel_mean, pixel_std,
                 size_divisibility: int = 32, detections_per_image: int = 100, mask_threshold: float = 0.5,
                 score_threshold: float = 0.0, gt_mask_guided: bool = True, deep_supervision: bool = True):
        super().__init__()
        self.backbone, self.pixel_decoder, self.decoder, self.criterion = backbone, pixel_decoder, decoder, criterion
        self.loss_weights = loss_weights
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.detections_per_image, self.mask_threshold = detections_per_image, mask_threshold
        self.score_threshold = score_threshold
        self.gt_mask_guided, self.deep_supervision = gt_mask_guided, deep_supervision
        self.num_classes = criterion.num_classes

    @property
    def every_parameter_gets_gradient(self) -> bool:
        """Whether every trainable parameter gets a gradient in each step (DDP then skips the search for unused
        ones): without deep supervision the intermediate heads only build detached attention masks."""
        return self.deep_supervision

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(images)
        return self.pixel_decoder([feats[k] for k in sorted(feats, key=lambda n: int(n[3:]))])

    def forward(self, batched_inputs: list[dict]):
        images = [((x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std) for x in batched_inputs]
        sizes = [im.shape[-2:] for im in images]
        batch = pad_batch(images, self.size_divisibility)
        features = self.features(batch)
        if self.training:
            targets = self.prepare_targets(batched_inputs, batch.shape[-2:])
            return self.losses(features, targets)
        out = self.decoder(features)
        return [self.instance_inference(logits, masks, size, (x.get("height", size[0]), x.get("width", size[1])),
                                        batch.shape[-2:])
                for logits, masks, size, x in zip(out["pred_logits"], out["pred_masks"], sizes, batched_inputs)]

    def prepare_targets(self, batched_inputs: list[dict], padded) -> list[dict]:
        targets = []
        for x in batched_inputs:
            inst = x["instances"]
            masks = inst["gt_masks"].to(self.device)
            padded_masks = masks.new_zeros((masks.shape[0], *padded))
            padded_masks[:, :masks.shape[1], :masks.shape[2]] = masks
            targets.append({"labels": inst["gt_classes"].to(self.device), "masks": padded_masks})
        return targets

    def losses(self, features, targets) -> dict[str, torch.Tensor]:
        def match_last(out):
            return self.criterion.matcher(out["pred_logits"], out["pred_masks"], out["query_locations"], targets), \
                [t["masks"] for t in targets]

        out = self.decoder(features, match_last if self.gt_mask_guided else None)
        if not self.deep_supervision:
            out["aux_outputs"] = []
        losses = self.criterion(out, targets)
        return {k: v * self.loss_weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k, v in losses.items()}

    @torch.no_grad()
    def instance_inference(self, logits, masks, input_size, out_size, padded_size) -> dict:
        """Top-k (query, class) pairs; masks resized to the original image; score = class prob x mean
        mask probability inside the mask."""
        num_c = self.num_classes
        scores = logits.float().softmax(-1)[:, :-1].flatten()
        k = min(self.detections_per_image, scores.numel())
        top_scores, top = scores.topk(k)
        classes, query = top % num_c, top // num_c
        h_in, w_in = input_size
        pred_masks, mask_scores = [], []
        for chunk in query.split(16):
            m = F.interpolate(masks[chunk][None].float(), size=padded_size, mode="bilinear", align_corners=False)
            m = F.interpolate(m[:, :, :h_in, :w_in], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
            prob = m.sigmoid()
            binary = prob > self.mask_threshold
            mask_scores.append((prob * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6))
            pred_masks.append(binary)
        pred_masks = torch.cat(pred_masks) if pred_masks else torch.zeros((0, *out_size), dtype=torch.bool)
        final = top_scores * torch.cat(mask_scores) if mask_scores else top_scores
        keep = final > self.score_threshold
        return {"instances": {"pred_masks": pred_masks[keep], "pred_classes": classes[keep], "scores": final[keep]}}


@register_model("FastInst")
def build_fastinst(cfg) -> FastInst:
    f = cfg.MODEL.FASTINST
    backbone = build_resnet_backbone(cfg)
    shapes = backbone.output_shape()
    in_features = [n for n in ("res3", "res4", "res5") if n in shapes]
    if len(in_features) != 3:
        raise ValueError("FastInst needs MODEL.RESNETS.OUT_FEATURES to contain res3, res4 and res5")
    if f.HIDDEN_DIM != f.CONVS_DIM:
        raise ValueError(f"MODEL.FASTINST.HIDDEN_DIM ({f.HIDDEN_DIM}) must equal CONVS_DIM ({f.CONVS_DIM})")
    pixel_decoder = PPMFPN([shapes[n][0] for n in in_features], f.CONVS_DIM, f.NORM)
    decoder = FastInstDecoder(f.HIDDEN_DIM, f.NUM_CLASSES, f.NUM_OBJECT_QUERIES, f.NUM_AUX_QUERIES, f.NHEADS,
                              f.DIM_FEEDFORWARD, f.DEC_LAYERS, f.MASK_DIM, f.PRE_NORM)
    matcher = HungarianMatcher(f.CLASS_WEIGHT, f.MASK_WEIGHT, f.DICE_WEIGHT, f.LOCATION_WEIGHT, f.TRAIN_NUM_POINTS)
    criterion = SetCriterion(f.NUM_CLASSES, matcher, f.NO_OBJECT_WEIGHT, f.TRAIN_NUM_POINTS, f.OVERSAMPLE_RATIO,
                             f.IMPORTANCE_SAMPLE_RATIO)
    weights = {"loss_ce": f.CLASS_WEIGHT, "loss_mask": f.MASK_WEIGHT, "loss_dice": f.DICE_WEIGHT,
               "loss_proposal": f.PROPOSAL_WEIGHT}
    divisibility = cfg.INPUT.SIZE_DIVISIBILITY if cfg.INPUT.SIZE_DIVISIBILITY > 0 else f.SIZE_DIVISIBILITY
    return FastInst(backbone, pixel_decoder, decoder, criterion, weights, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                    divisibility, cfg.TEST.DETECTIONS_PER_IMAGE, f.TEST.MASK_THRESHOLD, f.TEST.SCORE_THRESHOLD,
                    f.GT_MASK_GUIDED, f.DEEP_SUPERVISION)
