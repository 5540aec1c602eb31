"""Stage 1 (instance selection): what downstream stages and users rely on."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from instsynth.core.io import InstSynthError, iter_cityscapes_images, read_json, read_png, write_json, write_png
from instsynth.stages.selection import (COORDINATES_NAME, METADATA_NAME, REPORT_NAME, SelectionParams, load_metadata,
                                 rank_instances, select_instances, square_crop_box)


def run(root, out, **kw):
    kw.setdefault("workers", 1)
    return select_instances(root, out=out, **kw)


@pytest.fixture(scope="module")
def selected(demo_root, tmp_path_factory):
    """Default stage-1 run (k=3) on the demo train split; returns the loaded metadata."""
    out = tmp_path_factory.mktemp("stage1")
    run(demo_root, out)
    return load_metadata(out / METADATA_NAME)


def expected_ranking(instance_ids, k, min_area=64):
    values, counts = np.unique(instance_ids, return_counts=True)
    cands = [(int(v), int(c)) for v, c in zip(values, counts) if v >= 1000 and c >= min_area]
    return sorted(cands, key=lambda vc: (-vc[1], vc[0]))[:k]


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- selection
def test_selects_k_largest_per_image_in_order(selected, demo_root):
    by_image = {}
    for inst in selected["instances"]:
        by_image.setdefault(inst["image_id"], []).append((inst["instance_id"], inst["area"]))
    images = iter_cityscapes_images(demo_root, "train")
    assert selected["k"] == 3 and len(images) == 6
    for image in images:
        ids = read_png(image.gt("instanceIds"))
        assert by_image.get(image.image_id, []) == expected_ranking(ids, 3), image.image_id
    assert sum(map(len, by_image.values())) == len(selected["instances"]) > 0


def test_report_counts_images_and_skipped_instances(selected, demo_root):
    report = read_json(selected["instances"][0]["crop_rgb_path"].parents[3] / REPORT_NAME)
    images = iter_cityscapes_images(demo_root, "train")
    candidates = {i.image_id: len(expected_ranking(read_png(i.gt("instanceIds")), 1000)) for i in images}
    assert report["images_seen"] == len(images)
    assert report["images_without_instances"] == [name for name, n in candidates.items() if n == 0] != []
    assert report["images_with_instances"] == sum(n > 0 for n in candidates.values())
    assert report["instances_selected"] == len(selected["instances"])
    assert report["instances_skipped"]["beyond_k"] == sum(max(0, n - 3) for n in candidates.values())
    assert report["bad_images"] == []


def test_ties_are_broken_by_instance_id():
    ids = np.zeros((10, 10), np.uint16)
    ids[0, :4], ids[1, :4], ids[2, :4], ids[3, :6] = 26005, 24001, 26002, 33000
    ids[4, :2] = 24  # a group region is never selected
    chosen, skipped = rank_instances(ids, SelectionParams(k=3, min_area=1))
    assert chosen == [(33000, 6), (24001, 4), (26002, 4)]
    assert skipped["beyond_k"] == 1 and skipped["group_region"] == 1


def test_classes_and_min_area_filter(demo_root, tmp_path):
    run(demo_root, tmp_path, k=5, classes=["person"], min_area=200)
    meta = load_metadata(tmp_path / METADATA_NAME)
    assert meta["instances"] and {i["class"] for i in meta["instances"]} == {"person"}
    assert min(i["area"] for i in meta["instances"]) >= 200
    report = read_json(tmp_path / REPORT_NAME)
    assert report["instances_skipped"]["class_not_selected"] > 0 and report["instances_skipped"]["below_min_area"] > 0


def test_generated_city_folders_are_skipped(demo_copy, tmp_path):
    city = iter_cityscapes_images(demo_copy, "train")[0].city
    shutil.copytree(demo_copy / "gtFine" / "train" / city, demo_copy / "gtFine" / "train" / f"{city}_syn")
    run(demo_copy, tmp_path)
    assert not any(i["city"].endswith("_syn") for i in load_metadata(tmp_path / METADATA_NAME)["instances"])


# --------------------------------------------------------------------------- crops
def test_crop_box_square_inside_image_and_around_instance(selected):
    for inst in selected["instances"]:
        (bx0, by0, bx1, by1), (x0, y0, x1, y1) = inst["bbox"], inst["crop_box"]
        assert x1 - x0 == y1 - y0 == max(bx1 - bx0, by1 - by0), inst["key"]
        assert 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 256
        assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1


@pytest.mark.parametrize("bbox, context, expected", [
    ((100, 40, 140, 60), 1.0, (100, 30, 140, 70)),    # centred on the short side
    ((0, 10, 30, 20), 1.0, (0, 0, 30, 30)),           # shifted down, not padded, at the top edge
    ((480, 240, 512, 250), 1.0, (480, 224, 512, 256)),  # shifted up/left at the bottom-right edge
    ((100, 100, 120, 120), 1.5, (95, 95, 125, 125)),  # context
    ((0, 0, 500, 20), 1.0, (0, 0, 500, 256)),         # taller than the image: clamped, not square
])
def test_square_crop_box(bbox, context, expected):
    assert square_crop_box(bbox, 512, 256, context) == expected


def test_crops_hold_exactly_the_instance(selected):
    for inst in selected["instances"]:
        x0, y0, x1, y1 = inst["crop_box"]
        mask, rgb = read_png(inst["crop_mask_path"]), read_png(inst["crop_rgb_path"], rgb=True)
        ids, left = read_png(inst["instance_ids_path"]), read_png(inst["image_path"], rgb=True)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, ids[y0:y1, x0:x1] == inst["instance_id"]), inst["key"]
        assert np.array_equal(rgb, left[y0:y1, x0:x1])
        assert int((mask == 255).sum()) == inst["area"]


def test_coordinates_file_matches_metadata(selected):
    coords = read_json(selected["instances"][0]["crop_rgb_path"].parents[3] / COORDINATES_NAME)
    assert [(c["key"], c["cropped_instance_mask"], c["bbox_coordinate"]) for c in coords] == \
        [(i["key"], i["crop_mask"], i["crop_box"]) for i in selected["instances"]]


# --------------------------------------------------------------------------- determinism, idempotence
def test_same_bytes_for_any_worker_count(demo_root, tmp_path):
    run(demo_root, tmp_path / "w1", workers=1)
    run(demo_root, tmp_path / "w2", workers=2)
    one, two = files_under(tmp_path / "w1"), files_under(tmp_path / "w2")
    assert one.keys() == two.keys() and len(one) > 3
    assert all(one[name].read_bytes() == two[name].read_bytes() for name in one)


def test_rerun_rewrites_nothing_and_repairs_a_damaged_crop(demo_root, tmp_path):
    run(demo_root, tmp_path)
    before = {name: p.stat().st_mtime_ns for name, p in files_under(tmp_path).items()}
    summary = run(demo_root, tmp_path, workers=2)
    assert summary.crops_written == 0
    assert {name: p.stat().st_mtime_ns for name, p in files_under(tmp_path).items()} == before
    crop = load_metadata(tmp_path / METADATA_NAME)["instances"][0]["crop_rgb_path"]
    good = crop.read_bytes()
    crop.write_bytes(good[:100])
    assert run(demo_root, tmp_path).crops_written == 1 and crop.read_bytes() == good


def test_rerun_with_smaller_k_removes_the_crops_it_no_longer_lists(demo_root, tmp_path):
    run(demo_root, tmp_path, k=3)
    summary = run(demo_root, tmp_path, k=1)
    listed = {p for i in load_metadata(tmp_path / METADATA_NAME)["instances"] for p in (i["crop_rgb"], i["crop_mask"])}
    assert summary.stale_removed > 0
    assert {n for n in files_under(tmp_path) if n.startswith("crops/")} == listed


# --------------------------------------------------------------------------- bad input
def first_image(root):
    return iter_cityscapes_images(root, "train")[0]


def damage_missing_left(root):
    first_image(root).left.unlink()
    return first_image(root).left


def damage_truncated_ids(root):
    path = first_image(root).gt("instanceIds")
    path.write_bytes(path.read_bytes()[:200])
    return path


def damage_corrupt_left(root):
    path = first_image(root).left
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return path


def damage_uint8_ids(root):
    path = first_image(root).gt("instanceIds")
    write_png(path, (read_png(path) // 1000).astype(np.uint8))
    return path


def damage_wrong_size_ids(root):
    path = first_image(root).gt("instanceIds")
    write_png(path, read_png(path)[:128])
    return path


def damage_rgb_ids(root):
    path = first_image(root).gt("instanceIds")
    write_png(path, np.repeat(read_png(path)[..., None], 3, axis=2))
    return path


DAMAGES = [damage_missing_left, damage_truncated_ids, damage_corrupt_left, damage_uint8_ids,
           damage_wrong_size_ids, damage_rgb_ids]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[len("damage_"):])
def test_bad_image_is_an_error_naming_the_file(demo_copy, tmp_path, damage):
    bad_path = damage(demo_copy)
    with pytest.raises(InstSynthError) as err:
        run(demo_copy, tmp_path, workers=2)
    assert err.value.path == bad_path and str(bad_path) in str(err.value)
    assert not (tmp_path / METADATA_NAME).exists()


@pytest.mark.parametrize("damage", [damage_truncated_ids, damage_wrong_size_ids], ids=["truncated", "wrong_size"])
def test_skip_bad_reports_the_image_and_keeps_the_rest(demo_copy, demo_root, tmp_path, damage):
    bad_path, bad_id = damage(demo_copy), first_image(demo_copy).image_id
    summary = run(demo_copy, tmp_path / "skip", skip_bad=True)
    report = read_json(tmp_path / "skip" / REPORT_NAME)
    assert summary.bad_images == 1
    assert [(b["image_id"], b["path"]) for b in report["bad_images"]] == [(bad_id, str(bad_path))]
    assert report["bad_images"][0]["problem"]
    kept = load_metadata(tmp_path / "skip" / METADATA_NAME)["instances"]
    run(demo_root, tmp_path / "clean")
    full = load_metadata(tmp_path / "clean" / METADATA_NAME)["instances"]
    assert [i["key"] for i in kept] == [i["key"] for i in full if i["image_id"] != bad_id]


def test_empty_dataset_and_bad_parameters(demo_root, tmp_path):
    (tmp_path / "empty" / "gtFine" / "train" / "somecity").mkdir(parents=True)
    with pytest.raises(InstSynthError, match="empty dataset"):
        run(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(InstSynthError, match="folder not found"):
        run(tmp_path / "nothing", tmp_path / "out")
    for bad in (dict(k=0), dict(k=-2), dict(context=0.5), dict(classes=["sky"]), dict(min_area=-1)):
        with pytest.raises(InstSynthError) as err:
            run(demo_root, tmp_path / "out", **bad)
        assert str(demo_root) in str(err.value)
    assert not (tmp_path / "out" / METADATA_NAME).exists()


# --------------------------------------------------------------------------- load_metadata
def test_load_metadata_rejects_bad_files(selected, tmp_path):
    good = json.loads(json.dumps({k: v for k, v in selected.items()}, default=str))
    for inst in good["instances"]:
        for name in ("image_path", "instance_ids_path", "crop_rgb_path", "crop_mask_path"):
            del inst[name]
    crops_root = selected["instances"][0]["crop_rgb_path"].parents[3]
    shutil.copytree(crops_root / "crops", tmp_path / "crops")
    path = tmp_path / METADATA_NAME

    def broken(edit):
        meta = json.loads(json.dumps(good))
        edit(meta)
        write_json(path, meta)
        return path

    write_json(path, good)
    assert load_metadata(path)["instances"][0]["crop_mask_path"] == tmp_path / good["instances"][0]["crop_mask"]
    cases = {
        "version": lambda m: m.update(version=7),
        "'instances'": lambda m: m.pop("instances"),
        "'crop_box'": lambda m: m["instances"][0].pop("crop_box"),
        "does not contain": lambda m: m["instances"][0].update(crop_box=[0, 0, 1, 1]),
        "duplicate": lambda m: m["instances"].append(m["instances"][0]),
        "not found": lambda m: m["instances"][0].update(crop_rgb="crops/missing.png"),
    }
    for message, edit in cases.items():
        with pytest.raises(InstSynthError, match=message) as err:
            load_metadata(broken(edit))
        assert err.value.path == path
    with pytest.raises(InstSynthError, match="file not found"):
        load_metadata(tmp_path / "nope.json")


# --------------------------------------------------------------------------- command line
def test_cli_with_paper_flags_and_light_startup(demo_root, tmp_path):
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'CLI imported torch'")
    cmd = [sys.executable, "-c", code, str(REPO / "process_clean_ver.py"), "--train_folder", str(demo_root),
           "--k", "1", "--out", str(tmp_path), "--workers", "2", "--classes", "car,bus"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    meta = load_metadata(tmp_path / METADATA_NAME)
    assert meta["k"] == 1 and {i["class"] for i in meta["instances"]} <= {"car", "bus"}
    assert len({i["image_id"] for i in meta["instances"]}) == len(meta["instances"])
    res = subprocess.run([sys.executable, str(REPO / "process_clean_ver.py"), "--train_folder", str(demo_root),
                          "--k", "0", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "k must be" in res.stderr and str(demo_root) in res.stderr
