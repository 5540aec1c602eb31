"""Quality gate: score every generated sample and write the scores into the manifest.

    python generation/filter_generation.py --manifest OUT/DiffPainting/generation.json \
        --clip weights/clip-vit-base-patch32 [--mask_model output/fastinst_R50_ppm-fpn_x1_576_D1]

With --clip, per sample: clip_prompt (CLIP cosine of the sample and its prompt), clip_margin
(clip_prompt minus the best other prompt of its class), clip_class_margin (the plain class prompt
minus the best other class's prompt), mask_leak (share of the pixel change outside the mask) and
changed_fraction (share of mask pixels changed). With --mask_model (a train_net.py output folder, a
checkpoint beside its config.yaml, or a config YAML), the sample is pasted into its image and the
model run on it: mask_iou (best-matching predicted mask vs the instance mask), mask_class,
mask_class_ok and mask_score (--mask_model sam:ID_OR_FOLDER: a SAM prompted with the instance's box,
no training; shape only, mask_class_ok true). The scores go into generation.json ("scores" per instance);
filter_report.json and the printed table say how many samples each threshold keeps.
inpainted_integration.py --min_clip_score / --top_fraction / --min_clip_margin / --min_mask_iou
then uses only passing samples (--fallback original: failing ones are replaced by the original
instance). A rerun with the same models does no work.
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None):
    from instsynth.quality.mask_gate import DEFAULT_MIN_SCORE
    from instsynth.quality.gate import DEFAULT_THRESHOLDS, DEFAULT_TOP_FRACTIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="generation.json of a run (or its folder)")
    parser.add_argument("--clip", default=None, help="CLIP model: a save_pretrained folder or a hub id "
                                                     "(e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--mask_model", default=None,
                        help="instance-segmentation model of this project (FastInst/OneFormer): a train_net.py "
                             "OUTPUT_DIR, a checkpoint .pth beside its config.yaml, or a config YAML; or "
                             "sam:ID_OR_FOLDER, a SAM / SAM 2 prompted with the instance's box (no training; "
                             "e.g. sam:facebook/sam-vit-base)")
    parser.add_argument("--mask_weights", default=None, help="checkpoint for a --mask_model config YAML "
                                                             "(default: its MODEL.WEIGHTS)")
    parser.add_argument("--mask_min_score", type=float, default=DEFAULT_MIN_SCORE,
                        help=f"predictions scoring below this are not matched (SAM: its predicted IoU; default "
                             f"{DEFAULT_MIN_SCORE})")
    parser.add_argument("--prompts", default=None, help="prompt bank YAML for clip_margin (default: the run's)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                        help="min_clip_score values to tabulate")
    parser.add_argument("--top_fractions", type=float, nargs="+", default=list(DEFAULT_TOP_FRACTIONS),
                        help="top_fraction values to tabulate")
    parser.add_argument("--force", action="store_true", help="rescore samples that already have scores")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=None, help="processes for pixel metrics (default: all cores)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per CLIP call (mask model: at most 4)")
    args = parser.parse_args(argv)
    if not args.clip and not args.mask_model:
        parser.error("give --clip and/or --mask_model")
    return args


@command
def main(argv=None) -> None:
    from instsynth.quality.gate import format_gate_table, score_generation

    args = parse_args(argv)
    report = score_generation(args.manifest, clip=args.clip, prompts=args.prompts, device=args.device,
                              batch_size=args.batch_size, force=args.force, thresholds=args.thresholds,
                              top_fractions=args.top_fractions, workers=args.workers, mask_model=args.mask_model,
                              mask_weights=args.mask_weights, mask_min_score=args.mask_min_score)
    print(format_gate_table(report))
    print(f"report: {report['path']}")


if __name__ == "__main__":
    main()
