"""Pictures of an InstSynth run.

    python visualization/visualize.py sheets  --manifest OUT/Recolor/generation.json --out DIR [--per-page 8]
    python visualization/visualize.py overlay --coco DIR/annotations/instancesonly_filtered_gtFine_train.json \
        [--image-root DIR/leftImg8bit/train] --out DIR [--max-images 8] [--match _syn]
    python visualization/visualize.py stats   --coco BEFORE.json --coco AFTER.json --out stats.png

sheets: one PNG per page, a row per instance: source crop | mask | each sample with its prompt.
overlay: COCO annotations over their images (masks, outlines, boxes, class names; crowd hatched).
stats: bar chart of instances per class in each COCO file (e.g. before and after synthesis).
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    sheets = sub.add_parser("sheets", help="instance sheets of a generation run")
    sheets.add_argument("--manifest", required=True, help="generation.json of a run (or its folder)")
    sheets.add_argument("--out", required=True, help="folder for sheet_<page>.png")
    sheets.add_argument("--per-page", "--per_page", dest="per_page", type=int, default=8, help="instances per page")
    sheets.add_argument("--cell", type=int, default=192, help="cell size in pixels")
    sheets.add_argument("--max-pages", "--max_pages", dest="max_pages", type=int, default=None,
                        help="stop after this many pages")

    overlay = sub.add_parser("overlay", help="COCO annotations drawn over their images")
    overlay.add_argument("--coco", required=True, help="COCO instances JSON")
    overlay.add_argument("--image-root", "--image_root", dest="image_root", default=None,
                         help="folder the COCO file names are relative to, or the dataset root "
                              "(default: DIR/leftImg8bit/<split> of DIR/annotations/...json)")
    overlay.add_argument("--out", required=True, help="folder for <image stem>_overlay.png")
    overlay.add_argument("--max-images", "--max_images", dest="max_images", type=int, default=8,
                         help="images to draw, in file-name order (0: all)")
    overlay.add_argument("--match", default=None, help="only images whose file name contains this (e.g. _syn)")

    stats = sub.add_parser("stats", help="bar chart of instances per class")
    stats.add_argument("--coco", required=True, action="append", help="COCO instances JSON (repeat: before, after)")
    stats.add_argument("--label", action="append", default=None, help="legend label per --coco (default before/after)")
    stats.add_argument("--out", required=True, help="PNG to write")
    return parser.parse_args(argv)


@command
def main(argv=None) -> None:
    from instsynth.reports import viz
    from instsynth.core.io import InstSynthError

    args = parse_args(argv)
    try:
        if args.command == "sheets":
            paths = viz.instance_sheets(args.manifest, args.out, per_page=args.per_page, cell=args.cell,
                                        max_pages=args.max_pages)
        elif args.command == "overlay":
            paths = viz.coco_overlays(args.coco, args.image_root, args.out, max_images=args.max_images or None,
                                      match=args.match)
        else:
            paths = [viz.class_stats_chart(args.coco, args.out, labels=args.label)]
    except (InstSynthError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"{len(paths)} PNG(s) written: {paths[0].parent if len(paths) > 1 else paths[0]}")


if __name__ == "__main__":
    main()
