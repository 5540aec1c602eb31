"""Stage 4 of InstSynth: write gtFine labelIds and color of the new image/label pairs of stage 2.

Reads ``OUT/cropped_region_coordinates.json`` written by inpainted_integration.py and crops each
source ``_gtFine_labelIds.png`` and ``_gtFine_color.png`` with the same box and resize as the
instanceIds. Safe to rerun: files already right are not rewritten. All logic lives in
:mod:`instsynth.label_crops`.
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cropped_region_coordinates_path", required=True,
                   help="OUT/cropped_region_coordinates.json written by inpainted_integration.py")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images whose source labels are missing or broken (with a warning) instead of stopping")
    return p.parse_args(argv)


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    from instsynth.stages.label_crops import drop_color_and_label_ids

    summary = drop_color_and_label_ids(args.cropped_region_coordinates_path, workers=args.workers,
                                       skip_bad=args.skip_bad)
    print(f"{summary.images} images: {summary.files_written} label files written, "
          f"{summary.files_existing} already up to date, {len(summary.bad)} skipped")


if __name__ == "__main__":
    main()
