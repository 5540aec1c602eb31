"""The generation stage: plan the samples still missing, run a backend over them in batches, write
PNGs and the manifest, and report.

Scale-out: under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) process ``r`` of ``n``
takes instances ``r, r + n, ...`` of the metadata; since every sample's randomness comes from its own
seed, the union of outputs is the same as one process's. Resume: a sample counts as done when the
manifest (or a shard of an interrupted run) records it and its PNG exists.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from instsynth.core.io import TEMP_PREFIX, InstSynthError, get_logger, progress, read_json, read_png, write_json, write_png
from instsynth.core.labels import prompt_bank_with_gaps, render_prompt
from instsynth.core.lock import stage_output
from ..stages.metadata import load_metadata
from .backends import backend_class
from .common import (Backend, GenerationSettings, SampleJob, choose_prompt, composite,
                     instance_seed, sample_seed)
from instsynth.core.manifests import (MANIFEST_NAME, MANIFEST_VERSION, REPORT_NAME, add_sample, existing_entries,
                                      read_manifest, sample_relpath, shard_files, shard_name, write_manifest)

log = get_logger("instsynth.generation")

METADATA_NAMES = ("metadata_refined.json", "metadata.json")
"""Looked up in ``--folder`` when no ``--metadata`` is given (the paper's name first)."""


@dataclass
class Shard:
    """This process's place in a multi-process run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    state: Any = None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]


def current_shard(device: str = "auto") -> Shard:
    """Rank and world size from ``accelerate launch`` / ``torchrun`` (via accelerate's PartialState).

    The process group uses NCCL on GPUs and gloo when the run is on CPU (``--device cpu`` or no GPU).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes, state.local_process_index, state)


@dataclass
class InstancePlan:
    """One instance of this shard: its metadata, its manifest entry and the samples still to make."""

    inst: dict
    entry: dict
    pending: list[int]


@dataclass
class GenerationSummary:
    """Where the stage wrote and what it did."""

    manifest: Path
    report: Path
    instances: int
    samples_written: int
    samples_existing: int
    skipped: int
    rank: int = 0  # this process's rank: only rank 0's summary covers the whole run (the others: their shard)


@dataclass
class _RunState:
    skipped: list[dict] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    oom_halvings: int = 0


# --------------------------------------------------------------------------- inputs
def find_metadata(folder: str | os.PathLike) -> Path:
    """``metadata_refined.json`` or ``metadata.json`` inside the paper's ``--folder``."""
    folder = Path(folder)
    for name in METADATA_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InstSynthError(folder, f"no {' or '.join(METADATA_NAMES)} found (run process_clean_ver.py or pass --metadata)")


def remove_stale_temp_files(mode_dir: Path) -> int:
    """Delete temporary files of atomic writes left by a killed run (``.instsynth-tmp-*``, nothing else)."""
    stale = [p for p in mode_dir.rglob(TEMP_PREFIX + "*") if p.is_file()] if mode_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    return len(stale)


def validate_settings(settings: GenerationSettings, where: Path) -> None:
    checks = [(settings.num_samples >= 1, "num_samples must be >= 1"),
              (settings.batch_size >= 1, "batch_size must be >= 1"),
              (settings.steps >= 1, "steps must be >= 1"),
              (0.0 < settings.strength <= 1.0, "strength must be in (0, 1]"),
              (0.0 <= settings.blending_start_percentage < 1.0, "blending_start_percentage must be in [0, 1)"),
              (settings.resolution is None or (settings.resolution >= 8 and settings.resolution % 8 == 0),
               "resolution must be a multiple of 8")]
    for ok, problem in checks:
        if not ok:
            raise InstSynthError(where, problem)


def load_crop(inst: dict) -> tuple[np.ndarray, np.ndarray]:
    """(crop RGB uint8, crop mask bool) of an instance, checked: same size, mask of the instance's area."""
    rgb_path, mask_path = inst["crop_rgb_path"], inst["crop_mask_path"]
    rgb = read_png(rgb_path, rgb=True, dtype=np.uint8)
    mask = read_png(mask_path, dtype=np.uint8)
    if mask.ndim != 2:
        raise InstSynthError(mask_path, f"crop mask must be single-channel, found {mask.shape[2]} channels")
    if mask.shape != rgb.shape[:2]:
        raise InstSynthError(mask_path, f"size {mask.shape[1]}x{mask.shape[0]} differs from its crop {rgb_path} "
                                        f"({rgb.shape[1]}x{rgb.shape[0]})")
    mask = mask > 127
    if not mask.any():
        raise InstSynthError(mask_path, "empty instance mask (no pixel is 255)")
    if int(mask.sum()) != inst["area"]:
        raise InstSynthError(mask_path, f"instance {inst['key']!r}: {int(mask.sum())} mask pixels but metadata.json "
                                        f"says area {inst['area']} (crop of another instance, or edited metadata?)")
    return rgb, mask


# --------------------------------------------------------------------------- manifest bookkeeping
def manifest_header(settings: GenerationSettings, meta: dict, meta_path: Path, template: str) -> dict:
    return {"version": MANIFEST_VERSION, "backend": settings.mode, "mode_name": settings.mode_name,
            "model_id": settings.model_id, "params": {**settings.as_json(), "prompt_template": template},
            "metadata": str(meta_path), "dataset_root": meta["dataset_root"]}


def check_compatible(old: dict | None, new: dict, output_params: Sequence[str], where: Path) -> None:
    """Refuse to resume over samples made with settings that change the pixels."""
    if old is None:
        return
    old_params, new_params = old.get("params", {}), new["params"]
    keys = [("backend", old.get("backend"), new["backend"]), ("model_id", old.get("model_id"), new["model_id"])]
    keys += [(k, old_params.get(k), new_params.get(k)) for k in (*output_params, "prompt_template")]
    changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in keys if a != b]
    if changed:
        raise InstSynthError(where, "existing samples were made with other settings (" + "; ".join(changed)
                             + "); use another --folder or delete this folder to regenerate")


def new_entry(inst: dict, split: str, prompt: str, text: str, seed: int) -> dict:
    return {"image_id": inst["image_id"], "instance_id": inst["instance_id"], "class": inst["class"],
            "split": split, "city": inst["city"], "prompt": prompt, "text": text, "seed": seed,
            "samples": [], "sample_seeds": []}


def sample_budget(settings: GenerationSettings, meta: dict, where: Path) -> dict | None:
    """Samples per instance by class (:func:`instsynth.budget.class_budget`) or None (``num_samples`` for all).

    ``balance="inverse_freq"`` uses stage 1's instances per class of the split (``class_counts`` in
    metadata.json) or, in an older metadata.json, the selected instances per class; ``balance="ap"`` the
    per-class AP of ``settings.baseline_metrics``."""
    from collections import Counter

    from instsynth.stages.budget import class_budget

    counts = None
    if settings.balance == "inverse_freq":
        counts = meta.get("class_counts")
        if not isinstance(counts, dict):
            log.warning("%s has no class_counts (older stage 1): balancing by the selected instances per class", where)
            counts = dict(Counter(inst["class"] for inst in meta["instances"]))
    try:
        return class_budget(settings.num_samples, settings.samples_per_class, settings.balance, counts,
                            settings.balance_power, settings.max_factor, "samples_per_class",
                            settings.baseline_metrics)
    except ValueError as exc:
        raise InstSynthError(where, str(exc)) from None


def plan_instances(instances: list[dict], split: str, settings: GenerationSettings, template: str,
                   bank: dict[str, list[str]], done: dict[str, dict], mode_dir: Path, state: _RunState,
                   skip_bad: bool, where: Path, budget: dict | None = None) -> list[InstancePlan]:
    """Entry and missing sample indices of every instance (unknown classes raise or are skipped);
    ``budget``: samples per instance by class (default ``settings.num_samples``)."""
    from instsynth.stages.budget import budget_of

    plans = []
    for inst in instances:
        key = inst["key"]
        if inst["class"] not in bank:
            problem = f"instance {key!r}: class {inst['class']!r} has no prompts in {settings.prompts}"
            if not skip_bad:
                raise InstSynthError(where, problem)
            state.skipped.append({"key": key, "path": str(where), "problem": problem})
            continue
        seed = instance_seed(settings.seed, key)
        prompt = choose_prompt(bank[inst["class"]], seed)
        entry = new_entry(inst, split, prompt, render_prompt(template, prompt), seed)
        old = done.get(key)
        if old is not None and old["text"] != entry["text"]:
            log.warning("%s: prompt changed (%r -> %r); its samples are made again", key, old["text"], entry["text"])
            old = None
        recorded = set(old["samples"]) if old else set()
        pending = []
        for j in range(budget_of(budget, inst["class"], settings.num_samples)):
            rel = sample_relpath(split, inst["city"], inst["image_id"], inst["instance_id"], settings.mode_name, j)
            if rel in recorded and (mode_dir / rel).is_file():
                state.existing += 1
            else:
                pending.append(j)
        if old:  # keep what earlier runs recorded (e.g. quality scores) for samples still on disk
            keep = [(s, sd) for s, sd in zip(old["samples"], old["sample_seeds"]) if (mode_dir / s).is_file()]
            entry = {**old, **entry, "samples": [s for s, _ in keep], "sample_seeds": [sd for _, sd in keep]}
            if len(keep) != len(old["samples"]):
                entry.pop("scores", None)
        plans.append(InstancePlan(inst, entry, pending))
    return plans


# --------------------------------------------------------------------------- running
def iter_jobs(plans: list[InstancePlan], settings: GenerationSettings, state: _RunState,
              skip_bad: bool) -> Iterator[tuple[InstancePlan, SampleJob]]:
    """Every pending sample as a job; each instance's crop is read once, just before its samples."""
    for plan in plans:
        if not plan.pending:
            continue
        try:
            rgb, mask = load_crop(plan.inst)
        except InstSynthError as exc:
            if not skip_bad:
                raise
            log.warning("skipping %s: %s", plan.inst["key"], exc)
            state.skipped.append({"key": plan.inst["key"], "path": str(exc.path), "problem": exc.problem})
            plan.pending = []
            continue
        for j in plan.pending:
            yield plan, SampleJob(plan.inst["key"], j, sample_seed(settings.seed, plan.inst["key"], j),
                                  plan.entry["prompt"], plan.entry["text"], plan.inst["class"], rgb, mask)


def chunks(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def generate_with_oom_halving(backend: Backend, jobs: list[SampleJob], limit: list[int],
                              state: _RunState) -> list[np.ndarray]:
    """Run ``jobs`` in calls of at most ``limit[0]`` images, halving it (for the rest of the run) on OOM."""
    outputs: list[np.ndarray] = []
    start = 0
    while start < len(jobs):
        part = jobs[start:start + limit[0]]
        try:
            outputs += backend.generate(part)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc) or len(part) == 1:
                raise
            limit[0] = max(1, len(part) // 2)
            state.oom_halvings += 1
            log.warning("out of GPU memory with %d images per call; retrying with %d", len(part), limit[0])
            sys.modules["torch"].cuda.empty_cache()
            continue
        start += len(part)
    return outputs


def write_samples(mode_dir: Path, batch: list[tuple[InstancePlan, SampleJob]], images: list[np.ndarray]) -> None:
    """Composite each image through its original mask, write it atomically, record it in its entry."""
    for (plan, job), image in zip(batch, images):
        if image.shape[:2] != job.size:
            raise RuntimeError(f"backend returned {image.shape[:2]} for a crop of size {job.size}")
        inst = plan.inst
        rel = sample_relpath(plan.entry["split"], inst["city"], inst["image_id"], inst["instance_id"],
                             mode_dir.name, job.sample)
        write_png(mode_dir / rel, composite(job.crop_rgb, image, job.crop_mask))
        add_sample(plan.entry, rel, job.seed)


@dataclass
class _Run:
    """Everything one process needs while generating."""

    settings: GenerationSettings
    mode_dir: Path
    header: dict
    order: list[str]
    plans: list[InstancePlan]
    entries: dict[str, dict]
    shard: Shard
    state: _RunState
    skip_bad: bool

    @property
    def manifest_path(self) -> Path:
        name = MANIFEST_NAME if self.shard.world == 1 else shard_name(self.shard.rank, self.shard.world)
        return self.mode_dir / name

    def write_manifest(self) -> None:
        """This process's manifest (the shard's own, with its skips and counts, under a launcher)."""
        extra = {} if self.shard.world == 1 else {"skipped": self.state.skipped, "stats": _stats(self.state)}
        write_manifest(self.manifest_path, {**self.header, **extra},
                       {k: e for k, e in self.entries.items() if e["samples"]}, self.order)


def log_generated_prompts(generated: list[str], instances: list[dict], prompts: str) -> None:
    """One line naming the selected classes whose prompts were generated (the bank lacks them)."""
    used = sorted(set(generated) & {inst["class"] for inst in instances})
    if used:
        log.info("prompt bank %s has no prompts for %d selected classes; generated 'a <colour> <class>' "
                 "prompts for: %s", prompts, len(used), ", ".join(used))


def prepare_run(metadata: str | os.PathLike, out: str | os.PathLike | None, settings: GenerationSettings,
                skip_bad: bool, strict_prompts: bool = False, shard: Shard | None = None) -> _Run:
    """Validate inputs and settings, read what earlier runs recorded, plan this shard's samples."""
    meta_path = Path(metadata).resolve()
    meta = load_metadata(meta_path, check_files=False)
    mode_dir = (Path(out).resolve() if out is not None else meta_path.parent) / settings.mode_name
    validate_settings(settings, meta_path)
    template, bank, generated = prompt_bank_with_gaps(meta, settings.prompts, strict_prompts)
    log_generated_prompts(generated, meta["instances"], settings.prompts)
    shard = shard or current_shard(settings.device)
    header = manifest_header(settings, meta, meta_path, template)
    budget = sample_budget(settings, meta, meta_path)
    if budget:
        header["params"]["budget"] = budget
    if shard.rank == 0:
        remove_stale_temp_files(mode_dir)
    shard.barrier()
    done, old_header = existing_entries(mode_dir)
    check_compatible(old_header, header, backend_class(settings.mode).output_params, mode_dir)
    if old_header is not None:  # keep what others added (e.g. the quality filter's "quality_filter")
        header.update({k: v for k, v in old_header.items() if k not in header and k not in ("skipped", "stats")})
        if "resolved" in old_header.get("params", {}):
            header["params"]["resolved"] = old_header["params"]["resolved"]
    order = [inst["key"] for inst in meta["instances"]]
    state = _RunState()
    plans = plan_instances(meta["instances"][shard.rank::shard.world], meta["split"], settings, template, bank,
                           done, mode_dir, state, skip_bad, meta_path, budget)
    keys = set(order)
    entries = {key: e for key, e in done.items() if key in keys} if shard.world == 1 else {}
    entries.update({p.inst["key"]: p.entry for p in plans})
    return _Run(settings, mode_dir, header, order, plans, entries, shard, state, skip_bad)


def run_batches(run: _Run) -> None:
    """Generate every pending sample of this shard, ``batch_size`` images per backend call."""
    settings, state = run.settings, run.state
    pending = sum(len(p.pending) for p in run.plans)
    if not pending:
        return
    backend = backend_class(settings.mode)(settings, local_rank=run.shard.local_rank)
    run.header["params"]["resolved"] = backend.describe()
    limit = [settings.batch_size]
    batches = chunks(iter_jobs(run.plans, settings, state, run.skip_bad), settings.batch_size)
    for batch in progress(batches, f"generating ({settings.mode})", math.ceil(pending / settings.batch_size)):
        images = generate_with_oom_halving(backend, [job for _, job in batch], limit, state)
        write_samples(run.mode_dir, batch, images)
        state.written += len(batch)
        run.write_manifest()


def output_of(metadata: str | os.PathLike, out: str | os.PathLike | None,
              settings: GenerationSettings) -> tuple[Path, list[Path]]:
    """(the mode folder, the dataset root) of a generation call: the folder it holds and the tree it may not overlap."""
    meta_path = Path(metadata).resolve()
    meta = read_json(meta_path)
    root = meta.get("dataset_root") if isinstance(meta, dict) else None
    folder = Path(out).resolve() if out is not None else meta_path.parent
    return folder / settings.mode_name, [Path(root).resolve()] if isinstance(root, str) else []


@contextlib.contextmanager
def run_output(shard: Shard, folder: Path, inputs: list[Path]) -> Iterator[None]:
    """:func:`~instsynth.core.lock.stage_output` for every process of a run: alone, the process holds the
    folder's lock; under ``torchrun`` rank 0 holds it for all ranks (the run's last barrier keeps it held
    until every rank is done) and tells them whether it got it. When it did not, rank 0 raises the one-line
    error and the other ranks exit with status 1 without repeating it."""
    if shard.world == 1:
        with stage_output(folder, inputs):
            yield
        return
    with contextlib.ExitStack() as held:
        failure = None
        if shard.rank == 0:
            try:
                held.enter_context(stage_output(folder, inputs))
            except InstSynthError as exc:
                failure = exc
        refused = shard.from_rank0(failure is not None)
        if failure is not None:
            raise failure
        if refused:
            raise SystemExit(1)
        yield


def generate_instances(metadata: str | os.PathLike, out: str | os.PathLike | None = None,
                       settings: GenerationSettings = GenerationSettings(), skip_bad: bool = False,
                       strict_prompts: bool = False) -> GenerationSummary:
    """Generate ``settings.num_samples`` images of every instance of a stage-1 ``metadata.json``.

    Writes ``<out>/<ModeName>/<split>/<city>/<image_id>_<instance_id>_<ModeName>_<sample:06d>.png``,
    the manifest ``<out>/<ModeName>/generation.json`` and ``generation_report.json``; ``out``
    defaults to the metadata's folder. Samples already recorded are skipped. Bad input raises
    InstSynthError; with ``skip_bad`` the instance is skipped and listed in the report. For a COCO
    metadata, classes without prompts get :func:`instsynth.labels.generated_prompts` unless
    ``strict_prompts`` (then an error lists them).
    """
    started = time.time()
    shard = current_shard(settings.device)
    with run_output(shard, *output_of(metadata, out, settings)):
        return _generate(metadata, out, settings, skip_bad, strict_prompts, shard, started)


def _generate(metadata, out, settings: GenerationSettings, skip_bad: bool, strict_prompts: bool, shard: Shard,
              started: float) -> GenerationSummary:
    run = prepare_run(metadata, out, settings, skip_bad, strict_prompts, shard)
    run_batches(run)
    if run.shard.world > 1:
        run.write_manifest()  # also when this shard had nothing to do: it carries its skips and counts
    run.shard.barrier()
    summary = None
    if run.shard.rank == 0:
        summary = finalize(run.mode_dir, run.header, run.order, run.state, run.shard.world, time.time() - started)
    run.shard.barrier()
    if summary is None:
        summary = GenerationSummary(run.mode_dir / MANIFEST_NAME, run.mode_dir / REPORT_NAME, len(run.plans),
                                    run.state.written, run.state.existing, len(run.state.skipped), run.shard.rank)
    return summary


def _stats(state: _RunState) -> dict:
    return {"samples_written": state.written, "samples_existing": state.existing, "oom_halvings": state.oom_halvings}


def finalize(mode_dir: Path, header: dict, order: list[str], state: _RunState, world: int,
             seconds: float) -> GenerationSummary:
    """Merge shard manifests into ``generation.json``, write the report, delete the shards."""
    shards = shard_files(mode_dir)
    entries, _ = existing_entries(mode_dir)
    skipped, stats = list(state.skipped) if world == 1 else [], _stats(state) if world == 1 else None
    if world > 1:
        stats = {"samples_written": 0, "samples_existing": 0, "oom_halvings": 0}
        for path in shards:
            shard = read_manifest(path)
            if "resolved" not in header["params"] and "resolved" in shard["params"]:
                header["params"]["resolved"] = shard["params"]["resolved"]  # rank 0 loaded no model
            skipped += shard.get("skipped", [])
            for k in stats:
                stats[k] += shard.get("stats", {}).get(k, 0)
    header = {k: v for k, v in header.items() if k not in ("skipped", "stats")}
    keys = set(order)
    entries = {k: e for k, e in entries.items() if k in keys and e["samples"]}
    manifest = mode_dir / MANIFEST_NAME
    write_manifest(manifest, header, entries, order)
    for path in shards:
        path.unlink(missing_ok=True)
    position = {key: i for i, key in enumerate(order)}
    skipped.sort(key=lambda s: position.get(s["key"], -1))
    report = {"version": MANIFEST_VERSION, "backend": header["backend"], "mode_name": header["mode_name"],
              "metadata": header["metadata"], "instances_in_metadata": len(order),
              "instances_with_samples": len(entries),
              "samples_total": sum(len(e["samples"]) for e in entries.values()), **stats,
              **({"samples_per_class": header["params"]["budget"]["per_class"]} if "budget" in header["params"] else {}),
              "skipped_count": len(skipped), "skipped": skipped, "processes": world,
              "resolved": header["params"].get("resolved", {}), "seconds": round(seconds, 2)}
    write_json(mode_dir / REPORT_NAME, report)
    log.info("generation (%s): %d samples written, %d already there, %d instances skipped -> %s",
             header["backend"], stats["samples_written"], stats["samples_existing"], len(skipped), manifest)
    return GenerationSummary(manifest, mode_dir / REPORT_NAME, len(entries), stats["samples_written"],
                             stats["samples_existing"], len(skipped))
