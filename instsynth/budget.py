"""Per-class budgets: rare classes get more instances per image (stage 1) and more samples (generation).

A budget is a whole number per thing class: instances selected per image (``k``) in stage 1, samples
per instance in generation. It is given explicitly (``"truck=6,bus=6"``; other classes keep the base
value) or derived from the class frequencies of the split with ``balance="inverse_freq"``: class c
with ``n_c`` instances gets the factor ``min(max_factor, (n_max / n_c) ** power)`` (``n_max``: the most
frequent class; ``power`` 0.5 by default, the square-root damping of LVIS's repeat-factor sampling,
1.0 for plain inverse frequency) and the budget ``round(base * factor)``, never below the base.
On Cityscapes train this gives car x1, person x1.2, bicycle x2.7, rider x3.9, motorcycle x6,
truck x7.5, bus x8.4 -> 8, train x12.6 -> 8 (max_factor 8).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from .labels import THING_CLASSES

BALANCES = ("none", "inverse_freq")
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
                             "(n_max / n_c) ** power)) from the split's instances per class, so rare classes get more "
                             "(default none)")
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


def class_budget(base: int, explicit: str | Mapping[str, int] | None = None, balance: str = "none",
                 counts: Mapping[str, int] | None = None, power: float = DEFAULT_POWER,
                 max_factor: float = DEFAULT_MAX_FACTOR, what: str = "budget",
                 classes: Sequence[str] | None = None) -> dict | None:
    """The resolved budget ``{"base", "balance", "per_class", ...}``, or None for none (every class ``base``).

    ``explicit`` values win over balanced ones; ``balance="inverse_freq"`` needs ``counts``; ``classes``:
    the dataset's class names (default the Cityscapes thing classes).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
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
    per_class.update(explicit)
    budget["per_class"] = per_class
    return budget


def budget_of(budget: dict | None, class_name: str, base: int) -> int:
    """The budget of ``class_name`` (``base`` when there is no budget or the class is not in it)."""
    return (budget or {}).get("per_class", {}).get(class_name, base)
