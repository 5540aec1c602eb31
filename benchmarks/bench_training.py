#!/usr/bin/env python
"""Training throughput and peak GPU memory of FastInst-D3-R50 (and OneFormer-R50 when registered).

Random weights, synthetic 512x1024 images with random instances, batch 8, AdamW; each model is timed
in FP32 (the baseline) and with AMP (fp16 autocast + GradScaler) in the same run, and the script
prints iterations/s, peak memory and the AMP/FP32 ratios. Meant for one GPU (about 1-2 minutes on an
H100); ``--device cpu --batch 2 --height 128 --width 256 --iters 2`` is a smoke test (bf16 on CPU).

    python benchmarks/bench_training.py [--models fastinst oneformer] [--batch 8] [--iters 20]
"""
import argparse
import time

CONFIG_DIR = "configs/cityscapes/instance-segmentation"
CONFIGS = {  # model -> (config file pattern, META_ARCHITECTURE)
    "fastinst": ("fastinst_R50_ppm-fpn_x3_1024_D3.yaml", "FastInst"),
    "oneformer": ("oneformer_R50*.yaml", "OneFormer"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fastinst", "oneformer"], choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per setting")
    p.add_argument("--instances", type=int, default=12, help="random instances per image")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_batch(batch: int, height: int, width: int, instances: int, num_classes: int, seed: int) -> list[dict]:
    """Random images with random rectangular/elliptic instances (contiguous classes)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out = []
    for _ in range(batch):
        masks = []
        for _ in range(instances):
            cy = torch.randint(0, height, (1,), generator=g).item()
            cx = torch.randint(0, width, (1,), generator=g).item()
            ry = torch.randint(8, height // 4, (1,), generator=g).item()
            rx = torch.randint(8, width // 6, (1,), generator=g).item()
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        out.append({"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g),
                    "height": height, "width": width,
                    "instances": {"gt_classes": torch.randint(0, num_classes, (instances,), generator=g),
                                  "gt_masks": torch.stack(masks)}})
    return out


def build(name: str, device: str):
    """(cfg, model) for a benchmark model, or (None, reason) when it is not available."""
    from pathlib import Path

    from instsynth.config import load_config
    from instsynth.modeling import registered_models
    from instsynth.modeling import build_model

    pattern, arch = CONFIGS[name]
    if arch not in registered_models():
        return None, f"model {arch} is not registered"
    repo = Path(__file__).resolve().parent.parent
    paths = sorted(p for p in (repo / CONFIG_DIR).glob(pattern) if "instsynth" not in p.name)
    if not paths:
        return None, f"no {CONFIG_DIR}/{pattern}"
    cfg = load_config(paths[0], ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    return cfg, build_model(cfg)


def time_training(model, cfg, batch, device: str, amp: bool, iters: int, warmup: int) -> dict:
    """Iterations/s and peak memory of ``iters`` training steps (after ``warmup`` steps)."""
    import torch

    from instsynth.engine.trainer import build_optimizer

    torch.manual_seed(0)
    model.to(device).train()
    opt = build_optimizer(cfg, model)
    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=amp):
            losses = model(batch)
        loss = sum(losses.values())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        loss = step()
    loss.item()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return {"it_s": iters / elapsed, "img_s": iters * len(batch) / elapsed, "peak_gib": peak}


def main(args: argparse.Namespace) -> None:
    import copy

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and small sizes) for a smoke test")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"batch {args.batch} x {args.height}x{args.width}, {args.instances} instances/image, "
          f"{args.warmup} warm-up + {args.iters} timed iterations per setting")
    rows = []
    for name in args.models:
        cfg, model = build(name, args.device)
        if cfg is None:
            print(f"{name}: skipped ({model})")
            continue
        num_classes = cfg.MODEL.FASTINST.NUM_CLASSES if name == "fastinst" else cfg.MODEL.ONE_FORMER.NUM_CLASSES
        batch = synthetic_batch(args.batch, args.height, args.width, args.instances, num_classes, args.seed)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        results = {}
        for amp in (False, True):  # FP32 baseline first, then AMP, each from the same initial weights
            m = copy.deepcopy(model)
            try:
                results[amp] = time_training(m, cfg, batch, args.device, amp, args.iters, args.warmup)
            except torch.cuda.OutOfMemoryError:
                results[amp] = {"it_s": float("nan"), "img_s": float("nan"), "peak_gib": float("inf")}
            del m
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            r = results[amp]
            print(f"{name:10s} {'AMP ' if amp else 'FP32'}  {r['it_s']:7.2f} it/s  {r['img_s']:7.1f} img/s  "
                  f"peak {r['peak_gib']:6.2f} GiB  ({params:.1f}M params)", flush=True)
        rows.append((name, results))
    print("\nsummary (ratio = AMP / FP32 baseline, same run and device)")
    print(f"{'model':10s} | {'FP32 it/s':>9s} | {'AMP it/s':>8s} | {'speed-up':>8s} | {'FP32 GiB':>8s} | "
          f"{'AMP GiB':>7s} | {'mem ratio':>9s}")
    for name, r in rows:
        f, a = r[False], r[True]
        print(f"{name:10s} | {f['it_s']:9.2f} | {a['it_s']:8.2f} | {a['it_s'] / f['it_s']:7.2f}x | "
              f"{f['peak_gib']:8.2f} | {a['peak_gib']:7.2f} | {a['peak_gib'] / f['peak_gib']:8.2f}x")


if __name__ == "__main__":
    main(parse_args())
