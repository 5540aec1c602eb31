"""Training runs of an experiment: one per (arm, seed), each resumable and skipped once finished (experiment_run.json)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path


from instsynth.core.io import InstSynthError, get_logger, progress, read_json, write_json
from instsynth.reports.summary import coco_stats
from instsynth.experiments.arms import ArmData
from instsynth.experiments.config import Arm, BASELINE_NAME, Experiment, RUN_FILE, TEST_NAME, fingerprint

log = get_logger("instsynth.experiment")


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
    from instsynth.data.registry import register_coco_instances

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




def run_specs(exp: Experiment, arms: list[Arm], data: dict[str, ArmData]) -> list[RunSpec]:
    """A RunSpec per (arm, seed): baseline train set + the arm's extra images, tested on the original test split."""
    from instsynth.config import load_config

    common = {TEST_NAME: exp.split_files(exp.test_split, data), BASELINE_NAME: exp.split_files(exp.train_split, data)}
    base_images = coco_stats(read_json(common[BASELINE_NAME][0]))["images"]
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
