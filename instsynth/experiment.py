"""Controlled experiments: the same model and schedule trained on several data arms, N seeds each.

    python -m instsynth.experiment --config configs/experiments/demo.yaml [--output DIR] [--arms a,b]
                                   [--prepare_only] [--table_only]

Arms (``kind``): ``baseline`` (the original train split), ``duplicate`` (original images repeated
to as many extra images as a synthetic arm adds: controls for seeing more images), ``copy_paste``
(Simple Copy-Paste of original instances, :mod:`instsynth.copy_paste`, as many new images) and
``instsynth`` (stage 1 -> generation -> quality gate -> integration -> label crops -> COCO, each stage
run through its command-line script with the arm's options as flags). Every arm trains on the
baseline train set plus its extra images and is tested on the original test split.

Layout of the output folder: ``data/<arm>/`` (each arm's extra Cityscapes tree and COCO files;
``data/baseline`` holds hard links of the original train/test splits), ``work/<hash>/`` (stage-1
crops and generated samples, shared by arms with the same selection and generation options),
``runs/<arm>/seed_<s>/`` (train_net.py output folders), ``results.md`` / ``results.json`` (the table).
Everything resumes: prepared arms (``data/<arm>/prepared.json``) are not rebuilt, finished runs
(``experiment_run.json``) are not retrained and interrupted ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instsynth.cli import command
from instsynth.stages.coco_conversion import coco_json_path, convert_cityscapes_to_coco
from instsynth.generation.common import MODE_ALIASES, MODE_NAMES
from instsynth.core.io import InstSynthError, get_logger, progress, read_json, read_yaml, write_bytes, write_json
from instsynth.core.labels import REPO_ROOT
from instsynth.reports.summary import coco_stats, run_metrics

log = get_logger("instsynth.experiment")

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
    "selection": ("process_clean_ver.py", ("train_folder", "out", "split")),
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
    dataset: Path
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
    exp = Experiment(
        path=path, output_dir=Path(output_dir or data.get("output_dir") or Path("output/experiments") / path.stem),
        dataset=Path(data["dataset"]), train_config=Path(train["config"]),
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


# --------------------------------------------------------------------------- arm data
@dataclass
class ArmData:
    """An arm's extra training images (none for the baseline) as a COCO file, and their statistics."""

    name: str
    fingerprint: str
    json_file: Path | None = None
    image_root: Path | None = None
    dataset_root: Path | None = None
    stats: dict = field(default_factory=dict)  # coco_stats of the extra images

    PATHS = ("json_file", "image_root", "dataset_root")

    def as_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "stats": self.stats,
                **{k: str(getattr(self, k)) if getattr(self, k) else None for k in self.PATHS}}

    @classmethod
    def load(cls, name: str, path: Path) -> "ArmData":
        """The ArmData recorded in a prepared.json."""
        done = read_json(path)
        return cls(name, done["fingerprint"], stats=done["stats"],
                   **{k: Path(done[k]) if done[k] else None for k in cls.PATHS})


def cli_flags(options: dict) -> list[str]:
    """Command-line flags of an options mapping: ``{k: 3, skip-bad: true, thresholds: [0.2, 0.3],
    pipeline_options: {max_sequence_length: 256}}`` -> ``--k 3 --skip-bad --thresholds 0.2 0.3
    --pipeline_options max_sequence_length=256`` (false / null values are left out)."""
    flags = []
    for key, value in options.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, dict):
            flags += [f"--{key}", ",".join(f"{k}={v}" for k, v in value.items())]
        elif value is not False and value is not None:
            flags += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return flags


def run_stage(name: str, script: str, args: list[str], log_path: Path) -> None:
    """Run a stage script of this repository in a fresh process (in the current directory, so relative
    paths in the options mean what they mean to the user); its output goes to ``log_path``."""
    cmd = [sys.executable, str(REPO_ROOT / script), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: %s (output in %s)", name, " ".join(cmd[1:]), log_path)
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise InstSynthError(log_path, f"{name} failed with exit code {code}:\n{tail}")


class Preparer:
    """Builds (or finds already built) the data of every arm of an experiment."""

    def __init__(self, exp: Experiment):
        self.exp, self.out = exp, exp.output_dir.resolve()
        self.data: dict[str, ArmData] = {}

    def _coco(self, root: Path, splits: tuple[str, ...]) -> None:
        convert_cityscapes_to_coco(root, splits=splits, workers=self.exp.workers, **self.exp.coco)

    def _finish(self, arm: str, fp: str, json_file: Path | None, image_root: Path | None,
                dataset_root: Path | None) -> ArmData:
        stats = coco_stats(read_json(json_file)) if json_file else {}
        data = ArmData(arm, fp, json_file, image_root, dataset_root, stats)
        write_json(self.out / "data" / arm / PREPARED_FILE, data.as_json())
        return data

    def _done(self, arm: str, fp: str) -> ArmData | None:
        try:
            done = ArmData.load(arm, self.out / "data" / arm / PREPARED_FILE)
        except (InstSynthError, KeyError, TypeError):
            return None
        ok = done.fingerprint == fp and (done.json_file or done.dataset_root / "annotations").exists()
        return done if ok else None

    def baseline(self, arm: Arm) -> ArmData:
        from instsynth.stages.assemble import assemble_dataset

        e = self.exp
        root = self.out / "data" / arm.name
        splits = (e.train_split, e.test_split)
        fp = fingerprint({"dataset": str(e.dataset.resolve()), "splits": splits, "coco": e.coco})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        log.info("arm %s: original %s splits -> %s", arm.name, "/".join(splits), root)
        assemble_dataset(e.dataset, root, mode=e.assemble_mode, splits=splits)
        self._coco(root, splits)
        return self._finish(arm.name, fp, None, None, root)

    def instsynth(self, arm: Arm) -> ArmData:
        from instsynth.stages.label_crops import drop_color_and_label_ids

        e, spec = self.exp, arm.spec
        root = self.out / "data" / arm.name
        stage_opts = {s: dict(spec.get(s) or {}) for s in STAGES}
        baseline_ap = self.baseline_budget(arm, stage_opts)
        shared = fingerprint({"dataset": str(e.dataset.resolve()), "split": e.train_split,
                              "selection": stage_opts["selection"], "generation": stage_opts["generation"],
                              **({"baseline_ap": baseline_ap} if baseline_ap else {})})
        fp = fingerprint({"shared": shared, "filter": stage_opts["filter"], "integration": stage_opts["integration"],
                          "coco": e.coco})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        work = self.out / "work" / shared
        logs = root / "logs"
        sel, gen = work / "selection", work / "generation"
        mode = stage_opts["generation"].get("mode") or "recolor"
        mode_dir = gen / MODE_NAMES.get(MODE_ALIASES.get(mode, mode), "Recolor")
        steps = [("selection", ["--train_folder", str(e.dataset.resolve()), "--split", e.train_split, "--out", str(sel)]),
                 ("generation", ["--metadata", str(sel / "metadata.json"), "--folder", str(gen)])]
        if stage_opts["filter"]:
            steps.append(("filter", ["--manifest", str(mode_dir / "generation.json")]))
        steps.append(("integration", ["--inpainting_dir", str(mode_dir), "--metadata_path", str(sel / "metadata.json"),
                                      "--cropped_region_coordinates", str(sel / "cropped_region_coordinates.json"),
                                      "--output_folder_name", str(root)]))
        for stage, fixed in steps:
            run_stage(f"arm {arm.name}: {stage}", STAGES[stage][0], fixed + cli_flags(stage_opts[stage]),
                      logs / f"{stage}.log")
        drop_color_and_label_ids(root / "cropped_region_coordinates.json", workers=e.workers)
        self._coco(root, (e.train_split,))
        return self._finish(arm.name, fp, coco_json_path(root, e.train_split), root / "leftImg8bit" / e.train_split,
                            root)

    def baseline_budget(self, arm: Arm, stage_opts: dict) -> dict | None:
        """``budget_from_baseline: true``: stage 1 and generation get ``--balance ap --baseline_metrics`` of
        the baseline arm's first seed (trained before this arm is prepared); returns that file's metrics."""
        if not arm.spec.get("budget_from_baseline"):
            return None
        metrics = baseline_metrics_path(self.exp)
        if not metrics.is_file():
            raise InstSynthError(metrics, f"arm {arm.name!r} is budgeted from the baseline's AP: train the baseline "
                                          "arm first (run the experiment without --prepare_only)")
        for stage in ("selection", "generation"):
            stage_opts[stage].update(balance="ap", baseline_metrics=str(metrics))
        return read_json(metrics)

    def target_count(self, arm: Arm) -> int:
        """Extra images a duplicate / copy_paste arm adds: ``num_images`` or those of its matched arm."""
        count = arm.spec.get("num_images")
        if count is None:
            count = self.data[arm.spec["match"]].stats.get("images", 0)
        if int(count) < 1:
            raise InstSynthError(self.exp.path, f"arm {arm.name!r} would add {count} images (num_images or the "
                                                f"extra images of {arm.spec.get('match')!r}); it needs at least 1")
        return int(count)

    def duplicate(self, arm: Arm) -> ArmData:
        e = self.exp
        base = self.data[e.baseline]
        count = self.target_count(arm)
        fp = fingerprint({"baseline": base.fingerprint, "count": count})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        root = base.dataset_root
        coco = read_json(coco_json_path(root, e.train_split))
        json_file = self.out / "data" / arm.name / "annotations" / f"instancesonly_filtered_gtFine_{e.train_split}.json"
        write_json(json_file, repeat_images(coco, count), indent=None)
        return self._finish(arm.name, fp, json_file, root / "leftImg8bit" / e.train_split, root)

    def copy_paste(self, arm: Arm) -> ArmData:
        from .copy_paste import CopyPasteParams, copy_paste_dataset

        e = self.exp
        count = self.target_count(arm)
        options = dict(arm.spec.get("options") or {})
        if "scale_range" in options:
            options["scale_range"] = tuple(options["scale_range"])
        try:
            params = CopyPasteParams(**options)
        except TypeError as exc:
            raise InstSynthError(e.path, f"arm {arm.name!r}: bad copy_paste options ({exc})") from None
        fp = fingerprint({"dataset": str(e.dataset.resolve()), "split": e.train_split, "count": count,
                          "params": params, "coco": e.coco})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        root = self.out / "data" / arm.name
        copy_paste_dataset(e.dataset, root, count, e.train_split, params, e.workers)
        self._coco(root, (e.train_split,))
        return self._finish(arm.name, fp, coco_json_path(root, e.train_split), root / "leftImg8bit" / e.train_split,
                            root)

    def prepare(self, arms: list[Arm]) -> dict[str, ArmData]:
        """Data of ``arms`` (and of the arms they depend on), in dependency order."""
        e = self.exp
        needed = {a.name for a in arms} | {e.baseline}
        needed |= {a.spec["match"] for a in e.arms if a.name in needed and a.spec.get("match")}
        order = sorted((a for a in e.arms if a.name in needed), key=lambda a: a.kind in CONTROLS)
        for arm in order:
            self.data[arm.name] = getattr(self, arm.kind)(arm)
        return self.data


def repeat_images(coco: dict, count: int) -> dict:
    """A COCO dict of ``count`` images cycling through ``coco``'s images (new ids, same files and annotations)."""
    images = coco["images"]
    if count and not images:
        raise InstSynthError("duplicate", "the baseline train split has no images to repeat")
    per_image: dict[Any, list] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    new_images, new_anns = [], []
    for j in range(count):
        image = images[j % len(images)]
        new_images.append({**image, "id": j + 1, "repeat_of": image["id"]})
        new_anns += [{**a, "id": len(new_anns) + n + 1, "image_id": j + 1} for n, a in enumerate(per_image.get(image["id"], []))]
    return {**coco, "images": new_images, "annotations": new_anns}


# --------------------------------------------------------------------------- training
@dataclass
class RunSpec:
    """One training run: picklable, so that ``--num-gpus`` worker processes can register its datasets."""

    arm: str
    seed: int
    output_dir: Path
    config: Path
    opts: list
    datasets: dict[str, tuple]  # name -> (json_file, image_root, dataset_root)
    train_names: tuple[str, ...]

    def cfg(self):
        from instsynth.config import load_config

        return load_config(self.config, [*self.opts, "DATASETS.TRAIN", self.train_names, "DATASETS.TEST", (TEST_NAME,),
                                         "SEED", self.seed, "OUTPUT_DIR", str(self.output_dir)])


def register(spec: RunSpec) -> None:
    from instsynth.data.catalog import register_coco_instances

    for name, (json_file, image_root, dataset_root) in spec.datasets.items():
        register_coco_instances(name, json_file, image_root, dataset_root)


def train_run(spec: RunSpec) -> None:
    """Register the run's datasets and train + evaluate it (resuming from its last checkpoint if any)."""
    from instsynth.engine.trainer import run

    register(spec)
    try:
        run(spec.cfg(), resume=True)
    finally:
        from accelerate.state import AcceleratorState

        # accelerate's state is a process-wide singleton: leave none behind for what runs next in this process
        AcceleratorState._reset_state(reset_partial_state="WORLD_SIZE" not in os.environ)
        root = logging.getLogger("instsynth")  # stop writing this process's later log lines into the run's log.txt
        for handler in list(root.handlers):
            if str(getattr(handler, "baseFilename", "")).startswith(str(spec.output_dir.resolve()) + os.sep):
                root.removeHandler(handler)
                handler.close()


def baseline_metrics_path(exp: Experiment) -> Path:
    """inference/metrics.json of the baseline arm's first seed (what ``budget_from_baseline`` arms read)."""
    return exp.output_dir.resolve() / "runs" / exp.baseline / f"seed_{exp.seeds[0]}" / "inference" / "metrics.json"


def run_specs(exp: Experiment, arms: list[Arm], data: dict[str, ArmData]) -> list[RunSpec]:
    """A RunSpec per (arm, seed): baseline train set + the arm's extra images, tested on the original test split."""
    from instsynth.config import load_config

    root = data[exp.baseline].dataset_root
    common = {TEST_NAME: (coco_json_path(root, exp.test_split), root / "leftImg8bit" / exp.test_split, root),
              BASELINE_NAME: (coco_json_path(root, exp.train_split), root / "leftImg8bit" / exp.train_split, root)}
    base_images = coco_stats(read_json(coco_json_path(root, exp.train_split)))["images"]
    max_iter = load_config(exp.train_config, exp.train_opts).SOLVER.MAX_ITER
    specs = []
    for arm in arms:
        d = data[arm.name]
        datasets, names = dict(common), (BASELINE_NAME,)
        if d.json_file is not None:
            extra = f"experiment_{arm.name}_extra"
            datasets[extra] = (d.json_file, d.image_root, d.dataset_root)
            names += (extra,)
        opts = list(exp.train_opts)
        if exp.schedule == "same_epochs":
            opts += ["SOLVER.MAX_ITER", max(1, round(max_iter * (base_images + d.stats.get("images", 0)) / base_images))]
        for seed in exp.seeds:
            specs.append(RunSpec(arm.name, seed, exp.output_dir.resolve() / "runs" / arm.name / f"seed_{seed}",
                                 exp.train_config.resolve(), opts, datasets, names))
    return specs


def run_fingerprint(spec: RunSpec, data: ArmData, base: ArmData) -> str:
    """What a run's result depends on: the merged config (without OUTPUT_DIR) and the data of its datasets."""
    cfg = spec.cfg().clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    return fingerprint({"config": cfg.dump(), "data": [base.fingerprint, data.fingerprint]})


def run_state(spec: RunSpec) -> dict:
    """The run's experiment_run.json ({} if it never started); ``done`` only with its final metrics.json."""
    path = spec.output_dir / RUN_FILE
    state = read_json(path) if path.is_file() else {}
    if state.get("done") and not (spec.output_dir / "inference" / "metrics.json").is_file():
        state["done"] = False
    return state


def train_all(exp: Experiment, specs: list[RunSpec], data: dict[str, ArmData]) -> dict[str, int]:
    """Train every run that is not finished; counts of runs trained and skipped."""
    from instsynth.engine.launch import launch

    base = data[exp.baseline]
    counts = {"trained": 0, "skipped": 0}
    for spec in progress(specs, "experiment runs"):
        fp = run_fingerprint(spec, data[spec.arm], base)
        state_path, state = spec.output_dir / RUN_FILE, run_state(spec)
        if state and state.get("fingerprint") != fp:
            raise InstSynthError(spec.output_dir, "was trained with other settings or data than this experiment "
                                                  "config; delete the folder to retrain it, or use another output_dir")
        if state.get("done"):
            log.info("arm %s seed %d: finished, not retrained", spec.arm, spec.seed)
            counts["skipped"] += 1
            continue
        log.info("arm %s seed %d: training -> %s", spec.arm, spec.seed, spec.output_dir)
        write_json(state_path, {"arm": spec.arm, "seed": spec.seed, "fingerprint": fp, "done": False})
        launch(train_run, exp.num_gpus, args=(spec,))
        write_json(state_path, {"arm": spec.arm, "seed": spec.seed, "fingerprint": fp, "done": True})
        counts["trained"] += 1
    return counts


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
    root = data[base_arm].dataset_root
    train_coco = read_json(coco_json_path(root, exp.train_split))
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


# --------------------------------------------------------------------------- entry point
def run_experiment(exp: Experiment, arms: list[str] | None = None, prepare_only: bool = False,
                   table_only: bool = False) -> dict:
    """Prepare the data of every arm, train every unfinished (arm, seed), write and return the results."""
    chosen = [a for a in exp.arms if arms is None or a.name in arms]
    unknown = sorted(set(arms or ()) - {a.name for a in exp.arms})
    if unknown:
        raise InstSynthError(exp.path, f"unknown arm(s) {unknown}; arms: {[a.name for a in exp.arms]}")
    out = exp.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if table_only:
        data = {a.name: ArmData.load(a.name, out / "data" / a.name / PREPARED_FILE)
                for a in exp.arms if (out / "data" / a.name / PREPARED_FILE).is_file()}
        chosen = [a for a in chosen if a.name in data]
    else:
        chained = {a.name for a in exp.arms if a.spec.get("budget_from_baseline")}
        waiting = [a for a in chosen if a.name in chained or a.spec.get("match") in chained]
        preparer = Preparer(exp)
        data = preparer.prepare([a for a in chosen if a not in waiting])
        if waiting and not prepare_only:  # the baseline's first seed, then the arms budgeted from its AP
            first = [s for s in run_specs(exp, [a for a in exp.arms if a.name == exp.baseline], data)
                     if s.seed == exp.seeds[0]]
            train_all(exp, first, data)
            data = preparer.prepare(chosen)
        elif waiting:
            log.info("prepare only: arms %s wait for the baseline's AP", [a.name for a in waiting])
        data.update({a.name: ArmData.load(a.name, out / "data" / a.name / PREPARED_FILE) for a in exp.arms
                     if a.name not in data and (out / "data" / a.name / PREPARED_FILE).is_file()})  # for the table
    specs = run_specs(exp, [a for a in exp.arms if a.name in data], data)
    counts = {"trained": 0, "skipped": 0}
    if table_only:
        counts["skipped"] = sum(bool(run_state(s).get("done")) for s in specs)  # the runs the table holds
    elif not prepare_only:
        counts = train_all(exp, [s for s in specs if s.arm in {a.name for a in chosen}], data)
    results = {**collect_results(exp, specs, data), "runs": counts}
    write_json(out / "results.json", results)
    write_bytes(out / "results.md", format_results(results).encode())
    return results


@command
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instsynth.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/experiments/)")
    parser.add_argument("--output", default=None, help="output folder (default: output_dir of the config)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to prepare and train (default: all)")
    parser.add_argument("--prepare_only", action="store_true", help="build the arms' data, train nothing")
    parser.add_argument("--table_only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args(argv)
    exp = load_experiment(args.config, args.output)
    results = run_experiment(exp, args.arms.split(",") if args.arms else None, args.prepare_only, args.table_only)
    print(format_results(results))
    print(f"runs trained: {results['runs']['trained']}, already finished: {results['runs']['skipped']}"
          + (" (tabulated)" if args.table_only else ""))
    print(f"table: {exp.output_dir / 'results.md'}  numbers: {exp.output_dir / 'results.json'}")


if __name__ == "__main__":
    main()
