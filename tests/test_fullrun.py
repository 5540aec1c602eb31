"""The bash wrapper runs every stage on the demo dataset, summarises it, and a rerun does no work."""
import os
import subprocess
import sys

import pytest

from instsynth.stages.demo_dataset import write_demo_dataset
from instsynth.core.io import read_json
from instsynth.reports.summary import coco_stats, original_subset

from conftest import REPO

SUMMARY_FILES = ("summary.json", "coco_original")


def _snapshot(*roots):
    """mtime of every output file under the roots (stage reports and the summary describe each run)."""
    return {p: p.stat().st_mtime_ns for r in roots for p in r.rglob("*")
            if p.is_file() and "_report" not in p.name and not any(s in p.parts for s in SUMMARY_FILES)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fullrun")
    write_demo_dataset(tmp / "cityscapes", cities=1, images_per_city=3, size=(512, 256))
    env = dict(os.environ, PYTHON=sys.executable, DATASET_PATH=str(tmp / "cityscapes"),
               OUTPUT_DATASET_PATH=str(tmp / "out"), WORK_DIR=str(tmp / "work"), MODE="recolor", K="2",
               NUM_SAMPLES="2", SEED="3")

    def run():
        return subprocess.run(["bash", str(REPO / "scripts/run_instsynth.sh")], env=env, capture_output=True,
                              text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, run, first


def test_wrapper_runs_every_stage_and_summarises(full_run):
    tmp, _, first = full_run
    for n in range(1, 8):
        assert "==> [" in first.stdout and f"{n}/7" in first.stdout
    summary = read_json(tmp / "work" / "summary.json")
    train = summary["coco"]["train"]
    selected = summary["stages"]["selection"]["instances_selected"]
    assert selected == 4  # k=2 in each of the two non-empty images
    assert summary["stages"]["generation"]["samples_total"] == 2 * selected
    # every sample gives a panorama and one context crop
    assert train["after"]["images"] == train["before"]["images"] + 2 * 2 * selected
    assert train["after"]["instances"] > train["before"]["instances"]
    assert "InstSynth run summary" in first.stdout and "COCO train: images 3 -> 19" in first.stdout
    before = read_json(tmp / "work" / "coco_original" / "instancesonly_filtered_gtFine_train.json")
    assert coco_stats(before) == train["before"]
    classes = summary["classes"]  # every category, with its totals in the split before and after
    assert set(classes) == set(train["before"]["per_class"]), (list(classes), list(train["before"]["per_class"]))
    for name, row in classes.items():
        assert (row["instances"], row["after"]) == (train["before"]["per_class"][name], train["after"]["per_class"][name])
    assert sum(r["selected"] for r in classes.values()) == selected
    unselected = next(n for n, r in classes.items() if not r["selected"])  # listed although stage 1 took none
    row = next(line.split() for line in first.stdout.splitlines() if line.strip().startswith(unselected + " "))
    assert row == [unselected, str(classes[unselected]["instances"]), "2", "0", "2", "0",
                   str(classes[unselected]["after"])]


def test_rerun_does_no_work(full_run):
    tmp, run, _ = full_run
    before = _snapshot(tmp / "out", tmp / "work")
    second = run()
    assert second.returncode == 0, second.stderr[-3000:]
    assert _snapshot(tmp / "out", tmp / "work") == before
    summary = read_json(tmp / "work" / "summary.json")
    assert summary["stages"]["generation"]["samples_written"] == 0


def test_wrapper_rejects_unknown_mode(tmp_path):
    res = subprocess.run(["bash", str(REPO / "scripts/run_instsynth.sh")], capture_output=True, text=True,
                         env=dict(os.environ, MODE="magic", PYTHON=sys.executable))
    assert res.returncode == 2 and "MODE must be" in res.stderr


def test_original_subset_drops_generated_folders():
    coco = {"images": [{"id": 1, "file_name": "a/a_000000_000019_leftImg8bit.png"},
                       {"id": 2, "file_name": "a_syn/a_000000_000019123_leftImg8bit.png"}],
            "annotations": [{"image_id": 1, "category_id": 26}, {"image_id": 2, "category_id": 26},
                            {"image_id": 2, "category_id": 24, "iscrowd": 1}],
            "categories": [{"id": 24, "name": "person"}, {"id": 26, "name": "car"}]}
    sub = original_subset(coco)
    assert [im["id"] for im in sub["images"]] == [1]
    assert coco_stats(sub) == {"images": 1, "instances": 1, "per_class": {"car": 1, "person": 0}}
    assert coco_stats(coco)["instances"] == 2


def test_ap_table_shows_gains_over_the_baseline(tmp_path):
    from instsynth.core.io import InstSynthError, write_json
    from instsynth.reports.summary import ap_table

    def run(name, coco_ap, cs_ap):
        write_json(tmp_path / name / "inference" / "metrics.json",
                   {"segm": {"AP": coco_ap, "AP50": 2 * coco_ap, "AP75": None}, "cityscapes": {"AP": cs_ap, "AP50": 40.0}})
        return tmp_path / name

    table = ap_table([run("baseline", 30.0, 28.0), run("instsynth", 31.5, 29.25)])
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")][:3] == ["run", "test set", "COCO AP"]
    assert "31.50 (+1.50)" in lines[3] and "29.25 (+1.25)" in lines[3] and "63.00 (+3.00)" in lines[3]
    assert lines[2].startswith("baseline") and "(+" not in lines[2]
    with pytest.raises(InstSynthError, match="no metrics.json"):
        ap_table([tmp_path / "missing"])


def test_wrapper_with_diffusers_backend_sam_gate_and_ap_budget(tmp_path):
    """MODE=diffusers (a tiny FLUX-Fill folder, PIPELINE_OPTIONS), MASK_MODEL=sam:FOLDER and BALANCE=ap."""
    import json

    from instsynth.testing.tiny_models import build_tiny_model
    from instsynth.testing.tiny_sam import build_tiny_sam

    write_demo_dataset(tmp_path / "cityscapes", cities=1, images_per_city=3, size=(512, 256))
    metrics = tmp_path / "baseline" / "inference" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"segm": {"AP": 10.0, "AP-car": 40.0, "AP-person": 10.0}}))
    env = dict(os.environ, PYTHON=sys.executable, DATASET_PATH=str(tmp_path / "cityscapes"),
               OUTPUT_DATASET_PATH=str(tmp_path / "out"), WORK_DIR=str(tmp_path / "work"), MODE="diffusers",
               MODEL_PATH=str(build_tiny_model("flux-fill", tmp_path / "models")), STEPS="2", K="1",
               PIPELINE_OPTIONS="max_sequence_length=16", GUIDANCE_SCALE="30", BALANCE="ap",
               BASELINE_METRICS=str(metrics), MASK_MODEL=f"sam:{build_tiny_sam(tmp_path / 'sam')}",
               FALLBACK="original")
    res = subprocess.run(["bash", str(REPO / "scripts/run_instsynth.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = read_json(tmp_path / "work" / "generation" / "Diffusers" / "generation.json")
    assert manifest["backend"] == "diffusers" and manifest["params"]["guidance_scale"] == 30.0
    assert manifest["params"]["budget"]["per_class"] == {"car": 1, "person": 2}  # sqrt(40 / 10)
    assert manifest["quality_filter"]["mask_model"].startswith("sam:")
    assert all("mask_iou" in s for e in manifest["instances"].values() for s in e["scores"])


def test_wrapper_on_a_coco_file_budgets_stage_1_from_the_baseline_ap_and_gates_with_sam(tmp_path):
    """``run_instsynth.sh --coco`` with BALANCE=ap BASELINE_METRICS=..., MASK_MODEL=sam:FOLDER (a tiny SAM 2 where
    transformers has it) and CLIP_MODEL + MIN_CLIP_MARGIN: stage 1 and generation are both budgeted from the
    baseline's per-class AP, and the class-and-shape gate scores every sample."""
    import json

    from instsynth.testing.tiny_eval_models import build_tiny_clip
    from instsynth.testing.tiny_sam import build_tiny_sam, build_tiny_sam2, has_sam2

    data = tmp_path / "demo_coco"
    subprocess.run([sys.executable, "-m", "instsynth.demo", str(data), "--format", "coco", "--cities", "1",
                    "--images-per-city", "3", "--size", "512x256"], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = tmp_path / "baseline" / "inference" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"segm": {"AP": 10.0, "AP-car": 40.0, "AP-person": 10.0}}))
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DATASET_PATH=str(tmp_path / "out"),
               WORK_DIR=str(tmp_path / "work"), MODE="recolor", K="1", BALANCE="ap", BASELINE_METRICS=str(metrics),
               MASK_MODEL=f"sam:{(build_tiny_sam2 if has_sam2() else build_tiny_sam)(tmp_path / 'sam')}",
               MIN_MASK_IOU="0", CLIP_MODEL=str(build_tiny_clip(tmp_path / "clip")), MIN_CLIP_SCORE="-1",
               MIN_CLIP_MARGIN="-2", FALLBACK="original")
    res = subprocess.run(["bash", str(REPO / "scripts/run_instsynth.sh"), "--coco",
                          str(data / "annotations/instances_train.json"), "--images", str(data / "images/train")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    budget = read_json(tmp_path / "work" / "selection" / "metadata.json")["class_budget"]
    assert budget["balance"] == "ap" and budget["baseline_metrics"] == str(metrics)
    assert budget["per_class"]["car"] == 1 and budget["per_class"]["person"] == 2  # sqrt(40 / 10)
    manifest = read_json(tmp_path / "work" / "generation" / "Recolor" / "generation.json")
    assert manifest["params"]["budget"]["balance"] == "ap"
    assert manifest["quality_filter"]["mask_model"].startswith("sam:")
    scores = [s for e in manifest["instances"].values() for s in e["scores"]]
    assert scores and all("mask_iou" in s and "clip_margin" in s for s in scores)
    gate = read_json(tmp_path / "out" / "integration_report.json")["gate"]
    assert gate["criteria"] == {"min_clip_margin": -2.0, "min_clip_score": -1.0, "min_mask_iou": 0.0}
    assert gate["samples"] == len(scores)
