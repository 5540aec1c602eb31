"""Stage 1 of InstSynth: select the k largest thing instances of every image and cut square crops.

Writes ``metadata.json``, ``cropped_region_coordinates.json``, ``selection_report.json`` and the
crops (``crops/<split>/<city>_syn/<key>_{rgb,mask}.png``) under ``--out`` (default: the dataset root).
All logic lives in :mod:`instsynth.stages.selection`.
"""
import argparse

from instsynth.stages.budget import add_budget_arguments
from instsynth.cli import command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_folder", help="Cityscapes dataset root (holds leftImg8bit/ and gtFine/)")
    source.add_argument("--coco", metavar="ANNOTATIONS.json",
                        help="or a COCO / LVIS instances file (with --images): your own dataset")
    source.add_argument("--folder", metavar="DIR",
                        help="or a folder dataset: DIR/images, DIR/instances (one instance PNG per image), "
                             "DIR/categories.json")
    parser.add_argument("--images", metavar="DIR", help="with --coco: the folder the file's file_name entries are relative to")
    parser.add_argument("--frequency", default=None,
                        help="with --coco on LVIS: comma-separated category frequencies to select (r, c, f)")
    parser.add_argument("--k", type=int, default=3, help="instances to select per image, largest first (default 3)")
    parser.add_argument("--split", default="train", help="split to process (default train)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated thing classes to select (default: all ten, person ... bicycle; "
                             "with --coco / --folder: category names, default all)")
    parser.add_argument("--min-area", type=int, default=64,
                        help="ignore instances smaller than this many pixels (default 64; 0 = paper behaviour)")
    parser.add_argument("--context", type=float, default=1.0,
                        help="crop side = max(box width, box height) x CONTEXT (default 1.0, >= 1)")
    add_budget_arguments(parser, "--k_per_class", "instances selected per image", "--k", "truck=6,bus=6")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: the dataset root; with --coco: <folder of the JSON>/instsynth_<split>)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable or inconsistent images with a warning (listed in selection_report.json)")
    args = parser.parse_args(argv)
    if (args.coco is None) != (args.images is None):
        parser.error("--coco and --images go together")
    if args.frequency and args.coco is None:
        parser.error("--frequency needs --coco")
    return args


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    from instsynth.formats import open_dataset
    from instsynth.stages.selection import select_coco_instances, select_from_dataset, select_instances

    def names(text):
        return [c.strip() for c in text.split(",") if c.strip()] if text else None

    common = dict(split=args.split, k=args.k, classes=names(args.classes), min_area=args.min_area,
                  context=args.context, out=args.out, workers=args.workers, skip_bad=args.skip_bad,
                  k_per_class=args.k_per_class, balance=args.balance, balance_power=args.balance_power,
                  max_factor=args.max_factor, baseline_metrics=args.baseline_metrics)
    if args.coco is not None:
        summary = select_coco_instances(args.coco, args.images, frequency=names(args.frequency), **common)
    elif args.folder is not None:
        summary = select_from_dataset(open_dataset("folder", args.folder), **common)
    else:
        summary = select_instances(args.train_folder, **common)
    print(f"{summary.instances} instances from {summary.images} images -> {summary.metadata}")


if __name__ == "__main__":
    main()
