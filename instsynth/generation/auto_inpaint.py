"""``diffusers``: any diffusers inpainting pipeline, loaded by the class its ``model_index.json`` names.

``FluxFillPipeline`` folders (FLUX.1 Fill) load with that class; everything else with diffusers'
``AutoPipelineForInpainting`` (SD 1.5 / 2 inpainting, SDXL inpainting, Kandinsky 2.2, ...). One call
generates a batch: each sample has its own prompt, crop, mask and CPU generator. The call gets the
options its signature takes: steps, ``guidance_scale`` (FLUX: the distilled guidance, 30 for
FLUX.1 Fill dev), ``strength``, ``negative_prompt``, ``true_cfg_scale`` and ``--pipeline_options``;
an option the pipeline does not take is an error, not silently dropped.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from instsynth.core.io import InstSynthError
from .common import SampleJob
from .models import DiffusionBackend, generators

FILL_CLASSES = ("FluxFillPipeline",)
"""``_class_name`` values loaded with their own class instead of AutoPipelineForInpainting."""
ONE_IMAGE_CLASSES = ("KandinskyV22InpaintPipeline", "KandinskyV22InpaintCombinedPipeline")
"""Pipelines whose call keeps only the first image of a batch outside the mask (Kandinsky 2.2's
denoising loop blends ``image[:1]`` into every row): called one sample at a time."""


def model_class_name(model_id: str) -> str | None:
    """``_class_name`` of a pipeline's ``model_index.json`` (local folder or hub cache), None if unreadable."""
    local = Path(model_id).expanduser()
    index = local / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model_id, "model_index.json"))
        except Exception:  # noqa: BLE001 - not cached / offline: load_pipeline reports it
            return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise InstSynthError(index, f"unreadable model_index.json ({type(exc).__name__})") from None
    return name if isinstance(name, str) else None


class DiffusersInpaintBackend(DiffusionBackend):
    """A diffusers inpainting pipeline (auto-detected class), batched across instances."""

    name = "diffusers"
    output_params = DiffusionBackend.output_params + ("strength", "true_cfg_scale", "pipeline_options")

    def load_class(self) -> Any:
        import diffusers

        name = model_class_name(self.settings.model_id)
        if name in FILL_CLASSES:
            return getattr(diffusers, name)
        return diffusers.AutoPipelineForInpainting

    def check_pipeline(self) -> None:
        pipe, where = self.pipe, self.settings.model_id
        self.call_params = inspect.signature(pipe.__call__).parameters
        if "mask_image" not in self.call_params:
            raise InstSynthError(where, f"{type(pipe).__name__} is not an inpainting pipeline (its call takes no mask_image)")
        transformer = getattr(pipe, "transformer", None)
        latent = getattr(getattr(pipe, "vae", None), "config", None)
        if type(pipe).__name__ in FILL_CLASSES and transformer is not None and latent is not None:
            if transformer.config.in_channels <= 4 * latent.latent_channels:  # text-to-image FLUX: packed latents only
                raise InstSynthError(where, f"{type(pipe).__name__} needs a Fill model (transformer input = latents + "
                                     f"masked image + mask), this transformer takes {transformer.config.in_channels} "
                                     "channels (a text-to-image FLUX?)")
        self.call_options()  # unknown --pipeline_options fail before any work

    # ----------------------------------------------------------------- networks and sizes
    def networks(self) -> dict[str, Any]:
        """The pipeline's torch modules by component name."""
        import torch

        return {name: m for name, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)}

    def row_modules(self) -> list:
        modules = []
        for module in self.networks().values():
            if hasattr(module, "encoder") and hasattr(module, "decoder"):  # VAE / VQ autoencoder
                parts = (module.encoder, module.decoder, getattr(module, "quant_conv", None),
                         getattr(module, "post_quant_conv", None))
                modules += [p for p in parts if p is not None]
            else:
                modules.append(module)
        return modules

    def channels_last_modules(self) -> list:
        return [m for name, m in self.networks().items() if name in ("unet", "vae", "movq")]

    def native_size(self) -> int:
        """Pixels per side the model was trained at (UNet sample size, or FLUX's default sample size)."""
        pipe = self.pipe
        decoder = getattr(pipe, "decoder_pipe", None)  # a combined prior + decoder pipeline (Kandinsky)
        scale = (getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "movq_scale_factor", None)
                 or getattr(decoder, "movq_scale_factor", None) or 8)
        unet = getattr(pipe, "unet", None)
        if unet is not None and isinstance(unet.config.sample_size, int):
            return unet.config.sample_size * scale
        return int(getattr(pipe, "default_sample_size", 128)) * scale

    # ----------------------------------------------------------------- the call
    def call_options(self) -> dict:
        """Settings-derived keyword arguments the pipeline's call takes (``pipeline_options`` must all fit)."""
        s = self.settings
        wanted = {"num_inference_steps": s.steps, "guidance_scale": s.guidance_scale, "strength": s.strength}
        if s.true_cfg_scale is not None:
            wanted["true_cfg_scale"] = s.true_cfg_scale
        options = {k: v for k, v in wanted.items() if k in self.call_params}
        if s.true_cfg_scale is not None and "true_cfg_scale" not in self.call_params:
            raise InstSynthError(s.model_id, f"{type(self.pipe).__name__} takes no true_cfg_scale")
        if self.negative_prompt and "negative_prompt" not in self.call_params:
            raise InstSynthError(s.model_id, f"{type(self.pipe).__name__} takes no negative_prompt")
        unknown = sorted(set(s.pipeline_options) - set(self.call_params))
        if unknown:
            raise InstSynthError(s.model_id, f"{type(self.pipe).__name__} takes no {', '.join(unknown)} "
                                 f"(pipeline_options); it takes {', '.join(sorted(self.call_params))}")
        return {**options, **s.pipeline_options}

    def describe(self) -> dict:
        return {**super().describe(), "call_options": self.call_options()}

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        if len(jobs) > 1 and type(self.pipe).__name__ in ONE_IMAGE_CLASSES:
            return [out for job in jobs for out in self.generate([job])]
        images = [Image.fromarray(image) for image in self.working_images(jobs)]
        masks = [Image.fromarray(mask.astype(np.uint8) * 255) for mask in self.working_masks(jobs)]
        kwargs = {"prompt": [job.text for job in jobs], "image": images, "mask_image": masks, "height": self.size,
                  "width": self.size, "generator": generators(jobs), "output_type": "np", **self.call_options()}
        if self.negative_prompt and "negative_prompt" in self.call_params:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(jobs)
        result = self.pipe(**kwargs)
        return self.to_crops(result.images, jobs)
