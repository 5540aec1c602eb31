"""Hostile numbers in a COCO file (issue 19): one error line naming the file and the annotation, or a
counted skip with --skip-bad; never a crash inside pycocotools nor a traceback later in integration."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import REPO
from instsynth.formats.coco import load_coco_source
from instsynth.formats.coco_checks import bbox_problems, compressed_runs, polygon_problems, rle_problem
from instsynth.core.io import InstSynthError, read_json

H, W = 256, 512  # the demo images

HOSTILE = {
    "nan coordinate": ({"segmentation": [[float("nan"), 1.0, 5.0, 5.0, 1.0, 9.0]]}, "NaN or infinite"),
    "inf coordinate": ({"segmentation": [[1.0, 1.0, float("inf"), 5.0, 1.0, 9.0]]}, "NaN or infinite"),
    "huge coordinate": ({"segmentation": [[1e8, 1.0, 5.0, 5.0, 1.0, 9.0]]}, "far outside"),
    "undecodable crowd rle": ({"iscrowd": 1, "segmentation": {"size": [H, W], "counts": "abc"}},
                              "not a valid compressed string"),
    "rle of another size": ({"segmentation": {"size": [5, 5], "counts": [25]}}, "differs from its image"),
    "rle not covering its image": ({"segmentation": {"size": [H, W], "counts": [10, 20]}}, "do not cover"),
    "bbox with no area": ({"bbox": [1, 1, 0, 4]}, "no area"),
    "nan bbox": ({"bbox": [1, float("nan"), 3, 4]}, "NaN or infinite"),
}


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1")
    env.pop("INSTSYNTH_DEBUG", None)
    return env


def _cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=_env(), cwd=REPO,
                          timeout=300)


def _hostile_copy(coco_files, tmp_path, change: dict) -> tuple:
    """A copy of the demo train JSON whose first annotation gets ``change``: (path, images, annotation id)."""
    data = read_json(coco_files["train"])
    data["annotations"][0].update(change)
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    return path, coco_files["train"].parent.parent / "images/train", data["annotations"][0]["id"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_number_is_one_line_naming_file_and_annotation(coco_files, tmp_path, case):
    change, message = HOSTILE[case]
    path, images, ann_id = _hostile_copy(coco_files, tmp_path, change)
    run = _cli(REPO / "process_clean_ver.py", "--coco", path, "--images", images, "--out", tmp_path / "sel",
               "--workers", "1")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(path) in last and f"annotation id {ann_id}:" in last and message in last
    source = load_coco_source(path, images, skip_bad=True)  # --skip-bad: left out and listed
    assert source.bad == [{"kind": "annotation", "id": ann_id, "problem": last.split(f"annotation id {ann_id}: ")[1]}]
    assert ann_id not in {a["id"] for anns in source.annotations.values() for a in anns}


def test_skipped_crowd_rle_never_reaches_integration(coco_files, tmp_path):
    """The probe of issue 19: 'counts': 'abc' passed stage 1 and crashed integration; now --skip-bad skips it."""
    path, images, ann_id = _hostile_copy(coco_files, tmp_path, HOSTILE["undecodable crowd rle"][0])
    sel, out = tmp_path / "sel", tmp_path / "out"
    steps = [[REPO / "process_clean_ver.py", "--coco", path, "--images", images, "--out", sel, "--workers", "1",
              "--skip-bad"],
             [REPO / "generation/instance_generation.py", "--mode", "recolor", "--metadata", sel / "metadata.json"],
             [REPO / "inpainted_integration.py", "--inpainting_dir", sel / "Recolor", "--output_folder_name", out,
              "--workers", "1", "--skip-bad"]]
    for step in steps:
        run = _cli(*step)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    report = read_json(sel / "selection_report.json")
    assert [b["id"] for b in report["bad_annotations"]] == [ann_id]
    run = _cli(*steps[2][:-1])  # without --skip-bad integration names the annotation in one line
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"annotation id {ann_id}" in run.stderr.strip().splitlines()[-1]


def test_compressed_rle_decoder_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for n in range(200):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8) if n % 5 else np.zeros((h, w), np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        runs = compressed_runs(rle["counts"].decode(), h * w)
        flat = mask.ravel(order="F")
        edges = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
        expected = ([0] if flat[0] else []) + np.diff(edges).tolist()
        assert runs.tolist() == expected
        assert rle_problem({"size": [h, w], "counts": rle["counts"].decode()}, h, w) is None
    assert compressed_runs("abc", 100) is None  # cut off: the last character says more follows
    assert compressed_runs("0\x7f", 100) is None  # outside the alphabet
    assert compressed_runs("", 100) is None
    assert "do not cover" in rle_problem({"size": [2, 2], "counts": [1, 2]}, 2, 2)
    assert "do not cover" in rle_problem({"size": [2, 2], "counts": [5, -1]}, 2, 2)
    assert "list of integers" in rle_problem({"size": [2, 2], "counts": [1.5, 2.5]}, 2, 2)
    assert "size must be" in rle_problem({"size": [2], "counts": [4]}, 2, 2)


def test_file_wide_checks_name_the_right_annotation():
    good = [[10.0, 10.0, 30.0, 10.0, 20.0, 25.0]]
    segs = [good] * 50
    segs[13] = [[10.0, 10.0, float("nan"), 10.0, 20.0, 25.0]]
    segs[21] = [[10.0, 10.0, 30.0, "x", 20.0, 25.0]]
    segs[34] = [[10.0, 10.0, 30.0, 10.0, 20.0, -200.0]]  # more than one image height above it
    segs[40] = [[10.0, 10.0, 30.0, 10.0]]
    problems = polygon_problems(segs, [(100, 50)] * 50)
    assert {i for i, p in enumerate(problems) if p} == {13, 21, 34, 40}
    assert "NaN" in problems[13] and "numbers" in problems[21] and "far outside" in problems[34]
    assert "2 points" in problems[40]
    assert polygon_problems([[[-3.0, -1.0, 51.0, 0.0, 20.0, 101.0]]], [(100, 50)]) == [None]  # a little outside
    boxes = [[1, 1, 5, 5]] * 10
    boxes[2], boxes[5], boxes[7], boxes[9] = [1, 1, 0, 5], [1, 1, 5, float("inf")], [40, 1, 20, 5], [1, 2, 3]
    problems = bbox_problems(boxes, [(100, 50)] * 10, 1.0)
    assert {i for i, p in enumerate(problems) if p} == {2, 5, 7, 9}
    assert "no area" in problems[2] and "infinite" in problems[5] and "outside" in problems[7]
    assert "[x, y, w, h]" in problems[9]


def test_good_file_has_no_problem(coco_files, tmp_path):
    source = load_coco_source(coco_files["train"], coco_files["train"].parent.parent / "images/train")
    assert source.bad == []
    with pytest.raises(InstSynthError, match="annotation id"):
        data = read_json(coco_files["train"])
        data["annotations"][-1]["segmentation"] = [[1, 2, 3, 4, 5, float("-inf")]]
        bad = tmp_path / "minus_inf.json"
        bad.write_text(json.dumps(data))
        load_coco_source(bad, coco_files["train"].parent.parent / "images/train")
