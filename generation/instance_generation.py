"""Instance generation: regenerate each selected instance inside its mask from a prompt.

Reads stage 1's metadata.json and writes, per instance and sample,
``OUT/<ModeName>/<split>/<city>/<image_id>_<instance_id>_<ModeName>_<sample:06d>.png`` plus the
manifest ``OUT/<ModeName>/generation.json`` and ``generation_report.json``. Scale out with
``accelerate launch generation/instance_generation.py ...`` (or torchrun). All logic lives in
:mod:`instsynth.generation`.
"""
import argparse
import sys
from pathlib import Path

from instsynth.stages.budget import add_budget_arguments
from instsynth.cli import command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["recolor", "diffinpainting", "diffpainting", "bld", "gligen", "diffusers"],
                   default=None,
                   help="backend (default: recolor when no --model_path is given); diffpainting, the spelling of "
                        "the paper's script, is diffinpainting; diffusers: any diffusers inpainting model "
                        "(SD 1.5/2 and SDXL inpainting, Kandinsky 2.2, FLUX.1 Fill)")
    p.add_argument("--metadata", default=None, help="stage-1 metadata.json (default: the one in --folder)")
    p.add_argument("--folder", default=None,
                   help="output folder; also where metadata_refined.json / metadata.json is looked up "
                        "without --metadata (default: the metadata's folder)")
    p.add_argument("--model_path", default=None,
                   help="local pipeline folder or hub id (default per mode: SD2-inpainting, SDXL base, GLIGEN 1.4 "
                        "inpainting, SDXL inpainting 0.1 for diffusers)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per instance (default 1)")
    add_budget_arguments(p, "--samples_per_class", "samples per instance", "--num_samples", "truck=4,bus=4")
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per pipeline call, packed across instances (default 1; halved on GPU out-of-memory)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="diffinpainting, diffusers: noise strength in (0, 1] (default 1.0)")
    p.add_argument("--true_cfg_scale", type=float, default=None,
                   help="diffusers: true classifier-free guidance of pipelines that take it (FLUX: > 1 with "
                        "--negative_prompt; default: the pipeline's)")
    p.add_argument("--pipeline_options", default=None,
                   help="diffusers: more keyword arguments of the pipeline call, KEY=VALUE,... or a JSON object "
                        "(e.g. max_sequence_length=256 for FLUX, prior_guidance_scale=4 for Kandinsky 2.2)")
    p.add_argument("--negative_prompt", default=None,
                   help="negative prompt (default: the paper's for gligen, none otherwise)")
    p.add_argument("--blending_start_percentage", type=float, default=0.25,
                   help="bld: fraction of the denoising schedule skipped before blending starts (default 0.25)")
    p.add_argument("--no_plms", action="store_true", help="gligen: DDIM instead of the PLMS sampler")
    p.add_argument("--resolution", type=int, default=None,
                   help="working resolution in pixels, a multiple of 8 (default: the model's native one)")
    p.add_argument("--prompts", default=None, help="prompt bank YAML (default configs/prompts.yaml)")
    p.add_argument("--seed", type=int, default=1, help="base seed (default 1)")
    p.add_argument("--strict-prompts", action="store_true",
                   help="COCO datasets: stop with the list of classes missing from the prompt bank instead of "
                        "generating 'a <colour> <class>' prompts for them")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                   help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--attention_slicing", action="store_true", help="enable attention slicing (off by default)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip instances with bad input (listed in generation_report.json) instead of stopping")
    return p.parse_args(argv)


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    from instsynth.generation import GenerationSettings, find_metadata, generate_instances
    from instsynth.generation.common import MODE_ALIASES, parse_pipeline_options, resolve_prompts_path
    from instsynth.core.io import InstSynthError

    args.mode = MODE_ALIASES.get(args.mode, args.mode)
    if args.mode is None and args.model_path is not None:
        sys.exit("error: --model_path needs --mode (diffinpainting, bld, gligen or diffusers)")
    if args.model_path and Path(args.model_path).expanduser().is_dir():  # one spelling per local model
        args.model_path = str(Path(args.model_path).expanduser().resolve())
    if args.metadata is None and args.folder is None:
        raise InstSynthError(".", "pass --metadata META or --folder DIR (holding metadata.json)")
    metadata = args.metadata or find_metadata(args.folder)
    try:
        pipeline_options = parse_pipeline_options(args.pipeline_options)
    except ValueError as exc:
        raise InstSynthError("--pipeline_options", str(exc)) from None
    settings = GenerationSettings(
        mode=args.mode or "recolor", model_path=args.model_path, num_samples=args.num_samples,
        batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance_scale,
        strength=args.strength, negative_prompt=args.negative_prompt,
        blending_start_percentage=args.blending_start_percentage, plms=not args.no_plms,
        resolution=args.resolution, seed=args.seed, device=args.device, dtype=args.dtype,
        prompts=resolve_prompts_path(args.prompts), attention_slicing=args.attention_slicing,
        samples_per_class=args.samples_per_class, balance=args.balance, balance_power=args.balance_power,
        max_factor=args.max_factor, baseline_metrics=args.baseline_metrics, true_cfg_scale=args.true_cfg_scale,
        pipeline_options=pipeline_options)
    summary = generate_instances(metadata, out=args.folder, settings=settings, skip_bad=args.skip_bad,
                                 strict_prompts=args.strict_prompts)
    if summary.rank != 0:
        return  # rank 0 prints the merged run's summary
    print(f"{summary.samples_written} samples written, {summary.samples_existing} already done, "
          f"{summary.skipped} instances skipped -> {summary.manifest}")


if __name__ == "__main__":
    main()
