"""Instance generation: regenerate every selected instance inside its own mask.

Backends (one module each, one interface, :class:`~instsynth.generation.common.Backend`):
``recolor`` (weightless Lab recolouring), ``diffinpainting`` (diffusers SD inpainting), ``bld``
(Blended Latent Diffusion on SDXL / SD 1.x-2.x components) and ``gligen`` (GLIGEN text-box
inpainting). :func:`generate_instances` runs one of them over a stage-1 ``metadata.json`` and writes
``OUT/<ModeName>/generation.json`` (read it back with :func:`load_manifest`).
"""
from .common import DEFAULT_MODELS, MODE_NAMES, GenerationSettings, SampleJob, sample_seed
from instsynth.core.manifests import MANIFEST_NAME, REPORT_NAME, load_manifest
from .runner import GenerationSummary, find_metadata, generate_instances

__all__ = ["DEFAULT_MODELS", "MODE_NAMES", "MANIFEST_NAME", "REPORT_NAME", "GenerationSettings", "GenerationSummary",
           "SampleJob", "find_metadata", "generate_instances", "load_manifest", "sample_seed"]
