"""The quality gate: score every sample (CLIP, class margin, mask IoU), tabulate thresholds, and decide which samples pass."""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

from instsynth.core.io import InstSynthError, get_logger, read_json, write_json
from instsynth.core.labels import render_prompt
from instsynth.core.lock import holds_output
from instsynth.quality.clip import load_clip, resolve_device
from instsynth.quality.pixel import json_number, read_number
from instsynth.quality.runs import (SampleRef, _by_instance, _jsonable, clip_similarities, load_run, manifest_file,
                                    sample_pixel_metrics)

log = get_logger("instsynth.quality")


FILTER_REPORT_NAME = "filter_report.json"


SCORE_NAMES = ("clip_prompt", "clip_margin", "clip_class_margin", "mask_leak", "changed_fraction")
"""The per-sample scores the quality filter writes into the manifest (``entry["scores"][i]``) with a CLIP model."""


DEFAULT_THRESHOLDS = (0.20, 0.22, 0.24, 0.26, 0.28, 0.30)
"""min_clip_score values tabulated by the filter report (CLIP ViT-B/32 cosines of matching pairs are ~0.2-0.35)."""


DEFAULT_TOP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


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
    from instsynth.core.labels import prompt_bank_for

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
    from instsynth.quality.mask_gate import MASK_SCORE_NAMES

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
    from instsynth.quality.mask_gate import load_mask_model, score_instances
    from instsynth.stages.metadata import load_metadata

    model = load_mask_model(mask_model, mask_weights, device)
    meta = load_metadata(run["metadata"], check_files=False)
    by_sample, by_instance = score_instances(_by_instance(refs), meta, model, min_score, batch_size)
    return _jsonable(by_sample), _jsonable(by_instance)


@holds_output(lambda args: (manifest_file(args["manifest"]).parent, []))  # the run's folder: one writer with generation
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
    from instsynth.core.manifests import read_manifest
    from instsynth.quality.mask_gate import DEFAULT_MIN_SCORE, MASK_SCORE_NAMES

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
