"""``python -m instsynth.data.split``: one COCO / LVIS file into train and val files by image."""
from __future__ import annotations

import argparse

from instsynth.cli import command
from instsynth.data.coco_split import SPLITS, split_coco


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m instsynth.data.split",
                                description="Split a COCO / LVIS instances file into train and val by image, with a seed.")
    p.add_argument("coco_json", help="COCO / LVIS instances file (e.g. trainval.json)")
    p.add_argument("--out", default=None, help="output folder (default: the file's folder)")
    p.add_argument("--val-fraction", "--val_fraction", dest="val_fraction", type=float, default=0.2,
                   help="share of the images that go to val (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order of the images (default 0)")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    summary = split_coco(args.coco_json, args.out, args.val_fraction, args.seed)
    for split in SPLITS:
        print(f"{split}: {summary.images[split]} images, {summary.annotations[split]} annotations -> "
              f"{summary.paths[split]}")
