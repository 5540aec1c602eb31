"""``python -m instsynth.demo``: write the built-in demo dataset (Cityscapes tree, or COCO / folder export)."""
from __future__ import annotations

import argparse
from pathlib import Path

from instsynth.cli import command
from instsynth.stages.demo_dataset import (COCO_FORMATS, LAYOUTS, _parse_size, write_demo_coco_dataset,
                                           write_demo_dataset)
from instsynth.stages.demo_dataset import __doc__ as _LIBRARY_DOC


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.demo", description=_LIBRARY_DOC.split("\n\n")[0])
    parser.add_argument("out", help="output dataset root (Cityscapes layout)")
    parser.add_argument("--cities", type=int, default=2, help="cities per split (default 2)")
    parser.add_argument("--images-per-city", type=int, default=3, help="images per city (default 3)")
    parser.add_argument("--size", type=_parse_size, default=(2048, 1024), help="WIDTHxHEIGHT (default 2048x1024)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--domain-shift", action="store_true",
                        help="train and val objects in disjoint colours: val wears the prompts' colours, train does not")
    parser.add_argument("--layout", choices=LAYOUTS, default="street",
                        help="street (default): crowded street scenes; simple: 2-3 large cars, buses and persons")
    parser.add_argument("--format", choices=COCO_FORMATS, default="cityscapes",
                        help="cityscapes (default) or coco: OUT/images/<split>/, OUT/annotations/instances_<split>.json "
                             "(and the Cityscapes tree in OUT/cityscapes)")
    args = parser.parse_args(argv)
    if args.format == "coco":
        jsons = write_demo_coco_dataset(args.out, args.cities, args.images_per_city, args.size, args.seed,
                                        args.domain_shift, args.layout)
        print(f"demo COCO dataset: {', '.join(str(p) for p in jsons.values())} (images under {Path(args.out) / 'images'})")
        return
    images = write_demo_dataset(args.out, args.cities, args.images_per_city, args.size, args.seed, args.domain_shift,
                                args.layout)
    print(f"demo dataset: {len(images)} images under {args.out}")


if __name__ == "__main__":
    main()
