"""What every generation backend shares: settings, seeds, prompt choice, sample jobs, resizing and
compositing, and the small :class:`Backend` interface.

Seeds never depend on processing order: an instance's seed is a stable hash of (base seed, instance
key) and picks its prompt; a sample's seed is a stable hash of (base seed, key, sample index) and
drives every random draw of that sample (its own CPU ``torch.Generator`` for diffusion backends).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from instsynth.core.imageops import resize_image
from instsynth.core.labels import DEFAULT_PROMPTS
from instsynth.core.seeds import stable_seed

MODE_NAMES = {"recolor": "Recolor", "diffinpainting": "DiffPainting", "bld": "BlendedDiff", "gligen": "gligen",
              "diffusers": "Diffusers"}
"""Output folder name of each backend (the paper's folder names; ``Diffusers`` for any diffusers inpainting model)."""

MODE_ALIASES = {"diffpainting": "diffinpainting"}
"""Other accepted spellings of ``--mode`` (``diffpainting``: the paper's own run script)."""

DEFAULT_MODELS = {
    "recolor": None,
    "diffinpainting": "stabilityai/stable-diffusion-2-inpainting",
    "bld": "stabilityai/stable-diffusion-xl-base-1.0",
    "gligen": "masterful/gligen-1-4-inpainting-text-box",
    "diffusers": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}
"""Model loaded by each backend when ``--model_path`` is not given (hub ids)."""

GLIGEN_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality")
"""The paper's default negative prompt for GLIGEN (the other backends default to none)."""


@dataclass(frozen=True)
class GenerationSettings:
    """Every knob of a generation run (recorded as ``params`` in the manifest)."""

    mode: str = "recolor"
    model_path: str | None = None
    num_samples: int = 1
    batch_size: int = 1
    steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 1.0
    negative_prompt: str | None = None
    blending_start_percentage: float = 0.25
    plms: bool = True
    resolution: int | None = None
    seed: int = 1
    device: str = "auto"
    dtype: str = "auto"
    prompts: str = str(DEFAULT_PROMPTS)
    attention_slicing: bool = False
    samples_per_class: str | None = None  # per-class budget "truck=4,bus=4" (samples per instance)
    balance: str = "none"  # "inverse_freq": samples per instance from stage 1's instances per class
    balance_power: float = 0.5
    max_factor: float = 8.0
    baseline_metrics: str | None = None  # balance "ap": a training run's inference/metrics.json
    true_cfg_scale: float | None = None  # diffusers: real classifier-free guidance of pipelines that take it
    pipeline_options: dict = field(default_factory=dict)  # diffusers: more keyword arguments of the pipeline call

    BUDGET_FIELDS: ClassVar[tuple[str, ...]] = ("samples_per_class", "balance", "balance_power", "max_factor",
                                                "baseline_metrics")
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("baseline_metrics", "true_cfg_scale", "pipeline_options")
    """Recorded only when set (manifests of runs without them stay as they were)."""

    @property
    def mode_name(self) -> str:
        return MODE_NAMES[self.mode]

    @property
    def model_id(self) -> str | None:
        """The model actually loaded: ``model_path`` or the backend's default hub id."""
        return self.model_path or DEFAULT_MODELS[self.mode]

    def as_json(self) -> dict:
        """Every field; the budget fields only when a budget is asked for (default manifests are unchanged)."""
        data = asdict(self)
        if not self.samples_per_class and self.balance == "none":
            for name in self.BUDGET_FIELDS:
                data.pop(name)
        for name in self.OPTIONAL_FIELDS:
            if name in data and data[name] in (None, {}):
                data.pop(name)
        return data


def parse_pipeline_options(text: str | dict | None) -> dict:
    """``"max_sequence_length=256,prior_guidance_scale=4"`` (or a JSON object / mapping) -> keyword arguments.

    Values are read as YAML scalars (numbers, true/false, strings); ValueError on a malformed pair."""
    import yaml

    if not text:
        return {}
    if isinstance(text, dict):
        options = dict(text)
    elif text.lstrip().startswith("{"):
        options = json.loads(text)
        if not isinstance(options, dict):
            raise ValueError(f"pipeline_options: expected a JSON object, got {text!r}")
    else:
        options = {}
        for part in (p for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"pipeline_options: expected KEY=VALUE pairs separated by commas, got {part!r}")
            options[key.strip()] = yaml.safe_load(value)
    reserved = sorted(set(options) & RESERVED_CALL_ARGUMENTS)
    if reserved:
        raise ValueError(f"pipeline_options: {', '.join(reserved)} are set by the stage itself "
                         "(use --steps / --guidance_scale / --strength / --true_cfg_scale / --negative_prompt)")
    return dict(sorted(options.items()))


RESERVED_CALL_ARGUMENTS = {"prompt", "image", "mask_image", "height", "width", "generator", "output_type",
                           "num_inference_steps", "guidance_scale", "strength", "true_cfg_scale", "negative_prompt"}


# --------------------------------------------------------------------------- seeds and prompts


def instance_seed(seed: int, key: str) -> int:
    """Seed of an instance (chooses its prompt)."""
    return stable_seed(seed, key)


def sample_seed(seed: int, key: str, sample: int) -> int:
    """Seed of one sample of an instance (drives all of that sample's randomness)."""
    return stable_seed(seed, key, sample)


def choose_prompt(prompts: Sequence[str], seed: int) -> str:
    """One prompt of the class's list, chosen by the instance seed."""
    return prompts[int(np.random.default_rng(seed).integers(len(prompts)))]


# --------------------------------------------------------------------------- sample jobs
@dataclass
class SampleJob:
    """One image to generate: sample ``sample`` of instance ``key``."""

    key: str
    sample: int
    seed: int
    prompt: str  # "a red car"
    text: str  # "a photo of a red car"
    class_name: str
    crop_rgb: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    crop_mask: np.ndarray = field(repr=False)  # (H, W) bool

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the crop."""
        return self.crop_mask.shape[:2]

    def mask_box(self) -> tuple[float, float, float, float]:
        """The instance's box inside the crop, normalised to [0, 1] (x0, y0, x1, y1)."""
        ys, xs = np.nonzero(self.crop_mask)
        h, w = self.size
        return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


# --------------------------------------------------------------------------- resizing, compositing


def composite(source: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``generated`` inside ``mask`` and ``source`` elsewhere (outside pixels byte-identical)."""
    if generated.shape != source.shape:
        generated = resize_image(generated, source.shape[:2])
    return np.where(mask[..., None], generated, source).astype(np.uint8)


# --------------------------------------------------------------------------- the backend interface
class Backend:
    """One way of regenerating instances. Subclasses set the class attributes and ``generate``."""

    name: ClassVar[str]
    output_params: ClassVar[tuple[str, ...]] = ("seed",)
    """Settings that change the pixels: a resumed run must use the same values."""

    def __init__(self, settings: GenerationSettings, local_rank: int = 0):
        self.settings = settings
        self.local_rank = local_rank  # GPU index of this process under accelerate launch / torchrun

    def describe(self) -> dict:
        """Resolved details recorded in the manifest's params (device, dtype, resolution, ...)."""
        return {}

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        """One RGB uint8 image per job, at the job's crop size (composited by the caller)."""
        raise NotImplementedError


def resolve_prompts_path(path: str | Path | None) -> str:
    return str(Path(path or DEFAULT_PROMPTS).resolve())
