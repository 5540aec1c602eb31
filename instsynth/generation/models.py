"""Shared code of the diffusion backends: device and dtype, loading weights (with a clear offline
error), per-sample CPU generators, batch-invariant CPU execution, working-resolution conversion.

Batch size never changes a sample: its noise comes from its own CPU ``torch.Generator`` (seeded with
the sample seed) and is moved to the device. On CPU the networks additionally run one row at a time
(:func:`run_rows_separately`), because CPU kernels (oneDNN convolutions, GroupNorm on batch-1 layouts,
matrix-vector products for one row) round differently for different batch sizes; batching brings no
speed there anyway, so PNGs are byte-identical for every ``--batch_size``. On CUDA rows run together (the point of batching);
results then agree across batch sizes up to float rounding.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError, get_logger
from instsynth.generation.common import Backend, GenerationSettings, SampleJob
from instsynth.core.imageops import resize_image, resize_mask

log = get_logger("instsynth.generation")

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def resolve_device(device: str, local_rank: int = 0):
    """``auto``: this process's GPU when CUDA is available, else CPU; ``cuda`` picks the local rank's GPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InstSynthError(device, "CUDA requested but no GPU is available (use --device cpu)")
    return resolved


def resolve_dtype(dtype: str, device) -> Any:
    """``auto``: fp16 on CUDA, fp32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[dtype])


def load_pipeline(pipeline_class: Any, model_id: str, dtype) -> Any:
    """``pipeline_class.from_pretrained(model_id)``; any failure to find the weights raises InstSynthError.

    The message names the model and says how to provide it offline (a local folder or a pre-filled
    Hugging Face cache under ``HF_HOME``).
    """
    local = Path(model_id).expanduser()
    looks_local = local.is_absolute() or model_id.startswith(".") or local.exists() or model_id.count("/") != 1
    if looks_local and not local.is_dir():
        raise InstSynthError(model_id, "model folder not found (pass --model_path a folder saved with "
                                       "save_pretrained, or a Hugging Face hub id)")
    try:
        with warnings.catch_warnings():  # newer diffusers deprecate torch_dtype=; older ones lack dtype=
            warnings.simplefilter("ignore", FutureWarning)
            return pipeline_class.from_pretrained(str(local) if local.is_dir() else model_id, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if local.is_dir():
            raise InstSynthError(model_id, f"cannot load this model folder with {pipeline_class.__name__} ({cause})") from exc
        from huggingface_hub.constants import HF_HUB_CACHE

        raise InstSynthError(model_id, f"cannot load this hub model: not in the Hugging Face cache ({HF_HUB_CACHE}) "
                             f"and not downloadable here ({cause}). Download it where there is network access "
                             f"(huggingface-cli download {model_id} --local-dir DIR), copy DIR over and pass "
                             f"--model_path DIR, or pre-fill the cache under HF_HOME and set HF_HUB_OFFLINE=1") from exc


# --------------------------------------------------------------------------- determinism helpers
def generators(jobs: Sequence[SampleJob]) -> list:
    """One CPU ``torch.Generator`` per job, seeded with its sample seed."""
    import torch

    return [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]


def sample_noise(gens: Sequence, shape: tuple[int, ...], device, dtype):
    """A (len(gens), *shape) normal tensor: row i drawn on CPU from ``gens[i]``, then moved to ``device``."""
    import torch

    rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(rows).to(device=device, dtype=dtype)


def _split(value: Any, index: int, batch: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value[index:index + 1] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _split(v, index, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, index, batch) for v in value)
    return value


def _concat(parts: list) -> Any:
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _concat([getattr(p, f.name) for p in parts])
                              for f in dataclasses.fields(first) if getattr(first, f.name) is not None})
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(items)) for items in zip(*parts))
    return first


BATCH_KWARGS = ("sample", "hidden_states", "input_ids")
"""Keyword names of a network's batched input when it is called without positional arguments (FLUX's transformer)."""
WHOLE_KWARGS = ("txt_ids", "img_ids")
"""Keyword inputs shared by every row (FLUX's position ids: (sequence, 3), never split)."""


def run_rows_separately(module) -> None:
    """Make ``module`` compute each batch row on its own (same result for any batch size on CPU)."""
    forward = module.forward

    @functools.wraps(forward)
    def rowwise(*args, **kwargs):
        first = args[0] if args else next((kwargs[k] for k in BATCH_KWARGS if k in kwargs), None)
        batch = first.shape[0] if hasattr(first, "shape") and first.ndim else 1
        if batch == 1:
            return forward(*args, **kwargs)
        whole = {k: kwargs.pop(k) for k in WHOLE_KWARGS if k in kwargs}
        return _concat([forward(*_split(args, i, batch), **_split(kwargs, i, batch), **whole)
                        for i in range(batch)])

    module.forward = rowwise


# --------------------------------------------------------------------------- the shared backend
class DiffusionBackend(Backend):
    """Loads ``pipeline_class`` from ``settings.model_id`` onto the device; subclasses implement ``generate``."""

    pipeline_class: Any = None
    output_params = ("seed", "steps", "guidance_scale", "resolution", "dtype", "negative_prompt")

    def __init__(self, settings: GenerationSettings, local_rank: int = 0, pipeline: Any = None):
        """Load the model of ``settings`` (or use ``pipeline``, an already built one, e.g. in benchmarks)."""
        super().__init__(settings, local_rank)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # progress notes and dtype-cast notices would drown the log
        self.device = resolve_device(settings.device, local_rank)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.pipe = pipeline if pipeline is not None else load_pipeline(self.load_class(), settings.model_id, self.dtype)
        self.check_pipeline()
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if settings.attention_slicing:
            self.pipe.enable_attention_slicing()
        if self.device.type == "cpu":
            for module in self.row_modules():
                run_rows_separately(module)
        else:  # fixed shapes, convolution-heavy networks: NHWC layout and tuned cuDNN kernels
            import torch

            torch.backends.cudnn.benchmark = True
            for module in self.channels_last_modules():
                module.to(memory_format=torch.channels_last)
        self.size = settings.resolution or self.native_size()
        log.info("%s: %s on %s (%s), %dx%d", self.name, settings.model_id, self.device, str(self.dtype).split(".")[-1],
                 self.size, self.size)

    def load_class(self) -> Any:
        return self.pipeline_class

    def check_pipeline(self) -> None:
        """Raise InstSynthError when the loaded model does not suit this backend."""

    def row_modules(self) -> list:
        """The networks run row by row on CPU."""
        vae = self.pipe.vae
        modules = [self.pipe.unet, vae.encoder, vae.decoder]
        modules += [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                    if m is not None]
        modules += [m for m in (getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)) if m is not None]
        return modules

    def channels_last_modules(self) -> list:
        """The convolution networks moved to NHWC on CUDA."""
        return [self.pipe.unet, self.pipe.vae]

    def native_size(self) -> int:
        """The model's working resolution in pixels (used without ``--resolution``)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def negative_prompt(self) -> str | None:
        return self.settings.negative_prompt or None

    def describe(self) -> dict:
        return {"device": self.device.type, "dtype": str(self.dtype).split(".")[-1], "working_resolution": self.size,
                "pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__}

    # ----------------------------------------------------------------- working resolution
    def working_images(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        return [resize_image(job.crop_rgb, (self.size, self.size)) for job in jobs]

    def working_masks(self, jobs: Sequence[SampleJob], size: int | None = None) -> list[np.ndarray]:
        size = size or self.size
        return [resize_mask(job.crop_mask, (size, size)) for job in jobs]

    @staticmethod
    def to_crops(images: np.ndarray, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        """Float [0, 1] NHWC model outputs as uint8 images at each job's crop size."""
        out = np.clip(np.rint(np.nan_to_num(np.asarray(images, np.float32)) * 255.0), 0, 255).astype(np.uint8)
        return [resize_image(image, job.size) for image, job in zip(out, jobs)]
