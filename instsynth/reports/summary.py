"""Summaries of InstSynth runs.

``python -m instsynth.summary run --work_dir WORK --output OUT [--mode_name Recolor] [--json PATH]``
prints the counts of every stage and the COCO statistics before/after: "before" is the original
images of the output dataset, "after" all of them (original + the synthetic ``*_syn`` folders), both
read from the COCO files of stage 5. ``--write-before DIR`` also writes the "before" subset as COCO
JSON (for ``visualization/visualize.py stats``).

``python -m instsynth.summary ap OUTPUT_DIR [OUTPUT_DIR ...]`` prints the AP table of training runs
(``train_net.py`` output folders), each with its gain over the first one (the baseline).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from instsynth.formats.coco import SYNTHETIC_FOLDER, merged_json_path
from instsynth.core.io import InstSynthError, is_generated_folder, read_json, write_json
from instsynth.core.lock import holds_output
from instsynth.stages.gate_decision import format_gate_counts

COCO_NAME = "instancesonly_filtered_gtFine_{}.json"


def original_subset(coco: dict) -> dict:
    """The COCO dict restricted to images outside InstSynth's generated folders (``*_syn`` cities,
    ``instsynth_syn/`` of a merged COCO file)."""
    keep = {im["id"] for im in coco["images"] if not is_generated_folder(Path(im["file_name"]).parent.name)
            and not im["file_name"].startswith(SYNTHETIC_FOLDER + "/")}
    return {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


def coco_stats(coco: dict) -> dict:
    """Images, instances (non-crowd annotations) and instances per class name of a COCO dict."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(names[a["category_id"]] for a in coco["annotations"] if not a.get("iscrowd"))
    return {"images": len(coco["images"]), "instances": sum(per_class.values()),
            "per_class": {n: per_class.get(n, 0) for n in sorted(names.values())}}


def _report(path: Path, *keys: str) -> dict:
    if not path.is_file():
        return {"missing": str(path)}
    data = read_json(path)
    return {k: data[k] for k in keys if k in data} or data


@holds_output(lambda args: (args["write_before"], []))  # no folder (None): nothing to hold
def run_summary(work_dir: str | Path, output: str | Path, mode_name: str = "Recolor",
                splits=("train", "val"), write_before: str | Path | None = None) -> dict:
    """Collect the stage reports and COCO statistics of a run into one dict."""
    work_dir, output = Path(work_dir), Path(output)
    stages = {
        "selection": _report(work_dir / "selection" / "selection_report.json"),
        "generation": _report(work_dir / "generation" / mode_name / "generation_report.json"),
        "integration": _report(output / "integration_report.json"),
    }
    coco = {}
    for split in splits:
        path = output / "annotations" / COCO_NAME.format(split)
        if not path.is_file():
            path = merged_json_path(output, split)  # your own dataset: the merged COCO file of stage 2
        if not path.is_file():
            continue
        data = read_json(path)
        before = original_subset(data)
        coco[split] = {"file": str(path), "before": coco_stats(before), "after": coco_stats(data)}
        if write_before:
            write_json(Path(write_before) / COCO_NAME.format(split), before, indent=None)
    return {"work_dir": str(work_dir), "output": str(output), "stages": stages, "coco": coco,
            "classes": class_table(work_dir / "selection" / "metadata.json",
                                   work_dir / "generation" / mode_name / "generation.json", coco)}


def class_table(metadata: Path, manifest: Path, coco: dict | None = None) -> dict:
    """Per category: non-crowd instances in stage 1's split before and after synthesis, selected by
    stage 1 (and its k_c), samples generated (and samples per instance): the effect of the per-class
    budgets. Every category of the split's COCO file is listed (``coco``: the summary's ``coco`` entries
    by split); without that file, "before" is stage 1's ``class_counts`` and "after" is None. Empty
    when metadata.json is missing."""
    if not metadata.is_file():
        return {}
    meta = read_json(metadata)
    k_budget = (meta.get("class_budget") or {}).get("per_class", {})
    selected = Counter(i["class"] for i in meta.get("instances", []))
    gen = read_json(manifest) if manifest.is_file() else {}
    s_budget = (gen.get("params", {}).get("budget") or {}).get("per_class", {})
    base = gen.get("params", {}).get("num_samples")
    samples = Counter()
    for entry in gen.get("instances", {}).values():
        samples[entry["class"]] += len(entry["samples"])
    split = (coco or {}).get(meta.get("split", "train"))
    if split:
        before, after = split["before"]["per_class"], split["after"]["per_class"]
    else:
        before, after = meta.get("class_counts") or {}, {}
    names = list(before) + sorted(set(selected) - set(before))
    return {name: {"instances": before.get(name) if before else None, "selected": selected.get(name, 0),
                   "k": k_budget.get(name, meta.get("k")), "samples": samples.get(name, 0),
                   "samples_per_instance": s_budget.get(name, base), "after": after.get(name) if after else None}
            for name in names}


def _scalars(d: dict) -> str:
    """The counts of a stage report (numbers only; paths and settings stay in the report file)."""
    return ", ".join(f"{k}={v}" for k, v in d.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "version")


def _dash(value) -> str:
    return "-" if value is None else str(value)


def format_summary(summary: dict) -> str:
    """Human-readable table of a run summary."""
    lines = ["", "=" * 72, "InstSynth run summary", "=" * 72]
    for stage, rep in summary["stages"].items():
        lines.append(f"{stage:<12} {_scalars(rep) or '(see report)'}")
    gate = summary["stages"].get("integration", {}).get("gate")
    if gate and gate.get("criteria"):
        criteria = ", ".join(f"{k} {v}" for k, v in gate["criteria"].items())
        lines.append(f"{'quality gate':<12} {format_gate_counts(gate)}; {criteria}, fallback {gate['fallback']}")
    classes = summary.get("classes") or {}
    if classes:
        width = max([12, *(len(n) + 2 for n in classes)])
        lines += ["", "classes of stage 1's split (before / after: instances in the split; k and per inst: the budgets)",
                  f"  {'class':<{width}}{'before':>8}{'k':>4}{'selected':>10}{'per inst':>10}{'samples':>9}{'after':>8}"]
        lines += [f"  {n:<{width}}{_dash(c['instances']):>8}{_dash(c['k']):>4}{c['selected']:>10}"
                  f"{_dash(c['samples_per_instance']):>10}{c['samples']:>9}{_dash(c.get('after')):>8}"
                  for n, c in classes.items()]
    for split, s in summary["coco"].items():
        b, a = s["before"], s["after"]
        width = max([12, *(len(n) + 2 for n in a["per_class"])])
        lines += ["", f"COCO {split}: images {b['images']} -> {a['images']}, "
                      f"instances {b['instances']} -> {a['instances']}  ({s['file']})",
                  f"  {'class':<{width}}{'before':>8}{'after':>8}"]
        lines += [f"  {n:<{width}}{b['per_class'][n]:>8}{a['per_class'][n]:>8}" for n in a["per_class"]]
    lines += ["", f"output dataset: {summary['output']}", f"work folder:    {summary['work_dir']}", "=" * 72]
    return "\n".join(lines)


AP_COLUMNS = (("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("cityscapes", "AP"), ("cityscapes", "AP50"))


def run_metrics(output_dir: str | Path) -> dict[str, dict]:
    """``{test dataset: metrics}`` of a train_net.py output folder (``inference/[<name>/]metrics.json``)."""
    inference = Path(output_dir) / "inference"
    found = {p.parent.name if p.parent != inference else "": read_json(p)
             for p in sorted(inference.glob("**/metrics.json"))}
    if not found:
        raise InstSynthError(inference, "no metrics.json: evaluate the run first (train_net.py --eval-only)")
    return found


def ap_table(output_dirs: list[str | Path]) -> str:
    """COCO mask AP/AP50/AP75 and Cityscapes AP/AP50 of each run, with the gain over the first run."""
    header = ["run", "test set"] + [f"{'COCO' if k == 'segm' else 'CS'} {m}" for k, m in AP_COLUMNS]
    rows, baseline = [], {}
    for n, run in enumerate(output_dirs):
        for test, metrics in run_metrics(run).items():
            values = [(metrics.get(k) or {}).get(m) for k, m in AP_COLUMNS]
            base = baseline.setdefault(test, values) if n == 0 else baseline.get(test)
            cells = []
            for v, b in zip(values, base or values):
                cell = "-" if v is None else f"{v:.2f}"
                if n and v is not None and b is not None:
                    cell += f" ({v - b:+.2f})"
                cells.append(cell)
            rows.append([Path(run).name, test or "-", *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])
