"""Stage 2: paste generated instances back into their images and cut new image/label pairs around them.

One code path for every dataset format (:mod:`instsynth.formats`). For every kept sample of the
generation manifest (``GEN_DIR/generation.json``):

1. the sample is resized to its instance's stage-1 crop box (area filter to shrink, bicubic to
   enlarge; samples are normally crop-sized already) and pasted into the full source image through
   the instance's mask (:func:`instsynth.stages.pasting.paste`, ``blend`` hard, feather or normalized);
2. the full-size result is a new image, the *panorama* (crop index 0), with the source's instances;
3. ``crops_per_sample`` random context crops (crop index 1, 2, ...) as in the paper
   (:func:`instsynth.stages.pasting.choose_context_crop`), resized back to the image size.

Each new image goes through the dataset's writer (:class:`instsynth.formats.DatasetWriter`), named as
the format names new images: Cityscapes ``OUT/{leftImg8bit,gtFine}/<split>/<city>_syn/`` with its
instanceIds; COCO / LVIS ``OUT/images/instsynth_syn/...`` and the merged
``OUT/annotations/instances_<split>_instsynth.json`` (originals hard-linked into ``OUT/images``); a folder
dataset ``OUT/images/instsynth_syn/...`` with its instance PNG under ``OUT/instances/`` and
``OUT/categories.json``. Stage 2 writes ``OUT/integration.json`` (each new image: source, instance, sample,
box, kind, blend, fingerprint) and ``OUT/integration_report.json``; the writer's ``finish`` writes the
file covering all new images (Cityscapes: ``cropped_region_coordinates.json``, the input of stage 4).

The quality gate's decision (:class:`GateDecision`, computed by :mod:`instsynth.quality.sample_gate`) says which
samples are integrated, and which fall back to the original instance (``--fallback original``: the
pair is still written, labelled ``instance_source: "original"``). Reruns skip samples whose recorded
fingerprint (parameters, sample bytes, source labels) is unchanged, rewrite no file whose bytes are
already right and remove the images an earlier run wrote that this one no longer produces.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instsynth.core.imageops import crop_resize_rgb, resize_image
from instsynth.core.io import (InstSynthError, default_workers, get_logger, progress, read_json, read_png,
                               write_if_changed)
from instsynth.core.lock import stage_output
from instsynth.core.manifests import load_manifest
from instsynth.core.parallel import ordered_map
from instsynth.formats import Annotations, Dataset, DatasetWriter, NewImage, SourceImage
from instsynth.formats.cityscapes import COORDINATES_NAME, MAX_SAMPLE_INDEX
from instsynth.stages.gate_decision import GateDecision, format_gate_counts
from instsynth.stages.integration_records import (INTEGRATION_NAME, INTEGRATION_VERSION, REPORT_NAME, Layout,
                                                  entry_record, filters_of, fingerprint, header_of, layout_of, ordered,
                                                  previous_entries, remove_stale, reusable, source_digest)
from instsynth.stages.metadata import image_index, load_metadata, metadata_dataset
from instsynth.stages.pasting import (ContextCrop, IntegrationParams, as_rgb_sample, choose_context_crop, crop_seed,
                                      paste)

log = get_logger("instsynth.integration")
# --------------------------------------------------------------------------- per-image work (in workers)
@dataclass
class SampleTask:
    """One sample to integrate: its instance (metadata entry), index, file and fingerprint."""

    key: str
    instance_id: int
    bbox: list[int]
    crop_box: list[int]
    area: int
    sample: int
    sample_path: Path
    sample_rel: str
    fingerprint: str
    original: bool = False  # the quality gate's fallback: integrate the original instance instead
    labels: str = ""  # the file holding the instance's labels (error messages name it)


@dataclass
class ImageTask:
    """All samples of one source image (read once for all of them) and the writer of its new images."""

    source: SourceImage
    samples: list[SampleTask]
    params: IntegrationParams
    writer: DatasetWriter


@dataclass
class SampleResult:
    """New-image fields of one sample, or the error that stopped it; files written / already right."""

    task: SampleTask
    entries: list[dict] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    error: tuple[str, str, str] | None = None  # (path, problem, reason)


def load_sample(task: SampleTask) -> tuple[np.ndarray, list[str]]:
    """The task's sample as RGB uint8 of its crop box's size, and notes on what had to be converted."""
    x0, y0, x1, y1 = task.crop_box
    image, note = as_rgb_sample(read_png(task.sample_path), task.sample_path)
    notes = [note] if note else []
    if image.shape[:2] != (y1 - y0, x1 - x0):
        notes.append(f"resized {image.shape[1]}x{image.shape[0]} -> {x1 - x0}x{y1 - y0}")
        image = resize_image(image, (y1 - y0, x1 - x0))
    return image, notes


def check_instance(task: SampleTask, ann: Annotations) -> tuple[np.ndarray | None, tuple[str, str, str] | None]:
    """(the instance's mask inside its crop box, None) or (None, error) when the labels disagree with stage 1."""
    where, image = task.labels or str(ann.image.path), ann.image.relative
    x0, y0, x1, y1 = task.crop_box
    if not (x1 <= ann.width and y1 <= ann.height):
        raise InstSynthError(where, f"crop box {task.crop_box} of {task.key} lies outside the {ann.width}x{ann.height} "
                                    "image (metadata of another dataset?)")
    inst = ann.by_id.get(task.instance_id)
    mask = None if inst is None else inst.mask(tuple(task.crop_box))
    if mask is None or not mask.any():
        return None, (where, f"instance {task.instance_id} (key {task.key}) of {image} has no pixel inside its crop "
                             f"box {task.crop_box}", "empty_mask")
    if inst.area != task.area:  # the labels disagree with the instance stage 1 selected
        return None, (where, f"instance {task.key!r}: {inst.area} pixels of id {task.instance_id}, but "
                             f"metadata.json says area {task.area} (edited metadata or another dataset?)",
                      "area_mismatch")
    return mask, None


def integrate_sample(task: SampleTask, ann: Annotations, rgb: np.ndarray, counts: np.ndarray,
                     params: IntegrationParams, writer: DatasetWriter) -> SampleResult:
    """Paste one sample, cut its context crops and write every new image with its labels."""
    result = SampleResult(task)
    mask, result.error = check_instance(task, ann)
    if mask is None:
        return result
    if task.original:
        pasted, notes = rgb, []
    else:
        sample, notes = load_sample(task)
        pasted = paste(rgb, sample, mask, task.crop_box, params.blend, params.feather_pixels)
    width, height, source = ann.width, ann.height, ann.image
    crops = [ContextCrop((0, 0, width, height), 0, 0, False)]
    crops += [choose_context_crop(ann.label_map, task.bbox, crop_seed(params.seed, task.key, task.sample, c),
                                  params, counts) for c in range(1, params.crops_per_sample + 1)]
    for c, crop in enumerate(crops):
        name = writer.new_name(source, task.instance_id, task.sample, c)
        image = pasted if c == 0 else crop_resize_rgb(pasted, crop.box, (width, height))
        done = writer.write(NewImage(name, ann, image, tuple(crop.box),
                                     regenerated=None if task.original else task.instance_id))
        result.written, result.existing = result.written + done.written, result.existing + done.existing
        result.entries.append({  # every format's fields; its Layout keeps and orders its own (entry_record)
            "image_id": name, "name": name, "kind": "panorama" if c == 0 else "crop", "split": writer.split,
            "city": source.folder, "source_image_id": source.report_id, "key": task.key,
            "instance_id": task.instance_id, "sample": task.sample_rel, "sample_index": task.sample, "crop_index": c,
            "bbox_coordinate": list(map(int, crop.box)), "size": [width, height], "blend": params.blend,
            "ratio": crop.ratio, "tries": crop.tries, "fallback": crop.fallback, "sample_notes": notes,
            "instance_source": "original" if task.original else "generated", **done.fields,
            "fingerprint": task.fingerprint})
    return result


def integrate_image(task: ImageTask) -> list[SampleResult]:
    """Worker: integrate every sample of one source image; bad input becomes ``SampleResult.error``."""
    try:
        ann = task.source.annotations()
        rgb = task.source.read_pixels(shape=(ann.height, ann.width))
        counts = np.bincount(ann.label_map.ravel(), minlength=1 << 16)
    except InstSynthError as exc:
        return [SampleResult(s, error=(str(exc.path), exc.problem, "bad_source")) for s in task.samples]
    results = []
    for sample in task.samples:
        try:
            results.append(integrate_sample(sample, ann, rgb, counts, task.params, task.writer))
        except InstSynthError as exc:
            results.append(SampleResult(sample, error=(str(exc.path), exc.problem, "bad_sample")))
    return results


# --------------------------------------------------------------------------- inputs and planning
def check_coordinates_match(path: Path, coordinates: Any, instances: list[dict]) -> None:
    """Stage 1's cropped_region_coordinates.json must list the metadata's instances, in order, with their boxes."""
    if not isinstance(coordinates, list):
        raise InstSynthError(path, "expected stage 1's list of {key, cropped_instance_mask, bbox_coordinate}")
    if len(coordinates) != len(instances):
        raise InstSynthError(path, f"{len(coordinates)} entries but the metadata lists {len(instances)} instances "
                                   "(files from different stage-1 runs?)")
    for n, (entry, inst) in enumerate(zip(coordinates, instances)):
        key = entry.get("key", inst["key"]) if isinstance(entry, dict) else None
        box = entry.get("bbox_coordinate") if isinstance(entry, dict) else None
        if key != inst["key"] or box != inst["crop_box"]:
            raise InstSynthError(path, f"entry {n} ({key!r}, box {box}) does not match metadata instance {n} "
                                       f"({inst['key']!r}, crop_box {inst['crop_box']}): files from different runs?")


def load_inputs(inpainting_dir: str | os.PathLike, out: Path, metadata_path: str | os.PathLike | None,
                coordinates_path: str | os.PathLike | None) -> tuple[Path, dict, Path, dict]:
    """(manifest path, manifest, metadata path, metadata), validated against each other."""
    gen_dir = Path(inpainting_dir).resolve()
    manifest_path = gen_dir / "generation.json" if gen_dir.is_dir() else gen_dir
    manifest = load_manifest(manifest_path)
    if metadata_path is None and not isinstance(manifest.get("metadata"), str):
        raise InstSynthError(manifest_path, "names no stage-1 metadata; pass --metadata_path")
    meta_path = Path(metadata_path or manifest["metadata"]).resolve()
    meta = load_metadata(meta_path)
    if coordinates_path is not None:
        coordinates_path = Path(coordinates_path).resolve()
        if coordinates_path == out / COORDINATES_NAME:
            raise InstSynthError(out, f"stage 2 writes its own {COORDINATES_NAME} here; choose an output folder "
                                      "other than the one holding stage 1's")
        check_coordinates_match(coordinates_path, read_json(coordinates_path), meta["instances"])
    unknown = sorted(set(manifest["instances"]) - {inst["key"] for inst in meta["instances"]})
    if unknown:
        raise InstSynthError(manifest_path, f"{len(unknown)} instances not in {meta_path}, e.g. {unknown[0]!r}")
    return manifest_path, manifest, meta_path, meta


def check_gate(manifest_path: Path, manifest: dict, gate: GateDecision) -> None:
    """The gate's samples must be samples of this manifest (a decision made for another run is refused)."""
    for key, indices in (*gate.accepted.items(), *gate.fallback.items()):
        entry = manifest["instances"].get(key)
        if entry is None or any(not 0 <= i < len(entry["samples"]) for i in indices):
            raise InstSynthError(manifest_path, f"the quality gate names samples {indices} of {key!r}, which this "
                                                "manifest does not have (a decision made for another run?)")


@dataclass
class Plan:
    """What a run has to do: samples to compute (grouped by source image), samples reused, skips."""

    layout: Layout
    order: list[tuple[str, int]] = field(default_factory=list)
    tasks: dict[str, ImageTask] = field(default_factory=dict)
    reused: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    previous: dict[str, dict] = field(default_factory=dict)  # new-image entries of the last run
    skip_bad: bool = False

    def skip(self, key: str, sample: int, path: str, problem: str, reason: str) -> None:
        """Record a bad sample (InstSynthError unless skip_bad)."""
        if not self.skip_bad:
            raise InstSynthError(path, problem)
        log.warning("skipping %s sample %d: %s: %s", key, sample, path, problem)
        self.skipped.append({"key": key, "sample_index": sample, "reason": reason, "path": path, "problem": problem})


def plan_samples(manifest_path: Path, manifest: dict, meta: dict, dataset: Dataset, writer: DatasetWriter,
                 gate: GateDecision, params: IntegrationParams, out: Path, skip_bad: bool) -> Plan:
    """Every chosen sample in metadata order: reused (unchanged since the last run), to do, or skipped."""
    layout = layout_of(dataset)
    plan = Plan(layout, previous=previous_entries(layout, out / INTEGRATION_NAME), skip_bad=skip_bad)
    images, fields = image_index(dataset, meta["split"])
    label_files, digests = list(dataset.metadata_paths.values()), {}
    for inst in meta["instances"]:
        entry = manifest["instances"].get(inst["key"])
        image = images.get((inst["image"], *(inst[f] for f in fields)))
        fallback = set(gate.fallback.get(inst["key"], []))
        for i in sorted({*gate.accepted.get(inst["key"], []), *fallback}) if entry is not None else []:
            sample_path = entry["sample_paths"][i]
            if i > MAX_SAMPLE_INDEX:
                plan.skip(inst["key"], i, str(manifest_path), f"sample index {i} > {MAX_SAMPLE_INDEX}", "sample_index")
                continue
            if image is None:
                plan.skip(inst["key"], i, str(dataset.where), f"image {inst['image']} is not (or no longer) in the "
                          "dataset", "bad_source")
                continue
            if i not in fallback and not sample_path.is_file():
                plan.skip(inst["key"], i, str(sample_path), "sample file not found", "sample_missing")
                continue
            if image.relative not in digests:
                try:
                    digests[image.relative] = source_digest(image, inst, label_files)
                except OSError:
                    digests[image.relative] = b""  # unreadable: the worker reports it
            stamp = fingerprint(params, inst, None if i in fallback else sample_path, digests[image.relative])
            labels = str(inst[label_files[0]] if label_files else dataset.where)
            task = SampleTask(inst["key"], inst["instance_id"], inst["bbox"], inst["crop_box"], inst["area"], i,
                              sample_path, entry["samples"][i], stamp, original=i in fallback, labels=labels)
            plan.order.append((task.key, i))
            names = [writer.new_name(image, task.instance_id, i, c) for c in range(params.crops_per_sample + 1)]
            done = reusable(layout, names, task.fingerprint, plan.previous, out)
            if done is not None:
                plan.reused[task.key, i] = done
            else:
                plan.tasks.setdefault(image.relative, ImageTask(image, [], params, writer)).samples.append(task)
    return plan


def run_plan(plan: Plan, workers: int) -> tuple[list[dict], Counter]:
    """Compute the plan's samples in worker processes; every entry in plan order (reused ones included)
    and the file counts (written, existing). Failed samples become the plan's skips."""
    results: dict[tuple[str, int], SampleResult] = {}
    tasks = list(plan.tasks.values())
    bar = progress(None, "stage 2: integrating", sum(len(t.samples) for t in tasks))
    try:
        for sample_results in ordered_map(integrate_image, tasks, workers):
            for res in sample_results:
                results[res.task.key, res.task.sample] = res
                bar.update(1)
                if res.error is not None:
                    plan.skip(res.task.key, res.task.sample, *res.error)
    finally:
        bar.close()
    entries: list[dict] = []
    for pair in plan.order:
        if pair in plan.reused:
            entries += plan.reused[pair]
        elif pair in results and results[pair].error is None:
            entries += [entry_record(plan.layout, e) for e in results[pair].entries]
    files = Counter(written=sum(r.written for r in results.values()),
                    existing=sum(r.existing for r in results.values()))
    return entries, files


# --------------------------------------------------------------------------- the stage
@dataclass
class IntegrationSummary:
    """Where stage 2 wrote and what it did. ``coordinates``: the writer's file covering every new image
    (Cityscapes cropped_region_coordinates.json, COCO merged instances file, folder categories.json)."""

    integration: Path
    coordinates: Path
    report: Path
    samples: int
    new_images: int
    files_written: int
    skipped: int
    gate: dict | None = None  # the quality gate's counts (integration_report.json "gate")


def make_report(header: dict, gate: GateDecision, plan: Plan, entries: list[dict], files: Counter,
                not_generated: list[str], stale: list[str], extras: dict) -> dict:
    """integration_report.json: what was selected, integrated, reused, skipped (and why), written."""
    counts, kinds = gate.stats["gate"], Counter(e["kind"] for e in entries)
    converted = sorted({(e["sample"], note) for e in entries for note in e["sample_notes"]})
    report = {"samples_accepted": counts["accepted"], "samples_fallen_back": counts["fallen_back"],
              "samples_dropped_by_gate": counts["dropped"], "gate_accept_rate": counts["accept_rate"],
              "samples_integrated": len({(e["key"], e["sample_index"]) for e in entries}),
              "samples_reused": len(plan.reused), "samples_skipped": len(plan.skipped),
              "skip_reasons": dict(Counter(s["reason"] for s in plan.skipped)), "skipped": plan.skipped,
              "instances_not_generated": not_generated,
              "new_images": len(entries), "panoramas": kinds["panorama"], "crops": kinds["crop"],
              "files_written": files["written"], "files_already_right": files["existing"],
              "stale_images_removed": stale,
              "crop_redraws": sum(e["tries"] - 1 for e in entries if e["kind"] == "crop" and not e["fallback"]),
              "crop_fallbacks": [e[plan.layout.name] for e in entries if e["fallback"]],
              "samples_converted": [{"sample": s, "note": n} for s, n in converted], **extras}
    return {**header, **gate.stats, "gate_failures": gate.failures, **ordered(report, plan.layout.report)}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def integrate_samples(inpainting_dir: str | os.PathLike, out: str | os.PathLike,
                      metadata_path: str | os.PathLike | None = None,
                      coordinates_path: str | os.PathLike | None = None,
                      params: IntegrationParams = IntegrationParams(), workers: int | None = None,
                      skip_bad: bool = False, gate: GateDecision | None = None) -> IntegrationSummary:
    """Run stage 2 over the samples of ``inpainting_dir/generation.json`` (see the module docstring).

    ``metadata_path`` defaults to the manifest's metadata; ``coordinates_path`` (stage 1's
    cropped_region_coordinates.json, optional) is checked against it. ``gate``: the quality gate's
    decision (:func:`instsynth.quality.sample_gate.gate_for`; default every sample). Bad input raises
    InstSynthError naming the file; with ``skip_bad`` the sample is skipped and listed in
    integration_report.json. The JSON files are written after every sample was handled.
    """
    out = Path(out).resolve()
    params.validate(out)
    manifest_path, manifest, meta_path, meta = load_inputs(inpainting_dir, out, metadata_path, coordinates_path)
    gate = GateDecision.accept_all(manifest["instances"]) if gate is None else gate
    check_gate(manifest_path, manifest, gate)
    dataset = metadata_dataset(meta, skip_bad)
    with stage_output(out, dataset.input_paths()):  # no overlap with the dataset, one writer, own leftovers gone
        return _integrate(manifest_path, manifest, meta_path, meta, dataset, gate, params, out, workers, skip_bad)


def _integrate(manifest_path: Path, manifest: dict, meta_path: Path, meta: dict, dataset: Dataset, gate: GateDecision,
               params: IntegrationParams, out: Path, workers: int | None, skip_bad: bool) -> IntegrationSummary:
    """The body of :func:`integrate_samples`, run while ``out`` is held."""
    layout, writer = layout_of(dataset), dataset.writer(out, meta["split"])
    plan = plan_samples(manifest_path, manifest, meta, dataset, writer, gate, params, out, skip_bad)
    extras = layout.prepare(dataset, out) if layout.prepare else {}
    entries, files = run_plan(plan, default_workers() if workers is None else max(1, int(workers)))
    stale = remove_stale(layout, plan.previous, entries, out)

    header = header_of(layout, dataset, meta["split"], {
        "version": INTEGRATION_VERSION, "format": dataset.kind, "manifest": str(manifest_path),
        "backend": manifest["backend"], "metadata": str(meta_path), "params": asdict(params),
        "filters": filters_of(layout, gate.criteria, gate.mode)})
    write_if_changed(out / INTEGRATION_NAME, _json_bytes({**header, "images": entries}))
    written = writer.finish(entries, layout.info(header, entries))
    extras.update(layout.counts(dataset, entries, written) if layout.counts else {})
    not_generated = [i["key"] for i in meta["instances"] if i["key"] not in manifest["instances"]]
    report = make_report(header, gate, plan, entries, files, not_generated, stale, extras)
    write_if_changed(out / REPORT_NAME, _json_bytes(report))
    log.info("stage 2: %d samples -> %d new images (%d panoramas, %d crops), %d files written, %d skipped -> %s",
             report["samples_integrated"], len(entries), report["panoramas"], report["crops"], files["written"],
             len(plan.skipped), out)
    if gate.stats["gate"]["criteria"]:
        log.info("quality gate: %s", format_gate_counts(gate.stats["gate"]))
    return IntegrationSummary(out / INTEGRATION_NAME, written[0], out / REPORT_NAME,
                              samples=report["samples_integrated"], new_images=len(entries),
                              files_written=files["written"], skipped=len(plan.skipped), gate=gate.stats["gate"])
