"""Stage 5 (main_defined_clean_ver.py): valid COCO JSON that reproduces the instanceIds masks."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import REPO
from instsynth.stages.coco_conversion import (centre_polygons, coco_json_path, convert_cityscapes_to_coco,
                                              corner_polygons, report_path, rle_encode)
from instsynth.data.coco import load_coco_categories, load_coco_json
from instsynth.core.io import InstSynthError, iter_cityscapes_images, read_png, write_png
from instsynth.core.labels import EVAL_THING_CLASSES, instance_ids_to_label_ids, label_id

SCRIPT = REPO / "cityscapes-to-coco-conversion" / "main_defined_clean_ver.py"


def _hashes(root):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _add_syn_city(root):
    """Copy the first train city to ``<city>_syn`` without its polygons.json files (like stage 2's output)."""
    for top in ("leftImg8bit", "gtFine"):
        city = sorted((root / top / "train").iterdir())[0]
        shutil.copytree(city, city.with_name(city.name + "_syn"),
                        ignore=shutil.ignore_patterns("*_polygons.json"))


@pytest.fixture(scope="module")
def converted(demo_root, tmp_path_factory):
    """Polygon- and RLE-format conversions of a copy of the demo tree with a synthetic city added."""
    out = {}
    for fmt in ("polygon", "rle"):
        root = tmp_path_factory.mktemp(fmt) / "cityscapes"
        shutil.copytree(demo_root, root)
        _add_syn_city(root)
        before = _hashes(root)
        paths = convert_cityscapes_to_coco(root, fmt=fmt, workers=1)
        out[fmt] = root, paths, before
    return out


def _load(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _source_mask(root, split, coco, ann):
    file_name = coco.imgs[ann["image_id"]]["file_name"]
    inst = read_png(root / "gtFine" / split / file_name.replace("_leftImg8bit.png", "_gtFine_instanceIds.png"))
    return inst == ann["instance_id"]


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("fmt", ["polygon", "rle"])
def test_every_annotation_reproduces_its_source_mask(converted, fmt):
    root, paths, _ = converted[fmt]
    for split, path in paths.items():
        assert path == coco_json_path(root, split)
        coco = _load(path)
        anns = coco.dataset["annotations"]
        assert len(anns) > 40
        for ann in anns:
            src = _source_mask(root, split, coco, ann)
            got = coco.annToMask(ann).astype(bool)
            iou = _iou(src, got)
            assert iou >= 0.98 if fmt == "polygon" else iou == 1.0, (split, ann["id"], iou)
            assert ann["area"] == src.sum()
            ys, xs = np.nonzero(src)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            if fmt == "rle":
                assert isinstance(ann["segmentation"]["counts"], str)


def test_polygons_trace_pixel_edges_exactly(converted):
    root, paths, _ = converted["polygon"]
    coco = _load(paths["val"])
    polys = [a for a in coco.dataset["annotations"] if isinstance(a["segmentation"], list)]
    assert len(polys) > 20
    assert all(_iou(_source_mask(root, "val", coco, a), coco.annToMask(a).astype(bool)) == 1.0 for a in polys)


def test_ground_truth_scored_against_itself_gives_ap_1(converted):
    _, paths, _ = converted["polygon"]
    coco = _load(paths["train"])
    dets = []
    for ann in coco.dataset["annotations"]:
        rle = coco.annToRLE(ann)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"]}})
    with contextlib.redirect_stdout(io.StringIO()):
        result = coco.loadRes(dets)
        evaluator = COCOeval(coco, result, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50


def test_images_categories_and_empty_image(converted, demo_root):
    root, paths, _ = converted["polygon"]
    for split, path in paths.items():
        data = json.loads(path.read_text())
        expected = iter_cityscapes_images(root, split, include_generated=True)
        assert [i["file_name"] for i in data["images"]] == [f"{im.city}/{im.left.name}" for im in expected]
        assert all((root / "leftImg8bit" / split / i["file_name"]).is_file() for i in data["images"])
        assert all((i["width"], i["height"]) == (512, 256) for i in data["images"])
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(label_id(n), n) for n in EVAL_THING_CLASSES]
        annotated = {a["image_id"] for a in data["annotations"]}
        empty = [i for i in data["images"] if i["id"] not in annotated]
        assert len(empty) == (2 if split == "train" else 1)  # the demo's empty image (and its _syn copy)
    syn = [i for i in json.loads(paths["train"].read_text())["images"] if "_syn/" in i["file_name"]]
    assert len(syn) == 3


def test_split_instance_keeps_every_part(converted):
    root, paths, _ = converted["polygon"]
    coco = _load(paths["train"])
    split_parts = 0
    for ann in coco.dataset["annotations"]:
        src = _source_mask(root, "train", coco, ann)
        n_parts = cv2.connectedComponents(src.astype(np.uint8), connectivity=8)[0] - 1
        if n_parts > 1 and isinstance(ann["segmentation"], list):
            split_parts += 1
            assert len(ann["segmentation"]) == n_parts
            assert _iou(src, coco.annToMask(ann).astype(bool)) == 1.0
    assert split_parts >= 3  # the car behind the pole in every non-empty image


def test_instance_with_hole_is_rle_and_keeps_the_hole(converted):
    root, paths, _ = converted["polygon"]
    coco = _load(paths["train"])
    holes = 0
    for ann in coco.dataset["annotations"]:
        src = _source_mask(root, "train", coco, ann)
        outer, _ = cv2.findContours(src.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = cv2.drawContours(np.zeros(src.shape, np.uint8), outer, -1, 1, -1).astype(bool)
        hole = filled & ~src
        if ann["iscrowd"] or not hole.any():
            continue
        holes += 1
        assert isinstance(ann["segmentation"], dict)
        got = coco.annToMask(ann).astype(bool)
        assert not got[hole].any() and (got == src).all()
    assert holes >= 1  # the bus with a person in front of it
    report = json.loads(report_path(root, "train").read_text())
    assert report["instances_with_holes_written_as_rle"] == holes


def test_group_regions_are_crowd_rle(converted):
    root, paths, _ = converted["polygon"]
    coco = _load(paths["val"])
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert crowd and all(a["instance_id"] < 1000 and isinstance(a["segmentation"], dict) for a in crowd)
    assert {a["category_id"] for a in crowd} == {label_id("person")}  # demo groups are persongroup (24)
    assert all(a["instance_id"] >= 1000 for a in coco.dataset["annotations"] if not a["iscrowd"])


def test_polygons_json_written_only_where_missing_and_sources_unchanged(converted):
    root, _, before = converted["polygon"]
    after = _hashes(root)
    assert {p: h for p, h in after.items() if p in before} == before  # PNGs and existing polygons untouched
    new = sorted(p for p in after if p not in before and "annotations" not in p.parts)
    syn_gt = sorted((root / "gtFine" / "train").glob("*_syn/*_instanceIds.png"))
    assert [p.name for p in new] == [p.name.replace("instanceIds.png", "polygons.json") for p in syn_gt]
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    for poly_path, inst_path in zip(new, syn_gt):
        ann = Annotation()
        ann.fromJsonFile(str(poly_path))
        labels = np.asarray(createLabelImage(ann, "ids"))
        source = instance_ids_to_label_ids(read_png(inst_path))
        assert (labels == source).mean() > 0.99  # Cityscapes tools redraw the same label map
    report = json.loads(report_path(root, "train").read_text())
    assert report["polygons_json_written"] == len(new) == 3


def test_rerun_is_identical_and_workers_do_not_change_output(converted, tmp_path):
    root, paths, _ = converted["polygon"]
    first = {s: p.read_bytes() for s, p in paths.items()}
    copy = tmp_path / "again"
    shutil.copytree(root, copy)
    again = convert_cityscapes_to_coco(copy, fmt="polygon", workers=2)
    assert {s: p.read_bytes() for s, p in again.items()} == first


def test_corner_polygons_are_exact_on_small_and_random_masks():
    person = np.zeros((40, 30), bool)
    cv2.ellipse(person.view(np.uint8), (15, 8), (6, 7), 0, 0, 360, 1, -1)
    person[14:40, 7:23] = True
    person[28:40, 13:17] = False  # legs
    polys, holes = corner_polygons(person)
    coco_poly = [p.ravel().astype(float).tolist() for p in polys]
    assert not holes
    assert _iou(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(coco_poly, 40, 30))).astype(bool), person) == 1.0
    centre = [p.ravel().astype(float).tolist() for p in centre_polygons(person)]
    centre_iou = _iou(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(centre, 40, 30))).astype(bool), person)
    assert centre_iou < 0.95  # what the pixel-centre polygons of the paper's converter lose
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 14, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.9)
        if not mask.any():
            continue
        polys, holes = corner_polygons(mask)
        rles = mask_utils.frPyObjects([p.ravel().astype(float).tolist() for p in polys], int(h), int(w))
        drawn = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
        assert holes or (drawn == mask).all()


def test_rle_encode_matches_pycocotools_on_full_masks():
    rng = np.random.default_rng(1)
    for top, left, h, w in [(0, 0, 5, 7), (3, 4, 6, 2), (10, 0, 6, 12), (0, 9, 16, 3), (15, 11, 1, 1)]:
        local = rng.random((h, w)) < 0.5
        local[0, 0] = local[-1, -1] = True
        full = np.zeros((16, 12), np.uint8, order="F")
        full[top:top + h, left:left + w] = local
        expected = mask_utils.encode(full)
        assert rle_encode(local, top, left, 16, 12) == {"size": [16, 12], "counts": expected["counts"].decode()}


def _tiny_tree(root, instance_ids):
    """A one-image Cityscapes tree (train) with the given instanceIds map."""
    write_png(root / "leftImg8bit/train/town/town_000000_000000_leftImg8bit.png",
              np.zeros((*instance_ids.shape, 3), np.uint8))
    write_png(root / "gtFine/train/town/town_000000_000000_gtFine_instanceIds.png", instance_ids.astype(np.uint16))
    return root


def test_min_area_and_ignored_classes_are_reported(tmp_path):
    inst = np.full((20, 30), 7, np.uint16)
    inst[2:8, 2:8] = 26000  # car, 36 px
    inst[10, 10:13] = 26001  # car, 3 px: too small
    inst[12:18, 20:28] = 29000  # caravan (not evaluated)
    root = _tiny_tree(tmp_path / "ds", inst)
    path = convert_cityscapes_to_coco(root, splits=("train",), workers=1)["train"]
    anns = json.loads(path.read_text())["annotations"]
    assert [a["instance_id"] for a in anns] == [26000]
    report = json.loads(report_path(root, "train").read_text())
    reasons = {d["instance_id"]: d["reason"] for d in report["dropped"]}
    assert reasons.keys() == {26001, 29000}
    assert "min_area" in reasons[26001] and "include-ignored" in reasons[29000]
    assert report["counts"]["car"] == {"instances": 1, "crowd": 0}
    path = convert_cityscapes_to_coco(root, splits=("train",), include_ignored=True, min_area=1, workers=1)["train"]
    data = json.loads(path.read_text())
    assert sorted(a["instance_id"] for a in data["annotations"]) == [26000, 26001, 29000]
    assert {c["name"] for c in data["categories"]} >= {"caravan", "trailer"}


def test_values_that_are_not_cityscapes_ids_are_an_error(tmp_path):
    inst = np.full((20, 30), 7, np.uint16)
    inst[2:8, 2:8] = 500
    root = _tiny_tree(tmp_path / "ds", inst)
    with pytest.raises(InstSynthError, match="town_000000_000000_gtFine_instanceIds.png: value 500"):
        convert_cityscapes_to_coco(root, splits=("train",), workers=1)


@pytest.mark.parametrize("damage, culprit", [
    ("missing_left", "_leftImg8bit.png"),
    ("truncated_left", "_leftImg8bit.png"),
    ("corrupt_middle_left", "_leftImg8bit.png"),  # header and IEND intact: only a decode finds it
    ("corrupt_png", "_gtFine_instanceIds.png"),
    ("bad_polygons", "_gtFine_polygons.json"),
])
def test_bad_input_names_the_file_or_is_a_counted_skip(demo_copy, damage, culprit):
    image = iter_cityscapes_images(demo_copy, "val")[1]
    if damage == "missing_left":
        image.left.unlink()
    elif damage == "truncated_left":
        image.left.write_bytes(image.left.read_bytes()[:-100])
    elif damage == "corrupt_middle_left":
        data = bytearray(image.left.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        image.left.write_bytes(bytes(data))
    elif damage == "corrupt_png":
        image.gt("instanceIds").write_bytes(image.gt("instanceIds").read_bytes()[:200])
    else:
        image.gt("polygons").write_text("{not json")
    for workers in (1, 2):
        with pytest.raises(InstSynthError, match=image.image_id + culprit):
            convert_cityscapes_to_coco(demo_copy, splits=("val",), workers=workers)
    path = convert_cityscapes_to_coco(demo_copy, splits=("val",), workers=1, skip_bad=True)["val"]
    assert len(json.loads(path.read_text())["images"]) == 5
    report = json.loads(report_path(demo_copy, "val").read_text())
    assert report["num_skipped_images"] == 1 and image.image_id + culprit in report["skipped_images"][0]["reason"]


def test_load_coco_json_gives_training_dicts(converted):
    root, paths, _ = converted["polygon"]
    dicts = load_coco_json(paths["train"], root / "leftImg8bit" / "train")
    data = json.loads(paths["train"].read_text())
    assert len(dicts) == len(data["images"])
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
    assert any(not d["annotations"] for d in dicts)
    for d in dicts:
        assert os.path.isabs(d["file_name"]) and os.path.isfile(d["file_name"])
        assert (d["height"], d["width"]) == (256, 512)
        for a in d["annotations"]:
            assert a["bbox_mode"] == "XYWH_ABS" and len(a["bbox"]) == 4
            assert a["category_id"] in {label_id(n) for n in EVAL_THING_CLASSES}
            assert isinstance(a["segmentation"], (list, dict)) and a["iscrowd"] in (0, 1)
    assert [c["name"] for c in load_coco_categories(paths["train"])] == list(EVAL_THING_CLASSES)
    bad = root / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(InstSynthError, match="bad.json"):
        load_coco_json(bad, root)


@pytest.mark.parametrize("cwd", ["script folder", "repo root"])
def test_cli_runs_from_its_folder_and_from_the_repo_root(demo_copy, cwd):
    folder = SCRIPT.parent if cwd == "script folder" else REPO
    script = SCRIPT.name if cwd == "script folder" else str(SCRIPT.relative_to(REPO))
    res = subprocess.run([sys.executable, script, "--dataset", "cityscapes", "--datadir", str(demo_copy),
                          "--splits", "val", "--format", "rle", "--workers", "1"],
                         capture_output=True, text=True, cwd=folder, env={**os.environ, "INSTSYNTH_NO_PROGRESS": "1"})
    assert res.returncode == 0, res.stderr
    assert str(coco_json_path(demo_copy, "val")) in res.stdout
    assert not coco_json_path(demo_copy, "train").exists()
    anns = json.loads(coco_json_path(demo_copy, "val").read_text())["annotations"]
    assert anns and all(isinstance(a["segmentation"], dict) for a in anns)


def test_counts_synthetic_images_and_warns_when_none(demo_copy, caplog):
    with caplog.at_level("INFO", logger="instsynth"):
        convert_cityscapes_to_coco(demo_copy, workers=1)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "stage 5: no synthetic images" in warned[0]
    _add_syn_city(demo_copy)
    caplog.clear()
    with caplog.at_level("INFO", logger="instsynth"):
        convert_cityscapes_to_coco(demo_copy, workers=1)
    said = [r.getMessage() for r in caplog.records if "synthetic images" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(": train 3, val 0") and not caplog.records[0].levelname == "WARNING"
