"""``python -m instsynth.experiment``: the command line of :mod:`instsynth.experiments`."""
from __future__ import annotations

import argparse


from instsynth.cli import command
from instsynth import experiments
from instsynth.experiments.config import load_experiment
from instsynth.experiments.harness import run_experiment
from instsynth.experiments.table import format_results


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.experiment", description=experiments.__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/experiments/)")
    parser.add_argument("--output", default=None, help="output folder (default: output_dir of the config)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to prepare and train (default: all)")
    parser.add_argument("--prepare_only", action="store_true", help="build the arms' data, train nothing")
    parser.add_argument("--table_only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args(argv)
    exp = load_experiment(args.config, args.output)
    results = run_experiment(exp, args.arms.split(",") if args.arms else None, args.prepare_only, args.table_only)
    print(format_results(results))
    print(f"runs trained: {results['runs']['trained']}, already finished: {results['runs']['skipped']}"
          + (" (tabulated)" if args.table_only else ""))
    print(f"table: {exp.output_dir / 'results.md'}  numbers: {exp.output_dir / 'results.json'}")


if __name__ == "__main__":
    main()
