"""Stage 2 written once: the quality gate's fallback and the folder format through the same integration."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from instsynth.formats import open_dataset
from instsynth.formats.coco import merged_json_path
from instsynth.generation import GenerationSettings, generate_instances
from instsynth.core.imageops import crop_resize_labels
from instsynth.core.io import InstSynthError, read_json, read_png, write_json
from instsynth.quality.sample_gate import gate_for
from instsynth.stages.gate_decision import GateDecision
from instsynth.stages.integration import IntegrationParams, integrate_samples
from instsynth.stages.selection import METADATA_NAME, select_coco_instances, select_from_dataset


def score_samples(gen_dir: Path) -> None:
    """Give sample 0 of every instance a passing CLIP score and sample 1 a failing one."""
    path = gen_dir / "generation.json"
    manifest = read_json(path)
    for entry in manifest["instances"].values():
        entry["scores"] = [{"clip_prompt": 0.3 if i == 0 else 0.1} for i in range(len(entry["samples"]))]
    write_json(path, manifest)


@pytest.fixture(scope="module")
def coco_gen(coco_files, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("coco_fallback")
    path = coco_files["train"]
    select_coco_instances(path, path.parent.parent / "images/train", k=1, out=work, workers=1)
    generate_instances(work / METADATA_NAME, settings=GenerationSettings(mode="recolor", num_samples=2))
    score_samples(work / "Recolor")
    return work / "Recolor"


def test_fallback_original_on_coco_writes_the_original_instance(coco_gen, tmp_path):
    out = tmp_path / "out"
    gate = gate_for(coco_gen, min_clip_score=0.2, fallback="original")
    summary = integrate_samples(coco_gen, out, workers=1, gate=gate, params=IntegrationParams(crops_per_sample=1))
    report = read_json(summary.report)
    n = len(read_json(coco_gen / "generation.json")["instances"])
    assert (report["gate"]["accepted"], report["gate"]["fallen_back"], report["gate"]["dropped"]) == (n, n, 0)
    assert report["filters"]["fallback"] == "original" and report["samples_integrated"] == 2 * n
    entries = read_json(summary.integration)["images"]
    assert {(e["sample_index"], e.get("instance_source", "generated")) for e in entries} == {(0, "generated"),
                                                                                           (1, "original")}
    merged = read_json(merged_json_path(out, "train"))
    by_file = {img["file_name"]: img for img in merged["images"]}
    pasted = {a["image_id"]: a for a in merged["annotations"] if a.get("pasted")}
    for entry in entries:
        image_id = by_file[entry["file_name"]]["id"]
        if entry["sample_index"] == 1:  # nothing regenerated: no annotation marked pasted, pixels of the source
            assert image_id not in pasted
            if entry["kind"] == "panorama":  # the linked original, pixel for pixel
                source = next(i for i in merged["images"] if i["id"] == entry["source_image_id"])
                assert np.array_equal(read_png(out / "images" / entry["file_name"], rgb=True),
                                      read_png(out / "images" / source["file_name"], rgb=True))
        else:
            assert image_id in pasted
    again = integrate_samples(coco_gen, out, workers=1, gate=gate, params=IntegrationParams(crops_per_sample=1))
    assert again.files_written == 0 and read_json(again.report)["samples_reused"] == 2 * n


def test_gate_from_another_run_is_refused(coco_gen, tmp_path):
    gate = GateDecision.from_failures({"nope_1": {"samples": ["x"]}}, {("nope_1", 0): []}, {})
    with pytest.raises(InstSynthError, match="quality gate names samples"):
        integrate_samples(coco_gen, tmp_path / "out", workers=1, gate=gate)


def test_folder_dataset_end_to_end_through_the_integration_script(folder_root, tmp_path):
    """Stage 1 --folder, recolor, inpainted_integration.py: new images + instance PNGs in the folder layout."""
    select_from_dataset(open_dataset("folder", folder_root), k=1, out=tmp_path / "s1", workers=1)
    generate_instances(tmp_path / "s1" / METADATA_NAME, settings=GenerationSettings(mode="recolor", num_samples=2))
    gen_dir = tmp_path / "s1" / "Recolor"
    score_samples(gen_dir)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "inpainted_integration.py"), "--inpainting_dir", str(gen_dir),
                          "--output_folder_name", str(out), "--crops_per_sample", "1", "--workers", "1",
                          "--min_clip_score", "0.2", "--fallback", "original"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "fallen back" in run.stdout
    meta = read_json(tmp_path / "s1" / METADATA_NAME)
    by_key = {i["key"]: i for i in meta["instances"]}
    entries = read_json(out / "integration.json")["images"]
    assert len(entries) == len(meta["instances"]) * 2 * 2
    assert [(str(c["id"]), c["name"]) for c in read_json(out / "categories.json")["categories"]] == \
           list(read_json(folder_root / "categories.json").items())
    regenerated = 0
    for e in entries:
        inst = by_key[e["key"]]
        src_ids = read_png(folder_root / inst["instances"])
        src_rgb = read_png(folder_root / inst["image"], rgb=True)
        ids, rgb = read_png(out / e["outputs"]["instances"]), read_png(out / e["outputs"]["image"], rgb=True)
        assert e["outputs"]["image"].startswith("images/instsynth_syn/train/")
        assert np.array_equal(ids, crop_resize_labels(src_ids, e["bbox_coordinate"], src_ids.shape[::-1]))
        if e["kind"] != "panorama":
            continue
        mask = src_ids == inst["instance_id"]
        assert np.array_equal(ids == inst["instance_id"], mask)  # the pasted mask is the instance's own
        assert np.array_equal(rgb[~mask], src_rgb[~mask])  # outside the mask: the source, byte for byte
        changed = not np.array_equal(rgb[mask], src_rgb[mask])
        assert not changed if e["instance_source"] == "original" else True
        regenerated += changed
    assert regenerated > 0
    written = open_dataset("folder", out).images("train", include_generated=True)  # OUT reads as a folder dataset
    assert len(written) == len(entries)
    assert all(im.annotations().instances for im in written)
