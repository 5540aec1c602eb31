"""The data of each arm: the baseline's splits, repeated images, copy-paste images or a full InstSynth run, each prepared once (prepared.json)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from instsynth.core.lock import EXPERIMENT_LOCK, WAIT_ENV, output_lock
from instsynth.stages.coco_conversion import coco_json_path, convert_cityscapes_to_coco
from instsynth.experiments.dataset import extra_images_file
from instsynth.generation.common import MODE_ALIASES, MODE_NAMES
from instsynth.core.io import InstSynthError, get_logger, read_json, write_json
from instsynth.core.labels import REPO_ROOT
from instsynth.reports.summary import coco_stats
from instsynth.experiments.config import (CONTROLS, PREPARED_FILE, STAGES, Arm, Experiment, baseline_metrics_path,
                                          fingerprint)

log = get_logger("instsynth.experiment")


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
    env = {**os.environ, WAIT_ENV: "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
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
        if done.json_file:
            there = done.json_file.exists()
        else:  # a COCO baseline has no files of its own
            there = done.dataset_root is None or (done.dataset_root / "annotations").exists()
        return done if done.fingerprint == fp and there else None

    def baseline(self, arm: Arm) -> ArmData:
        from instsynth.stages.assemble import assemble_dataset

        e = self.exp
        root = self.out / "data" / arm.name
        splits = (e.train_split, e.test_split)
        fp = fingerprint({"dataset": e.source.key(splits), "splits": splits, "coco": e.coco})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        if e.source.is_coco:  # the dataset's own COCO files are the baseline's train and test files
            return self._finish(arm.name, fp, None, None, None)
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
        shared = fingerprint({"dataset": e.source.key((e.train_split,)), "split": e.train_split,
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
        steps = [("selection", [*e.source.selection_flags(e.train_split), "--split", e.train_split, "--out", str(sel)]),
                 ("generation", ["--metadata", str(sel / "metadata.json"), "--folder", str(gen)])]
        if stage_opts["filter"]:
            steps.append(("filter", ["--manifest", str(mode_dir / "generation.json")]))
        steps.append(("integration", ["--inpainting_dir", str(mode_dir), "--metadata_path", str(sel / "metadata.json"),
                                      "--cropped_region_coordinates", str(sel / "cropped_region_coordinates.json"),
                                      "--output_folder_name", str(root)]))
        for stage, fixed in steps:
            run_stage(f"arm {arm.name}: {stage}", STAGES[stage][0], fixed + cli_flags(stage_opts[stage]),
                      logs / f"{stage}.log")
        if e.source.is_coco:  # integration wrote the new images and a merged COCO file
            return self._new_images(arm.name, fp, root)
        drop_color_and_label_ids(root / "cropped_region_coordinates.json", workers=e.workers)
        self._coco(root, (e.train_split,))
        return self._finish(arm.name, fp, coco_json_path(root, e.train_split), root / "leftImg8bit" / e.train_split,
                            root)

    def _new_images(self, arm: str, fp: str, root: Path) -> ArmData:
        """A COCO arm's data: the new images of ``root``'s merged file (copy-paste's or integration's)."""
        split = self.exp.train_split
        merged = root / "annotations" / f"instances_{split}_instsynth.json"
        json_file = extra_images_file(merged, root / "annotations" / f"instances_{split}_extra.json")
        return self._finish(arm, fp, json_file, root / "images", None)

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
        train_json, image_root, root = e.split_files(e.train_split, self.data)
        name = f"instances_{e.train_split}_duplicate.json" if e.source.is_coco else \
            f"instancesonly_filtered_gtFine_{e.train_split}.json"
        json_file = self.out / "data" / arm.name / "annotations" / name
        write_json(json_file, repeat_images(read_json(train_json), count), indent=None)
        return self._finish(arm.name, fp, json_file, image_root, root)

    def copy_paste(self, arm: Arm) -> ArmData:
        from instsynth.experiments.copy_paste import CopyPasteParams, copy_paste_dataset

        e = self.exp
        count = self.target_count(arm)
        options = dict(arm.spec.get("options") or {})
        if "scale_range" in options:
            options["scale_range"] = tuple(options["scale_range"])
        try:
            params = CopyPasteParams(**options)
        except TypeError as exc:
            raise InstSynthError(e.path, f"arm {arm.name!r}: bad copy_paste options ({exc})") from None
        fp = fingerprint({"dataset": e.source.key((e.train_split,)), "split": e.train_split, "count": count,
                          "params": params, "coco": e.coco})
        if (done := self._done(arm.name, fp)) is not None:
            return done
        root = self.out / "data" / arm.name
        copy_paste_dataset(e.source.open(e.train_split), root, count, e.train_split, params, e.workers)
        if e.source.is_coco:
            return self._new_images(arm.name, fp, root)
        self._coco(root, (e.train_split,))
        return self._finish(arm.name, fp, coco_json_path(root, e.train_split), root / "leftImg8bit" / e.train_split,
                            root)

    def prepare(self, arms: list[Arm]) -> dict[str, ArmData]:
        """Data of ``arms`` (and of the arms they depend on), in dependency order."""
        e = self.exp
        needed = {a.name for a in arms} | {e.baseline}
        needed |= {a.spec["match"] for a in e.arms if a.name in needed and a.spec.get("match")}
        order = sorted((a for a in e.arms if a.name in needed), key=lambda a: a.kind in CONTROLS)
        for arm in order:  # another machine preparing the same arm: wait for it, then reuse its data
            with output_lock(self.out / "data" / arm.name, wait=True, name=EXPERIMENT_LOCK):
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
