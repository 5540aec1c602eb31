"""Stage 2 of InstSynth: paste generated instances into their images and cut new image/label pairs.

For every sample listed in ``GEN_DIR/generation.json`` writes the full-size pasted image (panorama)
and ``--crops_per_sample`` random context crops around the instance, each with its labels, in the
dataset's format: Cityscapes ``OUT/leftImg8bit/<split>/<city>_syn/`` and ``OUT/gtFine/<split>/<city>_syn/``
plus ``OUT/cropped_region_coordinates.json`` (input of drop_color_and_labelIds_clean_ver.py); COCO / LVIS
``OUT/images/instsynth_syn/`` and ``OUT/annotations/instances_<split>_instsynth.json``; a folder dataset
``OUT/images/instsynth_syn/``, ``OUT/instances/instsynth_syn/`` and ``OUT/categories.json``. Also
``OUT/integration.json`` and ``OUT/integration_report.json``. The quality gate's decision comes from
:mod:`instsynth.quality.sample_gate`, all other logic from :mod:`instsynth.stages.integration`.
"""
import argparse

from instsynth.cli import add_max_pixels, apply_max_pixels, command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inpainting_dir", required=True,
                   help="generation backend folder holding generation.json (e.g. ROOT/Recolor, ROOT/DiffPainting)")
    p.add_argument("--metadata_path", default=None,
                   help="stage-1 metadata.json (default: the one recorded in generation.json)")
    p.add_argument("--cropped_region_coordinates", default=None,
                   help="stage-1 cropped_region_coordinates.json, checked against the metadata (optional)")
    p.add_argument("--output_folder_name", required=True, help="output dataset folder OUT")
    p.add_argument("--crops_per_sample", type=int, default=1, help="random context crops per sample (default 1)")
    p.add_argument("--blend", choices=["hard", "feather", "normalized"], default="hard",
                   help="paste mode: hard mask, feathered mask edge, or the paper's mean colour correction (default hard)")
    p.add_argument("--seed", type=int, default=1, help="base seed of the random crops (default 1)")
    p.add_argument("--min_instance_pixels", type=int, default=4,
                   help="redraw a crop that cuts an instance to fewer pixels than this (default 4, as the paper)")
    p.add_argument("--max_tries", type=int, default=100,
                   help="crop draws before falling back to the smallest crop centred on the instance (default 100)")
    p.add_argument("--feather_pixels", type=int, default=3, help="width of the feathered edge in pixels (default 3)")
    p.add_argument("--min_clip_score", type=float, default=None,
                   help="keep only samples whose quality score clip_prompt is at least this (needs the quality filter)")
    p.add_argument("--top_fraction", type=float, default=None,
                   help="keep only the best fraction (0, 1] of all samples by clip_prompt (needs the quality filter)")
    p.add_argument("--min_mask_iou", type=float, default=None,
                   help="keep only samples whose mask-model match has at least this IoU with the instance mask and "
                        "the instance's class (needs filter_generation.py --mask_model)")
    p.add_argument("--min_clip_margin", type=float, default=None,
                   help="CLIP class check: the sample's score for its own class prompt must beat every other "
                        "class's prompt by this margin (needs filter_generation.py --clip)")
    p.add_argument("--fallback", choices=["drop", "original"], default="drop",
                   help="a sample failing the quality gate is left out (drop, default) or replaced by the original "
                        "instance (original: the pair is still written, labelled as original)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    add_max_pixels(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad samples or images (listed in integration_report.json) instead of stopping")
    return p.parse_args(argv)


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    apply_max_pixels(args)
    from instsynth.quality.sample_gate import gate_for
    from instsynth.stages.gate_decision import format_gate_counts
    from instsynth.stages.integration import IntegrationParams, integrate_samples

    params = IntegrationParams(blend=args.blend, crops_per_sample=args.crops_per_sample, seed=args.seed,
                               min_instance_pixels=args.min_instance_pixels, max_tries=args.max_tries,
                               feather_pixels=args.feather_pixels)
    gate = gate_for(args.inpainting_dir, min_clip_score=args.min_clip_score, top_fraction=args.top_fraction,
                    min_mask_iou=args.min_mask_iou, min_clip_margin=args.min_clip_margin, fallback=args.fallback)
    summary = integrate_samples(args.inpainting_dir, args.output_folder_name, metadata_path=args.metadata_path,
                                coordinates_path=args.cropped_region_coordinates, params=params,
                                workers=args.workers, skip_bad=args.skip_bad, gate=gate)
    print(f"{summary.samples} samples -> {summary.new_images} new images ({summary.files_written} files written, "
          f"{summary.skipped} samples skipped) -> {summary.integration}")
    if summary.gate and summary.gate["criteria"]:
        print(f"quality gate: {format_gate_counts(summary.gate)}")


if __name__ == "__main__":
    main()
