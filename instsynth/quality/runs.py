"""A generation run read back (generation.json + metadata.json) and evaluated: pixel metrics, CLIP scores, FID (``evaluation.json``)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from instsynth.core.parallel import ordered_map
from instsynth.core.io import InstSynthError, default_workers, progress, read_png, write_json
from instsynth.quality.clip import ClipScorer, load_clip, resolve_device
from instsynth.quality.fid import FeatureExtractor, fid_from_features, load_feature_extractor
from instsynth.quality.pixel import json_number, pixel_metrics, psnr_from_mse, read_number


EVALUATION_NAME = "evaluation.json"


# --------------------------------------------------------------------------- reading a generation run
@dataclass(frozen=True)
class SampleRef:
    """One generated sample and the source crop it was made from."""

    key: str
    index: int
    path: Path
    rel: str
    crop_path: Path
    mask_path: Path
    class_name: str
    prompt: str
    text: str


def manifest_file(path: str | os.PathLike) -> Path:
    """Absolute path of a ``generation.json`` given it or its folder."""
    from instsynth.core.manifests import MANIFEST_NAME

    path = Path(path).resolve()
    return path / MANIFEST_NAME if path.is_dir() else path


def load_run(manifest_path: str | os.PathLike) -> tuple[dict, list[SampleRef]]:
    """The manifest (validated, with ``sample_paths``) and every sample with its source crop, in manifest order.

    The crops come from the stage-1 ``metadata.json`` the manifest names; an instance missing there
    raises InstSynthError naming the manifest.
    """
    from instsynth.core.manifests import load_manifest
    from instsynth.stages.metadata import load_metadata

    manifest = load_manifest(manifest_path)
    path = manifest_file(manifest_path)
    if not isinstance(manifest.get("metadata"), str):
        raise InstSynthError(path, "field 'metadata' (path of the stage-1 metadata.json) missing")
    crops = {inst["key"]: inst for inst in load_metadata(manifest["metadata"], check_files=False)["instances"]}
    refs = []
    for key, entry in manifest["instances"].items():
        if key not in crops:
            raise InstSynthError(path, f"instance {key!r} is not in {manifest['metadata']}")
        inst = crops[key]
        for index, (rel, sample_path) in enumerate(zip(entry["samples"], entry["sample_paths"])):
            refs.append(SampleRef(key, index, sample_path, rel, inst["crop_rgb_path"], inst["crop_mask_path"],
                                  entry["class"], entry["prompt"], entry["text"]))
    return manifest, refs


def read_crop(ref: SampleRef) -> tuple[np.ndarray, np.ndarray]:
    """(source crop RGB, mask bool) of a sample's instance."""
    rgb = read_png(ref.crop_path, rgb=True, dtype=np.uint8)
    mask = read_png(ref.mask_path, dtype=np.uint8, shape=rgb.shape[:2])
    if mask.ndim != 2:
        raise InstSynthError(ref.mask_path, "crop mask must be single-channel")
    return rgb, mask > 127


def read_sample(ref: SampleRef, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A sample's RGB pixels (it must have the crop's size when ``shape`` is given)."""
    return read_png(ref.path, rgb=True, dtype=np.uint8, shape=shape)


def _by_instance(refs: Sequence[SampleRef]) -> dict[str, list[SampleRef]]:
    groups: dict[str, list[SampleRef]] = {}
    for ref in refs:
        groups.setdefault(ref.key, []).append(ref)
    return groups


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


MIN_INSTANCES_PER_WORKER = 8
"""Small runs stay in one process: starting workers costs more than it saves below this."""


def _instance_pixel_metrics(group: Sequence[SampleRef]) -> list[dict] | tuple[str, str]:
    """Metrics of one instance's samples, or (path, problem) on bad input (the error does not pickle)."""
    try:
        crop, mask = read_crop(group[0])
        return [pixel_metrics(crop, read_sample(ref, crop.shape[:2]), mask) for ref in group]
    except InstSynthError as exc:
        return str(exc.path), exc.problem


def sample_pixel_metrics(refs: Sequence[SampleRef], desc: str = "pixel metrics", workers: int | None = None) -> list[dict]:
    """:func:`pixel_metrics` of every sample, in ``refs`` order; one task per instance (its crop read once).

    ``workers`` processes (default: every core); results do not depend on their number.
    """
    groups = list(_by_instance(refs).values())
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, len(groups) // MIN_INSTANCES_PER_WORKER)
    outputs = ordered_map(_instance_pixel_metrics, groups, workers)
    results: dict[tuple[str, int], dict] = {}
    for group, output in zip(groups, progress(outputs, desc, len(groups))):
        if isinstance(output, tuple):
            raise InstSynthError(*output)
        results.update({(ref.key, ref.index): metrics for ref, metrics in zip(group, output)})
    return [results[(r.key, r.index)] for r in refs]


def clip_similarities(refs: Sequence[SampleRef], clip: ClipScorer, texts_of: Callable[[SampleRef], list[str]],
                      desc: str = "CLIP") -> tuple[list[np.ndarray], list[float]]:
    """Per sample: cosines against each of ``texts_of(ref)`` and the image-image cosine to its source crop."""
    groups = _by_instance(refs)
    text_cache: dict[str, np.ndarray] = {}
    by_sample: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    for key, group in progress(groups.items(), desc, len(groups)):
        crop, _ = read_crop(group[0])
        embeddings = clip.images([crop] + [read_sample(ref, crop.shape[:2]) for ref in group])
        for ref, image in zip(group, embeddings[1:]):
            texts = texts_of(ref)
            for text in texts:
                if text not in text_cache:
                    text_cache[text] = clip.texts([text])[0]
            text_scores = np.array([float(image @ text_cache[t]) for t in texts])
            by_sample[(key, ref.index)] = (text_scores, float(image @ embeddings[0]))
    return [by_sample[(r.key, r.index)][0] for r in refs], [by_sample[(r.key, r.index)][1] for r in refs]


def generation_fid(refs: Sequence[SampleRef], features: FeatureExtractor, batch_size: int = 16) -> float | None:
    """FID between the generated samples and their (distinct) source crops; None with < 2 of either."""
    sources = list(_by_instance(refs).values())
    if len(sources) < 2 or len(refs) < 2:
        return None
    real = [features([read_crop(g[0])[0] for g in chunk]) for chunk in _chunks(sources, batch_size)]
    fake = [features([read_sample(ref) for ref in chunk]) for chunk in progress(
        list(_chunks(refs, batch_size)), "FID features", math.ceil(len(refs) / max(1, batch_size)))]
    return fid_from_features(np.concatenate(real), np.concatenate(fake))


# --------------------------------------------------------------------------- evaluation
def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], fid: float | None) -> dict:
    """Run-level numbers: means of per-sample metrics, PSNR of the mean MSE (finite unless all perfect)."""
    def mse(name):
        return _mean(r[name] for r in records)

    outside = [r for r in records if r["mse_out"] is not None]
    return {
        "instances": len({r["key"] for r in records}), "samples": len(records), "fid": fid,
        "ssim_in": _mean(r["ssim_in"] for r in records), "ssim_out": _mean(r["ssim_out"] for r in records),
        "ssim_out_min": min((r["ssim_out"] for r in outside), default=None),
        "psnr_in": psnr_from_mse(mse("mse_in")), "psnr_out": psnr_from_mse(mse("mse_out")),
        "outside_identical": sum(1 for r in outside if r["mse_out"] == 0), "outside_pixels_present": len(outside),
        "mask_leak_max": max((r["mask_leak"] for r in records), default=None),
        "changed_fraction": _mean(r["changed_fraction"] for r in records),
        "clip_prompt": _mean(r.get("clip_prompt") for r in records),
        "clip_source": _mean(r.get("clip_source") for r in records)}


SUMMARY_ROWS = (
    ("fid", "FID generated vs source crops (lower = closer)"),
    ("ssim_in", "SSIM inside the mask (mean; lower = more changed)"),
    ("psnr_in", "PSNR inside the mask, dB (of the mean MSE)"),
    ("ssim_out", "SSIM outside the mask (1 = untouched)"),
    ("psnr_out", "PSNR outside the mask, dB (inf = untouched)"),
    ("outside_identical", "samples identical to the source outside the mask"),
    ("mask_leak_max", "largest share of the change outside the mask"),
    ("changed_fraction", "share of mask pixels changed (mean)"),
    ("clip_prompt", "CLIP sample vs its prompt, cosine (mean)"),
    ("clip_source", "CLIP sample vs source crop, cosine (mean)"),
)


def format_table(result: dict) -> str:
    """The summary of :func:`evaluate_generation` as a fixed-width text table (with the notes)."""
    summary = result["summary"]
    lines = [f"{result.get('mode_name', '')}: {summary['samples']} samples of {summary['instances']} instances",
             f"{'metric':<18} {'value':>12}  meaning", "-" * 78]
    for name, meaning in SUMMARY_ROWS:
        value = summary.get(name)
        if name == "outside_identical":
            text = f"{value}/{summary['outside_pixels_present']}"
        elif value is None:
            text = "skipped" if name in ("fid", "clip_prompt", "clip_source") else "-"
        else:
            text = f"{read_number(value):.4f}" if not isinstance(value, str) else value
        lines.append(f"{name:<18} {text:>12}  {meaning}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def evaluate_generation(manifest: str | os.PathLike, inception: str | None = None, clip: str | None = None,
                        out: str | os.PathLike | None = None, device: str | None = "auto",
                        batch_size: int = 16, workers: int | None = None) -> dict:
    """Measure a generation run; writes ``out`` (default ``<manifest folder>/evaluation.json``) and returns it.

    Pixel metrics are always computed. FID needs ``inception`` and CLIP scores need ``clip`` (local
    path or hub id); without them those metrics are skipped and a note says so. Pixel metrics run
    in ``workers`` processes (default: every core).
    """
    device = resolve_device(device)
    run, refs = load_run(manifest)
    manifest_path = manifest_file(manifest)
    if not refs:
        raise InstSynthError(manifest_path, "the manifest lists no samples")
    records = [{"key": r.key, "sample": r.index, "path": r.rel, **m}
               for r, m in zip(refs, sample_pixel_metrics(refs, workers=workers))]
    notes, fid = [], None
    if clip:
        scorer = load_clip(clip, device, batch_size)
        text_scores, source_scores = clip_similarities(refs, scorer, lambda ref: [ref.text])
        for record, texts, source in zip(records, text_scores, source_scores):
            record.update(clip_prompt=float(texts[0]), clip_source=source)
    else:
        notes.append("CLIP scores skipped: no --clip model given (e.g. --clip openai/clip-vit-base-patch32 or a local copy)")
    if inception:
        fid = generation_fid(refs, load_feature_extractor(inception, device), batch_size)
        if fid is None:
            notes.append("FID skipped: needs at least 2 instances and 2 samples")
    else:
        notes.append("FID skipped: no --inception weights given (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    result = {"version": 1, "manifest": str(manifest_path), "backend": run["backend"], "mode_name": run["mode_name"],
              "models": {"inception": str(inception) if inception else None, "clip": str(clip) if clip else None},
              "notes": notes, "summary": summarize(records, fid), "samples": records}
    out = Path(out) if out is not None else manifest_path.parent / EVALUATION_NAME
    write_json(out, _jsonable(result))
    result["path"] = str(out)
    return result


def _jsonable(obj: Any) -> Any:
    """``obj`` with every float made strict-JSON safe (:func:`json_number`)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return json_number(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
