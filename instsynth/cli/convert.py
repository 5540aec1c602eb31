"""``python -m instsynth.modeling.convert``: convert official / Detectron2 / torchvision weights to checkpoints."""
from __future__ import annotations

import argparse

from instsynth.cli import command
from instsynth.modeling.convert import convert


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m instsynth.modeling.convert",
        description="Convert an official FastInst checkpoint (.pth), Detectron2's torchvision-converted R-50.pkl "
                    "or a torchvision ResNet to this project's checkpoint for MODEL.WEIGHTS (or back to the "
                    "official names with --to official).")
    p.add_argument("input", help="weights file: .pth / .pkl")
    p.add_argument("output", help="checkpoint to write (.pth)")
    p.add_argument("--to", choices=("instsynth", "official"), default="instsynth",
                   help="names of the written checkpoint (default: this project's)")
    args = p.parse_args(argv)
    dst, fmt, n = convert(args.input, args.output, args.to)
    print(f"{args.input} ({fmt}) -> {dst}: {n} tensors")
    return 0
