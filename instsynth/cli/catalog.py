"""``python -m instsynth.data.catalog``: register COCO datasets by name for train_net.py."""
from __future__ import annotations

from instsynth.cli import command
from instsynth.data.catalog import add_to_catalog, registered_names


@command
def main(argv=None) -> None:
    """``python -m instsynth.data.catalog add CATALOG NAME JSON IMAGE_ROOT`` / ``list``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m instsynth.data.catalog",
                                description="Register COCO datasets by name for train_net.py ($INSTSYNTH_CATALOG).")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add or replace a dataset in a catalog YAML file")
    add.add_argument("catalog", help="catalog YAML file (created if missing); point $INSTSYNTH_CATALOG at it")
    add.add_argument("name", help="dataset name for DATASETS.TRAIN / DATASETS.TEST")
    add.add_argument("json_file", help="COCO instances JSON")
    add.add_argument("image_root", help="folder the JSON's file_name entries are relative to")
    sub.add_parser("list", help="print every registered dataset name")
    args = p.parse_args(argv)
    if args.command == "add":
        path = add_to_catalog(args.catalog, args.name, args.json_file, args.image_root)
        print(f"{args.name} -> {path}")
    else:
        print("\n".join(registered_names()))
