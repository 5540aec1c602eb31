"""Measure a generation run: FID, SSIM/PSNR inside and outside the mask, CLIP scores.

    python generation/evaluate_generation.py --manifest OUT/Recolor/generation.json \
        [--inception weights/pt_inception-2015-12-05-6726825d.pth] [--clip weights/clip-vit-base-patch32]

Writes evaluation.json next to the manifest (or --out) and prints a summary table. FID and CLIP
scores are skipped (with a note) unless their model is given; nothing is downloaded unless a hub id
is passed.
"""
import argparse

from instsynth.cli import command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="generation.json of a run (or its folder)")
    parser.add_argument("--inception", default=None,
                        help="Inception weights for FID: a .pth/.safetensors state_dict, a folder, or a hub id")
    parser.add_argument("--clip", default=None, help="CLIP model: a save_pretrained folder or a hub id "
                                                     "(e.g. openai/clip-vit-base-patch32)")
    parser.add_argument("--out", default=None, help="result JSON (default: evaluation.json next to the manifest)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=None, help="processes for pixel metrics (default: all cores)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per model call")
    return parser.parse_args(argv)


@command
def main(argv=None) -> None:
    from instsynth.quality.runs import evaluate_generation, format_table

    args = parse_args(argv)
    result = evaluate_generation(args.manifest, inception=args.inception, clip=args.clip, out=args.out,
                                 device=args.device, batch_size=args.batch_size, workers=args.workers)
    print(format_table(result))
    print(f"per-sample results: {result['path']}")


if __name__ == "__main__":
    main()
