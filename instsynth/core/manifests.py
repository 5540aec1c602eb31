"""The generation manifest ``OUT/<ModeName>/generation.json`` (data contract 2) and its shards.

One process writes ``generation.json`` itself after every batch. Under ``accelerate launch`` /
``torchrun`` every process writes its own ``generation.shard-<rank>-of-<world>.json`` (same format,
its instances only) after every batch, and rank 0 merges them into ``generation.json`` at the end
and deletes them. Every write is atomic, so a killed run loses at most the batch in flight.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from instsynth.core.io import InstSynthError, read_json, write_json

MANIFEST_VERSION = 1
MANIFEST_NAME = "generation.json"
REPORT_NAME = "generation_report.json"
_SHARD = re.compile(r"^generation\.shard-(\d+)-of-(\d+)\.json$")


def shard_name(rank: int, world: int) -> str:
    return f"generation.shard-{rank:05d}-of-{world:05d}.json"


def shard_files(mode_dir: Path) -> list[Path]:
    """Shard manifests left in ``mode_dir`` (by this run or an interrupted earlier one)."""
    if not mode_dir.is_dir():
        return []
    return sorted(p for p in mode_dir.iterdir() if _SHARD.match(p.name))


def sample_relpath(split: str, city: str, image_id: str, instance_id: int, mode_name: str, sample: int) -> str:
    """``<split>/<city>/<image_id>_<instance_id>_<ModeName>_<sample:06d>.png`` (relative to the manifest)."""
    return f"{split}/{city}/{image_id}_{instance_id}_{mode_name}_{sample:06d}.png"


def _check_entry(path: Path, key: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise InstSynthError(path, f"instance {key!r} is not an object")
    for name, kind in (("image_id", str), ("instance_id", int), ("class", str), ("split", str), ("city", str),
                       ("prompt", str), ("text", str), ("seed", int), ("samples", list), ("sample_seeds", list)):
        if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
            raise InstSynthError(path, f"instance {key!r}: field {name!r} missing or not {kind.__name__}")
    if len(entry["samples"]) != len(entry["sample_seeds"]):
        raise InstSynthError(path, f"instance {key!r}: 'samples' and 'sample_seeds' differ in length")
    if not all(isinstance(s, str) for s in entry["samples"]):
        raise InstSynthError(path, f"instance {key!r}: 'samples' must be a list of relative paths")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a manifest (or a shard of one) without adding paths."""
    path = Path(path)
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise InstSynthError(path, f"not an InstSynth generation manifest (expected an object with version {MANIFEST_VERSION})")
    for name, kind in (("backend", str), ("mode_name", str), ("params", dict), ("instances", dict)):
        if not isinstance(manifest.get(name), kind):
            raise InstSynthError(path, f"field {name!r} missing or not {kind.__name__}")
    for key, entry in manifest["instances"].items():
        _check_entry(path, key, entry)
    return manifest


def load_manifest(path: str | os.PathLike, check_files: bool = False) -> dict:
    """Read a ``generation.json`` (or the folder holding it) and validate it.

    Adds ``sample_paths`` (absolute :class:`~pathlib.Path` of every sample) to each instance entry;
    with ``check_files`` every sample must exist. Bad input raises InstSynthError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    path = path.resolve()
    manifest = read_manifest(path)
    for key, entry in manifest["instances"].items():
        entry["sample_paths"] = [path.parent / s for s in entry["samples"]]
        if check_files:
            for p in entry["sample_paths"]:
                if not p.is_file():
                    raise InstSynthError(path, f"instance {key!r}: sample {p} not found")
    return manifest


def write_manifest(path: Path, header: dict, entries: dict[str, dict], order: list[str]) -> None:
    """Atomically write a manifest with ``entries`` in ``order`` (keys without an entry are left out)."""
    instances = {key: entries[key] for key in order if key in entries}
    write_json(path, {**header, "instances": instances}, indent=1)


def existing_entries(mode_dir: Path) -> tuple[dict[str, dict], dict | None]:
    """Instance entries recorded by earlier runs (main manifest, then shards) and the main header."""
    entries: dict[str, dict] = {}
    header = None
    main = mode_dir / MANIFEST_NAME
    if main.is_file():
        manifest = read_manifest(main)
        header = {k: v for k, v in manifest.items() if k != "instances"}
        entries.update(manifest["instances"])
    for shard in shard_files(mode_dir):
        manifest = read_manifest(shard)
        header = header or {k: v for k, v in manifest.items() if k not in ("instances", "skipped", "stats")}
        for key, entry in manifest["instances"].items():
            entries[key] = merge_entries(entries.get(key), entry)
    return entries, header


def add_sample(entry: dict, rel: str, seed: int) -> None:
    """Record sample ``rel`` in an instance entry (kept sorted by index; stale quality scores dropped)."""
    pairs = dict(zip(entry["samples"], entry["sample_seeds"]))
    pairs[rel] = seed
    entry["samples"] = sorted(pairs)
    entry["sample_seeds"] = [pairs[s] for s in entry["samples"]]
    entry.pop("scores", None)


def merge_entries(old: dict | None, new: dict) -> dict:
    """One entry holding the samples of both (sorted by sample path, i.e. by sample index)."""
    if old is None:
        return new
    pairs = dict(zip(old["samples"], old["sample_seeds"]))
    pairs.update(zip(new["samples"], new["sample_seeds"]))
    samples = sorted(pairs)
    merged = {**old, **new, "samples": samples, "sample_seeds": [pairs[s] for s in samples]}
    if samples != old["samples"] and "scores" not in new:
        merged.pop("scores", None)  # scores of the quality filter no longer match the samples
    return merged
