"""The quality gate's decision for stage 2: which samples are integrated, fall back or are dropped.

The decision is computed here, on the quality side (it reads the quality scores through
:func:`instsynth.quality.gate.gate_failures`), and handed to :func:`instsynth.stages.integration.integrate_samples`
as plain data (:class:`~instsynth.stages.gate_decision.GateDecision`): the integration stage never imports
quality.
"""
from __future__ import annotations

import os
from pathlib import Path

from instsynth.core.io import InstSynthError
from instsynth.core.manifests import MANIFEST_NAME, load_manifest
from instsynth.quality.gate import GATE_CRITERIA, gate_failures
from instsynth.stages.gate_decision import FALLBACKS, GateDecision


def gate_samples(instances: dict[str, dict], min_clip_score: float | None = None, top_fraction: float | None = None,
                 min_mask_iou: float | None = None, min_clip_margin: float | None = None, fallback: str = "drop",
                 where: str | os.PathLike = Path(".")) -> GateDecision:
    """Apply the quality gate to a manifest's instances.

    A sample passes when it meets every given criterion (None: off; see :func:`instsynth.quality.gate.gate_failures`).
    A failing sample is left out (``fallback="drop"``) or integrated with the original instance in place
    of the generated one (``"original"``: the pair is still written, labelled ``instance_source: "original"``).
    """
    where = Path(where)
    if fallback not in FALLBACKS:
        raise InstSynthError(where, f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    criteria = dict(zip(GATE_CRITERIA, (min_clip_score, top_fraction, min_mask_iou, min_clip_margin)))
    try:
        failed = gate_failures({"instances": instances}, where, **criteria)
    except ValueError as exc:
        raise InstSynthError(where, str(exc)) from None
    return GateDecision.from_failures(instances, failed, criteria, fallback, where)


def select_samples(instances: dict[str, dict], min_clip_score: float | None = None,
                   top_fraction: float | None = None, where: str | os.PathLike = Path("."),
                   min_mask_iou: float | None = None,
                   min_clip_margin: float | None = None) -> tuple[dict[str, list[int]], dict]:
    """Sample indices that pass the gate per instance key, and the gate's counts (samples failing are dropped)."""
    decision = gate_samples(instances, min_clip_score, top_fraction, min_mask_iou, min_clip_margin, "drop", where)
    return decision.accepted, decision.stats


def gate_for(inpainting_dir: str | os.PathLike, min_clip_score: float | None = None,
             top_fraction: float | None = None, min_mask_iou: float | None = None,
             min_clip_margin: float | None = None, fallback: str = "drop") -> GateDecision:
    """The gate's decision over the samples of ``inpainting_dir/generation.json`` (or that file itself)."""
    path = Path(inpainting_dir)
    path = path / MANIFEST_NAME if path.is_dir() else path
    manifest = load_manifest(path)
    return gate_samples(manifest["instances"], min_clip_score, top_fraction, min_mask_iou, min_clip_margin, fallback,
                        path.resolve())
