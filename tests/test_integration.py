"""Stages 2 and 4 (integration, label crops): what downstream stages and users rely on."""
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import REPO
from instsynth.generation import GenerationSettings, generate_instances, load_manifest
from instsynth.formats.cityscapes import new_image_id
from instsynth.quality.sample_gate import gate_for, gate_samples, select_samples
from instsynth.stages.integration import INTEGRATION_NAME, REPORT_NAME, IntegrationParams, integrate_samples
from instsynth.stages.pasting import as_rgb_sample, aspect_box_area, choose_context_crop, feather_alpha, paste
from instsynth.core.io import (CityscapesImage, InstSynthError, iter_cityscapes_images, read_json, read_png,
                               split_image_id, write_json, write_png)
from instsynth.stages.label_crops import crop_resize_labels, drop_color_and_label_ids
from instsynth.core.labels import colorize, instance_ids_to_label_ids
from instsynth.stages.selection import COORDINATES_NAME, METADATA_NAME, select_instances

CROPS = 2


def run_pipeline(root: Path, work: Path, num_samples: int) -> Path:
    """Stage 1 and the recolor backend on ``root``; returns the backend folder (holding generation.json)."""
    select_instances(root, out=work, workers=1)
    generate_instances(work / METADATA_NAME, settings=GenerationSettings(mode="recolor", num_samples=num_samples))
    return work / "Recolor"


def integrate(gen_dir: Path, out: Path, workers: int = 1, **kw) -> object:
    kw.setdefault("params", IntegrationParams(crops_per_sample=CROPS))
    summary = integrate_samples(gen_dir, out, coordinates_path=gen_dir.parent / COORDINATES_NAME,
                                workers=workers, **kw)
    drop_color_and_label_ids(out / COORDINATES_NAME, workers=workers)
    return summary


def files_under(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline(demo_root, tmp_path_factory):
    """A demo copy run through stage 1, recolor (2 samples), stage 2 (2 crops/sample) and stage 4."""
    base = tmp_path_factory.mktemp("integration")
    root = base / "cityscapes"
    shutil.copytree(demo_root, root)
    gen_dir = run_pipeline(root, base / "stage1", num_samples=2)
    out = base / "out"
    summary = integrate(gen_dir, out)
    return {"root": root, "gen_dir": gen_dir, "out": out, "summary": summary,
            "integration": read_json(out / INTEGRATION_NAME), "report": read_json(out / REPORT_NAME)}


@pytest.fixture
def small_pipeline(demo_copy, tmp_path):
    """A private demo copy through stage 1 and recolor (1 sample) that a test may break."""
    return run_pipeline(demo_copy, tmp_path / "stage1", num_samples=1)


# --------------------------------------------------------------------------- pasting (synthetic arrays)
def synthetic_paste_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    box = (10, 5, 40, 35)
    mask = np.zeros((30, 30), bool)
    cv2.circle(mask.view(np.uint8), (15, 15), 10, 1, -1)
    sample = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    return image, sample, mask, box


def outside_mask(image_shape, mask, box):
    x0, y0, x1, y1 = box
    full = np.zeros(image_shape[:2], bool)
    full[y0:y1, x0:x1] = mask
    return ~full


def test_hard_paste_replaces_exactly_the_mask():
    image, sample, mask, box = synthetic_paste_inputs()
    out = paste(image, sample, mask, box, "hard")
    outside = outside_mask(image.shape, mask, box)
    assert np.array_equal(out[outside], image[outside])
    assert np.array_equal(out[5:35, 10:40][mask], sample[mask])


def test_feather_ramps_inside_the_mask_edge_only():
    image, sample, mask, box = synthetic_paste_inputs()
    alpha = feather_alpha(mask, 3)
    assert (alpha[~mask] == 0).all() and (alpha[mask] > 0).all()
    assert alpha[15, 15] == 1.0 and 0 < alpha[15, 5] < 1  # centre vs. edge pixel of the disc
    out = paste(image, sample, mask, box, "feather", feather_pixels=3)
    outside = outside_mask(image.shape, mask, box)
    assert np.array_equal(out[outside], image[outside])
    assert np.array_equal(out[5 + 15, 10 + 15], sample[15, 15])
    edge = image[20, 15].astype(float), sample[15, 5].astype(float), out[20, 15].astype(float)
    assert np.all(np.abs(edge[2] - (alpha[15, 5] * edge[1] + (1 - alpha[15, 5]) * edge[0])) <= 1)


def test_normalized_subtracts_the_background_colour_shift():
    image, _, mask, box = synthetic_paste_inputs()
    x0, y0, x1, y1 = box
    shift = np.array([20, -10, 5])
    sample = np.clip(image[y0:y1, x0:x1].astype(int) + shift, 0, 255)
    sample[mask] = np.array([100, 120, 140]) + shift  # new content, seen through the same colour shift
    out = paste(image, sample.astype(np.uint8), mask, box, "normalized")
    outside = outside_mask(image.shape, mask, box)
    assert np.array_equal(out[outside], image[outside])
    inside = out[y0:y1, x0:x1][mask].astype(int)
    assert np.abs(inside - [100, 120, 140]).max() <= 3  # clipping at 0/255 biases the mean slightly


def test_sample_modes_are_converted_or_refused(tmp_path):
    gray = np.full((4, 5), 7, np.uint8)
    rgb, note = as_rgb_sample(gray, tmp_path / "g.png")
    assert rgb.shape == (4, 5, 3) and (rgb == 7).all() and "grayscale" in note
    rgba = np.dstack([np.full((4, 5, 3), 9, np.uint8), np.zeros((4, 5), np.uint8)])
    assert as_rgb_sample(rgba, tmp_path / "a.png")[0].shape == (4, 5, 3)
    with pytest.raises(InstSynthError, match="16.png: sample must be 8-bit"):
        as_rgb_sample(gray.astype(np.uint16), tmp_path / "16.png")


# --------------------------------------------------------------------------- context crops
def test_context_crops_follow_the_paper_geometry():
    ids = np.zeros((256, 512), np.uint16)
    ids[100:140, 200:230] = 26000
    bbox = (200, 100, 230, 140)
    area = aspect_box_area(bbox, 2.0)
    ratios = []
    for seed in range(300):
        crop = choose_context_crop(ids, bbox, seed, IntegrationParams())
        x0, y0, x1, y1 = crop.box
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 256
        assert x0 <= bbox[0] and y0 <= bbox[1] and bbox[2] <= x1 and bbox[3] <= y1
        assert w == 2 * h and crop.ratio * area <= w * h < crop.ratio * area + 2 * (w + h)
        assert not crop.fallback
        ratios.append(crop.ratio)
    assert min(ratios) >= 1 and 3.2 < np.mean(ratios) < 3.8  # E[max(1, ceil(N(3, 1)))] ~ 3.5
    assert choose_context_crop(ids, bbox, 7, IntegrationParams()).box == choose_context_crop(ids, bbox, 7, IntegrationParams()).box


def test_crops_never_cut_an_instance_to_a_tiny_fragment():
    rng = np.random.default_rng(0)
    ids = np.zeros((128, 256), np.uint16)
    for n, (y, x) in enumerate(zip(rng.integers(0, 126, 300), rng.integers(0, 254, 300))):
        ids[y:y + 2, x:x + 2] = 24001 + n  # 2x2 persons everywhere: crops often cut one
    ids[20:100, 40:200] = 26000  # a large generated instance: crops are barely enlarged
    bbox = (40, 20, 200, 100)
    source_counts = np.bincount(ids.ravel(), minlength=1 << 16)
    redraws = 0
    for seed in range(40):
        crop = choose_context_crop(ids, bbox, seed, IntegrationParams(min_instance_pixels=4), source_counts)
        assert not crop.fallback
        x0, y0, x1, y1 = crop.box
        inside = np.bincount(ids[y0:y1, x0:x1].ravel(), minlength=1 << 16)
        resized = np.bincount(crop_resize_labels(ids, crop.box, (256, 128)).ravel(), minlength=1 << 16)
        cut = np.flatnonzero((inside > 0) & (inside < source_counts))
        assert (resized[cut] >= 4).all(), (seed, crop)
        redraws += crop.tries - 1
    assert redraws > 0  # the rule was exercised


def test_impossible_constraint_falls_back_after_bounded_tries():
    ids = np.zeros((128, 256), np.uint16)
    ids[60:70, 120:140] = 26000
    ids[:, :] = np.where(ids == 0, 24001, ids)  # everything around is one big person: every crop cuts it
    crop = choose_context_crop(ids, (120, 60, 140, 70), 0, IntegrationParams(min_instance_pixels=10 ** 9, max_tries=5))
    assert crop.fallback and crop.tries == 5 and crop.ratio == 1
    x0, y0, x1, y1 = crop.box
    assert x1 - x0 == 2 * (y1 - y0) and x0 <= 120 and 140 <= x1 and y0 <= 60 and 70 <= y1


# --------------------------------------------------------------------------- naming and sample selection
def test_new_names_are_unique_cityscapes_ids():
    ids = [new_image_id(f"my_city_{seq:06d}_{frame:06d}", inst, s, c)
           for seq in (0, 1) for frame in (19, 190, 1900) for inst in (24000, 24001, 26010, 33999, 1000)
           for s in (0, 1, 10, 9999) for c in (0, 1, 10, 99)]
    assert len(set(ids)) == len(ids)
    assert all(split_image_id(i)[0] == "my_city" for i in ids)
    assert split_image_id(new_image_id("aachen_000012_000019", 26003, 1, 2)) == ("aachen", "000012", "00001926003000102")
    with pytest.raises(ValueError):
        new_image_id("aachen_000012_000019", 26003, 0, 100)


def test_select_samples_by_clip_score_and_top_fraction():
    instances = {"a": {"samples": ["a0", "a1"], "scores": [{"clip_prompt": 0.30}, {"clip_prompt": 0.10}]},
                 "b": {"samples": ["b0", "b1"], "scores": [{"clip_prompt": 0.25}, {"clip_prompt": 0.20}]}}
    assert select_samples(instances)[0] == {"a": [0, 1], "b": [0, 1]}
    kept, stats = select_samples(instances, min_clip_score=0.2)
    assert kept == {"a": [0], "b": [0, 1]} and stats["dropped_below_min_clip_score"] == 1
    kept, stats = select_samples(instances, top_fraction=0.5)
    assert kept == {"a": [0], "b": [0]} and stats["dropped_outside_top_fraction"] == 2
    kept, stats = select_samples(instances, min_clip_score=0.26, top_fraction=0.5)
    assert kept == {"a": [0]} and stats["samples_selected"] == 1
    del instances["b"]["scores"]
    with pytest.raises(InstSynthError, match="no quality scores"):
        select_samples(instances, min_clip_score=0.2)


# --------------------------------------------------------------------------- end to end on the demo
def test_every_written_pair_has_consistent_labels(pipeline):
    out, root, entries = pipeline["out"], pipeline["root"], pipeline["integration"]["images"]
    report = pipeline["report"]
    manifest = load_manifest(pipeline["gen_dir"])
    n_samples = sum(len(e["samples"]) for e in manifest["instances"].values())
    assert report["samples_integrated"] == n_samples > 0 and report["samples_skipped"] == 0
    assert len(entries) == n_samples * (1 + CROPS) == report["new_images"]
    assert report["panoramas"] == n_samples and report["crops"] == n_samples * CROPS
    for e in entries:
        source = CityscapesImage(root, "train", e["city"], e["source_image_id"])
        paths = {k: out / v for k, v in e["outputs"].items()}
        ids = read_png(paths["instanceIds"], dtype=np.uint16, shape=(256, 512))
        labels = read_png(paths["labelIds"], dtype=np.uint8, shape=(256, 512))
        assert read_png(paths["leftImg8bit"], rgb=True).shape == (256, 512, 3)
        assert np.array_equal(labels, instance_ids_to_label_ids(ids)), e["image_id"]
        assert np.array_equal(read_png(paths["color"], rgb=True), colorize(labels)), e["image_id"]
        assert (ids == e["instance_id"]).sum() > 0
        src_ids = read_png(source.gt("instanceIds"))
        assert np.array_equal(ids, crop_resize_labels(src_ids, e["bbox_coordinate"], (512, 256)))
        if e["kind"] == "panorama":
            assert e["bbox_coordinate"] == [0, 0, 512, 256]
            for kind in ("instanceIds", "labelIds", "color"):
                assert np.array_equal(read_png(paths[kind]), read_png(source.gt(kind))), (e["image_id"], kind)


def test_panorama_changes_only_the_instance(pipeline):
    out, root = pipeline["out"], pipeline["root"]
    manifest = load_manifest(pipeline["gen_dir"])
    for e in pipeline["integration"]["images"][:: 1 + CROPS][:6]:
        source = CityscapesImage(root, "train", e["city"], e["source_image_id"])
        src, new = read_png(source.left, rgb=True), read_png(out / e["outputs"]["leftImg8bit"], rgb=True)
        mask = read_png(source.gt("instanceIds")) == e["instance_id"]
        assert np.array_equal(new[~mask], src[~mask])
        sample = read_png(manifest["instances"][e["key"]]["sample_paths"][e["sample_index"]], rgb=True)
        x0, y0, x1, y1 = next(i["crop_box"] for i in read_json(pipeline["gen_dir"].parent / METADATA_NAME)["instances"]
                              if i["key"] == e["key"])
        assert np.array_equal(new[y0:y1, x0:x1], sample)  # the recolor sample equals the source outside the mask
        assert not np.array_equal(new[mask], src[mask])


def test_names_are_unique_and_found_as_a_cityscapes_split(pipeline):
    entries = pipeline["integration"]["images"]
    ids = [e["image_id"] for e in entries]
    assert len(set(ids)) == len(ids)
    found = iter_cityscapes_images(pipeline["out"], "train", include_generated=True)
    assert sorted(i.image_id for i in found) == sorted(ids)
    assert all(i.city.endswith("_syn") and i.image_id.startswith(i.city[:-4] + "_") for i in found)
    coords = read_json(pipeline["out"] / COORDINATES_NAME)["images"]
    assert [c["image_id"] for c in coords] == ids


def test_rerun_rewrites_nothing(pipeline):
    out = pipeline["out"]
    before = {k: p.stat().st_mtime_ns for k, p in files_under(out).items() if k != REPORT_NAME}
    summary = integrate(pipeline["gen_dir"], out)
    after = {k: p.stat().st_mtime_ns for k, p in files_under(out).items() if k != REPORT_NAME}
    assert after == before
    report = read_json(out / REPORT_NAME)
    assert summary.files_written == 0 and report["samples_reused"] == report["samples_integrated"]


def test_cli_with_two_workers_gives_identical_bytes(pipeline, tmp_path):
    gen_dir, out = pipeline["gen_dir"], tmp_path / "out2"
    cmd = [sys.executable, str(REPO / "inpainted_integration.py"), "--inpainting_dir", str(gen_dir),
           "--metadata_path", str(gen_dir.parent / METADATA_NAME), "--cropped_region_coordinates",
           str(gen_dir.parent / COORDINATES_NAME), "--output_folder_name", str(out),
           "--crops_per_sample", str(CROPS), "--workers", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, str(REPO / "drop_color_and_labelIds_clean_ver.py"),
                          "--cropped_region_coordinates_path", str(out / COORDINATES_NAME), "--workers", "2"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    one, two = files_under(pipeline["out"]), files_under(out)
    assert sorted(one) == sorted(two)
    for name in one:
        if name != REPORT_NAME:
            assert one[name].read_bytes() == two[name].read_bytes(), name


def test_other_seed_or_blend_changes_outputs_and_removes_stale_files(pipeline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pipeline["out"], out)
    integrate(pipeline["gen_dir"], out, params=IntegrationParams(crops_per_sample=1, seed=2, blend="feather"))
    entries = read_json(out / INTEGRATION_NAME)["images"]
    old = {e["image_id"]: e for e in pipeline["integration"]["images"]}
    assert len(entries) == len(old) * 2 // 3
    assert any(e["bbox_coordinate"] != old[e["image_id"]]["bbox_coordinate"] for e in entries if e["kind"] == "crop")
    gone = [e for e in old.values() if e["crop_index"] == 2]
    assert gone and not any((out / p).exists() for e in gone for p in e["outputs"].values())
    assert len(read_json(out / REPORT_NAME)["stale_images_removed"]) == len(gone)


# --------------------------------------------------------------------------- bad input
def test_missing_sample_is_an_error_or_a_counted_skip(small_pipeline, tmp_path):
    manifest = load_manifest(small_pipeline)
    victim = next(iter(manifest["instances"].values()))["sample_paths"][0]
    victim.unlink()
    with pytest.raises(InstSynthError, match=f"{victim.name}: sample file not found"):
        integrate_samples(small_pipeline, tmp_path / "out", workers=1)
    summary = integrate_samples(small_pipeline, tmp_path / "out", workers=1, skip_bad=True,
                                params=IntegrationParams(crops_per_sample=0))
    report = read_json(tmp_path / "out" / REPORT_NAME)
    assert summary.skipped == 1 and report["skip_reasons"] == {"sample_missing": 1}
    assert report["samples_integrated"] == report["samples_selected"] - 1 == summary.new_images


def test_coordinates_of_another_run_are_refused(small_pipeline, tmp_path):
    coords = read_json(small_pipeline.parent / COORDINATES_NAME)
    bad = tmp_path / "crc.json"
    write_json(bad, coords[:-1])
    with pytest.raises(InstSynthError, match=f"crc.json: {len(coords) - 1} entries but the metadata lists {len(coords)}"):
        integrate_samples(small_pipeline, tmp_path / "out", coordinates_path=bad, workers=1)
    coords[0], coords[1] = coords[1], coords[0]
    write_json(bad, coords)
    with pytest.raises(InstSynthError, match="does not match metadata instance 0"):
        integrate_samples(small_pipeline, tmp_path / "out", coordinates_path=bad, workers=1)


def test_samples_of_another_size_or_mode_are_converted_and_reported(small_pipeline, tmp_path):
    manifest = load_manifest(small_pipeline)
    entries = list(manifest["instances"].values())
    small, gray = entries[0]["sample_paths"][0], entries[1]["sample_paths"][0]
    rgb = read_png(small, rgb=True)
    write_png(small, cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA))
    write_png(gray, cv2.cvtColor(read_png(gray, rgb=True), cv2.COLOR_RGB2GRAY))
    integrate_samples(small_pipeline, tmp_path / "out", workers=1, params=IntegrationParams(crops_per_sample=0))
    notes = {Path(n["sample"]).name: n["note"] for n in read_json(tmp_path / "out" / REPORT_NAME)["samples_converted"]}
    assert notes[small.name].startswith("resized") and notes[gray.name] == "grayscale -> RGB"


def test_instance_missing_from_its_image_is_a_counted_skip(small_pipeline, tmp_path):
    meta = read_json(small_pipeline.parent / METADATA_NAME)
    inst = meta["instances"][0]
    ids_path = Path(meta["dataset_root"]) / inst["instance_ids"]
    ids = read_png(ids_path)
    ids[ids == inst["instance_id"]] = 0
    write_png(ids_path, ids)
    with pytest.raises(InstSynthError, match="has no pixel inside its crop box"):
        integrate_samples(small_pipeline, tmp_path / "out", workers=1)
    integrate_samples(small_pipeline, tmp_path / "out", workers=1, skip_bad=True)
    report = read_json(tmp_path / "out" / REPORT_NAME)
    assert report["skip_reasons"] == {"empty_mask": 1} and report["skipped"][0]["key"] == inst["key"]


def test_stage4_cli_refuses_stage1_coordinates(small_pipeline):
    res = subprocess.run([sys.executable, str(REPO / "drop_color_and_labelIds_clean_ver.py"),
                          "--cropped_region_coordinates_path", str(small_pipeline.parent / COORDINATES_NAME)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "not a stage-2 cropped_region_coordinates.json" in res.stderr


def test_quality_gate_selects_samples_and_reports_counts(small_pipeline, tmp_path):
    path = small_pipeline / "generation.json"
    manifest = read_json(path)
    keys = list(manifest["instances"])
    for n, key in enumerate(keys):
        manifest["instances"][key]["scores"] = [{"clip_prompt": 0.1 + 0.01 * n}]
    write_json(path, manifest)
    gate = gate_for(small_pipeline, min_clip_score=0.1 + 0.01 * 2, top_fraction=0.5)
    summary = integrate_samples(small_pipeline, tmp_path / "out", workers=1, gate=gate,
                                params=IntegrationParams(crops_per_sample=0))
    report = read_json(tmp_path / "out" / REPORT_NAME)
    n = len(keys)
    assert report["dropped_below_min_clip_score"] == 2
    assert report["samples_selected"] == summary.samples == min(n - 2, -(-n // 2))
    kept = {e["key"] for e in read_json(tmp_path / "out" / INTEGRATION_NAME)["images"]}
    assert kept == set(keys[n - summary.samples:])  # the best scores


def test_stage4_missing_source_labels_is_an_error_or_a_listed_skip(small_pipeline, tmp_path):
    out = tmp_path / "out"
    integrate_samples(small_pipeline, out, workers=1, params=IntegrationParams(crops_per_sample=1))
    images = read_json(out / COORDINATES_NAME)["images"]
    victim = Path(images[0]["source"]["labelIds"])
    victim.unlink()  # and the instanceIds it could be read from
    victim.with_name(victim.name.replace("_labelIds.png", "_instanceIds.png")).unlink()
    with pytest.raises(InstSynthError, match=f"{victim.name}: file not found"):
        drop_color_and_label_ids(out / COORDINATES_NAME, workers=1)
    summary = drop_color_and_label_ids(out / COORDINATES_NAME, workers=1, skip_bad=True)
    affected = [e for e in images if e["source"]["labelIds"] == str(victim)]
    assert len(summary.bad) == len(affected) > 0 and summary.images == len(images)


def test_stage4_without_color_files_derives_the_colours_from_label_ids(pipeline, demo_copy, tmp_path):
    """A source tree of only leftImg8bit, instanceIds and labelIds: stage 4 writes color from the cut labelIds
    in the Cityscapes palette, pixel-equal to the colours cut from a tree that has them."""
    removed = [p for p in demo_copy.glob("gtFine/*/*/*") if p.name.endswith(("_color.png", "_polygons.json"))]
    assert removed
    for path in removed:
        path.unlink()
    out = tmp_path / "out"
    integrate(run_pipeline(demo_copy, tmp_path / "stage1", num_samples=2), out)
    entries = read_json(out / INTEGRATION_NAME)["images"]
    assert [e["image_id"] for e in entries] == [e["image_id"] for e in pipeline["integration"]["images"]]
    for e in entries:
        color = read_png(out / e["outputs"]["color"], rgb=True)
        assert np.array_equal(color, colorize(read_png(out / e["outputs"]["labelIds"]))), e["image_id"]
        assert np.array_equal(color, read_png(pipeline["out"] / e["outputs"]["color"], rgb=True)), e["image_id"]


def test_stage4_reads_missing_label_ids_from_instance_ids(pipeline, demo_copy, tmp_path, caplog):
    """A source tree of only leftImg8bit and instanceIds: stage 1 says what each later stage will do without the
    other gtFine files, and stage 4 writes labelIds and color pixel-equal to those of the complete tree."""
    removed = [p for p in demo_copy.glob("gtFine/*/*/*") if not p.name.endswith("_instanceIds.png")]
    assert any(p.name.endswith("_labelIds.png") for p in removed)
    for path in removed:
        path.unlink()
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="instsynth"):
        gen_dir = run_pipeline(demo_copy, tmp_path / "stage1", num_samples=2)
    n = len(list(demo_copy.glob("gtFine/train/*/*_instanceIds.png")))
    for line in (f"instanceIds {n}/{n} (stages 1-5)", f"labelIds 0/{n} (stage 4; where absent, read from instanceIds)",
                 f"color 0/{n} (stage 4", f"polygons 0/{n} (stage 5"):
        assert line in caplog.text
    integrate(gen_dir, out)
    entries = read_json(out / INTEGRATION_NAME)["images"]
    assert [e["image_id"] for e in entries] == [e["image_id"] for e in pipeline["integration"]["images"]]
    for e in entries:
        for kind in ("labelIds", "color"):
            assert np.array_equal(read_png(out / e["outputs"][kind]), read_png(pipeline["out"] / e["outputs"][kind])), \
                (e["image_id"], kind)


def test_gate_fallback_original_keeps_failing_samples_as_originals():
    instances = {"a": {"samples": ["a0", "a1"], "scores": [{"clip_prompt": 0.3, "clip_class_margin": 0.1},
                                                           {"clip_prompt": 0.3, "clip_class_margin": -0.1}]},
                 "b": {"samples": ["b0"], "scores": [{"clip_prompt": 0.1, "clip_class_margin": 0.1}]}}
    drop = gate_samples(instances, min_clip_score=0.2, min_clip_margin=0.0)
    assert drop.accepted == {"a": [0]} and drop.fallback == {}
    assert (drop.stats["gate"]["dropped"], drop.stats["samples_selected"]) == (2, 1)
    original = gate_samples(instances, min_clip_score=0.2, min_clip_margin=0.0, fallback="original")
    assert original.accepted == {"a": [0]} and original.fallback == {"a": [1], "b": [0]}
    gate = original.stats["gate"]
    assert (gate["accepted"], gate["fallen_back"], gate["dropped"]) == (1, 2, 0)
    assert gate["accept_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert gate["failed_by"] == {"min_clip_score": 1, "min_clip_margin": 1}
    assert [(f["key"], f["failed"]) for f in original.failures] == [("a", ["min_clip_margin"]), ("b", ["min_clip_score"])]
    with pytest.raises(InstSynthError, match="fallback"):
        gate_samples(instances, fallback="copy")
