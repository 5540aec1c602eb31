"""``python -m instsynth.copy_paste``: the command line of :mod:`instsynth.experiments.copy_paste`."""
from __future__ import annotations

import argparse

from instsynth.cli import command
from instsynth.experiments.copy_paste import CopyPasteParams, copy_paste_dataset
from instsynth.formats import dataset_from_args
from instsynth.experiments.copy_paste import __doc__ as _LIBRARY_DOC


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.copy_paste", description=_LIBRARY_DOC.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", "--train_folder", dest="train_folder", help="Cityscapes root (leftImg8bit/, gtFine/)")
    source.add_argument("--coco", help="your own dataset: a COCO / LVIS instances file (with --images)")
    source.add_argument("--folder", help="your own dataset: images/ + instances/ + categories.json")
    parser.add_argument("--images", help="folder the --coco file's file_name entries are relative to")
    parser.add_argument("--skip_bad", action="store_true", help="leave out bad COCO annotations instead of stopping")
    parser.add_argument("--out", required=True, help="output root for the new images (in the dataset's format)")
    parser.add_argument("--num_images", type=int, required=True, help="new images to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale_range", type=float, nargs=2, default=(0.1, 2.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--no_flip", action="store_true", help="never flip the source")
    parser.add_argument("--keep_prob", type=float, default=0.5, help="probability to paste each source instance")
    parser.add_argument("--max_objects", type=int, default=None, help="most instances pasted per image")
    parser.add_argument("--min_pixels", type=int, default=16, help="smallest visible pasted instance")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.coco and not args.images:
        parser.error("--coco needs --images DIR")
    params = CopyPasteParams(seed=args.seed, scale_range=tuple(args.scale_range), flip=not args.no_flip,
                             keep_prob=args.keep_prob, max_objects=args.max_objects, min_pixels=args.min_pixels)
    report = copy_paste_dataset(dataset_from_args(args), args.out, args.num_images, args.split, params, args.workers)
    print(f"{report['new_images']} images, {report['instances_pasted']} instances pasted -> {args.out}")


if __name__ == "__main__":
    main()
