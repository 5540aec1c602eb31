"""Experiment harness: arms x seeds on the demo data, resumption, the results table, its statistics,
and the Simple Copy-Paste arm."""
import json

import numpy as np
import pytest
import yaml

from instsynth.experiments.arms import Preparer, cli_flags
from instsynth.experiments.table import gain_interval, mean_std
from instsynth.experiments.config import load_experiment
from instsynth.cli.experiment import main
from instsynth.experiments.harness import run_experiment
from instsynth.experiments.runs import run_specs
from instsynth.core.io import InstSynthError, read_json, read_png

from conftest import REPO

QUICK = REPO / "configs" / "quick_schedules" / "fastinst_R50_quick.yaml"


def write_config(path, dataset, out, arms, seeds=(1, 2), **train_opts):
    opts = {"SOLVER.MAX_ITER": 2, "SOLVER.IMS_PER_BATCH": 1, "SOLVER.CHECKPOINT_PERIOD": 1000, "LOG_PERIOD": 1000,
            "INPUT.MIN_SIZE_TRAIN": [64], "INPUT.CROP.SIZE": [64, 128], "INPUT.MIN_SIZE_TEST": 64,
            "INPUT.MAX_SIZE_TEST": 128, **train_opts}  # tiny: 4 trainings must stay cheap
    path.write_text(yaml.safe_dump({"output_dir": str(out), "dataset": str(dataset), "seeds": list(seeds),
                                    "workers": 1, "train": {"config": str(QUICK), "opts": opts}, "arms": arms}))
    return path


RECOLOR = {"selection": {"k": 2, "workers": 1}, "generation": {"mode": "recolor", "num_samples": 2},
           "integration": {"crops_per_sample": 1, "workers": 1}}


@pytest.fixture(scope="module")
def experiment(demo_root, tmp_path_factory):
    """The harness CLI on the demo data: baseline and an InstSynth (recolor) arm, 2 seeds each."""
    tmp = tmp_path_factory.mktemp("experiment")
    config = write_config(tmp / "exp.yaml", demo_root, tmp / "out", {"baseline": {}, "recolor": RECOLOR})
    main(["--config", str(config)])
    return tmp, config


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.startswith("results.")}


def test_harness_trains_every_arm_and_seed_and_writes_the_table(experiment):
    tmp, _ = experiment
    out = tmp / "out"
    for arm in ("baseline", "recolor"):
        for seed in (1, 2):
            run = out / "runs" / arm / f"seed_{seed}"
            assert (run / "model_final.pth").is_file() and (run / "inference" / "metrics.json").is_file()
            assert f"SEED: {seed}" in (run / "config.yaml").read_text()
    results = read_json(out / "results.json")
    assert results["families"] == ["segm", "cityscapes"] and results["runs"] == {"trained": 4, "skipped": 0}
    base, syn = results["arms"]["baseline"], results["arms"]["recolor"]
    integration = read_json(out / "data" / "recolor" / "integration_report.json")
    assert syn["extra_images"] == integration["new_images"] > 0  # 2 samples x (panorama + crop) per instance
    assert syn["reports"]["integration_report"]["samples_integrated"] == integration["samples_integrated"]
    assert syn["train_images"] == base["train_images"] + syn["extra_images"]  # every synthetic image has instances
    # train images = those training used: the loader drops the baseline's image without instances
    base_log = (out / "runs" / "baseline" / "seed_1" / "log.txt").read_text()
    assert base["train_images"] == base["listed_images"] - 1 and f"training on {base['train_images']} images" in base_log
    for arm in (base, syn):
        ap = arm["metrics"]["segm"]["AP"]
        assert arm["seeds"] == 2 and len(ap["values"]) == 2 and ap["std"] is not None
        assert "AP-car" in arm["metrics"]["segm"] and "AP50" in arm["metrics"]["cityscapes"]
    gain = syn["metrics"]["segm"]["AP"]
    assert gain["gain"] == pytest.approx(gain["mean"] - base["metrics"]["segm"]["AP"]["mean"])
    assert "gain" not in base["metrics"]["segm"]["AP"]
    if gain["no_information"] or base["metrics"]["segm"]["AP"]["no_information"]:  # 2 iterations: AP is 0.0
        assert gain["low"] is None and "No information in this table's AP" in (out / "results.md").read_text()
    else:
        assert gain["low"] <= gain["gain"] <= gain["high"]
    # rare classes: the fewest baseline train instances (classes without any are not rare, they have no AP)
    counts = results["baseline_train_instances"]
    rare = results["rare_classes"]
    assert len(rare) == 3 and all(counts[c] > 0 for c in rare)
    assert max(counts[c] for c in rare) <= min(counts[c] for c in counts if counts[c] and c not in rare)
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| baseline ") or line.startswith("| recolor ")]
    assert len(rows) == 2 * 2  # one row per arm in the COCO and in the Cityscapes table
    assert all(f"| {c} * " in table for c in rare)
    assert " ± " in table and "Welch t interval" in table


def test_rerun_skips_finished_runs_and_prepared_data(experiment, capsys):
    tmp, config = experiment
    before = mtimes(tmp / "out")
    main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert "runs trained: 0, already finished: 4" in printed and "| recolor " in printed
    assert mtimes(tmp / "out") == before  # no stage rerun, no checkpoint or metrics rewritten


def test_new_seed_trains_only_that_run_and_changed_settings_are_refused(experiment, demo_root):
    tmp, _ = experiment
    arms = {"baseline": {}, "recolor": RECOLOR}
    more = write_config(tmp / "more.yaml", demo_root, tmp / "out", arms, seeds=(1, 2, 3))
    results = run_experiment(load_experiment(more), arms=["baseline"])
    assert results["runs"] == {"trained": 1, "skipped": 2}
    assert results["arms"]["baseline"]["seeds"] == 3 and results["arms"]["recolor"]["seeds"] == 2
    changed = write_config(tmp / "changed.yaml", demo_root, tmp / "out", arms, **{"SOLVER.BASE_LR": 0.01})
    with pytest.raises(InstSynthError, match="trained with other settings"):
        run_experiment(load_experiment(changed), arms=["baseline"])


def test_control_arms_match_the_synthetic_arm(experiment, demo_root):
    """duplicate and copy_paste add as many images as the InstSynth arm; only copy-paste adds new instances."""
    tmp, _ = experiment
    arms = {"baseline": {}, "recolor": RECOLOR, "duplicate": {}, "copy_paste": {"options": {"seed": 3}}}
    config = write_config(tmp / "controls.yaml", demo_root, tmp / "out", arms)
    results = run_experiment(load_experiment(config), prepare_only=True)
    extra = read_json(tmp / "out" / "data" / "recolor" / PREPARED)["stats"]["images"]
    dup = read_json(tmp / "out" / "data" / "duplicate" / PREPARED)
    base_coco = read_json(tmp / "out" / "data" / "baseline" / "annotations" / "instancesonly_filtered_gtFine_train.json")
    dup_coco = read_json(dup["json_file"])
    assert len(dup_coco["images"]) == extra and {im["file_name"] for im in dup_coco["images"]} == \
        {im["file_name"] for im in base_coco["images"]}
    per_image = len(base_coco["annotations"]) / len(base_coco["images"])
    assert len(dup_coco["annotations"]) == pytest.approx(extra * per_image, rel=0.35)
    cp = read_json(tmp / "out" / "data" / "copy_paste" / PREPARED)
    assert cp["stats"]["images"] == extra and cp["stats"]["instances"] > dup["stats"]["instances"]
    assert results["runs"] == {"trained": 0, "skipped": 0}
    # same_epochs: each arm gets MAX_ITER x its images / the baseline's (2 iterations on the baseline)
    exp = load_experiment(config)
    exp.schedule = "same_epochs"
    specs = run_specs(exp, exp.arms, Preparer(exp).prepare(exp.arms))
    base_images = len(base_coco["images"])
    iters = {s.arm: s.cfg().SOLVER.MAX_ITER for s in specs}
    assert iters == {"baseline": 2, **dict.fromkeys(("recolor", "duplicate", "copy_paste"),
                                                    round(2 * (base_images + extra) / base_images))}


PREPARED = "prepared.json"


def test_stage_options_become_flags():
    assert cli_flags({"k": 3, "skip-bad": True, "force": False, "prompts": None, "thresholds": [0.2, 0.3],
                      "mode": "recolor"}) == ["--k", "3", "--skip-bad", "--thresholds", "0.2", "0.3", "--mode", "recolor"]
    # a diffusers arm's pipeline options (a YAML mapping) become one KEY=VALUE,... flag
    flags = cli_flags({"mode": "diffusers", "pipeline_options": {"max_sequence_length": 256, "prior_guidance_scale": 4}})
    assert flags == ["--mode", "diffusers", "--pipeline_options", "max_sequence_length=256,prior_guidance_scale=4"]
    from instsynth.generation.common import parse_pipeline_options

    assert parse_pipeline_options(flags[-1]) == {"max_sequence_length": 256, "prior_guidance_scale": 4}


def test_config_errors_name_the_problem(tmp_path, demo_root):
    cases = [({"baseline": {}, "recolor": {"integration": {"output_folder_name": "x"}}}, "set by the harness"),
             ({"recolor": RECOLOR}, "exactly one baseline"),
             ({"baseline": {}, "duplicate": {}}, "match: ARM"),
             ({"baseline": {}, "copy": {"kind": "copy-paste"}}, "kind must be one of")]
    for arms, message in cases:
        path = write_config(tmp_path / "bad.yaml", demo_root, tmp_path / "out", arms)
        with pytest.raises(InstSynthError, match=message):
            load_experiment(path)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "arms": {"baseline": {}}, "seed": 3}))
    with pytest.raises(InstSynthError, match=r"unknown key\(s\) \['seed'\]"):
        load_experiment(path)


def test_gain_interval_is_welch_t_or_bootstrap():
    from scipy import stats

    arm, base = [31.0, 32.0, 33.5, 32.5], [30.0, 30.5, 29.0]
    gain, low, high = gain_interval(arm, base, "t", 0.95)
    ref = stats.ttest_ind(arm, base, equal_var=False).confidence_interval(0.95)
    assert gain == pytest.approx(np.mean(arm) - np.mean(base))
    assert (low, high) == pytest.approx((ref.low, ref.high))
    g, lo, hi = gain_interval(arm, base, "bootstrap", 0.95, samples=4000)
    assert g == gain and lo < gain < hi and hi - lo < high - low  # percentile bootstrap is narrower here
    assert (lo, hi) == gain_interval(arm, base, "bootstrap", 0.95, samples=4000)[1:]  # seeded
    assert min(arm) - max(base) <= lo and hi <= max(arm) - min(base)
    assert gain_interval([1.0], base) == (1.0 - np.mean(base), None, None)
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(np.sqrt(2))) and mean_std([2.0]) == (2.0, None)


def test_gain_interval_keeps_the_hand_written_implementation_values():
    """scipy.stats replaced the hand-written Welch and bootstrap code: the values it gave, recorded before."""
    a1, b1 = [31.0, 32.0, 33.5, 32.5], [30.0, 30.5, 29.0]
    a2, b2 = [10.2, 11.7, 9.9], [8.1, 8.4, 9.6]
    a3, b3 = [0.5, 0.7], [0.1, 0.9, 0.4, 0.3, 0.2]
    recorded = [
        (a1, b1, "t", 0.95, (2.416666666666668, 0.6625349250972656, 4.17079840823607)),
        (a1, b1, "t", 0.9, (2.416666666666668, 1.0417705914737394, 3.7915627418595963)),
        (a1, b1, "bootstrap", 0.95, (2.416666666666668, 1.2916666666666679, 3.541666666666668)),
        (a1, b1, "bootstrap", 0.8, (2.416666666666668, 1.6666666666666679, 3.166666666666668)),
        (a2, b2, "t", 0.95, (1.8999999999999986, -0.13166494134896123, 3.9316649413489584)),
        (a2, b2, "t", 0.9, (1.8999999999999986, 0.34622209130978554, 3.4537779086902116)),
        (a2, b2, "bootstrap", 0.95, (1.8999999999999986, 0.7999999999999989, 2.9999999999999964)),
        (a2, b2, "bootstrap", 0.8, (1.8999999999999986, 1.1999999999999993, 2.599999999999998)),
        (a3, b3, "t", 0.95, (0.21999999999999997, -0.23754244041870365, 0.6775424404187036)),
        (a3, b3, "t", 0.9, (0.21999999999999997, -0.13510063921562265, 0.5751006392156226)),
        (a3, b3, "bootstrap", 0.95, (0.21999999999999997, -0.06000000000000005, 0.4799999999999999)),
        (a3, b3, "bootstrap", 0.8, (0.21999999999999997, 0.040000000000000036, 0.39999999999999997))]
    for arm, base, method, confidence, values in recorded:
        assert gain_interval(arm, base, method, confidence, samples=2000) == pytest.approx(values, rel=1e-12)
    assert gain_interval([2.0, 2.0], [1.0, 1.0]) == (1.0, None, None)  # no variance: no interval
    assert gain_interval([2.0, 2.0], [1.0, 1.0], "bootstrap") == (1.0, None, None)


def test_no_information_names_the_reason():
    from instsynth.experiments.table import no_information, used_images

    assert no_information([0.0, 0.0, 0.0]) == "every value is 0 (3 seeds)"
    assert no_information([1.5, 1.5]) == "no variance over 2 seeds (every value 1.50)"
    assert no_information([1.0, 2.0]) is None and no_information([1.0]) is None
    coco = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"image_id": 1}, {"image_id": 1}, {"image_id": 2, "iscrowd": 1}]}
    assert used_images(coco) == 1  # image 2 holds only a crowd region, image 3 nothing


def test_copy_paste_pastes_whole_source_instances_over_the_target(demo_root, tmp_path):
    from instsynth.experiments.copy_paste import CopyPasteParams, copy_paste_dataset
    from instsynth.core.io import CityscapesImage
    from instsynth.core.labels import colorize, instance_ids_to_label_ids

    report = copy_paste_dataset(demo_root, tmp_path, 8, params=CopyPasteParams(seed=5), workers=1)
    entries = read_json(tmp_path / "copy_paste.json")["images"]
    assert report["new_images"] == len(entries) == 8 and report["instances_pasted"] > 8
    assert len({e["image_id"] for e in entries}) == 8
    for e in entries:
        target = CityscapesImage(demo_root, "train", e["city"], e["target_image_id"])
        rgb, ids = read_png(target.left, rgb=True), read_png(target.gt("instanceIds"))
        out = {k: read_png(tmp_path / p) for k, p in e["outputs"].items()}
        assert e["source_image_id"] != e["target_image_id"] and e["pasted"]
        new_values = [int(v) for v in e["pasted"].values()]
        assert not set(new_values) & set(np.unique(ids).tolist())  # fresh instance ids
        assert all(int(old) // 1000 == new // 1000 for old, new in e["pasted"].items())  # same class
        pasted = np.isin(out["instanceIds"], new_values)
        assert all((out["instanceIds"] == v).sum() >= 16 for v in new_values)
        assert (out["instanceIds"][~pasted] == ids[~pasted]).all()  # occluded instances only lose pixels
        assert (out["leftImg8bit"][~pasted] == rgb[~pasted]).all()
        assert (out["labelIds"] == instance_ids_to_label_ids(out["instanceIds"])).all()
        assert (out["color"] == colorize(out["labelIds"])).all()
    again = copy_paste_dataset(demo_root, tmp_path, 8, params=CopyPasteParams(seed=5), workers=2)
    assert again["files_written"] == 0  # same bytes with two workers: nothing rewritten
    fewer = copy_paste_dataset(demo_root, tmp_path, 5, params=CopyPasteParams(seed=5), workers=1)
    assert len(fewer["stale_images_removed"]) == 3
    assert len(list((tmp_path / "leftImg8bit").rglob("*.png"))) == 5
    assert json.loads((tmp_path / "copy_paste_report.json").read_text())["new_images"] == 5


def test_table_only_reports_mean_std_and_gain_of_the_finished_runs(experiment, tmp_path, capsys):
    """--table_only reads each run's inference/metrics.json: here known numbers give a known table."""
    import shutil

    from scipy import stats

    src, config = experiment
    out = tmp_path / "out"
    shutil.copytree(src / "out" / "runs", out / "runs")
    shutil.copytree(src / "out" / "data", out / "data", symlinks=True)
    ap = {("baseline", 1): 30.0, ("baseline", 2): 31.0, ("recolor", 1): 32.0, ("recolor", 2): 34.0}
    for (arm, seed), value in ap.items():
        path = out / "runs" / arm / f"seed_{seed}" / "inference" / "metrics.json"
        metrics = read_json(path)
        metrics["segm"].update({"AP": value, "AP50": 2 * value, "AP-car": value + 10})
        path.write_text(json.dumps(metrics))
    main(["--config", str(config), "--output", str(out), "--table_only"])
    printed = capsys.readouterr().out
    ref = stats.ttest_ind([32.0, 34.0], [30.0, 31.0], equal_var=False).confidence_interval(0.95)
    row = next(line for line in printed.splitlines() if line.startswith("| recolor "))
    assert "| 33.00 ± 1.41 | 66.00 ± 2.83 |" in row and f"+2.50 [{ref.low:+.2f}, {ref.high:+.2f}]" in row
    assert next(line for line in printed.splitlines() if line.startswith("| car ")).count("(+2.50)") == 1
    assert "runs trained: 0, already finished: 4 (tabulated)" in printed
    assert (out / "results.md").read_text() in printed + "\n"
    assert "No information" not in printed.split("## Cityscapes AP")[0]  # the COCO AP above varies and is not 0


def test_table_says_when_its_values_carry_no_information(experiment, tmp_path, capsys):
    """Every AP 0 (an arm that learned nothing) or no variance: the table says so and prints no interval."""
    import shutil

    src, config = experiment
    out = tmp_path / "out"
    shutil.copytree(src / "out" / "runs", out / "runs")
    shutil.copytree(src / "out" / "data", out / "data", symlinks=True)
    ap = {("baseline", 1): 0.0, ("baseline", 2): 0.0, ("recolor", 1): 3.0, ("recolor", 2): 4.0}
    for (arm, seed), value in ap.items():
        path = out / "runs" / arm / f"seed_{seed}" / "inference" / "metrics.json"
        metrics = read_json(path)
        metrics["segm"].update({"AP": value, "AP50": 0.0 if arm == "baseline" else 5.0})
        path.write_text(json.dumps(metrics))
    main(["--config", str(config), "--output", str(out), "--table_only"])
    printed = capsys.readouterr().out
    coco = printed.split("## COCO mask AP")[1].split("###")[0]
    row = next(line for line in coco.splitlines() if line.startswith("| recolor "))
    assert "+3.50 (no interval)" in row and "[" not in row
    assert "**No information in this table's AP:** baseline: every value is 0 (2 seeds)." in coco
    assert "No interval is printed for a gain that involves these arms." in coco
    cell = read_json(out / "results.json")["arms"]["recolor"]["metrics"]["segm"]["AP"]
    assert cell["low"] is None and cell["high"] is None and cell["no_information"] is None
    for arm, seed in ap:  # now both arms equal over seeds: the whole table is empty of information
        path = out / "runs" / arm / f"seed_{seed}" / "inference" / "metrics.json"
        metrics = read_json(path)
        metrics["segm"]["AP"] = 0.0 if arm == "baseline" else 2.0
        path.write_text(json.dumps(metrics))
    main(["--config", str(config), "--output", str(out), "--table_only"])
    coco = capsys.readouterr().out.split("## COCO mask AP")[1].split("###")[0]
    assert "recolor: no variance over 2 seeds (every value 2.00)" in coco
    assert "Every arm is degenerate: nothing can be concluded from this table" in coco


def test_arm_budgeted_from_the_baseline_ap_is_prepared_after_the_baseline_trained(demo_root, tmp_path):
    """``budget_from_baseline: true``: the baseline's first seed trains, then stage 1 and generation of the arm
    run with --balance ap --baseline_metrics of that run."""
    arms = {"baseline": {}, "ap": {**RECOLOR, "budget_from_baseline": True}}
    config = write_config(tmp_path / "exp.yaml", demo_root, tmp_path / "out", arms, seeds=(1,))
    main(["--config", str(config), "--prepare_only"])
    assert not (tmp_path / "out" / "data" / "ap").exists()  # waits for the baseline's AP
    main(["--config", str(config)])
    out = tmp_path / "out"
    metrics = out / "runs" / "baseline" / "seed_1" / "inference" / "metrics.json"
    works = list((out / "work").glob("*/selection/metadata.json"))
    assert len(works) == 1
    budget = read_json(works[0])["class_budget"]
    assert budget["balance"] == "ap" and budget["baseline_metrics"] == str(metrics)
    assert set(budget["baseline_ap"]) == {k[3:] for k in read_json(metrics)["segm"] if k.startswith("AP-")}
    generation = read_json(works[0].parent.parent / "generation" / "Recolor" / "generation.json")
    assert generation["params"]["budget"]["balance"] == "ap"
    assert (out / "runs" / "ap" / "seed_1" / "inference" / "metrics.json").is_file()


def test_two_harnesses_sharing_an_output_prepare_each_arm_once(demo_root, tmp_path):
    """The multi-machine recipe: two harnesses on one output folder at the same time. The second waits for the
    arm data the first is preparing and reuses it: every stage runs once, and the data equals a lone run's."""
    import os
    import subprocess
    import sys

    config = write_config(tmp_path / "exp.yaml", demo_root, tmp_path / "out", {"baseline": {}, "recolor": RECOLOR},
                          seeds=(1,))
    env = dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "instsynth.experiment", "--config", str(config), "--prepare_only", "--arms", "recolor"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    logs = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    for stage in ("selection", "generation", "integration"):  # each stage's command is logged as it starts
        assert sum(log.count(f"INFO arm recolor: {stage}: ") for log in logs) == 1, (stage, logs)
    assert any("waiting for it" in log for log in logs), logs  # the second run waited for the first
    lone = write_config(tmp_path / "lone.yaml", demo_root, tmp_path / "lone", {"baseline": {}, "recolor": RECOLOR},
                        seeds=(1,))
    main(["--config", str(lone), "--prepare_only", "--arms", "recolor"])
    shared, alone = tmp_path / "out" / "data" / "recolor", tmp_path / "lone" / "data" / "recolor"
    files = sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file() and p.suffix == ".png")
    assert files and files == sorted(p.relative_to(shared) for p in shared.rglob("*") if p.is_file() and p.suffix == ".png")
    assert all((shared / f).read_bytes() == (alone / f).read_bytes() for f in files)


def test_arm_with_a_diffusers_backend_and_the_sam_gate_is_prepared(demo_root, tmp_path):
    """An InstSynth arm can use ``mode: diffusers`` (a tiny FLUX-Fill folder, pipeline options as a mapping), the
    zero-shot ``sam:`` mask gate in ``filter`` and its threshold with a fallback in ``integration``."""
    from instsynth.testing.tiny_models import build_tiny_model
    from instsynth.testing.tiny_sam import build_tiny_sam

    flux, sam = build_tiny_model("flux-fill", tmp_path / "models"), build_tiny_sam(tmp_path / "sam")
    arm = {"selection": {"k": 1, "workers": 1},
           "generation": {"mode": "diffusers", "model_path": str(flux), "steps": 2, "resolution": 32,
                          "guidance_scale": 30, "pipeline_options": {"max_sequence_length": 16}},
           "filter": {"mask_model": f"sam:{sam}", "mask_min_score": -1, "device": "cpu", "workers": 1},
           "integration": {"crops_per_sample": 0, "min_mask_iou": 0.3, "fallback": "original", "workers": 1}}
    config = write_config(tmp_path / "exp.yaml", demo_root, tmp_path / "out", {"baseline": {}, "flux": arm},
                          seeds=(1,))
    main(["--config", str(config), "--prepare_only"])
    out = tmp_path / "out"
    (manifest_path,) = (out / "work").glob("*/generation/Diffusers/generation.json")
    manifest = read_json(manifest_path)
    assert manifest["backend"] == "diffusers" and manifest["model_id"] == str(flux)
    assert manifest["params"]["guidance_scale"] == 30.0
    assert manifest["quality_filter"]["mask_model"] == f"sam:{sam}"
    scores = [s for e in manifest["instances"].values() for s in e["scores"]]
    assert scores and all(0.0 <= s["mask_iou"] <= 1.0 for s in scores)
    report = read_json(out / "data" / "flux" / "integration_report.json")
    gate = report["gate"]
    assert gate["samples"] == len(scores) and gate["accepted"] + gate["fallen_back"] == len(scores)
    assert gate["accepted"] == sum(s["mask_iou"] >= 0.3 for s in scores)
    assert read_json(out / "data" / "flux" / "prepared.json")["stats"]["images"] == report["new_images"] > 0
