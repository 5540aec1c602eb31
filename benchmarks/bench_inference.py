#!/usr/bin/env python
"""Inference FPS of FastInst-D3-R50 and OneFormer-R50 side by side, with the official FastInst protocol.

Batch 1, 5 warm-up images, then the synchronised model time per image including post-processing (to
full-size masks), in fp32 and with AMP, both models on the same random images of one size in one run;
the ratio column is each row's FPS over OneFormer-R50's fp32 FPS measured in the same run.

    python benchmarks/bench_inference.py --device cuda                 # 1024x2048, full models, 55 images
    python benchmarks/bench_inference.py                               # no GPU: tiny models at 128x256
"""
import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--size", default=None,
                   help="input HxW (default 1024x2048, the Cityscapes test size; tiny: 128x256)")
    p.add_argument("--images", type=int, default=None, help="images per setting incl. warm-up (default 55; tiny 15)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first images (default 5, as FastInst)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="the quick-schedule models (default: on CPU)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[dict]:
    import torch

    from instsynth.engine.speed import compare_inference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (run without --device for the tiny CPU benchmark)")
    tiny = device == "cpu" if args.tiny is None else args.tiny
    h, w = map(int, (args.size or ("128x256" if tiny else "1024x2048")).lower().split("x"))
    images = args.images or (15 if tiny else 55)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)} | torch {torch.__version__}")
    print(f"{'tiny' if tiny else 'full'} models, input {h}x{w}, batch 1, {args.warmup} warm-up + "
          f"{images - args.warmup} timed images per setting, {device}")
    rows = compare_inference((h, w), images, args.warmup, tiny, device)
    base = next(r["fps"] for r in rows if r["model"] == "OneFormer-R50" and r["precision"] == "fp32")
    print(f"{'model':16s} | {'precision':9s} | {'params':>7s} | {'ms/img':>8s} | {'FPS':>7s} | vs OneFormer fp32")
    for r in rows:
        print(f"{r['model']:16s} | {r['precision']:9s} | {r['params'] / 1e6:6.1f}M | {r['ms']:8.1f} | "
              f"{r['fps']:7.2f} | {r['fps'] / base:6.2f}x")
    return rows


if __name__ == "__main__":
    main(parse_args())
