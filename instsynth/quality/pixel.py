"""Pixel metrics of a generated sample against its source crop: SSIM and PSNR inside the mask, the leak outside it."""
from __future__ import annotations

import math

import numpy as np


CHANGE_TOLERANCE = 8
"""A pixel counts as changed when a channel moved by more than this many grey levels."""


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
