"""The quality gate's decision as stage 2 receives it: plain data, made on the quality side.

:mod:`instsynth.quality.sample_gate` finds which criteria each sample fails (it reads the quality scores) and
builds a :class:`GateDecision` with :meth:`GateDecision.from_failures`; the integration stage only
reads it, so it never imports quality.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from instsynth.core.io import InstSynthError

FALLBACKS = ("drop", "original")
"""What happens to a sample failing the quality gate: left out, or replaced by the original instance."""


@dataclass
class GateDecision:
    """Which samples the quality gate accepts, which fall back to the original instance, and the counts.

    ``criteria``: each criterion's threshold (None: off); ``stats``: the counts of integration_report.json."""

    accepted: dict[str, list[int]]
    fallback: dict[str, list[int]]
    stats: dict
    failures: list[dict]
    criteria: dict = field(default_factory=dict)
    mode: str = "drop"

    @classmethod
    def from_failures(cls, instances: dict[str, dict], failed: dict[tuple[str, int], list[str]], criteria: dict,
                      mode: str = "drop", where: Path = Path(".")) -> "GateDecision":
        """The decision from the criteria each sample ``(key, index)`` fails (every sample of ``instances`` listed)."""
        if mode not in FALLBACKS:
            raise InstSynthError(where, f"fallback must be one of {FALLBACKS}, got {mode!r}")
        indices = {key: range(len(e["samples"])) for key, e in instances.items()}
        accepted = {key: [i for i in ids if not failed.get((key, i))] for key, ids in indices.items()}
        rejected = {key: [i for i in ids if failed.get((key, i))] for key, ids in indices.items()}
        total, n_failed = len(failed), sum(1 for f in failed.values() if f)
        fails = {name: sum(1 for f in failed.values() if name in f) for name in criteria}
        by_score_only = sum(1 for f in failed.values() if "top_fraction" in f and "min_clip_score" not in f)
        stats = {"samples_in_manifest": total, "dropped_below_min_clip_score": fails.get("min_clip_score", 0),
                 "dropped_outside_top_fraction": by_score_only,
                 "samples_selected": total - n_failed if mode == "drop" else total}
        stats["gate"] = {"criteria": {k: v for k, v in criteria.items() if v is not None}, "fallback": mode,
                         "samples": total, "accepted": total - n_failed,
                         "fallen_back": n_failed if mode == "original" else 0,
                         "dropped": n_failed if mode == "drop" else 0,
                         "accept_rate": round((total - n_failed) / total, 6) if total else None,
                         "failed_by": {k: fails[k] for k, v in criteria.items() if v is not None}}
        failures = [{"key": key, "sample_index": i, "failed": f, "action": "dropped" if mode == "drop" else "original"}
                    for (key, i), f in failed.items() if f]
        fallback = rejected if mode == "original" else {}
        return cls({k: v for k, v in accepted.items() if v}, {k: v for k, v in fallback.items() if v}, stats,
                   failures, dict(criteria), mode)

    @classmethod
    def accept_all(cls, instances: dict[str, dict]) -> "GateDecision":
        """No gate: every sample of the manifest is integrated."""
        return cls.from_failures(instances, {(k, i): [] for k, e in instances.items()
                                             for i in range(len(e["samples"]))}, {})


def format_gate_counts(gate: dict) -> str:
    """One line of the gate's counts: ``accepted 8, fallen back 2, dropped 0 of 10 samples (accept rate 80.0%)``."""
    rate = "-" if gate["accept_rate"] is None else f"{100 * gate['accept_rate']:.1f}%"
    return (f"accepted {gate['accepted']}, fallen back {gate['fallen_back']}, dropped {gate['dropped']} of "
            f"{gate['samples']} samples (accept rate {rate})")
