"""The experiment harness on a COCO dataset: every arm's train file is COCO, no Cityscapes conversion."""
import pytest
import yaml

from instsynth.experiments.config import BASELINE_NAME, TEST_NAME, load_experiment
from instsynth.experiments.harness import run_experiment
from instsynth.experiments.runs import run_specs
from instsynth.core.io import InstSynthError, read_json

from conftest import REPO
from test_experiment import QUICK, RECOLOR


def coco_config(path, coco_files, out, arms, seeds=(1,), **opts):
    images = coco_files["train"].parent.parent / "images"
    dataset = {"coco": str(coco_files["train"].parent / "instances_{split}.json"), "images": str(images / "{split}")}
    opts = {"SOLVER.MAX_ITER": 1, "SOLVER.IMS_PER_BATCH": 1, "SOLVER.CHECKPOINT_PERIOD": 1000, "LOG_PERIOD": 1000,
            "INPUT.MIN_SIZE_TRAIN": [64], "INPUT.CROP.SIZE": [64, 128], "INPUT.MIN_SIZE_TEST": 64,
            "INPUT.MAX_SIZE_TEST": 128, "MODEL.FASTINST.NUM_CLASSES": 10, **opts}
    path.write_text(yaml.safe_dump({"output_dir": str(out), "dataset": dataset, "seeds": list(seeds), "workers": 1,
                                    "train": {"config": str(QUICK), "opts": opts}, "arms": arms}))
    return path


def test_every_arm_prepares_its_coco_train_file_without_conversion(coco_files, tmp_path):
    arms = {"baseline": {}, "duplicate": {}, "copy_paste": {"options": {"seed": 3}}, "recolor": RECOLOR}
    exp = load_experiment(coco_config(tmp_path / "exp.yaml", coco_files, tmp_path / "out", arms))
    assert exp.source.is_coco and exp.source.coco_split("val")[0] == coco_files["val"].resolve()
    results = run_experiment(exp, prepare_only=True)
    data = {a: read_json(tmp_path / "out" / "data" / a / "prepared.json") for a in arms}
    baseline = tmp_path / "out" / "data" / "baseline"
    assert data["baseline"]["json_file"] is None and [p.name for p in baseline.iterdir()] == ["prepared.json"]
    integration = read_json(tmp_path / "out" / "data" / "recolor" / "integration_report.json")
    count = integration["new_images"]
    assert count > 0 and all(data[a]["stats"]["images"] == count for a in ("duplicate", "copy_paste", "recolor"))
    train = read_json(coco_files["train"])
    for arm in ("copy_paste", "recolor"):
        root = tmp_path / "out" / "data" / arm
        extra = read_json(data[arm]["json_file"])
        assert len(extra["images"]) == count and extra["categories"] == train["categories"]
        assert all(im["file_name"].startswith("instsynth_syn/train/") for im in extra["images"])
        assert all((root / "images" / im["file_name"]).is_file() for im in extra["images"])
        assert {a["image_id"] for a in extra["annotations"]} <= {im["id"] for im in extra["images"]}
        assert data[arm]["image_root"] == str(root / "images")
        assert not (root / "leftImg8bit").exists() and not list(root.rglob("instancesonly_filtered_gtFine_*"))
    assert any(a["pasted"] for a in read_json(data["copy_paste"]["json_file"])["annotations"])
    duplicate = read_json(data["duplicate"]["json_file"])
    assert {im["file_name"] for im in duplicate["images"]} <= {im["file_name"] for im in train["images"]}
    assert data["duplicate"]["image_root"] == str(coco_files["train"].parent.parent / "images" / "train")
    specs = run_specs(exp, exp.arms, {a.name: Preparer_load(tmp_path, a.name) for a in exp.arms})
    assert specs[0].datasets[BASELINE_NAME][0] == coco_files["train"].resolve()
    assert specs[0].datasets[TEST_NAME][0] == coco_files["val"].resolve()
    assert results["runs"] == {"trained": 0, "skipped": 0}
    again = run_experiment(load_experiment(tmp_path / "exp.yaml"), prepare_only=True)  # prepared arms are reused
    assert read_json(tmp_path / "out" / "data" / "copy_paste" / "prepared.json") == data["copy_paste"]
    assert again["runs"] == results["runs"]


def Preparer_load(tmp_path, arm):
    from instsynth.experiments.arms import ArmData

    return ArmData.load(arm, tmp_path / "out" / "data" / arm / "prepared.json")


def test_tiniest_training_on_coco_arms(coco_files, tmp_path):
    arms = {"baseline": {}, "copy_paste": {"num_images": 2}}
    exp = load_experiment(coco_config(tmp_path / "exp.yaml", coco_files, tmp_path / "out", arms))
    results = run_experiment(exp)
    assert results["runs"] == {"trained": 2, "skipped": 0} and results["families"] == ["segm"]
    assert results["arms"]["copy_paste"]["extra_images"] == 2
    assert results["arms"]["copy_paste"]["train_images"] == results["arms"]["baseline"]["train_images"] + 2


@pytest.mark.parametrize("dataset, message", [
    ({"coco": "a.json", "images": "im"}, "needs '{split}'"),
    ({"coco": "{split}.json"}, "needs dataset.coco"),
    ({"format": "folder", "root": "x"}, "format must be one of"),
    ({"format": "cityscapes"}, "dataset.root"),
    ({"coco": "{split}.json", "images": "im", "bad": 1}, "unknown key"),
    (3, "must be a Cityscapes root or a mapping")])
def test_bad_dataset_forms_are_one_clear_error(tmp_path, dataset, message):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"dataset": dataset, "train": {"config": str(QUICK)}, "arms": {"baseline": {}}}))
    with pytest.raises(InstSynthError, match=message):
        load_experiment(path)


def test_the_coco_demo_config_loads():
    exp = load_experiment(REPO / "configs" / "experiments" / "demo_coco.yaml")
    assert exp.source.kind == "coco" and [a.kind for a in exp.arms] == ["baseline", "duplicate", "copy_paste",
                                                                        "instsynth"]
    cityscapes = load_experiment(REPO / "configs" / "experiments" / "demo.yaml")
    assert cityscapes.source.kind == "cityscapes" and cityscapes.dataset == cityscapes.source.root
