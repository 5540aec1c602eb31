"""Instance generation with the weightless recolor backend: output contract, manifest, resume, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from instsynth.generation import GenerationSettings, generate_instances, load_manifest, sample_seed
from instsynth.generation.recolor import color_word, recolor, to_lab
from instsynth.core.io import InstSynthError, read_png, write_png
from instsynth.stages.selection import load_metadata, select_instances


@pytest.fixture(scope="module")
def stage1(demo_root, tmp_path_factory):
    """Stage-1 output (metadata.json + crops) of the demo tree, in its own folder."""
    out = tmp_path_factory.mktemp("stage1")
    select_instances(demo_root, "train", k=3, out=out, workers=1)
    return out / "metadata.json"


def run(meta, out, **kw):
    return generate_instances(meta, out=out, settings=GenerationSettings(**kw))


def pngs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_recolor_output_contract(stage1, tmp_path):
    summary = run(stage1, tmp_path, num_samples=2)
    meta = load_metadata(stage1)
    manifest = load_manifest(summary.manifest)
    assert summary.manifest == tmp_path / "Recolor" / "generation.json"
    assert manifest["backend"] == "recolor" and manifest["mode_name"] == "Recolor" and manifest["model_id"] is None
    assert manifest["metadata"] == str(stage1.resolve()) and manifest["dataset_root"] == meta["dataset_root"]
    assert list(manifest["instances"]) == [i["key"] for i in meta["instances"]]
    for inst in meta["instances"]:
        entry = manifest["instances"][inst["key"]]
        assert entry["text"] == "a photo of " + entry["prompt"]
        assert entry["samples"] == [f"train/{inst['city']}/{inst['image_id']}_{inst['instance_id']}_Recolor_{j:06d}.png"
                                    for j in range(2)]
        assert entry["sample_seeds"] == [sample_seed(1, inst["key"], j) for j in range(2)]
        crop = read_png(inst["crop_rgb_path"], rgb=True)
        mask = read_png(inst["crop_mask_path"]) > 0
        for path in entry["sample_paths"]:
            out = read_png(path, rgb=True)
            assert out.shape == crop.shape
            assert np.array_equal(out[~mask], crop[~mask])  # background byte-identical
            assert np.abs(out[mask].astype(int) - crop[mask]).mean() > 3  # the instance changed
    report = json.loads((tmp_path / "Recolor" / "generation_report.json").read_text())
    assert report["samples_written"] == 2 * len(meta["instances"]) and report["skipped_count"] == 0


def test_recolor_follows_the_colour_word_and_keeps_shading():
    rng = np.random.default_rng(0)
    shade = np.linspace(100, 220, 64)[:, None] + rng.normal(0, 4, (64, 64))
    rgb = np.stack([shade * 0.3, shade * 0.4, shade], -1).clip(0, 255).astype(np.uint8)  # blue, vertical shading
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True
    red = recolor(rgb, mask, "a red car", seed=3)
    lab = to_lab(red)[mask]
    assert (lab[:, 1] > 30).mean() > 0.9  # a* clearly red
    lightness = to_lab(red)[8:56, 32, 0]
    assert np.corrcoef(lightness, to_lab(rgb)[8:56, 32, 0])[0, 1] > 0.9  # shading kept
    assert np.array_equal(recolor(rgb, mask, "a red car", seed=3), red)  # deterministic
    assert not np.array_equal(recolor(rgb, mask, "a red car", seed=4), red)  # samples differ
    assert color_word("a photo of a Silver car") == "silver" and color_word("a woman") is None


def test_results_do_not_depend_on_batch_size_or_order(stage1, tmp_path):
    run(stage1, tmp_path / "a", num_samples=2, batch_size=1)
    run(stage1, tmp_path / "b", num_samples=2, batch_size=3)
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")
    a = (tmp_path / "a/Recolor/generation.json").read_text()
    b = json.loads((tmp_path / "b/Recolor/generation.json").read_text())
    assert json.loads(a)["instances"] == b["instances"]


def test_resume_skips_recorded_samples_and_completes_missing_ones(stage1, tmp_path):
    run(stage1, tmp_path, num_samples=1)
    first = pngs(tmp_path)
    mode_dir = tmp_path / "Recolor"
    victim = sorted(mode_dir.rglob("*.png"))[0]
    victim.unlink()
    summary = run(stage1, tmp_path, num_samples=2)  # one missing, plus a second sample each
    assert summary.samples_written == 1 + len(first) and summary.samples_existing == len(first) - 1
    again = pngs(tmp_path)
    assert all(again[k] == v for k, v in first.items())
    fresh = tmp_path / "fresh"
    run(stage1, fresh, num_samples=2)
    assert pngs(fresh) == again
    assert run(stage1, tmp_path, num_samples=2).samples_written == 0
    with pytest.raises(InstSynthError, match="seed"):
        run(stage1, tmp_path, num_samples=2, seed=7)


def test_bad_input_raises_or_is_counted(stage1, tmp_path):
    meta = json.loads(stage1.read_text())
    folder = stage1.parent
    bad = tmp_path / "metadata.json"
    meta["dataset_root"] = meta["dataset_root"]
    inst = meta["instances"]
    empty_mask = tmp_path / "empty_mask.png"
    write_png(empty_mask, np.zeros_like(read_png(folder / inst[0]["crop_mask"])))
    for i in inst:
        for k in ("crop_rgb", "crop_mask"):
            i[k] = str(folder / i[k])
    inst[0]["crop_mask"] = str(empty_mask)
    inst[1]["crop_rgb"] = str(tmp_path / "missing.png")
    bad.write_text(json.dumps(meta))
    with pytest.raises(InstSynthError, match="empty instance mask"):
        run(bad, tmp_path / "out")
    summary = generate_instances(bad, out=tmp_path / "out", settings=GenerationSettings(), skip_bad=True)
    report = json.loads(summary.report.read_text())
    assert report["skipped_count"] == 2 and {s["key"] for s in report["skipped"]} == {inst[0]["key"], inst[1]["key"]}
    assert len(load_manifest(summary.manifest)["instances"]) == len(inst) - 2
    (tmp_path / "prompts.yaml").write_text('template: "a photo of {}"\nprompts:\n  car: ["a red car"]\n')
    with pytest.raises(InstSynthError, match="has no prompts"):
        run(stage1, tmp_path / "out2", prompts=str(tmp_path / "prompts.yaml"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InstSynthError, match="broken.json"):
        run(tmp_path / "broken.json", tmp_path / "out3")


def test_load_manifest_rejects_bad_files(tmp_path):
    (tmp_path / "generation.json").write_text(json.dumps({"version": 1, "backend": "recolor"}))
    with pytest.raises(InstSynthError, match="generation.json: field .mode_name. missing"):
        load_manifest(tmp_path)


def test_cli_paper_layout(stage1, tmp_path):
    """--folder holding metadata.json works as in the paper; outputs go under it."""
    folder = tmp_path / "data"
    folder.mkdir()
    meta = json.loads(stage1.read_text())
    for i in meta["instances"]:
        for k in ("crop_rgb", "crop_mask"):
            i[k] = str(stage1.parent / i[k])
    (folder / "metadata.json").write_text(json.dumps(meta))
    env = {**os.environ, "INSTSYNTH_NO_PROGRESS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "generation/instance_generation.py"), "--folder", str(folder),
                          "--num_samples", "1"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert len(load_manifest(folder / "Recolor")["instances"]) == len(meta["instances"])
    res = subprocess.run([sys.executable, str(REPO / "generation/instance_generation.py"), "--folder", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "metadata.json" in res.stderr


def test_rerun_keeps_what_the_quality_filter_added(stage1, tmp_path):
    summary = run(stage1, tmp_path, num_samples=1)
    manifest = json.loads(summary.manifest.read_text())
    manifest["quality_filter"] = {"clip": "x"}
    key = next(iter(manifest["instances"]))
    manifest["instances"][key]["scores"] = [{"clip_prompt": 0.3}]
    summary.manifest.write_text(json.dumps(manifest))
    run(stage1, tmp_path, num_samples=1)  # nothing to do: scores and header kept
    kept = json.loads(summary.manifest.read_text())
    assert kept["quality_filter"] == {"clip": "x"} and kept["instances"][key]["scores"] == [{"clip_prompt": 0.3}]
    run(stage1, tmp_path, num_samples=2)  # new samples: their scores are stale, so dropped
    assert "scores" not in json.loads(summary.manifest.read_text())["instances"][key]
