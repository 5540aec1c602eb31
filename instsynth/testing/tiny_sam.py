"""A tiny SAM (transformers ``SamModel`` + ``SamProcessor``) for the zero-shot mask-gate tests.

:func:`build_tiny_sam` saves a randomly initialised SAM (128-pixel input, 2 ViT layers of width 32,
about 96k parameters) with its processor, loadable by path as ``--mask_model sam:FOLDER``.
:func:`train_tiny_sam` then fits it briefly on the box-prompted instances of a Cityscapes tree's
split, as SAM is trained: the instance's stage-1 crop window with its tight box in, its mask out
(focal-free BCE + dice on the low-resolution mask, MSE on the predicted IoU), plus boxes over
object-free regions whose target is an empty mask with IoU 0. It never sees the gate's test samples
(instances replaced by background). Seeded: the same call gives the same weights.

:func:`build_tiny_sam2` saves a randomly initialised SAM 2 (``Sam2Model`` + ``Sam2Processor``: a
4-stage Hiera of widths 8-64 at 128 pixels, an FPN and mask decoder of width 32, about 120k
parameters), for transformers that have SAM 2 (:func:`has_sam2`); ``train_tiny_sam(..., sam2=True)``
fits it the same way (SAM 2's processor resizes to the square input without padding).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

INPUT_SIZE = 128
NEGATIVE_SHARE = 0.3
"""Share of instances that also give an object-free window."""


def tiny_sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=INPUT_SIZE, patch_size=16, window_size=4, global_attn_indexes=[1],
                             num_pos_feats=16, mlp_dim=64, initializer_range=0.02)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=INPUT_SIZE, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def tiny_sam_processor():
    from transformers import SamImageProcessor, SamProcessor

    low = INPUT_SIZE // 4
    return SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": INPUT_SIZE}, pad_size={"height": INPUT_SIZE, "width": INPUT_SIZE},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))


def _save(out: str | Path, model, processor) -> Path:
    """``model`` and ``processor`` saved with ``save_pretrained`` to ``out``."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def _seeded(model_class: Callable, config: Callable, seed: int):
    """A randomly initialised ``model_class(config())`` under torch seed ``seed``."""
    import torch

    torch.manual_seed(seed)
    return model_class(config())


def build_tiny_sam(out: str | Path, seed: int = 0, model=None) -> Path:
    """Save a tiny SAM (random unless ``model`` is given) and its processor to ``out``."""
    from transformers import SamModel

    return _save(out, model if model is not None else _seeded(SamModel, tiny_sam_config, seed), tiny_sam_processor())


def has_sam2() -> bool:
    """True when the installed transformers has ``Sam2Model`` and ``Sam2Processor``."""
    import transformers

    return all(hasattr(transformers, n) for n in ("Sam2Model", "Sam2Processor", "Sam2ImageProcessor"))


def tiny_sam2_config():
    """A tiny SAM 2: Hiera strides 4-32 on a 128-pixel input, FPN levels at strides 4, 8, 16."""
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig,
                              Sam2VisionConfig)

    size = INPUT_SIZE
    hiera = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[size, size],
                               blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                               num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
                               global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[size // s, size // s] for s in (4, 8, 16)], fpn_hidden_size=32)
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def tiny_sam2_processor():
    from transformers import Sam2ImageProcessor, Sam2Processor

    low = INPUT_SIZE // 4
    return Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": INPUT_SIZE, "width": INPUT_SIZE},
                                                            mask_size={"height": low, "width": low}))


def build_tiny_sam2(out: str | Path, seed: int = 0, model=None) -> Path:
    """Save a tiny SAM 2 (random unless ``model`` is given) and its processor (a plain 128x128 resize,
    no padding) to ``out``."""
    from transformers import Sam2Model

    return _save(out, model if model is not None else _seeded(Sam2Model, tiny_sam2_config, seed),
                 tiny_sam2_processor())


# --------------------------------------------------------------------------- training examples
def _examples(dataset_root: Path, split: str, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(window RGB, window target mask) pairs: every thing instance in its crop window, and as many
    object-free windows (target empty)."""
    from instsynth.core.io import iter_cityscapes_images, read_png
    from instsynth.core.labels import THING_LABEL_IDS
    from ..stages.selection import square_crop_box
    from instsynth.quality.sam_gate import mask_box

    for image in iter_cityscapes_images(dataset_root, split):
        rgb = read_png(image.left, rgb=True, dtype=np.uint8)
        ids = read_png(image.gt("instanceIds"), dtype=np.uint16)
        h, w = ids.shape
        things = (ids >= 1000) & np.isin(ids // 1000, list(THING_LABEL_IDS))
        for value in np.unique(ids[things]):
            mask = ids == value
            if mask.sum() < 64:
                continue
            x0, y0, x1, y1 = square_crop_box(mask_box(mask), w, h)
            yield rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
            side = max(x1 - x0, y1 - y0)
            for _ in range(10 if rng.random() < NEGATIVE_SHARE else 0):  # an object-free window of the same size
                bx, by = int(rng.integers(0, max(1, w - side))), int(rng.integers(0, max(1, h - side)))
                if not things[by:by + side, bx:bx + side].any():
                    yield rgb[by:by + side, bx:bx + side], np.zeros((side, side), bool), mask[y0:y1, x0:x1]
                    break


def _low_res_target(mask: np.ndarray, sam2: bool = False) -> np.ndarray:
    """A window mask in the processor's frame at mask resolution: SAM's (longest side resized to the
    input, padded) or SAM 2's (resized to the square input)."""
    import cv2

    low = INPUT_SIZE // 4
    h, w = mask.shape
    if sam2:
        return cv2.resize(mask.astype(np.float32), (low, low), interpolation=cv2.INTER_AREA)
    scale = low / max(h, w)
    small = cv2.resize(mask.astype(np.float32), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    out = np.zeros((low, low), np.float32)
    out[:small.shape[0], :small.shape[1]] = small
    return out


def train_tiny_sam(dataset_root: str | Path, out: str | Path, split: str = "train", steps: int = 150,
                   batch_size: int = 8, lr: float = 1e-3, seed: int = 0, sam2: bool = False) -> Path:
    """Build a tiny SAM (``sam2``: SAM 2), fit it on ``dataset_root``'s ``split`` (see the module
    docstring), save it to ``out``."""
    import torch
    import torch.nn.functional as F

    from instsynth.quality.sam_gate import mask_box

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    examples = []
    for item in _examples(Path(dataset_root), split, rng):
        window, target = item[0], item[1]
        box_of = item[2] if len(item) == 3 else target  # object-free windows borrow an instance's box
        examples.append((window, target, [float(v) for v in mask_box(box_of)]))
    if sam2:
        from transformers import Sam2Model

        processor, model = tiny_sam2_processor(), Sam2Model(tiny_sam2_config()).train()
    else:
        from transformers import SamModel

        processor, model = tiny_sam_processor(), SamModel(tiny_sam_config()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        batch = [examples[i] for i in rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)]
        inputs = processor(images=[b[0] for b in batch], input_boxes=[[b[2]] for b in batch], return_tensors="pt")
        result = model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        logits = result.pred_masks[:, 0, 0]
        target = torch.from_numpy(np.stack([_low_res_target(b[1], sam2) for b in batch]))
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).flatten(1).sum(1) + 1) / ((prob + target).flatten(1).sum(1) + 1)
        with torch.no_grad():
            hard = prob > 0.5
            inter = (hard & (target > 0.5)).flatten(1).sum(1).float()
            union = (hard | (target > 0.5)).flatten(1).sum(1).float()
            iou = torch.where(target.flatten(1).sum(1) > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        loss = (F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
                + F.mse_loss(result.iou_scores[:, 0, 0], iou))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return (build_tiny_sam2 if sam2 else build_tiny_sam)(out, model=model.eval())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny SAM to OUT (random, or trained on a Cityscapes tree).")
    parser.add_argument("out")
    parser.add_argument("--train_on", default=None, help="Cityscapes tree to fit it on (default: random weights)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--sam2", action="store_true", help="a tiny SAM 2 instead of SAM")
    args = parser.parse_args(argv)
    if args.train_on:
        path = train_tiny_sam(args.train_on, args.out, steps=args.steps, sam2=args.sam2)
    else:
        path = (build_tiny_sam2 if args.sam2 else build_tiny_sam)(args.out)
    print(path)


if __name__ == "__main__":
    main()
