"""Benchmark instance generation (diffinpainting): the paper's way vs this project's batched path.

Both ways run in the same process on the same pipeline object and the same instances:
- paper: one ``StableDiffusionInpaintPipeline`` call per instance (one sample each), attention
  slicing on, as the paper's ``instance_generation_.py``;
- batched: :class:`instsynth.generation.diffinpainting.DiffInpaintingBackend`, ``--batch-size``
  instances (each with its own prompt, crop, mask and generator) per call, SDPA attention, no slicing.
Both include resizing to the working resolution and back plus the composite through the mask (no
PNG writing). Printed: instances/s of each and their ratio; on CUDA also images/s against the compute
bound ``peak FLOP/s / (UNet FLOPs per image and step x steps)``, with the UNet FLOPs of one
classifier-free-guidance step (batch 2) counted by ``torch.utils.flop_counter.FlopCounterMode``.
The bound counts the UNet only (text encoder and VAE are run but not counted).

Models (no download):
- ``--arch tiny`` (default): the 32x32 test pipeline of ``instsynth.testing.tiny_models``.
- ``--arch sd2``: the real stable-diffusion-2-inpainting architecture written out below (UNet 865M,
  VAE, OpenCLIP-H text encoder with 23 layers), random weights, fp16 on CUDA, 512x512; the whole
  pipeline runs (text encoder, UNet loop, VAE encode/decode). The tokenizer is the project's tiny
  byte-level one (ids only; the text encoder's cost does not depend on it).

Commands:
    python benchmarks/bench_generation.py                                  # CPU, tiny model (~1 min)
    python benchmarks/bench_generation.py --device cuda --arch sd2         # GPU: SD2 arch, 50 steps, < 4 min on an H100
"""
from __future__ import annotations

import argparse
import time

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}
"""Dense fp16/bf16 tensor-core peak (TFLOP/s, no sparsity) by GPU name; H100 PCIe is lower (756)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--arch", choices=["tiny", "sd2"], default=None, help="tiny (default on CPU) or sd2 (default on CUDA)")
    p.add_argument("--instances", type=int, default=None, help="instances per way (default 32 on CUDA, 16 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="batched path: images per call (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50 for sd2, 10 for tiny)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU dense fp16 peak (default: from the GPU name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models
def sd2_inpaint_pipeline(device, dtype):
    """stable-diffusion-2-inpainting's architecture with random weights (configs written out here)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from instsynth.testing.tiny_models import tiny_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=1,
            pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def tiny_inpaint_pipeline(device, dtype):
    import torch

    from instsynth.testing.tiny_models import build_sd_inpaint

    torch.manual_seed(0)
    return build_sd_inpaint().to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- workload
def make_jobs(n: int, seed: int = 0) -> list:
    """``n`` instances: textured square crops of varied size with an elliptical instance mask."""
    import cv2
    import numpy as np

    from instsynth.generation.common import SampleJob, sample_seed

    rng = np.random.default_rng(seed)
    prompts = ["a red car", "a white car", "a man", "a woman", "a green bus", "a black bicycle"]
    jobs = []
    for i in range(n):
        side = int(rng.integers(96, 400))
        crop = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (0, 0), 3)
        mask = np.zeros((side, side), np.uint8)
        cv2.ellipse(mask, (side // 2, side // 2), (side // 3, side // 4), 0, 0, 360, 1, -1)
        prompt = prompts[i % len(prompts)]
        jobs.append(SampleJob(f"inst{i}", 0, sample_seed(1, f"inst{i}", 0), prompt, f"a photo of {prompt}", "car",
                              crop, mask.astype(bool)))
    return jobs


def paper_way(pipe, jobs, size: int, steps: int) -> list:
    """One pipeline call per instance, attention slicing on (the paper's code path)."""
    import numpy as np
    import torch
    from PIL import Image

    from instsynth.generation.common import composite
    from instsynth.core.imageops import resize_image, resize_mask

    pipe.enable_attention_slicing()
    outs = []
    try:
        for job in jobs:
            image = Image.fromarray(resize_image(job.crop_rgb, (size, size)))
            mask = Image.fromarray(resize_mask(job.crop_mask, (size, size)).astype(np.uint8) * 255)
            result = pipe(prompt=job.text, image=image, mask_image=mask, height=size, width=size,
                          num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(job.seed),
                          output_type="np").images[0]
            out = np.clip(np.rint(np.nan_to_num(result) * 255), 0, 255).astype(np.uint8)
            outs.append(composite(job.crop_rgb, resize_image(out, job.size), job.crop_mask))
    finally:
        pipe.disable_attention_slicing()
    return outs


def batched_way(backend, jobs, batch_size: int) -> list:
    from instsynth.generation.common import composite

    outs = []
    for start in range(0, len(jobs), batch_size):
        part = jobs[start:start + batch_size]
        outs += [composite(j.crop_rgb, im, j.crop_mask) for j, im in zip(part, backend.generate(part))]
    return outs


def timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def unet_flops_per_image_step(pipe, size: int, device, dtype) -> float:
    """FLOPs of one UNet evaluation with classifier-free guidance (batch 2) for one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    latent = size // pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device=device), encoder_hidden_states=context)
    return float(counter.get_total_flops())


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    if "H100" in name and "PCIe" in name:
        return 756.0
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.diffinpainting import DiffInpaintingBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    arch = args.arch or ("sd2" if cuda else "tiny")
    steps = args.steps or (50 if arch == "sd2" else 10)
    n = args.instances or (32 if cuda else 16)
    batch_size = args.batch_size or (16 if cuda else 4)
    dtype = torch.float16 if cuda else torch.float32

    built = time.perf_counter()
    pipe = (sd2_inpaint_pipeline if arch == "sd2" else tiny_inpaint_pipeline)(device, dtype)
    settings = GenerationSettings(mode="diffinpainting", model_path=f"<random {arch}>", steps=steps,
                                  batch_size=batch_size, device=str(device), dtype="fp16" if cuda else "fp32")
    backend = DiffInpaintingBackend(settings, pipeline=pipe)
    size = backend.size
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {gpu}; model: {arch} inpainting UNet ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M "
          f"params), random weights, {str(dtype).split('.')[-1]}, {size}x{size}, {steps} steps, CFG 7.5; "
          f"built in {time.perf_counter() - built:.1f}s")

    jobs = make_jobs(n)
    warm = make_jobs(batch_size, seed=1)
    paper_way(pipe, warm[:1], size, steps)  # warm-up both paths (kernel selection, allocator)
    batched_way(backend, warm, batch_size)
    t_paper = timed(lambda: paper_way(pipe, jobs, size, steps), device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_batched = timed(lambda: batched_way(backend, jobs, batch_size), device)
    paper_rate, batched_rate = n / t_paper, n / t_batched
    print(f"paper way (1 instance per call, attention slicing): {paper_rate:.3f} instances/s ({t_paper:.1f}s for {n})")
    print(f"batched ({batch_size} instances per call, SDPA, no slicing): {batched_rate:.3f} instances/s "
          f"({t_batched:.1f}s for {n})")
    print(f"speed-up batched / paper: {batched_rate / paper_rate:.2f}x")
    if not cuda:
        print("note: on CPU the networks run one row at a time (byte-identical results for any batch size), so "
              "batching cannot gain much there; the GPU run measures the real gain")
        return
    flops = unet_flops_per_image_step(pipe, size, device, dtype)
    peak = peak_tflops(gpu, args.peak_tflops)
    print(f"UNet: {flops / 1e12:.3f} TFLOP per image and step (CFG batch 2) -> {flops * steps / 1e12:.1f} TFLOP per image")
    print(f"peak memory (batched): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if peak is None:
        print("compute bound: unknown GPU peak; pass --peak-tflops")
        return
    bound = peak * 1e12 / (flops * steps)
    print(f"compute bound at {peak:.0f} TFLOP/s dense fp16: {bound:.2f} images/s (UNet only); "
          f"batched reaches {batched_rate / bound:.0%} of it, paper way {paper_rate / bound:.0%}")


if __name__ == "__main__":
    main()
