"""python -m instsynth.data.split: one COCO / LVIS file into train and val by image (issue 20 point 5)."""
import json
import logging
import subprocess
import sys

import pytest

from conftest import REPO
from instsynth.data.coco_split import choose_val, split_coco
from instsynth.core.io import InstSynthError, read_json, write_json


def lvis_file(path, images=20):
    """An LVIS-like file: category 1 on every image, 2 on two images, 3 on one; LVIS fields on all objects."""
    imgs = [{"id": i, "file_name": f"{i:03d}.jpg", "width": 64, "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": [3]}
            for i in range(1, images + 1)]
    anns, n = [], 0
    for img in imgs:
        cats = [1] + ([2] if img["id"] in (4, 9) else []) + ([3] if img["id"] == 7 else [])
        for c in cats:
            n += 1
            anns.append({"id": n, "image_id": img["id"], "category_id": c, "bbox": [1, 1, 10, 10], "area": 100,
                         "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]], "iscrowd": 0})
    cats = [{"id": i, "name": name, "frequency": "r", "synonyms": [name], "image_count": 0, "instance_count": 0}
            for i, name in ((1, "cat"), (2, "dog"), (3, "bow_(weapon)"))]
    return write_json(path, {"info": {"description": "t"}, "licenses": [], "images": imgs, "annotations": anns,
                             "categories": cats})


def test_split_keeps_every_category_in_both_where_possible(tmp_path, caplog):
    src = lvis_file(tmp_path / "trainval.json")
    with caplog.at_level(logging.WARNING):
        summary = split_coco(src, tmp_path / "out", val_fraction=0.25, seed=3)
    train, val = (read_json(tmp_path / "out" / f"trainval_{s}.json") for s in ("train", "val"))
    assert summary.images == {"train": 15, "val": 5}
    ids = {s: {i["id"] for i in d["images"]} for s, d in (("train", train), ("val", val))}
    assert not ids["train"] & ids["val"] and len(ids["train"] | ids["val"]) == 20
    for data, images in ((train, ids["train"]), (val, ids["val"])):
        assert all(a["image_id"] in images for a in data["annotations"])
        assert data["info"] == {"description": "t"} and data["images"][0]["not_exhaustive_category_ids"] == [3]
    assert {a["category_id"] for a in train["annotations"]} == {1, 2, 3}
    assert {a["category_id"] for a in val["annotations"]} == {1, 2}  # dog (2 images) in both
    assert summary.only_in == {"train": ["bow_(weapon)"], "val": []} and "bow_(weapon)" in caplog.text
    assert len(train["annotations"]) + len(val["annotations"]) == 23
    counts = {c["name"]: (c["image_count"], c["instance_count"], c["frequency"]) for c in val["categories"]}
    assert counts == {"cat": (5, 5, "r"), "dog": (1, 1, "r"), "bow_(weapon)": (0, 0, "r")}


def test_split_is_seeded():
    categories = {i: {i % 4} for i in range(40)}
    assert choose_val(list(categories), categories, 8, seed=0) == choose_val(list(categories), categories, 8, seed=0)
    assert choose_val(list(categories), categories, 8, seed=0) != choose_val(list(categories), categories, 8, seed=1)
    val = choose_val(list(categories), categories, 8, seed=5)
    assert len(val) == 8 and {categories[i].pop() for i in val} == {0, 1, 2, 3}


def test_cli_and_bad_input(tmp_path):
    src = lvis_file(tmp_path / "all.json", images=6)
    cmd = [sys.executable, "-m", "instsynth.data.split", str(src), "--val_fraction", "0.5", "--seed", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train: 3 images" in done.stdout and (tmp_path / "all_val.json").is_file()
    bad = tmp_path / "bad.json"
    data = json.loads(src.read_text())
    data["annotations"][0]["image_id"] = 99
    write_json(bad, data)
    done = subprocess.run([sys.executable, "-m", "instsynth.data.split", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "bad.json: annotation id 1: points to image id 99" in done.stderr
    done = subprocess.run(cmd + ["--val-fraction", "1.5"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "between 0 and 1" in done.stderr
    with pytest.raises(InstSynthError, match="a split needs at least 2"):
        split_coco(lvis_file(tmp_path / "one.json", images=1))


def test_stage1_says_which_split_name_it_used(coco_files, tmp_path, caplog):
    from instsynth.stages.selection import select_coco_instances

    with caplog.at_level(logging.INFO, logger="instsynth"):
        path = coco_files["train"]
        select_coco_instances(path, path.parent.parent / "images/train", split="val", k=1, out=tmp_path, workers=1)
    assert "is split 'val'" in caplog.text and "instances_val_instsynth.json" in caplog.text
