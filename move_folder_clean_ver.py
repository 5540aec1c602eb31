"""Stage 3: place the original train/val/test splits of a Cityscapes tree into the output dataset.

    python move_folder_clean_ver.py --src_path SRC --des_path DST [--mode link|copy|symlink]

Hard links by default (a copy where the filesystem cannot link); reruns skip identical files.
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--src_path", required=True, help="source Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--des_path", required=True, help="output dataset root")
    parser.add_argument("--mode", choices=["link", "copy", "symlink"], default="link",
                        help="link: hard links, copy where impossible (default); copy; symlink")
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"],
                        help="splits to place where they exist (default: train val test)")
    parser.add_argument("--include-generated", action="store_true",
                        help="also place city folders written by InstSynth (*_syn, *_inpainted)")
    return parser.parse_args(argv)


@command
def main(argv=None):
    args = parse_args(argv)
    from instsynth.stages.assemble import assemble_dataset

    report = assemble_dataset(args.src_path, args.des_path, mode=args.mode, splits=tuple(args.splits),
                              include_generated=args.include_generated)
    print(", ".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
