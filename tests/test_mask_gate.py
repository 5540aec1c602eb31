"""Quality gate v2: a tiny FastInst trained on a demo image scores samples by mask consistency.

An untouched sample of an instance the model knows passes the mask gate; the same instance replaced
by background fails it and, with ``--fallback original``, its pair is written with the original
instance (labelled as original) instead of being dropped.
"""
import importlib.util
import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import REPO
from instsynth.core.io import InstSynthError, read_json, read_png, write_png

MIN_IOU = 0.5


@pytest.fixture(scope="module")
def gate_run(demo_root, tmp_path_factory):
    """Stage 1 on the demo train split, restricted to one image; a tiny FastInst trained on that image;
    per instance two samples: 0 = the untouched crop, 1 = the instance replaced by background."""
    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.runner import generate_instances
    from instsynth.stages.selection import load_metadata, select_instances
    from instsynth.testing.tiny_mask_model import train_tiny_mask_model

    tmp = tmp_path_factory.mktemp("mask_gate")
    selection = select_instances(demo_root, "train", k=3, out=tmp / "stage1", workers=1)
    meta = read_json(selection.metadata)
    image_id = meta["instances"][0]["image_id"]
    meta["instances"] = [i for i in meta["instances"] if i["image_id"] == image_id]
    (tmp / "stage1" / "metadata.json").write_text(json.dumps(meta))
    model = train_tiny_mask_model(demo_root, [image_id], tmp / "model")
    gen = generate_instances(tmp / "stage1" / "metadata.json", tmp / "gen", GenerationSettings(num_samples=2))
    manifest = read_json(gen.manifest)
    for inst in load_metadata(tmp / "stage1" / "metadata.json")["instances"]:
        crop, mask = read_png(inst["crop_rgb_path"], rgb=True), read_png(inst["crop_mask_path"]) > 127
        background = cv2.inpaint(crop, cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)), 5,
                                 cv2.INPAINT_TELEA)
        samples = manifest["instances"][inst["key"]]["samples"]
        write_png(gen.manifest.parent / samples[0], crop)
        write_png(gen.manifest.parent / samples[1], background)
    return {"manifest": gen.manifest, "model": model, "root": demo_root, "tmp": tmp, "keys": list(manifest["instances"])}


@pytest.fixture(scope="module")
def scored(gate_run):
    from instsynth.quality.gate import score_generation

    report = score_generation(gate_run["manifest"], mask_model=str(gate_run["model"]), device="cpu")
    return report, read_json(gate_run["manifest"])


def test_untouched_sample_passes_and_background_fails(scored):
    report, manifest = scored
    assert len(manifest["instances"]) == 3
    for key, entry in manifest["instances"].items():
        untouched, background = entry["scores"]
        assert untouched["mask_iou"] >= MIN_IOU and untouched["mask_class_ok"], (key, untouched)
        assert background["mask_iou"] < 0.2, (key, background)
        # the untouched sample pasted back is the source image: the same scores as the source
        assert entry["mask_gate_source"]["mask_iou_source"] == untouched["mask_iou"]
    assert report["mask_class_ok"] >= 3
    assert [row["samples_kept"] for row in report["min_mask_iou"] if row["threshold"] == MIN_IOU] == [3]


def test_rescoring_with_the_same_model_does_nothing(gate_run, scored):
    from instsynth.quality.gate import score_generation

    before = gate_run["manifest"].read_bytes()
    again = score_generation(gate_run["manifest"], mask_model=str(gate_run["model"]), device="cpu")
    assert again["scored_now"] == 0 and gate_run["manifest"].read_bytes() == before


@pytest.mark.parametrize("fallback", ["original", "drop"])
def test_failing_sample_falls_back_to_the_original_or_is_dropped(gate_run, scored, fallback, tmp_path):
    from instsynth.integration import IntegrationParams, integrate_samples

    out = tmp_path / "out"
    summary = integrate_samples(gate_run["manifest"].parent, out, workers=1, min_mask_iou=MIN_IOU, fallback=fallback,
                                params=IntegrationParams(crops_per_sample=1))
    report = read_json(summary.report)
    gate = report["gate"]
    assert (gate["accepted"], gate["samples"], gate["accept_rate"]) == (3, 6, 0.5)
    assert (gate["fallen_back"], gate["dropped"]) == ((3, 0) if fallback == "original" else (0, 3))
    assert gate["failed_by"] == {"min_mask_iou": 3} and report["gate_accept_rate"] == 0.5
    assert {(f["sample_index"], tuple(f["failed"])) for f in report["gate_failures"]} == {(1, ("min_mask_iou",))}
    images = read_json(summary.integration)["images"]
    kinds = {(e["sample_index"], e["instance_source"]) for e in images}
    if fallback == "drop":
        assert kinds == {(0, "generated")} and len(images) == 3 * 2
        return
    assert kinds == {(0, "generated"), (1, "original")} and len(images) == 6 * 2
    for entry in images:  # the fallback panorama is exactly the source image; the generated one too here
        if entry["kind"] == "panorama":
            source = gate_run["root"] / "leftImg8bit" / "train" / entry["city"] / f"{entry['source_image_id']}_leftImg8bit.png"
            assert np.array_equal(read_png(out / entry["outputs"]["leftImg8bit"]), read_png(source))


def test_gate_needs_mask_scores_and_cli_scores_them(gate_run, scored, tmp_path, capsys):
    from instsynth.integration import integrate_samples

    copy = tmp_path / "gen"
    shutil.copytree(gate_run["manifest"].parent, copy)
    manifest = read_json(copy / "generation.json")
    for entry in manifest["instances"].values():
        entry["scores"] = [{k: v for k, v in s.items() if not k.startswith("mask_")} for s in entry["scores"]]
    (copy / "generation.json").write_text(json.dumps(manifest))
    with pytest.raises(InstSynthError, match="no quality scores.*--mask_model"):
        integrate_samples(copy, tmp_path / "out", workers=1, min_mask_iou=MIN_IOU)

    spec = importlib.util.spec_from_file_location("filter_generation", REPO / "generation" / "filter_generation.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--manifest", str(copy), "--mask_model", str(gate_run["model"] / "model_final.pth"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "min_mask_iou 0.50" in out and "mask_iou_source median" in out
    with pytest.raises(SystemExit, match="error: .*not found"):
        cli.main(["--manifest", str(copy), "--mask_model", str(tmp_path / "no-such-run"), "--device", "cpu"])


def test_integration_cli_prints_the_accept_rate(gate_run, scored, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("inpainted_integration", REPO / "inpainted_integration.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--inpainting_dir", str(gate_run["manifest"].parent), "--output_folder_name", str(tmp_path / "out"),
              "--crops_per_sample", "0", "--min_mask_iou", str(MIN_IOU), "--fallback", "original", "--workers", "1"])
    out = capsys.readouterr().out
    assert "quality gate: accepted 3, fallen back 3, dropped 0 of 6 samples (accept rate 50.0%)" in out


def test_oneformer_config_with_weights_loads_as_mask_model(tmp_path):
    """A config YAML plus --mask_weights works too, and OneFormer's classes come from its config."""
    from instsynth.config import load_config
    from instsynth.engine.checkpoint import save_checkpoint
    from instsynth.quality.mask_gate import best_match, load_mask_model
    from instsynth.modeling import build_model

    config = REPO / "configs" / "quick_schedules" / "oneformer_quick.yaml"
    save_checkpoint(tmp_path, "model_final.pth", build_model(load_config(config)))
    model = load_mask_model(config, weights=str(tmp_path / "model_final.pth"))
    assert model.classes[2] == "car" and len(model.classes) == 8
    prediction = model.predict([np.zeros((64, 128, 3), np.uint8)])[0]
    assert tuple(prediction["masks"].shape[1:]) == (64, 128)
    match = best_match(prediction, np.ones((64, 128), bool), "car", min_score=0.0)
    assert 0.0 <= match["mask_iou"] <= 1.0 and match["mask_class"] in model.classes
    with pytest.raises(InstSynthError, match="config.yaml"):
        load_mask_model(tmp_path / "model_final.pth")  # a checkpoint needs its run's config.yaml beside it


def test_sheet_captions_show_the_mask_gate_scores():
    from instsynth.reports.viz import _sample_caption

    entry = {"prompt": "a red car", "scores": [{"clip_prompt": 0.251, "mask_iou": 0.834, "mask_class_ok": True},
                                               {"mask_iou": 0.12, "mask_class": "bus", "mask_class_ok": False}]}
    assert _sample_caption(entry, 0) == "#0 a red car (CLIP 0.251, IoU 0.83)"
    assert _sample_caption(entry, 1) == "#1 a red car (IoU 0.12 bus)"
