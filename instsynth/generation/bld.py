"""``bld``: Blended Latent Diffusion (Avrahami, Fried & Lischinski, SIGGRAPH 2023), written here on
diffusers components of SDXL (default stabilityai/stable-diffusion-xl-base-1.0) or SD 1.x/2.x.

Per batch (samples of several instances, each with its own prompt and CPU generator):
1. encode the crops with the VAE (posterior mean) -> source latents ``z_src``;
2. skip the first ``--blending_start_percentage`` of the schedule and start from ``z_src`` noised to
   that timestep (``scheduler.add_noise``);
3. each step: UNet with classifier-free guidance, ``scheduler.step``, then replace the latents outside
   the latent-resolution mask by ``z_src`` noised (fresh noise from the sample's generator) to the
   noise level the latents now have; after the last step the outside is ``z_src`` itself;
4. decode. The caller composites the decoded crop through the original-resolution mask.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError
from .common import SampleJob
from .models import DiffusionBackend, generators, sample_noise


class LatentDiffusionBackend(DiffusionBackend):
    """Shared latent-space helpers: VAE encode/decode (fp32 where the VAE needs it), CFG UNet calls."""

    def upcast_vae_if_needed(self) -> None:
        import torch

        vae = self.pipe.vae
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # SDXL's VAE overflows in fp16

    def encode(self, images: list[np.ndarray]):
        """Scaled VAE posterior means of uint8 RGB images."""
        import torch

        vae = self.pipe.vae
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents) -> np.ndarray:
        """Float [0, 1] NHWC images of latents."""
        vae = self.pipe.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        return (images.float().clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1).cpu().numpy()

    def latent_masks(self, jobs: Sequence[SampleJob], latent_size: int):
        """(B, 1, h, w) float masks at latent resolution (a latent cell is inside if it covers any instance pixel)."""
        import torch

        masks = np.stack(self.working_masks(jobs, latent_size)).astype(np.float32)[:, None]
        return torch.from_numpy(masks).to(self.device, self.dtype)

    def guided(self, noise_pred, batch: int):
        """Classifier-free guidance of a UNet output computed on ``[uncond; cond]``."""
        uncond, cond = noise_pred[:batch], noise_pred[batch:]
        return uncond + self.settings.guidance_scale * (cond - uncond)

    def step_kwargs(self, gens: list) -> dict:
        """Per-sample generators for schedulers whose step draws noise (ancestral/SDE ones)."""
        return {"generator": gens} if "generator" in inspect.signature(self.pipe.scheduler.step).parameters else {}


class BlendedLatentDiffusionBackend(LatentDiffusionBackend):
    """Blended Latent Diffusion on an SDXL or SD 1.x/2.x text-to-image model."""

    name = "bld"
    output_params = LatentDiffusionBackend.output_params + ("blending_start_percentage",)

    def load_class(self) -> Any:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline

    def check_pipeline(self) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not isinstance(self.pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise InstSynthError(self.settings.model_id, f"bld needs an SDXL or SD 1.x/2.x text-to-image model, "
                                 f"got {type(self.pipe).__name__}")
        if self.pipe.unet.config.in_channels != 4:
            raise InstSynthError(self.settings.model_id, "bld needs a text-to-image UNet (4 input channels), "
                                 f"this one has {self.pipe.unet.config.in_channels}")
        self.is_sdxl = isinstance(self.pipe, StableDiffusionXLPipeline)
        self.upcast_vae_if_needed()

    def describe(self) -> dict:
        return {**super().describe(), "architecture": "sdxl" if self.is_sdxl else "sd"}

    def conditioning(self, texts: list[str]) -> tuple[Any, dict]:
        """Text embeddings ``[uncond; cond]`` and the UNet's extra kwargs (SDXL: pooled text + size ids)."""
        import torch

        negative = [self.negative_prompt] * len(texts) if self.negative_prompt else None
        if not self.is_sdxl:
            cond, uncond = self.pipe.encode_prompt(texts, self.device, 1, True, negative_prompt=negative)
            return torch.cat([uncond, cond]), {}
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative)
        size = (self.size, self.size)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                               text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
        time_ids = time_ids.to(self.device).repeat(2 * len(texts), 1)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids}
        return torch.cat([uncond, cond]), {"added_cond_kwargs": added}

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return self.to_crops(self.blend(jobs), jobs)

    def blend(self, jobs: Sequence[SampleJob]) -> np.ndarray:
        import torch

        pipe, batch, gens = self.pipe, len(jobs), generators(jobs)
        scheduler = pipe.scheduler
        embeds, extra = self.conditioning([job.text for job in jobs])
        source = self.encode(self.working_images(jobs))
        shape = tuple(source.shape[1:])
        mask = self.latent_masks(jobs, shape[-1])

        scheduler.set_timesteps(self.settings.steps, device=self.device)
        timesteps = scheduler.timesteps[int(len(scheduler.timesteps) * self.settings.blending_start_percentage):]
        noise = sample_noise(gens, shape, self.device, self.dtype)
        latents = scheduler.add_noise(source, noise, timesteps[:1].repeat(batch))
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds, **extra).sample
            latents = scheduler.step(self.guided(noise_pred, batch), t, latents, **self.step_kwargs(gens)).prev_sample
            if i + 1 < len(timesteps):
                fresh = sample_noise(gens, shape, self.device, self.dtype)
                background = scheduler.add_noise(source, fresh, timesteps[i + 1:i + 2].repeat(batch))
            else:
                background = source
            latents = latents * mask + background * (1 - mask)
        return self.decode(latents)
