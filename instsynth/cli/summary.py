"""``python -m instsynth.summary``: the end-of-run summary and AP tables."""
from __future__ import annotations

import argparse

from instsynth.cli import command
from instsynth.core.io import write_json
from instsynth.reports.summary import ap_table, format_summary, run_summary
from instsynth.reports.summary import __doc__ as _LIBRARY_DOC


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.summary", description=_LIBRARY_DOC.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="counts per stage and COCO statistics of a full run")
    run.add_argument("--work_dir", required=True, help="the run's work folder (selection/, generation/)")
    run.add_argument("--output", required=True, help="the output dataset root")
    run.add_argument("--mode_name", default="Recolor", help="generation folder name (Recolor, DiffPainting, ...)")
    run.add_argument("--json", help="also write the summary here")
    run.add_argument("--write-before", help="write the original-only COCO subsets into this folder")
    ap = commands.add_parser("ap", help="AP table of train_net.py runs, gains over the first")
    ap.add_argument("output_dirs", nargs="+", help="train_net.py OUTPUT_DIRs; the first is the baseline")
    args = parser.parse_args(argv)
    if args.command == "ap":
        print(ap_table(args.output_dirs))
        return
    summary = run_summary(args.work_dir, args.output, args.mode_name, write_before=args.write_before)
    if args.json:
        write_json(args.json, summary)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
