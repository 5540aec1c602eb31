"""Quality of generated instances: pixel metrics, FID, CLIP scores and the quality gate.

Every generated sample is an RGB crop that must equal its source crop outside the instance mask
(contract 2). Measured per sample:

- ``ssim_in`` / ``psnr_in``: how much the instance changed (SSIM map and MSE over mask pixels);
- ``ssim_out`` / ``psnr_out``: the same outside the mask; a hard paste gives exactly 1 and ``inf``;
- ``mask_leak``: the fraction of the squared pixel change that lies outside the mask (0 = none);
- ``changed_fraction``: the fraction of mask pixels that changed by more than a few grey levels;
- ``clip_prompt``: CLIP cosine similarity of the sample and its prompt text ("a photo of a red car");
- ``clip_margin``: ``clip_prompt`` minus the best score of the other prompts of the class;
- ``clip_class_margin``: the CLIP class check: the score of the plain class prompt ("a photo of a car")
  minus the best score of the other classes' prompts (below 0: CLIP sees another class);
- ``clip_source``: CLIP image-image cosine similarity of the sample and its source crop;

and per run the FID between the generated samples and the source crops: 2048-d pool features of
Inception-v3 (torchvision's network; with pytorch-fid's ``pt_inception`` weights pytorch-fid's own FID
Inception blocks, so features match pytorch-fid's to float rounding), or a network described by ``config.json``.

Models load from a local path or a Hugging Face hub id; nothing is downloaded unless a hub id is
given, and with no network and no local copy the error says what to download and where.

In JSON files an infinite PSNR is written as the string ``"inf"`` (strict JSON has no infinity) and
an undefined value (an empty region) as ``null``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .parallel import ordered_map
from .io import InstSynthError, default_workers, get_logger, progress, read_json, read_png, write_json
from .labels import render_prompt

log = get_logger("instsynth.quality")

EVALUATION_NAME = "evaluation.json"
FILTER_REPORT_NAME = "filter_report.json"
SCORE_NAMES = ("clip_prompt", "clip_margin", "clip_class_margin", "mask_leak", "changed_fraction")
"""The per-sample scores the quality filter writes into the manifest (``entry["scores"][i]``) with a CLIP model."""
CHANGE_TOLERANCE = 8
"""A pixel counts as changed when a channel moved by more than this many grey levels."""
DEFAULT_THRESHOLDS = (0.20, 0.22, 0.24, 0.26, 0.28, 0.30)
"""min_clip_score values tabulated by the filter report (CLIP ViT-B/32 cosines of matching pairs are ~0.2-0.35)."""
DEFAULT_TOP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)

CLIP_DOWNLOAD_HINT = ("download it once where there is network, e.g. `huggingface-cli download "
                      "openai/clip-vit-base-patch32 --local-dir weights/clip-vit-base-patch32`, "
                      "and pass that folder (--clip weights/clip-vit-base-patch32)")
INCEPTION_DOWNLOAD_HINT = (
    "download pytorch-fid's FID Inception weights "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth "
    "(or torchvision's https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth) "
    "to e.g. weights/pt_inception-2015-12-05-6726825d.pth and pass that file (--inception PATH)")


# --------------------------------------------------------------------------- JSON numbers
def json_number(value: float | None, digits: int = 6) -> float | str | None:
    """A metric as strict JSON: rounded float, ``"inf"``/``"-inf"``, or None for NaN/undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return round(value, digits)


def read_number(value: float | str | None) -> float:
    """Inverse of :func:`json_number` (None becomes NaN)."""
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------- pixel metrics
def _check_pair(reference: np.ndarray, sample: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if reference.shape != sample.shape or reference.shape[:2] != mask.shape[:2]:
        raise ValueError(f"shape mismatch: reference {reference.shape}, sample {sample.shape}, mask {mask.shape}")
    return np.asarray(mask).astype(bool)


def region_ssim(reference: np.ndarray, sample: np.ndarray, region: np.ndarray) -> float | None:
    """Mean SSIM over ``region`` of the pair that differs from ``reference`` only inside ``region``.

    ``sample`` pixels outside the region are replaced by the reference's first, so a change on one
    side of the mask never lowers the score of the other side (SSIM windows straddle the border).
    Identical regions give exactly 1.0; an empty region gives None.
    """
    from skimage.metrics import structural_similarity

    region = _check_pair(reference, sample, region)
    if not region.any():
        return None
    composite = np.where(region[..., None] if reference.ndim == 3 else region, sample, reference)
    if np.array_equal(composite, reference):
        return 1.0
    side = min(reference.shape[:2])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:  # too small for SSIM windows: compare pixel values
        return float(np.mean(composite[region] == reference[region]))
    _, ssim_map = structural_similarity(reference, composite, data_range=255, full=True, win_size=win,
                                        channel_axis=2 if reference.ndim == 3 else None)
    if ssim_map.ndim == 3:
        ssim_map = ssim_map.mean(axis=2)
    return float(ssim_map[region].mean())


def region_mse(reference: np.ndarray, sample: np.ndarray, region: np.ndarray) -> float | None:
    """Mean squared error (0-255 scale) over the pixels of ``region``; None when it is empty."""
    region = _check_pair(reference, sample, region)
    if not region.any():
        return None
    diff = reference[region].astype(np.float64) - sample[region].astype(np.float64)
    return float(np.mean(diff * diff))


def psnr_from_mse(mse: float | None, data_range: float = 255.0) -> float | None:
    """PSNR in dB of a mean squared error: ``inf`` for 0, None for None."""
    if mse is None:
        return None
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def mask_leak(reference: np.ndarray, sample: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the squared pixel change that lies outside ``mask`` (0 when nothing changed)."""
    inside = _check_pair(reference, sample, mask)
    energy = (reference.astype(np.float64) - sample.astype(np.float64)) ** 2
    if energy.ndim == 3:
        energy = energy.sum(axis=2)
    total = energy.sum()
    return float(energy[~inside].sum() / total) if total > 0 else 0.0


def changed_fraction(reference: np.ndarray, sample: np.ndarray, mask: np.ndarray,
                     tolerance: int = CHANGE_TOLERANCE) -> float | None:
    """Fraction of mask pixels where some channel changed by more than ``tolerance`` grey levels."""
    inside = _check_pair(reference, sample, mask)
    if not inside.any():
        return None
    delta = np.abs(reference.astype(np.int16) - sample.astype(np.int16))
    if delta.ndim == 3:
        delta = delta.max(axis=2)
    return float(np.mean(delta[inside] > tolerance))


def pixel_metrics(reference: np.ndarray, sample: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """SSIM/PSNR inside and outside the mask, mask_leak and changed_fraction of one sample."""
    inside = _check_pair(reference, sample, mask)
    mse_in, mse_out = region_mse(reference, sample, inside), region_mse(reference, sample, ~inside)
    return {"ssim_in": region_ssim(reference, sample, inside), "ssim_out": region_ssim(reference, sample, ~inside),
            "psnr_in": psnr_from_mse(mse_in), "psnr_out": psnr_from_mse(mse_out),
            "mse_in": mse_in, "mse_out": mse_out, "mask_leak": mask_leak(reference, sample, inside),
            "changed_fraction": changed_fraction(reference, sample, inside)}


# --------------------------------------------------------------------------- Frechet distance
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: ``|mu1-mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))``.

    ``scipy.linalg.sqrtm`` of the product; when it is not finite (near-singular covariances)
    ``eps`` is added to both diagonals and it is retried. Small imaginary parts from rounding
    are dropped; large ones raise ValueError.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        log.warning("FID: sqrtm of the covariance product is not finite; adding %g to the diagonals", eps)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, abs(np.trace(sigma1)), abs(np.trace(sigma2)))
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if imaginary > 1e-3 * scale:
            raise ValueError(f"FID: sqrtm has a large imaginary component ({imaginary:.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two feature sets (rows are samples; each set needs at least 2 rows).

    When there are fewer samples than feature dimensions the features are first expressed in an
    orthonormal basis of the subspace they span (relative to their common mean); the distance is
    unchanged by this, but the matrices become smaller and far better conditioned.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d, got {real.shape} and {fake.shape}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    if len(real) + len(fake) < real.shape[1]:
        both = np.concatenate([real, fake])
        centre = both.mean(axis=0)
        basis, singular, _ = np.linalg.svd((both - centre).T, full_matrices=False)
        basis = basis[:, singular > singular.max(initial=0.0) * 1e-9]
        real, fake = (real - centre) @ basis, (fake - centre) @ basis
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))


# --------------------------------------------------------------------------- feature network for FID
FEATURE_CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def build_feature_network(config: dict):
    """A torch module mapping (N, 3, S, S) images in [-1, 1] to (N, D) features, from its config.

    ``{"architecture": "inception_v3", "num_classes": 1008, "aux_logits": false, "fid_variant": true}``:
    torchvision's Inception-v3 with ``fc`` removed (2048-d pool features, input 299); with
    ``fid_variant`` pytorch-fid's FID Inception blocks (``FIDInceptionA/C/E_1/E_2``: the TensorFlow FID
    Inception's pooling). ``{"architecture":
    "tiny_inception", "stem_channels": C, "pool_features": P, "input_size": S}``: one stem conv and
    one torchvision InceptionA block, global average pooled (``224 + P``-d), for tests.
    """
    import torch
    from torchvision.models.inception import BasicConv2d, Inception3, InceptionA

    arch = config.get("architecture")
    if arch == "inception_v3":
        from torchvision.models.inception import InceptionAux, InceptionB, InceptionD

        blocks = None
        if config.get("fid_variant"):  # pytorch-fid's blocks: the TensorFlow FID Inception's pooling
            from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

            blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE_1, InceptionAux]
        net = Inception3(num_classes=int(config.get("num_classes", 1008)), aux_logits=bool(config.get("aux_logits", False)),
                         transform_input=False, inception_blocks=blocks, init_weights=False)
        if config.get("fid_variant"):
            net.Mixed_7c = FIDInceptionE_2(2048)  # the last block max-pools
        net.fc = torch.nn.Identity()
        return net
    if arch == "tiny_inception":
        stem = int(config.get("stem_channels", 16))
        return torch.nn.Sequential(BasicConv2d(3, stem, kernel_size=3, stride=2),
                                   InceptionA(stem, pool_features=int(config.get("pool_features", 8))),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    raise ValueError(f"unknown feature architecture {arch!r} (inception_v3 or tiny_inception)")


def _read_state_dict(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file: any loader error
        raise InstSynthError(path, f"cannot read weights ({exc.__class__.__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InstSynthError(path, "not a state_dict (expected a mapping of parameter names to tensors)")
    return state


def _inception_config_of(state: dict) -> dict:
    """Config of a plain Inception-v3 state_dict: 1008 classes is the TF FID Inception (pytorch-fid's
    ``pt_inception``), anything else torchvision's (e.g. ``inception_v3_google``, 1000 classes)."""
    fc = state.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None else 1008
    return {"architecture": "inception_v3", "num_classes": num_classes, "fid_variant": num_classes == 1008,
            "aux_logits": any(k.startswith("AuxLogits.") for k in state), "input_size": 299}


def _resolve_local_weights(path: Path) -> tuple[dict, Path]:
    """(config, weights file) of a weights file or a folder holding config.json and/or one weights file."""
    if path.is_file():
        return {}, path
    config = read_json(path / FEATURE_CONFIG) if (path / FEATURE_CONFIG).is_file() else {}
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise InstSynthError(path, f"expected exactly one weights file ({'/'.join(WEIGHT_SUFFIXES)}) in the folder, "
                                   f"found {[p.name for p in files]}")
    return config, files[0]


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids (``owner/name``): ./x, /x, ~/x, a/b/c, x.pth."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in WEIGHT_SUFFIXES


def _hub_snapshot(repo_id: str, hint: str) -> Path:
    """Local folder of a hub repository (cache first; network only if not offline)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", *("*" + s for s in WEIGHT_SUFFIXES)]))
    except Exception as exc:  # offline, unknown repo, no network
        raise InstSynthError(repo_id, f"not a local path, and not available from the Hugging Face hub "
                                      f"({exc.__class__.__name__}); {hint}") from None


@dataclass
class FeatureExtractor:
    """A loaded feature network for FID and where it came from."""

    net: Any
    input_size: int
    source: str
    device: str = "cpu"

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float64 features of RGB uint8 images (any sizes; resized bilinearly to the input size)."""
        import torch
        import torch.nn.functional as F

        batch = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
            batch.append(F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False))
        x = torch.cat(batch).to(self.device) / 127.5 - 1.0
        with torch.no_grad():
            return self.net(x).double().cpu().numpy()


def load_feature_extractor(name: str | os.PathLike, device: str = "cpu") -> FeatureExtractor:
    """Inception features for FID from a weights file, a folder, or a hub id.

    A ``.pth``/``.pt``/``.bin``/``.safetensors`` file is a torchvision Inception-v3 state_dict
    (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torchvision's
    ``inception_v3_google-0cc3c7bd.pth`` both fit). A folder holds one such file and optionally a
    ``config.json`` naming the architecture (see :func:`build_feature_network`). Anything else is
    a hub repository id (downloaded only when not offline). Missing weights raise InstSynthError
    saying what to download.
    """
    text = str(name)
    path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text):
            raise InstSynthError(path, f"Inception weights not found; {INCEPTION_DOWNLOAD_HINT}")
        path = _hub_snapshot(text, INCEPTION_DOWNLOAD_HINT)
    config, weights = _resolve_local_weights(path)
    state = _read_state_dict(weights)
    config = config or _inception_config_of(state)
    try:
        net = build_feature_network(config)
    except ValueError as exc:
        raise InstSynthError(path, str(exc)) from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InstSynthError(weights, f"weights do not fit {config['architecture']}: missing {list(missing)[:5]}, "
                                      f"unexpected {list(unexpected)[:5]}")
    return FeatureExtractor(net.eval().to(device), int(config.get("input_size", 299)), text, device)


# --------------------------------------------------------------------------- CLIP
def _unit_rows(features) -> np.ndarray:
    """Rows scaled to unit length (float64 numpy) of a tensor or a transformers output holding one."""
    if not hasattr(features, "shape"):  # transformers >= 5 returns an output object
        features = features.pooler_output
    features = features.double().cpu().numpy()
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass
class ClipScorer:
    """A CLIP model and processor; embeddings are unit vectors, so dot products are cosines in [-1, 1]."""

    model: Any
    processor: Any
    source: str
    device: str = "cpu"
    batch_size: int = 16

    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) unit image embeddings of RGB uint8 arrays."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out.append(_unit_rows(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, 0))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit text embeddings (each text tokenised alone, so results do not depend on batching)."""
        import torch

        out = []
        for text in texts:
            tokens = self.processor(text=[text], return_tensors="pt", truncation=True)
            with torch.no_grad():
                out.append(_unit_rows(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                                   attention_mask=tokens["attention_mask"].to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, 0))


def load_clip(name: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> ClipScorer:
    """transformers CLIPModel + CLIPProcessor from a ``save_pretrained`` folder or a hub id.

    A hub id is looked up in the local cache and fetched only when not offline (``HF_HUB_OFFLINE``);
    when it cannot be loaded the InstSynthError says what to download and where.
    """
    from transformers import CLIPModel, CLIPProcessor

    text = str(name)
    path = Path(text).expanduser()
    if not path.exists() and _looks_like_path(text):
        raise InstSynthError(path, f"CLIP model folder not found; {CLIP_DOWNLOAD_HINT}")
    source = str(path) if path.exists() else text
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=path.exists())
        processor = CLIPProcessor.from_pretrained(source, local_files_only=path.exists())
    except (OSError, ValueError) as exc:
        where = "folder is not a complete CLIP save_pretrained folder" if path.exists() else \
            "is not a local folder and could not be loaded from the Hugging Face hub (offline or not cached)"
        raise InstSynthError(text, f"CLIP model {where} ({exc.__class__.__name__}); {CLIP_DOWNLOAD_HINT}") from None
    return ClipScorer(model.eval().to(device), processor, text, device, batch_size)


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when available, else ``cpu``."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------- reading a generation run
@dataclass(frozen=True)
class SampleRef:
    """One generated sample and the source crop it was made from."""

    key: str
    index: int
    path: Path
    rel: str
    crop_path: Path
    mask_path: Path
    class_name: str
    prompt: str
    text: str


def manifest_file(path: str | os.PathLike) -> Path:
    """Absolute path of a ``generation.json`` given it or its folder."""
    from .generation.manifest import MANIFEST_NAME

    path = Path(path).resolve()
    return path / MANIFEST_NAME if path.is_dir() else path


def load_run(manifest_path: str | os.PathLike) -> tuple[dict, list[SampleRef]]:
    """The manifest (validated, with ``sample_paths``) and every sample with its source crop, in manifest order.

    The crops come from the stage-1 ``metadata.json`` the manifest names; an instance missing there
    raises InstSynthError naming the manifest.
    """
    from .generation.manifest import load_manifest
    from .stages.metadata import load_metadata

    manifest = load_manifest(manifest_path)
    path = manifest_file(manifest_path)
    if not isinstance(manifest.get("metadata"), str):
        raise InstSynthError(path, "field 'metadata' (path of the stage-1 metadata.json) missing")
    crops = {inst["key"]: inst for inst in load_metadata(manifest["metadata"], check_files=False)["instances"]}
    refs = []
    for key, entry in manifest["instances"].items():
        if key not in crops:
            raise InstSynthError(path, f"instance {key!r} is not in {manifest['metadata']}")
        inst = crops[key]
        for index, (rel, sample_path) in enumerate(zip(entry["samples"], entry["sample_paths"])):
            refs.append(SampleRef(key, index, sample_path, rel, inst["crop_rgb_path"], inst["crop_mask_path"],
                                  entry["class"], entry["prompt"], entry["text"]))
    return manifest, refs


def read_crop(ref: SampleRef) -> tuple[np.ndarray, np.ndarray]:
    """(source crop RGB, mask bool) of a sample's instance."""
    rgb = read_png(ref.crop_path, rgb=True, dtype=np.uint8)
    mask = read_png(ref.mask_path, dtype=np.uint8, shape=rgb.shape[:2])
    if mask.ndim != 2:
        raise InstSynthError(ref.mask_path, "crop mask must be single-channel")
    return rgb, mask > 127


def read_sample(ref: SampleRef, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A sample's RGB pixels (it must have the crop's size when ``shape`` is given)."""
    return read_png(ref.path, rgb=True, dtype=np.uint8, shape=shape)


def _by_instance(refs: Sequence[SampleRef]) -> dict[str, list[SampleRef]]:
    groups: dict[str, list[SampleRef]] = {}
    for ref in refs:
        groups.setdefault(ref.key, []).append(ref)
    return groups


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


MIN_INSTANCES_PER_WORKER = 8
"""Small runs stay in one process: starting workers costs more than it saves below this."""


def _instance_pixel_metrics(group: Sequence[SampleRef]) -> list[dict] | tuple[str, str]:
    """Metrics of one instance's samples, or (path, problem) on bad input (the error does not pickle)."""
    try:
        crop, mask = read_crop(group[0])
        return [pixel_metrics(crop, read_sample(ref, crop.shape[:2]), mask) for ref in group]
    except InstSynthError as exc:
        return str(exc.path), exc.problem


def sample_pixel_metrics(refs: Sequence[SampleRef], desc: str = "pixel metrics", workers: int | None = None) -> list[dict]:
    """:func:`pixel_metrics` of every sample, in ``refs`` order; one task per instance (its crop read once).

    ``workers`` processes (default: every core); results do not depend on their number.
    """
    groups = list(_by_instance(refs).values())
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(groups) // MIN_INSTANCES_PER_WORKER)
    outputs = ordered_map(_instance_pixel_metrics, groups, workers)
    results: dict[tuple[str, int], dict] = {}
    for group, output in zip(groups, progress(outputs, desc, len(groups))):
        if isinstance(output, tuple):
            raise InstSynthError(*output)
        results.update({(ref.key, ref.index): metrics for ref, metrics in zip(group, output)})
    return [results[(r.key, r.index)] for r in refs]


def clip_similarities(refs: Sequence[SampleRef], clip: ClipScorer, texts_of: Callable[[SampleRef], list[str]],
                      desc: str = "CLIP") -> tuple[list[np.ndarray], list[float]]:
    """Per sample: cosines against each of ``texts_of(ref)`` and the image-image cosine to its source crop."""
    groups = _by_instance(refs)
    text_cache: dict[str, np.ndarray] = {}
    by_sample: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    for key, group in progress(groups.items(), desc, len(groups)):
        crop, _ = read_crop(group[0])
        embeddings = clip.images([crop] + [read_sample(ref, crop.shape[:2]) for ref in group])
        for ref, image in zip(group, embeddings[1:]):
            texts = texts_of(ref)
            for text in texts:
                if text not in text_cache:
                    text_cache[text] = clip.texts([text])[0]
            text_scores = np.array([float(image @ text_cache[t]) for t in texts])
            by_sample[(key, ref.index)] = (text_scores, float(image @ embeddings[0]))
    return [by_sample[(r.key, r.index)][0] for r in refs], [by_sample[(r.key, r.index)][1] for r in refs]


def generation_fid(refs: Sequence[SampleRef], features: FeatureExtractor, batch_size: int = 16) -> float | None:
    """FID between the generated samples and their (distinct) source crops; None with < 2 of either."""
    sources = list(_by_instance(refs).values())
    if len(sources) < 2 or len(refs) < 2:
        return None
    real = [features([read_crop(g[0])[0] for g in chunk]) for chunk in _chunks(sources, batch_size)]
    fake = [features([read_sample(ref) for ref in chunk]) for chunk in progress(
        list(_chunks(refs, batch_size)), "FID features", math.ceil(len(refs) / max(1, batch_size)))]
    return fid_from_features(np.concatenate(real), np.concatenate(fake))


# --------------------------------------------------------------------------- evaluation
def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], fid: float | None) -> dict:
    """Run-level numbers: means of per-sample metrics, PSNR of the mean MSE (finite unless all perfect)."""
    def mse(name):
        return _mean(r[name] for r in records)

    outside = [r for r in records if r["mse_out"] is not None]
    return {
        "instances": len({r["key"] for r in records}), "samples": len(records), "fid": fid,
        "ssim_in": _mean(r["ssim_in"] for r in records), "ssim_out": _mean(r["ssim_out"] for r in records),
        "ssim_out_min": min((r["ssim_out"] for r in outside), default=None),
        "psnr_in": psnr_from_mse(mse("mse_in")), "psnr_out": psnr_from_mse(mse("mse_out")),
        "outside_identical": sum(1 for r in outside if r["mse_out"] == 0), "outside_pixels_present": len(outside),
        "mask_leak_max": max((r["mask_leak"] for r in records), default=None),
        "changed_fraction": _mean(r["changed_fraction"] for r in records),
        "clip_prompt": _mean(r.get("clip_prompt") for r in records),
        "clip_source": _mean(r.get("clip_source") for r in records)}


SUMMARY_ROWS = (
    ("fid", "FID generated vs source crops (lower = closer)"),
    ("ssim_in", "SSIM inside the mask (mean; lower = more changed)"),
    ("psnr_in", "PSNR inside the mask, dB (of the mean MSE)"),
    ("ssim_out", "SSIM outside the mask (1 = untouched)"),
    ("psnr_out", "PSNR outside the mask, dB (inf = untouched)"),
    ("outside_identical", "samples identical to the source outside the mask"),
    ("mask_leak_max", "largest share of the change outside the mask"),
    ("changed_fraction", "share of mask pixels changed (mean)"),
    ("clip_prompt", "CLIP sample vs its prompt, cosine (mean)"),
    ("clip_source", "CLIP sample vs source crop, cosine (mean)"),
)


def format_table(result: dict) -> str:
    """The summary of :func:`evaluate_generation` as a fixed-width text table (with the notes)."""
    summary = result["summary"]
    lines = [f"{result.get('mode_name', '')}: {summary['samples']} samples of {summary['instances']} instances",
             f"{'metric':<18} {'value':>12}  meaning", "-" * 78]
    for name, meaning in SUMMARY_ROWS:
        value = summary.get(name)
        if name == "outside_identical":
            text = f"{value}/{summary['outside_pixels_present']}"
        elif value is None:
            text = "skipped" if name in ("fid", "clip_prompt", "clip_source") else "-"
        else:
            text = f"{read_number(value):.4f}" if not isinstance(value, str) else value
        lines.append(f"{name:<18} {text:>12}  {meaning}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def evaluate_generation(manifest: str | os.PathLike, inception: str | None = None, clip: str | None = None,
                        out: str | os.PathLike | None = None, device: str | None = "auto",
                        batch_size: int = 16, workers: int | None = None) -> dict:
    """Measure a generation run; writes ``out`` (default ``<manifest folder>/evaluation.json``) and returns it.

    Pixel metrics are always computed. FID needs ``inception`` and CLIP scores need ``clip`` (local
    path or hub id); without them those metrics are skipped and a note says so. Pixel metrics run
    in ``workers`` processes (default: every core).
    """
    device = resolve_device(device)
    run, refs = load_run(manifest)
    manifest_path = manifest_file(manifest)
    if not refs:
        raise InstSynthError(manifest_path, "the manifest lists no samples")
    records = [{"key": r.key, "sample": r.index, "path": r.rel, **m}
               for r, m in zip(refs, sample_pixel_metrics(refs, workers=workers))]
    notes, fid = [], None
    if clip:
        scorer = load_clip(clip, device, batch_size)
        text_scores, source_scores = clip_similarities(refs, scorer, lambda ref: [ref.text])
        for record, texts, source in zip(records, text_scores, source_scores):
            record.update(clip_prompt=float(texts[0]), clip_source=source)
    else:
        notes.append("CLIP scores skipped: no --clip model given (e.g. --clip openai/clip-vit-base-patch32 or a local copy)")
    if inception:
        fid = generation_fid(refs, load_feature_extractor(inception, device), batch_size)
        if fid is None:
            notes.append("FID skipped: needs at least 2 instances and 2 samples")
    else:
        notes.append("FID skipped: no --inception weights given (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    result = {"version": 1, "manifest": str(manifest_path), "backend": run["backend"], "mode_name": run["mode_name"],
              "models": {"inception": str(inception) if inception else None, "clip": str(clip) if clip else None},
              "notes": notes, "summary": summarize(records, fid), "samples": records}
    out = Path(out) if out is not None else manifest_path.parent / EVALUATION_NAME
    write_json(out, _jsonable(result))
    result["path"] = str(out)
    return result


def _jsonable(obj: Any) -> Any:
    """``obj`` with every float made strict-JSON safe (:func:`json_number`)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return json_number(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- quality gate
def other_prompts(manifest: dict, prompts: str | os.PathLike | None = None) -> Callable[[SampleRef], list[str]]:
    """``ref -> [its text, then the texts of the other prompts of its class]`` from the run's prompt bank."""
    template, bank = _run_bank(manifest, prompts)

    def texts(ref: SampleRef) -> list[str]:
        others = [render_prompt(template, p) for p in bank.get(ref.class_name, []) if p != ref.prompt]
        return [ref.text] + [t for t in others if t != ref.text]

    return texts


def _run_bank(manifest: dict, prompts: str | os.PathLike | None) -> tuple[str, dict[str, list[str]]]:
    """(template, bank) of a run: the prompt bank it was made with (or ``prompts``), its own template;
    a COCO dataset's metadata completes the bank with its categories' generated prompts."""
    from .labels import prompt_bank_for

    params = manifest.get("params", {})
    try:
        meta = read_json(manifest["metadata"])
    except (KeyError, TypeError, InstSynthError):
        meta = {}
    template, bank = prompt_bank_for(meta if isinstance(meta, dict) else {}, prompts or params.get("prompts"))
    return params.get("prompt_template") or template, bank


def class_prompt(template: str, class_name: str) -> str:
    """The plain class prompt of the CLIP class check: ``"a photo of a car"``."""
    article = "an" if class_name[0] in "aeiou" else "a"
    return render_prompt(template, f"{article} {class_name}")


def class_texts(manifest: dict, prompts: str | os.PathLike | None = None) -> Callable[[SampleRef], list[str]]:
    """``ref -> [its class prompt, then those of every other class of the run's prompt bank]``."""
    template, bank = _run_bank(manifest, prompts)

    def texts(ref: SampleRef) -> list[str]:
        others = [c for c in bank if c != ref.class_name]
        return [class_prompt(template, c) for c in [ref.class_name, *others]]

    return texts


def _margin(scores: np.ndarray) -> float | None:
    """First score minus the best of the others (None without others)."""
    return float(scores[0] - scores[1:].max()) if len(scores) > 1 else None


def _has_scores(entry: dict, names: Sequence[str]) -> bool:
    scores = entry.get("scores")
    return (isinstance(scores, list) and len(scores) == len(entry["samples"])
            and all(isinstance(s, dict) and all(n in s for n in names) for s in scores))


def _scores_current(entry: dict, filter_info: dict | None, clip_source: str) -> bool:
    return (isinstance(filter_info, dict) and filter_info.get("clip") == clip_source
            and _has_scores(entry, SCORE_NAMES))


def _mask_scores_current(entry: dict, filter_info: dict | None, model: str, min_score: float) -> bool:
    from .mask_gate import MASK_SCORE_NAMES

    return (isinstance(filter_info, dict) and filter_info.get("mask_model") == model
            and filter_info.get("mask_min_score") == min_score and _has_scores(entry, MASK_SCORE_NAMES))


GATE_CRITERIA = ("min_clip_score", "top_fraction", "min_mask_iou", "min_clip_margin")
"""The criteria of the quality gate, in the order they are reported."""
_CRITERION_SCORE = {"min_clip_score": "clip_prompt", "top_fraction": "clip_prompt", "min_mask_iou": "mask_iou",
                    "min_clip_margin": "clip_class_margin"}
_SCORER_HINT = {"clip_prompt": "--clip", "clip_class_margin": "--clip", "mask_iou": "--mask_model"}


def gate_failures(manifest: dict, where: str | os.PathLike = "generation.json", **criteria) -> dict[tuple[str, int], list[str]]:
    """Per sample ``(key, index)``: the criteria of ``criteria`` (see :data:`GATE_CRITERIA`) it fails.

    ``min_clip_score``: ``clip_prompt >= S``; ``top_fraction``: among the best ``ceil(F * N)`` of all N
    samples by ``clip_prompt`` (ties: key, then index); ``min_mask_iou``: ``mask_iou >= T`` and
    ``mask_class_ok``; ``min_clip_margin``: ``clip_class_margin >= M``. A criterion given as None is
    off. Samples without the scores a criterion needs raise InstSynthError naming the scorer to run.
    """
    unknown = set(criteria) - set(GATE_CRITERIA)
    if unknown:
        raise TypeError(f"unknown gate criteria {sorted(unknown)}")
    active = {name: value for name, value in criteria.items() if value is not None}
    top = active.get("top_fraction")
    if top is not None and not 0.0 < top <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top}")
    instances = manifest["instances"]
    needed = sorted({_CRITERION_SCORE[name] for name in active})
    for key, entry in instances.items():
        missing = [n for n in needed if not _has_scores(entry, [n])]
        if missing:
            flags = " ".join(sorted({_SCORER_HINT[n] for n in missing}))
            raise InstSynthError(where, f"instance {key!r} has no quality scores {missing} for its samples; "
                                        f"run generation/filter_generation.py {flags} first")
    samples = [(key, i, s) for key, e in instances.items()
               for i, s in enumerate(e["scores"] if _has_scores(e, []) else [{}] * len(e["samples"]))]
    failed: dict[tuple[str, int], list[str]] = {(key, i): [] for key, i, _ in samples}
    tests = {"min_clip_score": lambda s, t: read_number(s.get("clip_prompt")) >= t,
             "min_mask_iou": lambda s, t: read_number(s.get("mask_iou")) >= t and bool(s.get("mask_class_ok")),
             "min_clip_margin": lambda s, t: read_number(s.get("clip_class_margin")) >= t}
    for name in GATE_CRITERIA:
        if name not in active:
            continue
        if name == "top_fraction":
            order = sorted(samples, key=lambda x: (-read_number(x[2].get("clip_prompt")), x[0], x[1]))
            best = {(k, i) for k, i, _ in order[:math.ceil(top * len(samples) - 1e-9)]}
            passed = lambda k, i, s: (k, i) in best  # noqa: E731
        else:
            passed = lambda k, i, s, n=name: tests[n](s, active[n])  # noqa: E731
        for key, i, score in samples:
            if not passed(key, i, score):
                failed[key, i].append(name)
    return failed


def passing_samples(manifest: dict, min_clip_score: float | None = None, top_fraction: float | None = None,
                    score: str = "clip_prompt", where: str | os.PathLike = "generation.json",
                    min_mask_iou: float | None = None, min_clip_margin: float | None = None) -> dict[str, list[int]]:
    """Sample indices per instance key that pass every given criterion of :func:`gate_failures`
    (all samples when none is given). ``score`` ranks ``min_clip_score`` / ``top_fraction`` (default
    ``clip_prompt``)."""
    instances = manifest["instances"]
    if score != "clip_prompt":  # rank by another score: the same rules on a renamed copy
        instances = {k: {**e, "scores": [{**s, "clip_prompt": s.get(score)} for s in e.get("scores", [])]}
                     if isinstance(e.get("scores"), list) else e for k, e in instances.items()}
    failed = gate_failures({"instances": instances}, where, min_clip_score=min_clip_score, top_fraction=top_fraction,
                           min_mask_iou=min_mask_iou, min_clip_margin=min_clip_margin)
    return {key: [i for i in range(len(e["samples"])) if not failed[key, i]] for key, e in instances.items()}


DEFAULT_MASK_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
"""min_mask_iou values tabulated by the filter report."""
DEFAULT_MARGIN_THRESHOLDS = (0.0, 0.01, 0.02, 0.05)
"""min_clip_margin values tabulated by the filter report."""


def gate_table(manifest: dict, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
               top_fractions: Sequence[float] = DEFAULT_TOP_FRACTIONS,
               mask_ious: Sequence[float] = DEFAULT_MASK_IOU_THRESHOLDS,
               margins: Sequence[float] = DEFAULT_MARGIN_THRESHOLDS) -> dict:
    """How many samples (and instances with at least one sample) each gate setting keeps.

    Only criteria whose scores every instance has are tabulated."""
    def count(**kwargs) -> dict:
        kept = passing_samples(manifest, **kwargs)
        return {"samples_kept": sum(map(len, kept.values())), "instances_kept": sum(1 for v in kept.values() if v)}

    entries = manifest["instances"].values()
    table = {}
    if all(_has_scores(e, ["clip_prompt"]) for e in entries):
        table["min_clip_score"] = [{"threshold": t, **count(min_clip_score=t)} for t in thresholds]
        table["top_fraction"] = [{"fraction": f, **count(top_fraction=f)} for f in top_fractions]
    if all(_has_scores(e, ["clip_class_margin"]) for e in entries):
        table["min_clip_margin"] = [{"threshold": t, **count(min_clip_margin=t)} for t in margins]
    if all(_has_scores(e, ["mask_iou"]) for e in entries):
        table["min_mask_iou"] = [{"threshold": t, **count(min_mask_iou=t)} for t in mask_ious]
    return table


def _distribution(values: Sequence[float]) -> dict:
    values = np.array([v for v in values if not math.isnan(v)])
    if not len(values):
        return {}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "p25", "median", "p75", "max"), map(float, q)))


def _merge_scores(raw: dict, fresh: dict[tuple[str, int], dict]) -> None:
    """Merge per-sample score dicts into the manifest's ``scores`` lists (creating them where needed)."""
    for (key, index), values in fresh.items():
        entry = raw["instances"][key]
        if not (isinstance(entry.get("scores"), list) and len(entry["scores"]) == len(entry["samples"])):
            entry["scores"] = [{} for _ in entry["samples"]]
        entry["scores"][index] = {**(entry["scores"][index] or {}), **values}


def clip_scores(refs: Sequence[SampleRef], run: dict, clip: str, prompts, device: str, batch_size: int,
                workers: int | None) -> dict[tuple[str, int], dict]:
    """The CLIP and pixel scores (:data:`SCORE_NAMES`) of ``refs``."""
    scorer = load_clip(clip, device, batch_size)
    prompt_texts, class_of = other_prompts(run, prompts), class_texts(run, prompts)
    text_scores, _ = clip_similarities(refs, scorer, lambda ref: prompt_texts(ref) + class_of(ref), desc="scoring (CLIP)")
    pixels = sample_pixel_metrics(refs, desc="scoring (pixels)", workers=workers)
    fresh = {}
    for ref, texts, pix in zip(refs, text_scores, pixels):
        n = len(prompt_texts(ref))
        fresh[ref.key, ref.index] = {
            "clip_prompt": json_number(texts[0]), "clip_margin": json_number(_margin(texts[:n])),
            "clip_class_margin": json_number(_margin(texts[n:])),
            "mask_leak": json_number(pix["mask_leak"]), "changed_fraction": json_number(pix["changed_fraction"])}
    return fresh


def mask_scores(refs: Sequence[SampleRef], run: dict, mask_model: str, mask_weights: str | None, device: str,
                batch_size: int, min_score: float) -> tuple[dict[tuple[str, int], dict], dict[str, dict]]:
    """The mask-gate scores of ``refs`` and the untouched-source scores of their instances."""
    from .mask_gate import load_mask_model, score_instances
    from .stages.metadata import load_metadata

    model = load_mask_model(mask_model, mask_weights, device)
    instances = {i["key"]: i for i in load_metadata(run["metadata"], check_files=False)["instances"]}
    by_sample, by_instance = score_instances(_by_instance(refs), instances, model, min_score, batch_size)
    return _jsonable(by_sample), _jsonable(by_instance)


def score_generation(manifest: str | os.PathLike, clip: str | None = None, prompts: str | os.PathLike | None = None,
                     device: str | None = "auto", batch_size: int = 16, force: bool = False, workers: int | None = None,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     top_fractions: Sequence[float] = DEFAULT_TOP_FRACTIONS, mask_model: str | None = None,
                     mask_weights: str | None = None, mask_min_score: float | None = None) -> dict:
    """Score every sample and write the scores into the manifest atomically.

    With ``clip``: :data:`SCORE_NAMES` (``clip_margin`` compares the prompt with the other prompts of
    the class in the run's prompt bank, ``prompts`` overriding it, null for a class with a single
    prompt; ``clip_class_margin`` the plain class prompt with those of the other classes). With
    ``mask_model`` (:func:`instsynth.mask_gate.load_mask_model`): the mask-gate scores
    (:data:`instsynth.mask_gate.MASK_SCORE_NAMES`, and per instance those of the untouched source
    under ``mask_gate_source``). Samples already scored by the same model are kept unless ``force``,
    so a rerun does no work and leaves the manifest unchanged. Writes ``filter_report.json`` next to
    the manifest and returns it.
    """
    from .generation.manifest import read_manifest
    from .mask_gate import DEFAULT_MIN_SCORE, MASK_SCORE_NAMES

    path = manifest_file(manifest)
    if not clip and not mask_model:
        raise InstSynthError(path, "nothing to score: give a CLIP model (--clip) and/or a mask model (--mask_model)")
    min_score = DEFAULT_MIN_SCORE if mask_min_score is None else float(mask_min_score)
    run, refs = load_run(path)
    raw = read_manifest(path)  # the file as written, without the absolute paths load_run adds
    info = dict(raw.get("quality_filter") or {})
    device = resolve_device(device)
    stale_clip = [r for r in refs if clip and (force or not _scores_current(raw["instances"][r.key], info, str(clip)))]
    stale_mask = [r for r in refs if mask_model and (force or not _mask_scores_current(
        raw["instances"][r.key], info, str(mask_model), min_score))]
    if stale_clip:
        _merge_scores(raw, clip_scores(stale_clip, run, str(clip), prompts, device, batch_size, workers))
        info.update(clip=str(clip), prompts=str(prompts or run["params"].get("prompts")))
    if stale_mask:
        by_sample, by_instance = mask_scores(stale_mask, run, str(mask_model), mask_weights, device,
                                             max(1, min(batch_size, 4)), min_score)
        _merge_scores(raw, by_sample)
        for key, values in by_instance.items():
            raw["instances"][key]["mask_gate_source"] = values
        info.update(mask_model=str(mask_model), mask_min_score=min_score)
    if stale_clip or stale_mask:
        names = [*(SCORE_NAMES if info.get("clip") else ()), *(MASK_SCORE_NAMES if info.get("mask_model") else ())]
        raw["quality_filter"] = {**info, "scores": names}
        write_json(path, raw, indent=1)
    scored = {(r.key, r.index) for r in stale_clip + stale_mask}
    log.info("quality filter: scored %d of %d samples (%d already scored) -> %s", len(scored), len(refs),
             len(refs) - len(scored), path)
    scores = [s for e in raw["instances"].values() for s in e.get("scores", []) if isinstance(s, dict)]
    names = [*SCORE_NAMES, "clip_class_margin", "mask_iou", "mask_score"]
    report = {"version": 1, "manifest": str(path), "clip": str(clip) if clip else info.get("clip"),
              "mask_model": str(mask_model) if mask_model else info.get("mask_model"),
              "instances": len(raw["instances"]), "samples": len(refs), "scored_now": len(scored),
              "already_scored": len(refs) - len(scored),
              "distribution": {n: _distribution([read_number(s.get(n)) for s in scores]) for n in names},
              **gate_table(raw, thresholds, top_fractions)}
    if any(isinstance(s.get("mask_class_ok"), bool) for s in scores):
        report["mask_class_ok"] = sum(1 for s in scores if s.get("mask_class_ok") is True)
        sources = [e.get("mask_gate_source", {}) for e in raw["instances"].values()]
        report["distribution"]["mask_iou_source"] = _distribution([read_number(s.get("mask_iou_source")) for s in sources])
    write_json(path.parent / FILTER_REPORT_NAME, _jsonable(report))
    report["path"] = str(path.parent / FILTER_REPORT_NAME)
    return report


_TABLE_ROWS = (("min_clip_score", "threshold", ".2f"), ("top_fraction", "fraction", ".2f"),
               ("min_clip_margin", "threshold", ".3f"), ("min_mask_iou", "threshold", ".2f"))


def format_gate_table(report: dict) -> str:
    """The filter report's threshold table as text."""
    total = report["samples"]
    models = [f"CLIP {report['clip']}" if report.get("clip") else None,
              f"mask model {report['mask_model']}" if report.get("mask_model") else None]
    lines = [f"{total} samples of {report['instances']} instances scored with {' and '.join(m for m in models if m)}",
             f"{'gate':<24} {'samples kept':>14} {'instances kept':>16}"]
    for name, field_, fmt in _TABLE_ROWS:
        for row in report.get(name, []):
            lines.append(f"{name + ' ' + format(row[field_], fmt):<24} "
                         f"{row['samples_kept']:>8} ({row['samples_kept'] / max(1, total):>4.0%}) {row['instances_kept']:>16}")
    dist = report["distribution"]
    for name in ("clip_prompt", "clip_margin", "clip_class_margin", "mask_iou", "mask_iou_source"):
        if dist.get(name, {}).get("median") is not None:
            lines.append(f"{name} median {dist[name]['median']:.4f} (min {dist[name]['min']:.4f}, "
                         f"max {dist[name]['max']:.4f})")
    if "mask_class_ok" in report:
        lines.append(f"mask model's best match has the instance's class: {report['mask_class_ok']} of {total} samples")
    return "\n".join(lines)
