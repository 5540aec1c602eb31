"""An experiment YAML read and checked: its arms, seeds, training config and table options."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from instsynth.stages.coco_conversion import coco_json_path
from instsynth.experiments.dataset import ExperimentDataset, parse_dataset
from instsynth.core.io import InstSynthError, read_yaml


KINDS = ("baseline", "duplicate", "copy_paste", "instsynth")


CONTROLS = ("duplicate", "copy_paste")  # arms that add as many images as a synthetic arm


SCHEDULES = ("same_iterations", "same_epochs")


INTERVALS = ("t", "bootstrap")


RUN_FILE = "experiment_run.json"


PREPARED_FILE = "prepared.json"


TEST_NAME = "experiment_test"


BASELINE_NAME = "experiment_baseline_train"


# stage: (script, flags the harness sets itself)
STAGES = {
    "selection": ("process_clean_ver.py", ("train_folder", "coco", "images", "folder", "out", "split")),
    "generation": ("generation/instance_generation.py", ("metadata", "folder")),
    "filter": ("generation/filter_generation.py", ("manifest",)),
    "integration": ("inpainted_integration.py", ("inpainting_dir", "metadata_path", "cropped_region_coordinates",
                                                 "output_folder_name")),
}


ARM_KEYS = {"baseline": {"kind"}, "duplicate": {"kind", "match", "num_images"},
            "copy_paste": {"kind", "match", "num_images", "options"},
            "instsynth": {"kind", "budget_from_baseline", *STAGES}}


TOP_KEYS = {"output_dir", "dataset", "train_split", "test_split", "seeds", "train", "coco", "workers", "table", "arms",
            "assemble_mode"}


# --------------------------------------------------------------------------- configuration
@dataclass
class Arm:
    name: str
    kind: str
    spec: dict


@dataclass
class Experiment:
    """A parsed EXP.yaml (paths resolved against the current directory)."""

    path: Path
    output_dir: Path
    dataset: Path | None  # the Cityscapes tree (None for a COCO dataset: see ``source``)
    train_config: Path
    train_opts: list
    arms: list[Arm]
    seeds: list[int]
    train_split: str = "train"
    test_split: str = "val"
    num_gpus: int = 1
    schedule: str = "same_iterations"
    coco: dict = field(default_factory=dict)
    workers: int | None = None
    assemble_mode: str = "link"  # how data/baseline holds the original splits (move_folder_clean_ver.py --mode)
    rare_classes: int = 3
    interval: str = "t"
    confidence: float = 0.95
    bootstrap_samples: int = 10000
    source: ExperimentDataset = field(default_factory=ExperimentDataset)

    def split_files(self, split: str, data: dict) -> tuple[Path, Path, Path | None]:
        """(COCO file, image root, dataset root) of an original split: the baseline arm's converted tree
        (Cityscapes) or the dataset's own file (COCO)."""
        if self.source.is_coco:
            return (*self.source.coco_split(split), None)
        root = data[self.baseline].dataset_root
        return coco_json_path(root, split), root / "leftImg8bit" / split, root

    @property
    def baseline(self) -> str:
        """Name of the baseline arm."""
        return next(a.name for a in self.arms if a.kind == "baseline")


def _check_keys(path: Path, where: str, data: dict, allowed: set) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InstSynthError(path, f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _opts_list(path: Path, opts: Any) -> list:
    """``train.opts`` as a flat KEY VALUE list (given as a mapping or as a list)."""
    if opts is None:
        return []
    if isinstance(opts, dict):
        return [x for k, v in opts.items() for x in (k, tuple(v) if isinstance(v, list) else v)]
    if isinstance(opts, list) and len(opts) % 2 == 0:
        return list(opts)
    raise InstSynthError(path, "train.opts must be a mapping KEY: VALUE or a list of KEY VALUE pairs")


def parse_arms(path: Path, arms: Any) -> list[Arm]:
    """``arms`` mapping (name -> spec) in file order; ``kind`` defaults to the name if it is a kind."""
    if not isinstance(arms, dict) or not arms:
        raise InstSynthError(path, "'arms' must map arm names to their settings")
    parsed = []
    for name, spec in arms.items():
        spec = dict(spec or {})
        kind = spec.get("kind", name if name in KINDS else "instsynth")
        if kind not in KINDS:
            raise InstSynthError(path, f"arm {name!r}: kind must be one of {KINDS}, got {kind!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise InstSynthError(path, f"arm name {name!r}: use letters, digits, '_', '-' or '.' (it names folders)")
        _check_keys(path, f"arm {name!r}", spec, ARM_KEYS[kind])
        for stage in STAGES:
            opts = spec.get(stage) or {}
            if not isinstance(opts, dict):
                raise InstSynthError(path, f"arm {name!r}: {stage} must be a mapping of command-line options")
            taken = sorted(set(opts) & set(STAGES[stage][1]))
            if taken:
                raise InstSynthError(path, f"arm {name!r}: {stage} option(s) {taken} are set by the harness")
        parsed.append(Arm(str(name), kind, spec))
    kinds = [a.kind for a in parsed]
    if kinds.count("baseline") != 1:
        raise InstSynthError(path, f"an experiment needs exactly one baseline arm, found {kinds.count('baseline')}")
    synthetic = [a.name for a in parsed if a.kind == "instsynth"]
    for arm in (a for a in parsed if a.kind in CONTROLS and a.spec.get("num_images") is None):
        arm.spec.setdefault("match", synthetic[0] if synthetic else None)
        if arm.spec["match"] not in synthetic:
            raise InstSynthError(path, f"arm {arm.name!r} needs 'match: ARM' naming an instsynth arm "
                                       f"({', '.join(synthetic) or 'there is none'}) or 'num_images: N'")
    return parsed


def load_experiment(path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Experiment:
    """Read and check an experiment YAML (see configs/experiments/)."""
    path = Path(path)
    data = read_yaml(path, "experiment config not found")
    if not isinstance(data, dict):
        raise InstSynthError(path, "an experiment config must be a mapping")
    _check_keys(path, "the experiment", data, TOP_KEYS)
    for key in ("dataset", "train", "arms"):
        if key not in data:
            raise InstSynthError(path, f"missing key {key!r}")
    train, table = dict(data["train"] or {}), dict(data.get("table") or {})
    _check_keys(path, "train", train, {"config", "opts", "num_gpus", "schedule"})
    _check_keys(path, "table", table, {"rare_classes", "interval", "confidence", "bootstrap_samples"})
    if "config" not in train:
        raise InstSynthError(path, "train.config (a train_net.py config) is required")
    seeds = data.get("seeds", 3)
    seeds = list(range(1, seeds + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InstSynthError(path, f"seeds must be a count >= 1 or a list of distinct integers, got {seeds}")
    source = parse_dataset(path, data["dataset"])
    exp = Experiment(
        path=path, output_dir=Path(output_dir or data.get("output_dir") or Path("output/experiments") / path.stem),
        dataset=source.root, source=source, train_config=Path(train["config"]),
        train_opts=_opts_list(path, train.get("opts")), arms=parse_arms(path, data["arms"]), seeds=seeds,
        train_split=data.get("train_split", "train"), test_split=data.get("test_split", "val"),
        num_gpus=int(train.get("num_gpus", 1)), schedule=train.get("schedule", "same_iterations"),
        coco=dict(data.get("coco") or {}), workers=data.get("workers"), assemble_mode=data.get("assemble_mode", "link"),
        **{k: table[k] for k in ("rare_classes", "interval", "confidence", "bootstrap_samples") if k in table})
    if exp.schedule not in SCHEDULES:
        raise InstSynthError(path, f"train.schedule must be one of {SCHEDULES}, got {exp.schedule!r}")
    if exp.assemble_mode not in ("link", "copy", "symlink"):
        raise InstSynthError(path, f"assemble_mode must be link, copy or symlink, got {exp.assemble_mode!r}")
    if exp.interval not in INTERVALS:
        raise InstSynthError(path, f"table.interval must be one of {INTERVALS}, got {exp.interval!r}")
    if not 0 < exp.confidence < 1:
        raise InstSynthError(path, f"table.confidence must be in (0, 1), got {exp.confidence}")
    if not exp.train_config.is_file():
        raise InstSynthError(exp.train_config, "train.config not found")
    return exp


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def baseline_metrics_path(exp: Experiment) -> Path:
    """inference/metrics.json of the baseline arm's first seed (what ``budget_from_baseline`` arms read)."""
    return exp.output_dir.resolve() / "runs" / exp.baseline / f"seed_{exp.seeds[0]}" / "inference" / "metrics.json"
