"""``recolor``: a weightless baseline that repaints an instance's dominant colour from the prompt.

Works in CIE Lab on the instance's *body*: the pixels close to its dominant colour (the mode of a
coarse Lab histogram), so windows, tyres, lights and other parts in clearly different colours keep
theirs. The body gets the prompt's colour word (red, white, black, green, blue, yellow,
grey/silver, ...) while keeping its shading and texture: the lightness offsets from the dominant
lightness and part of the chroma variation are carried over. Prompts without a colour ("a woman")
recolour the clothing-like region instead (the body below the head) with a seeded colour. Each sample
jitters lightness, hue and chroma from its own seed, so samples differ. No torch, no weights: useful
on CPU and as a reference for the diffusion backends.
"""
from __future__ import annotations

import re
from typing import Sequence

import cv2
import numpy as np

from .common import Backend, SampleJob

COLORS_LAB: dict[str, tuple[float, float, float]] = {
    "red": (42.0, 62.0, 45.0), "white": (90.0, 0.0, 2.0), "black": (16.0, 0.0, -1.0),
    "green": (46.0, -42.0, 30.0), "blue": (36.0, 14.0, -55.0), "yellow": (84.0, -2.0, 78.0),
    "grey": (58.0, 0.0, -1.0), "gray": (58.0, 0.0, -1.0), "silver": (74.0, 0.0, -3.0),
    "orange": (64.0, 42.0, 68.0), "brown": (36.0, 18.0, 30.0), "purple": (34.0, 44.0, -42.0),
    "pink": (74.0, 34.0, 4.0),
}
"""Target colour (L, a, b) of each colour word (OpenCV float Lab: L in 0..100)."""

CLOTHING_PALETTE = ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "brown", "purple", "pink")
"""Colours drawn (seeded) for prompts without a colour word."""

HEAD_FRACTION = 0.18
"""Top part of a colourless instance's height treated as head (kept) for persons and riders."""

BODY_RADIUS = 7.0
"""Lab distance (lightness counted / 3, chroma relative to lightness) up to which a pixel fully
belongs to the body; pixels at twice this distance or more do not belong at all."""

NEAR_BLACK = 12.0
"""Lightness below which parts darker than the body (tyres, deep shadow) keep their colour."""


def color_word(prompt: str) -> str | None:
    """The first colour word of a prompt, or None (``"a red car"`` -> ``"red"``)."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in COLORS_LAB:
            return word
    return None


def to_lab(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def from_lab(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def dominant_color(lab: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Mean Lab of the most populated coarse Lab histogram bin inside ``region`` (the body colour)."""
    pixels = lab[region]
    bins = np.floor(pixels / np.array([10.0, 12.0, 12.0])).astype(np.int64)
    codes = (bins[:, 0] + 2) * 10_000 + (bins[:, 1] + 20) * 100 + (bins[:, 2] + 20)
    values, counts = np.unique(codes, return_counts=True)
    return pixels[codes == values[np.argmax(counts)]].mean(axis=0)


def blur_inside(image: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur that averages only pixels inside ``region`` (no bleeding across the mask edge)."""
    inside = region.astype(np.float32)
    weights = np.maximum(cv2.GaussianBlur(inside, (0, 0), sigma), 1e-6)
    if image.ndim == 3:
        return cv2.GaussianBlur(image * inside[..., None], (0, 0), sigma) / weights[..., None]
    return cv2.GaussianBlur(image * inside, (0, 0), sigma) / weights


def body_weight(lab: np.ndarray, region: np.ndarray, dominant: np.ndarray) -> np.ndarray:
    """Soft weight in [0, 1]: 1 on the body (near the dominant colour), 0 on other parts and outside.

    Pixels are compared after a light blur (sensor noise would otherwise decide); near-black parts
    darker than the body (tyres, the shadow under a car) are kept even when the body itself is dark.
    """
    smooth = blur_inside(lab, region, 1.5)
    # shading scales chroma with lightness: compare with the body colour at the pixel's lightness
    ratio = np.clip(smooth[..., :1] / max(float(dominant[0]), 1.0), 0.4, 2.0)
    d_chroma = smooth[..., 1:] - dominant[1:] * ratio
    d_light = (smooth[..., 0] - dominant[0]) / 3.0
    dist = np.sqrt(d_light ** 2 + (d_chroma ** 2).sum(axis=-1))
    weight = np.clip(2.0 - dist / BODY_RADIUS, 0.0, 1.0)
    floor = min(float(dominant[0]) - 5.0, NEAR_BLACK)
    coarse_lightness = blur_inside(lab[..., 0], region, 3.0)  # large dark parts only, not noise
    weight *= np.clip((coarse_lightness - floor) / 3.0 + 0.5, 0.0, 1.0)
    return blur_inside(weight.astype(np.float32), region, 0.7) * region


def clothing_region(mask: np.ndarray) -> np.ndarray:
    """The mask without its top ``HEAD_FRACTION`` of rows (the head of a person or rider)."""
    ys = np.nonzero(mask.any(axis=1))[0]
    top = ys[0] + int(round((ys[-1] + 1 - ys[0]) * HEAD_FRACTION))
    region = mask.copy()
    region[:top] = False
    return region if region.any() else mask


def jittered_target(word: str, rng: np.random.Generator) -> np.ndarray:
    """The colour word's Lab target with a small seeded change of lightness, hue and chroma."""
    lightness, a, b = COLORS_LAB[word]
    angle = np.deg2rad(rng.normal(0.0, 6.0))
    scale = rng.uniform(0.85, 1.15)
    a, b = scale * (a * np.cos(angle) - b * np.sin(angle)), scale * (a * np.sin(angle) + b * np.cos(angle))
    return np.array([np.clip(lightness + rng.normal(0.0, 4.0), 5.0, 95.0), a, b], np.float32)


def recolor(rgb: np.ndarray, mask: np.ndarray, prompt: str, seed: int, head_kept: bool = False) -> np.ndarray:
    """Recolour the instance in ``mask`` to the prompt's colour (or a seeded one), keeping shading."""
    rng = np.random.default_rng(seed)
    word = color_word(prompt)
    if word is None:
        word = CLOTHING_PALETTE[int(rng.integers(len(CLOTHING_PALETTE)))]
        region = clothing_region(mask) if head_kept else mask
    else:
        region = mask
    lab = to_lab(rgb)
    dominant = dominant_color(lab, region)
    weight = body_weight(lab, region, dominant)[..., None]
    target = jittered_target(word, rng)

    lightness = target[0] + 0.9 * (lab[..., 0] - dominant[0])
    fade = np.clip(1.0 - np.abs(lightness - target[0]) / 60.0, 0.3, 1.0)  # less chroma in deep shade/highlight
    chroma = target[1:] * fade[..., None] + 0.4 * (lab[..., 1:] - dominant[1:])
    new = np.concatenate([np.clip(lightness, 0.0, 100.0)[..., None], chroma], axis=-1)
    return from_lab(lab + weight * (new - lab))


class RecolorBackend(Backend):
    """Weightless baseline: Lab recolouring of the instance body from the prompt's colour word."""

    name = "recolor"
    output_params = ("seed",)

    def generate(self, jobs: Sequence[SampleJob]) -> list[np.ndarray]:
        return [recolor(job.crop_rgb, job.crop_mask, job.prompt, job.seed,
                        head_kept=job.class_name in ("person", "rider")) for job in jobs]
