"""Stage 1 written once: every format selects, crops and records through one module (issue 17.1)."""
import subprocess
import sys

import pytest

from conftest import REPO
from instsynth.formats import open_dataset
from instsynth.core.io import InstSynthError, read_json, read_png, write_json
from instsynth.core.labels import THING_CLASSES
from instsynth.stages.metadata import load_metadata
from instsynth.stages.selection import select_coco_instances, select_from_dataset, select_instances


def per_image_class_counts(meta):
    counts = {}
    for inst in meta["instances"]:
        counts.setdefault((inst["image_id"], inst["class"]), []).append(inst["area"])
    return counts


def test_folder_selects_what_cityscapes_selects_from_the_root_script(demo_root, folder_root, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "process_clean_ver.py"), "--folder", str(folder_root),
                          "--out", str(tmp_path / "f"), "--workers", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    folder = load_metadata(tmp_path / "f/metadata.json")
    city = read_json(select_instances(demo_root, out=tmp_path / "c", workers=1).metadata)
    assert folder["format"] == "folder" and [c["name"] for c in folder["categories"]] == list(THING_CLASSES)
    assert [(i["key"], i["area"], i["bbox"], i["crop_box"]) for i in folder["instances"]] == \
           [(i["key"], i["area"], i["bbox"], i["crop_box"]) for i in city["instances"]]
    for a, b in zip(folder["instances"], city["instances"]):
        assert read_png(a["crop_mask_path"]).tobytes() == read_png(tmp_path / "c" / b["crop_mask"]).tobytes()
        assert a["instances_path"].is_file()
    report = read_json(tmp_path / "f/selection_report.json")
    assert report["selected_per_class"] == dict(read_json(tmp_path / "c/selection_report.json")["selected_per_class"])


def test_budgets_work_with_coco_as_with_cityscapes(demo_root, coco_files, tmp_path):
    path = coco_files["train"]
    images = path.parent.parent / "images/train"
    plain = read_json(select_coco_instances(path, images, k=1, out=tmp_path / "p", workers=1).metadata)
    budget = read_json(select_coco_instances(path, images, k=1, k_per_class="car=3", out=tmp_path / "b",
                                             workers=1).metadata)
    assert budget["class_budget"]["per_class"] == {"car": 3}
    assert len(budget["instances"]) > len(plain["instances"])
    city = read_json(select_instances(demo_root, k=1, k_per_class="car=3", out=tmp_path / "c", workers=1).metadata)
    assert sorted(per_image_class_counts(budget).values()) == sorted(per_image_class_counts(city).values())
    balanced = read_json(select_coco_instances(path, images, k=1, balance="inverse_freq", out=tmp_path / "i",
                                               workers=1).metadata)
    assert balanced["class_budget"]["balance"] == "inverse_freq"
    assert balanced["class_budget"]["class_counts"] == \
           read_json(select_instances(demo_root, k=1, balance="inverse_freq", out=tmp_path / "j",
                                      workers=1).metadata)["class_budget"]["class_counts"]
    with pytest.raises(InstSynthError, match="unknown (thing )?class 'spaceship'"):
        select_coco_instances(path, images, k_per_class="spaceship=2", out=tmp_path / "x", workers=1)


def test_budget_flags_are_accepted_with_coco(coco_files, tmp_path):
    path = coco_files["train"]
    run = subprocess.run([sys.executable, str(REPO / "process_clean_ver.py"), "--coco", str(path), "--images",
                          str(path.parent.parent / "images/train"), "--k", "1", "--k_per_class", "car=2",
                          "--out", str(tmp_path), "--workers", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_json(tmp_path / "metadata.json")["class_budget"]["per_class"] == {"car": 2}


def test_metadata_of_an_unknown_format_is_refused(folder_root, tmp_path):
    summary = select_from_dataset(open_dataset("folder", folder_root), out=tmp_path, workers=1)
    meta = read_json(summary.metadata)
    meta["instances"][0]["class"] = "bus" if meta["instances"][0]["class"] != "bus" else "car"
    write_json(tmp_path / "edited.json", meta)
    with pytest.raises(InstSynthError, match="edited by hand"):
        load_metadata(tmp_path / "edited.json", check_files=False)
    meta["format"] = "pascal"
    write_json(tmp_path / "edited.json", meta)
    with pytest.raises(InstSynthError, match="unknown dataset format 'pascal'"):
        load_metadata(tmp_path / "edited.json", check_files=False)
