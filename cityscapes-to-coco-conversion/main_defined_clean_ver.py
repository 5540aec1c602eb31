"""Stage 5: write Cityscapes polygons.json (where missing) and COCO instance JSON for every split.

Run from this folder or from anywhere by path:
    python main_defined_clean_ver.py --dataset cityscapes --datadir DIR [--splits train val]
        [--format polygon|rle] [--include-ignored] [--min-area 4] [--workers N] [--skip-bad]
Writes DIR/annotations/instancesonly_filtered_gtFine_<split>.json and conversion_report_<split>.json.
"""
import argparse
import sys
from pathlib import Path


try:
    import instsynth  # noqa: F401
except ImportError:  # not installed: use the repository this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from instsynth.cli import command  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", default="cityscapes", choices=["cityscapes"], help="dataset format (only cityscapes)")
    parser.add_argument("--datadir", required=True, help="dataset root holding leftImg8bit/ and gtFine/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert (default: train val)")
    parser.add_argument("--format", dest="fmt", choices=["polygon", "rle"], default="polygon",
                        help="segmentation format (default polygon; instances with holes and crowd regions are always RLE)")
    parser.add_argument("--include-ignored", action="store_true",
                        help="also write caravan and trailer (not scored by the Cityscapes benchmark)")
    parser.add_argument("--min-area", type=int, default=4, help="drop instances with fewer pixels (default 4)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images with bad files (listed in the report) instead of stopping")
    parser.add_argument("--no-polygons-json", dest="write_polygons", action="store_false",
                        help="do not write missing _gtFine_polygons.json files")
    return parser.parse_args(argv)


@command
def main(argv=None):
    args = parse_args(argv)
    import instsynth.stages.coco_conversion as coco

    outputs = coco.convert_cityscapes_to_coco(args.datadir, splits=tuple(args.splits), fmt=args.fmt,
                                              include_ignored=args.include_ignored, min_area=args.min_area,
                                              workers=args.workers, skip_bad=args.skip_bad,
                                              write_polygons=args.write_polygons)
    for split, path in outputs.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
