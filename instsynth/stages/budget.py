"""Per-class budgets: rare classes get more instances per image (stage 1) and more samples (generation).

A budget is a whole number per thing class: instances selected per image (``k``) in stage 1, samples
per instance in generation. It is given explicitly (``"truck=6,bus=6"``; other classes keep the base
value) or derived from the class frequencies of the split with ``balance="inverse_freq"``: class c
with ``n_c`` instances gets the factor ``min(max_factor, (n_max / n_c) ** power)`` (``n_max``: the most
frequent class; ``power`` 0.5 by default, the square-root damping of LVIS's repeat-factor sampling,
1.0 for plain inverse frequency) and the budget ``round(base * factor)``, never below the base.
On Cityscapes train this gives car x1, person x1.2, bicycle x2.7, rider x3.9, motorcycle x6,
truck x7.5, bus x8.4 -> 8, train x12.6 -> 8 (max_factor 8).

``balance="ap"`` derives it from a baseline model's per-class mask AP instead (``AP-<class>`` of a
training run's ``inference/metrics.json``, COCO ``segm`` AP, else Cityscapes AP): the class with the
best AP gets factor 1 and class c ``min(max_factor, (AP_best / AP_c) ** power)``, so the classes the
baseline gets wrong get more data (AP 0: ``max_factor``; a class without AP, no ground truth in the
test split, keeps the base value). With AP car 40, truck 10, train 2.5: car x1, truck x2, train x4.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from instsynth.core.io import InstSynthError, read_json
from instsynth.core.labels import THING_CLASSES

BALANCES = ("none", "inverse_freq", "ap")
AP_FAMILIES = ("segm", "cityscapes")
"""Metric families of a metrics.json searched for ``AP-<class>``, in this order."""
METRICS_NAME = Path("inference") / "metrics.json"
DEFAULT_POWER = 0.5
DEFAULT_MAX_FACTOR = 8.0


def add_budget_arguments(parser, flag: str, what: str, base_flag: str, example: str) -> None:
    """The budget flags of a stage CLI: ``flag`` (explicit CLASS=N,...), --balance, --balance_power, --max_factor.

    ``what`` names the budgeted number (e.g. "instances selected per image"), ``base_flag`` the flag of its
    base value, ``example`` an explicit budget."""
    parser.add_argument(flag, default=None,
                        help=f"per-class budget CLASS=N,... (e.g. {example}): {what} for those classes "
                             f"(other classes: {base_flag})")
    parser.add_argument("--balance", choices=BALANCES, default="none",
                        help=f"inverse_freq: {what} for class c = round({base_flag.lstrip('-')} x min(max_factor, "
                             "(n_max / n_c) ** power)) from the split's instances per class, so rare classes get more; "
                             "ap: the same with (AP_best / AP_c) from --baseline_metrics, so classes a baseline "
                             "gets wrong get more (default none)")
    parser.add_argument("--baseline_metrics", default=None,
                        help="--balance ap: a baseline training run's inference/metrics.json (or its OUTPUT_DIR)")
    parser.add_argument("--balance_power", type=float, default=DEFAULT_POWER,
                        help=f"exponent of the inverse frequency (default {DEFAULT_POWER}; 1.0 = plain inverse frequency)")
    parser.add_argument("--max_factor", type=float, default=DEFAULT_MAX_FACTOR,
                        help=f"largest balance factor (default {DEFAULT_MAX_FACTOR:g})")


def parse_class_values(text: str | Mapping[str, int] | None, what: str = "budget",
                       classes: Sequence[str] | None = None) -> dict[str, int]:
    """``"truck=6,bus=6"`` (or a mapping) -> ``{"truck": 6, "bus": 6}``; ValueError on unknown classes or bad numbers.

    ``classes``: the known class names (default the Cityscapes thing classes)."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else (part.split("=", 1) for part in text.split(",") if part.strip())
    values = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{what}: expected CLASS=N pairs separated by commas, got {text!r}")
        name, value = str(pair[0]).strip(), str(pair[1]).strip()
        if name not in (classes or THING_CLASSES):
            kind = "thing class" if set(classes or THING_CLASSES) <= set(THING_CLASSES) else "class"
            raise ValueError(f"{what}: unknown {kind} {name!r}; choose from {', '.join(classes or THING_CLASSES)}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{what}: {name}={value} must be an integer >= 1")
        values[name] = int(value)
    return values


def balance_factors(counts: Mapping[str, int], power: float = DEFAULT_POWER,
                    max_factor: float = DEFAULT_MAX_FACTOR) -> dict[str, float]:
    """Inverse-frequency factor per class of ``counts`` (instances per class); classes without instances get ``max_factor``."""
    if power <= 0 or max_factor < 1:
        raise ValueError(f"balance power must be > 0 and max_factor >= 1, got {power} and {max_factor}")
    top = max(counts.values(), default=0)
    return {name: round(min(max_factor, (top / n) ** power) if n > 0 else max_factor, 4)
            for name, n in counts.items()}


def read_class_ap(path: str | os.PathLike) -> dict[str, float | None]:
    """Per-class AP (percent) of a training run's ``inference/metrics.json`` (or the run folder holding it).

    The file maps metric families to metrics (``{"segm": {"AP": 31.2, "AP-car": 45.0, ...}, "cityscapes":
    {...}}``, as :func:`instsynth.engine.trainer.do_test` writes it); the first family of
    :data:`AP_FAMILIES` with ``AP-<class>`` keys is used. None: the class had no ground truth."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise InstSynthError(path, "baseline metrics not found (pass a train_net.py run's inference/metrics.json)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise InstSynthError(path, "expected a JSON object of metric families (segm, cityscapes)")
    for family in AP_FAMILIES:
        metrics = data.get(family)
        if not isinstance(metrics, dict):
            continue
        ap = {k[3:]: v for k, v in metrics.items() if k.startswith("AP-")}
        if not ap:
            continue
        for name, value in ap.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 100):
                raise InstSynthError(path, f"{family} AP-{name} must be a number in [0, 100] or null, got {value!r}")
        return {name: None if v is None else float(v) for name, v in ap.items()}
    raise InstSynthError(path, f"no per-class AP (AP-<class> keys under {' or '.join(AP_FAMILIES)})")


def ap_factors(class_ap: Mapping[str, float | None], power: float = DEFAULT_POWER,
               max_factor: float = DEFAULT_MAX_FACTOR) -> dict[str, float]:
    """Factor per class with an AP: ``min(max_factor, (AP_best / AP_c) ** power)`` (AP 0: ``max_factor``).

    Classes without AP (None) are left out (they keep the base value); if no class has AP above 0
    every factor is 1 (the baseline ranks nothing)."""
    if power <= 0 or max_factor < 1:
        raise ValueError(f"balance power must be > 0 and max_factor >= 1, got {power} and {max_factor}")
    known = {name: ap for name, ap in class_ap.items() if ap is not None}
    best = max(known.values(), default=0.0)
    if best <= 0:
        return {name: 1.0 for name in known}
    return {name: round(min(max_factor, (best / ap) ** power) if ap > 0 else max_factor, 4)
            for name, ap in known.items()}


def class_budget(base: int, explicit: str | Mapping[str, int] | None = None, balance: str = "none",
                 counts: Mapping[str, int] | None = None, power: float = DEFAULT_POWER,
                 max_factor: float = DEFAULT_MAX_FACTOR, what: str = "budget",
                 baseline_metrics: str | os.PathLike | None = None,
                 classes: Sequence[str] | None = None) -> dict | None:
    """The resolved budget ``{"base", "balance", "per_class", ...}``, or None for none (every class ``base``).

    ``explicit`` values win over balanced ones; ``balance="inverse_freq"`` needs ``counts``,
    ``balance="ap"`` a ``baseline_metrics`` file (:func:`read_class_ap`; its errors name the file);
    ``classes``: the dataset's class names (default the Cityscapes thing classes).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if baseline_metrics is not None and balance != "ap":
        raise ValueError(f"{what}: --baseline_metrics is used by --balance ap only (got --balance {balance})")
    explicit = parse_class_values(explicit, what, classes)
    if balance == "none" and not explicit:
        return None
    budget: dict = {"base": base, "balance": balance}
    per_class = {}
    if balance == "inverse_freq":
        if counts is None:
            raise ValueError(f"{what}: balance inverse_freq needs the instances per class of the split")
        factors = balance_factors(counts, power, max_factor)
        budget.update(power=power, max_factor=max_factor, class_counts=dict(counts), factors=factors)
        per_class = {name: max(base, math.floor(base * f + 0.5)) for name, f in factors.items()}
    elif balance == "ap":
        if baseline_metrics is None:
            raise ValueError(f"{what}: balance ap needs --baseline_metrics (a baseline run's inference/metrics.json)")
        class_ap = read_class_ap(baseline_metrics)
        factors = ap_factors(class_ap, power, max_factor)
        budget.update(power=power, max_factor=max_factor, baseline_metrics=str(Path(baseline_metrics).resolve()),
                      baseline_ap=class_ap, factors=factors)
        per_class = {name: max(base, math.floor(base * f + 0.5)) for name, f in factors.items()}
    per_class.update(explicit)
    budget["per_class"] = per_class
    return budget


def budget_of(budget: dict | None, class_name: str, base: int) -> int:
    """The budget of ``class_name`` (``base`` when there is no budget or the class is not in it)."""
    return (budget or {}).get("per_class", {}).get(class_name, base)
