"""``gligen``: GLIGEN text-box grounded inpainting (Li et al., CVPR 2023) with diffusers'
``StableDiffusionGLIGENPipeline`` components (default masterful/gligen-1-4-inpainting-text-box).

The grounding is the instance's box inside the crop with the class name as its phrase, the prompt is
"a photo of <prompt>", and the crop is the inpainting image: as in the pipeline, the latents outside
the box are replaced by the crop's latents noised to the current step, the UNet also sees the crop's
latents and the box mask (9 input channels), and the gated grounding layers are on for the first 30 %
of the steps (scheduled sampling). The loop is written here, on the pipeline's own modules, because the
pipeline's ``__call__`` takes one inpainting image and one set of boxes per call and draws noise from
the global RNG: here every sample of a batch has its own crop, box, phrase and CPU generator.
Sampler: PLMS (the paper's default) or DDIM with ``--no_plms``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError
from .bld import LatentDiffusionBackend
from .common import GLIGEN_NEGATIVE_PROMPT, SampleJob
from .models import generators, sample_noise

SCHEDULED_SAMPLING_BETA = 0.3
"""Fraction of the steps with grounding on (the GLIGEN pipeline's and paper's default)."""

MAX_OBJECTS = 30
"""Grounding slots of the GLIGEN position net (one used: the instance)."""


class GligenBackend(LatentDiffusionBackend):
    """GLIGEN inpainting grounded on the instance box and class name, batched across instances."""

    name = "gligen"
    output_params = LatentDiffusionBackend.output_params + ("plms",)

    def load_class(self) -> Any:
        from diffusers import StableDiffusionGLIGENPipeline

        return StableDiffusionGLIGENPipeline

    def check_pipeline(self) -> None:
        from diffusers import DDIMScheduler, PNDMScheduler

        unet = self.pipe.unet
        if getattr(unet, "position_net", None) is None or unet.config.in_channels != 9:
            raise InstSynthError(self.settings.model_id, "gligen needs a GLIGEN text-box inpainting model "
                                 "(UNet with attention_type 'gated' and 9 input channels)")
        config = self.pipe.scheduler.config
        self.pipe.scheduler = (PNDMScheduler.from_config(config, skip_prk_steps=True) if self.settings.plms
                               else DDIMScheduler.from_config(config))

    @property
    def negative_prompt(self) -> str | None:
        if self.settings.negative_prompt is None:
            return GLIGEN_NEGATIVE_PROMPT
        return self.settings.negative_prompt or None

    def describe(self) -> dict:
        return {**super().describe(), "negative_prompt": self.negative_prompt,
                "scheduled_sampling_beta": SCHEDULED_SAMPLING_BETA}

    def grounding(self, jobs: Sequence[SampleJob]) -> dict:
        """GLIGEN's cross-attention kwargs for ``[uncond; cond]``: one box + phrase per sample."""
        import torch

        pipe, batch = self.pipe, len(jobs)
        tokens = pipe.tokenizer([job.class_name for job in jobs], padding="max_length",
                                max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        phrases = pipe.text_encoder(tokens.input_ids.to(self.device)).pooler_output
        boxes = torch.zeros(batch, MAX_OBJECTS, 4, device=self.device, dtype=self.dtype)
        boxes[:, 0] = torch.tensor([job.mask_box() for job in jobs], dtype=self.dtype, device=self.device)
        embeddings = torch.zeros(batch, MAX_OBJECTS, pipe.unet.config.cross_attention_dim, device=self.device,
                                 dtype=self.dtype)
        embeddings[:, 0] = phrases.to(self.dtype)
        masks = torch.zeros(batch, MAX_OBJECTS, device=self.device, dtype=self.dtype)
        masks[:, 0] = 1
        unmasked = torch.zeros_like(masks)  # the unconditional half has no grounding
        return {"gligen": {"boxes": torch.cat([boxes, boxes]), "positive_embeddings": torch.cat([embeddings, embeddings]),
                           "masks": torch.cat([unmasked, masks])}}

    def box_masks(self, jobs: Sequence[SampleJob], latent_size: int):
        """(B, 1, h, w): 1 outside each instance's box (kept from the crop), 0 inside (generated)."""
        import torch

        masks = [self.pipe.draw_inpaint_mask_from_boxes([job.mask_box()], (latent_size, latent_size)) for job in jobs]
        return torch.stack(masks)[:, None].to(self.device, self.dtype)

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return self.to_crops(self.inpaint(jobs), jobs)

    def inpaint(self, jobs: Sequence[SampleJob]) -> np.ndarray:
        import torch

        pipe, batch, gens = self.pipe, len(jobs), generators(jobs)
        scheduler = pipe.scheduler
        texts = [job.text for job in jobs]
        negative = [self.negative_prompt] * batch if self.negative_prompt else None
        cond, uncond = pipe.encode_prompt(texts, self.device, 1, True, negative_prompt=negative)
        embeds = torch.cat([uncond, cond])
        attention_kwargs = self.grounding(jobs)
        source = self.encode(self.working_images(jobs))
        shape = tuple(source.shape[1:])
        keep = self.box_masks(jobs, shape[-1])
        extra_channels = torch.cat([source * keep, keep], dim=1).repeat(2, 1, 1, 1)

        scheduler.set_timesteps(self.settings.steps, device=self.device)
        timesteps = scheduler.timesteps
        grounding_steps = int(SCHEDULED_SAMPLING_BETA * len(timesteps))
        latents = sample_noise(gens, shape, self.device, self.dtype) * scheduler.init_noise_sigma
        pipe.enable_fuser(True)
        try:
            for i, t in enumerate(timesteps):
                if i == grounding_steps:
                    pipe.enable_fuser(False)
                noised = scheduler.add_noise(source, sample_noise(gens, shape, self.device, self.dtype), t.repeat(batch))
                latents = noised * keep + latents * (1 - keep)
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                model_input = torch.cat([model_input, extra_channels], dim=1)
                noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds,
                                       cross_attention_kwargs=attention_kwargs).sample
                latents = scheduler.step(self.guided(noise_pred, batch), t, latents, **self.step_kwargs(gens)).prev_sample
        finally:
            pipe.enable_fuser(True)
        return self.decode(latents)
