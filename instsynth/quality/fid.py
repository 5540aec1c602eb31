"""FID: Inception-v3 pool features (pytorch-fid's FID blocks for its weights) or a network from ``config.json``, and the Frechet distance."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instsynth.core.io import InstSynthError, get_logger, read_json

log = get_logger("instsynth.quality")


INCEPTION_DOWNLOAD_HINT = (
    "download pytorch-fid's FID Inception weights "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth "
    "(or torchvision's https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth) "
    "to e.g. weights/pt_inception-2015-12-05-6726825d.pth and pass that file (--inception PATH)")


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
