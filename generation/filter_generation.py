"""Quality gate: score every generated sample and write the scores into the manifest.

    python generation/filter_generation.py --manifest OUT/DiffPainting/generation.json \
        --clip weights/clip-vit-base-patch32

Per sample: clip_prompt (CLIP cosine of the sample and its prompt), clip_margin (clip_prompt minus
the best other prompt of its class), mask_leak (share of the pixel change outside the mask) and
changed_fraction (share of mask pixels changed). The scores go into generation.json ("scores" per
instance); filter_report.json and the printed table say how many samples each threshold keeps.
inpainted_integration.py --min_clip_score S / --top_fraction F then uses only passing samples.
A rerun with the same CLIP model does no work.
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None):
    from instsynth.quality import DEFAULT_THRESHOLDS, DEFAULT_TOP_FRACTIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="generation.json of a run (or its folder)")
    parser.add_argument("--clip", required=True, help="CLIP model: a save_pretrained folder or a hub id "
                                                      "(e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--prompts", default=None, help="prompt bank YAML for clip_margin (default: the run's)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="min_clip_score values to tabulate")
    parser.add_argument("--top_fractions", type=float, nargs="+", default=list(DEFAULT_TOP_FRACTIONS),
                        help="top_fraction values to tabulate")
    parser.add_argument("--force", action="store_true", help="rescore samples that already have scores")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=None, help="processes for pixel metrics (default: all cores)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per CLIP call")
    return parser.parse_args(argv)


@command
def main(argv=None) -> None:
    from instsynth.io import InstSynthError
    from instsynth.quality import format_gate_table, score_generation

    args = parse_args(argv)
    try:
        report = score_generation(args.manifest, clip=args.clip, prompts=args.prompts, device=args.device,
                                  batch_size=args.batch_size, force=args.force, thresholds=args.thresholds,
                                  top_fractions=args.top_fractions, workers=args.workers)
    except InstSynthError as exc:
        raise SystemExit(f"error: {exc}")
    print(format_gate_table(report))
    print(f"report: {report['path']}")


if __name__ == "__main__":
    main()
