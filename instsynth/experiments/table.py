"""The results table: means over seeds, gains over the baseline with Welch or bootstrap intervals (scipy.stats), and a plain statement when a cell holds no information."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from instsynth.core.io import read_json
from instsynth.reports.summary import coco_stats, run_metrics
from instsynth.experiments.arms import ArmData
from instsynth.experiments.config import Experiment
from instsynth.experiments.runs import RunSpec, run_state


# --------------------------------------------------------------------------- statistics and table
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def gain_interval(arm: list[float], base: list[float], method: str = "t", confidence: float = 0.95,
                  samples: int = 10000, seed: int = 0) -> tuple[float, float | None, float | None]:
    """Gain mean(arm) - mean(base) and its ``confidence`` interval: Welch's t-interval (unequal variances,
    ``scipy.stats.ttest_ind``) or a percentile bootstrap over seeds (``scipy.stats.bootstrap``);
    (gain, None, None) when a side has fewer than two runs or neither side varies (no interval exists)."""
    from scipy import stats

    a, b = np.asarray(arm, float), np.asarray(base, float)
    gain = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return gain, None, None
    if method == "bootstrap":
        ci = stats.bootstrap((a, b), _mean_difference, n_resamples=samples, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    else:
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return gain, float(ci.low), float(ci.high)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def _values(runs: list[dict], family: str, key: str) -> list[float] | None:
    values = [(r.get(family) or {}).get(key) for r in runs]
    return None if not values or any(v is None for v in values) else [float(v) for v in values]


def used_images(coco: dict) -> int:
    """Images training uses: those with at least one non-crowd instance (the loader drops the others)."""
    return len({a["image_id"] for a in coco["annotations"] if not a.get("iscrowd")} & {im["id"] for im in coco["images"]})


def no_information(values: list[float]) -> str | None:
    """Why a metric's values over seeds carry no information (every value 0, or all equal), or None."""
    if all(v == 0 for v in values):
        return f"every value is 0 ({len(values)} seed{'s' if len(values) != 1 else ''})"
    if len(values) > 1 and len(set(values)) == 1:
        return f"no variance over {len(values)} seeds (every value {values[0]:.2f})"
    return None


def stage_counts(folder: Path) -> dict[str, dict]:
    """The numeric counts of every ``*_report.json`` of an arm's data folder (integration, copy-paste, ...)."""
    return {p.stem: {k: v for k, v in read_json(p).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for p in sorted(folder.glob("*_report.json"))}


def collect_results(exp: Experiment, specs: list[RunSpec], data: dict[str, ArmData]) -> dict:
    """Per arm and metric: values over seeds, mean, std, gain over the baseline and its interval."""
    base_arm = exp.baseline
    train_coco = read_json(exp.split_files(exp.train_split, data)[0])
    train_stats, base_used = coco_stats(train_coco), used_images(train_coco)
    classes = sorted(train_stats["per_class"], key=lambda c: (train_stats["per_class"][c], c))
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        if run_state(spec).get("done"):
            runs.setdefault(spec.arm, []).append(next(iter(run_metrics(spec.output_dir).values())))
    families = [f for f in ("segm", "cityscapes") if runs.get(base_arm) and all(f in r for r in runs[base_arm])]
    keys = ["AP", "AP50", *(f"AP-{c}" for c in sorted(train_stats["per_class"]))]
    arms = {}
    for arm in exp.arms:
        if arm.name not in runs:
            continue
        d = data[arm.name]
        per_class = {c: train_stats["per_class"][c] + d.stats.get("per_class", {}).get(c, 0) for c in classes}
        entry = {"kind": arm.kind, "seeds": len(runs[arm.name]), "reports": stage_counts(exp.output_dir / "data" / arm.name),
                 "train_images": base_used + (used_images(read_json(d.json_file)) if d.json_file else 0),
                 "listed_images": train_stats["images"] + d.stats.get("images", 0),
                 "extra_images": d.stats.get("images", 0), "train_instances_per_class": per_class, "metrics": {}}
        for family in families:
            for key in keys:
                values = _values(runs[arm.name], family, key)
                if values is None:
                    continue
                m, s = mean_std(values)
                cell = {"values": values, "mean": m, "std": s, "no_information": no_information(values)}
                base_values = _values(runs.get(base_arm, []), family, key)
                if arm.name != base_arm and base_values is not None:
                    cell["gain"], cell["low"], cell["high"] = gain_interval(
                        values, base_values, exp.interval, exp.confidence, exp.bootstrap_samples)
                    if cell["no_information"] or no_information(base_values):
                        cell["low"] = cell["high"] = None  # an interval from values without information
                entry["metrics"].setdefault(family, {})[key] = cell
        arms[arm.name] = entry
    return {"experiment": str(exp.path), "output_dir": str(exp.output_dir), "baseline": base_arm, "seeds": exp.seeds,
            "interval": exp.interval, "confidence": exp.confidence, "families": families,
            "rare_classes": [c for c in classes if train_stats["per_class"][c]][:exp.rare_classes],
            "baseline_train_instances": train_stats["per_class"],
            "arms": arms}


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _cell(c: dict | None) -> str:
    if c is None:
        return "n/a"
    return f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if c["std"] is not None else "")


def _gain(c: dict | None, interval: bool = True) -> str:
    if c is None or "gain" not in c:
        return "-"
    text = f"{c['gain']:+.2f}"
    if interval and c["low"] is not None:
        text += f" [{c['low']:+.2f}, {c['high']:+.2f}]"
    elif interval:
        text += " (no interval)"
    return text


def _no_information_lines(arms: dict, family: str) -> list[str]:
    """One line per arm whose AP values carry no information, and what that means for the table."""
    empty = [(n, c["no_information"]) for n, a in arms.items()
             if (c := a["metrics"].get(family, {}).get("AP")) is not None and c.get("no_information")]
    if not empty:
        return []
    lines = ["", f"**No information in this table's AP:** " + "; ".join(f"{n}: {why}" for n, why in empty) + "."]
    if len(empty) == len(arms):
        lines.append("Every arm is degenerate: nothing can be concluded from this table (the models did not learn, "
                     "or the runs do not differ); no interval is printed.")
    else:
        lines.append("No interval is printed for a gain that involves these arms.")
    return lines


FAMILY_NAMES = {"segm": "COCO mask AP", "cityscapes": "Cityscapes AP"}


def format_results(results: dict) -> str:
    """Markdown tables: AP / AP50 per arm with gains and intervals, per-class AP, training instances per class."""
    arms, base, rare = results["arms"], results["baseline"], set(results["rare_classes"])
    ci = f"{results['confidence']:.0%} {'Welch t' if results['interval'] == 't' else 'bootstrap'} interval"
    lines = [f"# Experiment {Path(results['experiment']).stem}", "",
             f"Seeds {results['seeds']}; mean ± std over seeds; gain = arm - {base} with its {ci}.",
             f"Rare classes (fewest {base} train instances, at least one) are marked *: {', '.join(results['rare_classes'])}.",
             "Train images: the images training used (images without instances are left out by the loader)."]
    names = [n for n in arms]
    classes = sorted(results["baseline_train_instances"], key=lambda c: (results["baseline_train_instances"][c], c))
    for family in results["families"]:
        rows = []
        for n in names:
            m = arms[n]["metrics"].get(family, {})
            rows.append([n, arms[n]["kind"], str(arms[n]["seeds"]), str(arms[n]["train_images"]),
                         _cell(m.get("AP")), _cell(m.get("AP50")), _gain(m.get("AP")), _gain(m.get("AP50"))])
        lines += ["", f"## {FAMILY_NAMES[family]}", ""]
        lines += _md_table(["arm", "kind", "seeds", "train images", "AP", "AP50", "gain AP", "gain AP50"], rows)
        lines += _no_information_lines(arms, family)
        rows = []
        for c in classes:
            row = [c + (" *" if c in rare else ""), str(results["baseline_train_instances"][c])]
            for n in names:
                cell = arms[n]["metrics"].get(family, {}).get(f"AP-{c}")
                row.append(_cell(cell) + ("" if n == base or cell is None else f" ({_gain(cell, False)})"))
            rows.append(row)
        lines += ["", f"### {FAMILY_NAMES[family]} per class (gain over {base})", ""]
        lines += _md_table(["class", "train inst.", *names], rows)
    rows = [[c + (" *" if c in rare else ""), *(str(arms[n]["train_instances_per_class"][c]) for n in names)]
            for c in classes]
    lines += ["", "## Training instances per class", ""] + _md_table(["class", *names], rows)
    return "\n".join(lines) + "\n"
