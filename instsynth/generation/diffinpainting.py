"""``diffinpainting``: diffusers ``StableDiffusionInpaintPipeline`` (default stabilityai/stable-diffusion-2-inpainting).

One pipeline call generates a whole batch: the samples of several instances, each with its own
prompt, crop, mask and CPU generator. Crops and masks are resized to the model's working resolution
(512 for SD 2) and the outputs back to the crop size; the caller composites through the original mask.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from instsynth.core.io import InstSynthError
from .common import SampleJob
from .models import DiffusionBackend, generators


class DiffInpaintingBackend(DiffusionBackend):
    """Stable Diffusion inpainting (9-channel UNet), batched across instances."""

    name = "diffinpainting"
    output_params = DiffusionBackend.output_params + ("strength",)

    def load_class(self) -> Any:
        from diffusers import StableDiffusionInpaintPipeline

        return StableDiffusionInpaintPipeline

    def check_pipeline(self) -> None:
        if self.pipe.unet.config.in_channels != 9:
            raise InstSynthError(self.settings.model_id, "diffinpainting needs an inpainting model (UNet with 9 input "
                                 f"channels), this one has {self.pipe.unet.config.in_channels}")

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        images = [Image.fromarray(image) for image in self.working_images(jobs)]
        masks = [Image.fromarray(mask.astype(np.uint8) * 255) for mask in self.working_masks(jobs)]
        negative = [self.negative_prompt] * len(jobs) if self.negative_prompt else None
        result = self.pipe(prompt=[job.text for job in jobs], image=images, mask_image=masks,
                           height=self.size, width=self.size, num_inference_steps=self.settings.steps,
                           guidance_scale=self.settings.guidance_scale, strength=self.settings.strength,
                           negative_prompt=negative, generator=generators(jobs), output_type="np")
        return self.to_crops(result.images, jobs)
