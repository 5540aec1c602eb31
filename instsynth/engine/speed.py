"""Inference speed with the official FastInst / Detectron2 protocol, for ``benchmarks/bench_inference.py``.

The protocol of FastInst's FPS numbers (Detectron2's ``inference_on_dataset``): batch 1, the first 5 images
are warm-up and not timed, then the model time of every image (the forward pass including post-processing
to full-resolution masks, not data loading) is summed with the device synchronised after each image;
FPS = timed images / summed time. Evaluation runs through :func:`instsynth.engine.trainer.eval_forward`,
the function evaluation uses, in fp32 or with AMP (fp16 autocast on CUDA, bf16 on CPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODELS = {  # name -> (full config, tiny config)
    "FastInst-D3-R50": ("configs/cityscapes/instance-segmentation/fastinst_R50_ppm-fpn_x3_1024_D3.yaml",
                        "configs/quick_schedules/fastinst_R50_quick.yaml"),
    "OneFormer-R50": ("configs/cityscapes/instance-segmentation/oneformer_R50_bs16_90k.yaml",
                      "configs/quick_schedules/oneformer_quick.yaml"),
}


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """``n`` seeded random uint8 images of the given size, as one-image batches of model inputs."""
    g = torch.Generator().manual_seed(seed)
    return [[{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g),
              "height": height, "width": width}] for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_inference(model: torch.nn.Module, batches: list[list[dict]], amp: bool = False, warmup: int = 5) -> dict:
    """Seconds per image and FPS of ``model`` over one-image ``batches`` (see the module docstring)."""
    from instsynth.engine.trainer import eval_forward

    model.eval()
    device = next(model.parameters()).device
    warmup = min(warmup, len(batches) - 1)
    total = 0.0
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        eval_forward(model, batch, amp)
        _sync(device)
        if i >= warmup:
            total += time.perf_counter() - start
    timed = len(batches) - warmup
    return {"ms": 1000 * total / timed, "fps": timed / total, "images": timed, "warmup": warmup}


def build_benchmark_model(name: str, tiny: bool, device: str) -> torch.nn.Module:
    """A randomly initialised model of :data:`MODELS` (tiny: its quick-schedule size) on ``device``."""
    from instsynth.config import load_config
    from instsynth.modeling import build_model

    config = REPO / MODELS[name][1 if tiny else 0]
    torch.manual_seed(0)
    cfg = load_config(config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    return build_model(cfg).to(device).eval()


def compare_inference(size: tuple[int, int], images: int = 55, warmup: int = 5, tiny: bool = False,
                      device: str = "cpu", names=tuple(MODELS), precisions=("fp32", "amp")) -> list[dict]:
    """One row per (model, precision): ms per image, FPS, parameters; every model sees the same images."""
    batches = synthetic_images(images, *size)
    rows = []
    for name in names:
        model = build_benchmark_model(name, tiny, device)
        params = sum(p.numel() for p in model.parameters())
        for precision in precisions:
            r = time_inference(model, batches, amp=precision == "amp", warmup=warmup)
            rows.append({"model": name, "precision": precision, "params": params, **r})
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows
