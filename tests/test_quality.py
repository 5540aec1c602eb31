"""Generation quality metrics (SSIM/PSNR in and out of the mask, FID, CLIP) and the quality gate."""
import json
import math
import shutil

import numpy as np
import pytest

from instsynth.core.io import InstSynthError, read_json, read_png
from instsynth.quality.clip import load_clip
from instsynth.quality.fid import fid_from_features, frechet_distance, load_feature_extractor
from instsynth.quality.gate import (
    FILTER_REPORT_NAME,
    SCORE_NAMES,
    class_prompt,
    gate_failures,
    passing_samples,
    score_generation,
)
from instsynth.quality.pixel import json_number, pixel_metrics, read_number
from instsynth.quality import runs
from instsynth.quality.runs import evaluate_generation, format_table, load_run, sample_pixel_metrics


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from instsynth.testing.tiny_eval_models import build_tiny_clip, build_tiny_inception

    root = tmp_path_factory.mktemp("tiny_eval_models")
    return {"clip": build_tiny_clip(root / "clip"), "inception": build_tiny_inception(root / "inception")}


@pytest.fixture(scope="module")
def recolor_run(demo_root, tmp_path_factory):
    """Stage 1 (k=2) and the recolor backend (2 samples per instance) on the demo train split."""
    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.runner import generate_instances
    from instsynth.stages.selection import select_instances

    out = tmp_path_factory.mktemp("recolor_run")
    selection = select_instances(demo_root, "train", k=2, out=out / "stage1", workers=1)
    summary = generate_instances(selection.metadata, out / "gen", GenerationSettings(mode="recolor", num_samples=2))
    return summary.manifest


@pytest.fixture
def run_copy(recolor_run, tmp_path):
    """A private copy of the generation folder (the manifest may be modified)."""
    dst = tmp_path / recolor_run.parent.name
    shutil.copytree(recolor_run.parent, dst)
    return dst / recolor_run.name


def random_pair(seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, bool)
    mask[10:30, 8:28] = True
    return image, mask


# --------------------------------------------------------------------------- pixel metrics
def test_identical_images_give_ssim_one_and_infinite_psnr():
    image, mask = random_pair()
    m = pixel_metrics(image, image.copy(), mask)
    assert m["ssim_in"] == 1.0 and m["ssim_out"] == 1.0
    assert m["psnr_in"] == math.inf and m["psnr_out"] == math.inf
    assert m["mask_leak"] == 0.0 and m["changed_fraction"] == 0.0


def test_change_inside_mask_leaves_outside_perfect():
    image, mask = random_pair()
    sample = image.copy()
    sample[mask] = 255 - sample[mask]
    m = pixel_metrics(image, sample, mask)
    assert m["ssim_out"] == 1.0 and m["psnr_out"] == math.inf and m["mask_leak"] == 0.0
    assert m["ssim_in"] < 0.5 and 0 < m["psnr_in"] < 20 and m["changed_fraction"] > 0.9


def test_change_outside_mask_is_measured():
    image, mask = random_pair()
    sample = image.copy()
    sample[0:4, 0:4] = 255 - sample[0:4, 0:4]
    m = pixel_metrics(image, sample, mask)
    assert m["ssim_in"] == 1.0 and m["psnr_in"] == math.inf
    assert m["ssim_out"] < 1.0 and math.isfinite(m["psnr_out"]) and m["mask_leak"] == 1.0


def test_psnr_and_mask_leak_known_values():
    reference = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[:10] = True
    sample = reference.copy()
    sample[mask] += 10  # MSE 100 inside
    sample[~mask] += 1  # MSE 1 outside
    m = pixel_metrics(reference, sample, mask)
    assert m["psnr_in"] == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert m["psnr_out"] == pytest.approx(10 * math.log10(255 ** 2))
    assert m["mask_leak"] == pytest.approx(1 / 101)
    assert m["changed_fraction"] == 1.0  # 10 grey levels > tolerance


def test_json_numbers_are_strict():
    assert json_number(math.inf) == "inf" and json_number(float("nan")) is None
    assert read_number("inf") == math.inf and json_number(0.1234567) == 0.123457


# --------------------------------------------------------------------------- FID
def test_frechet_distance_known_values():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)
    sigma1, sigma2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    assert frechet_distance([0, 0], sigma1, [1, 1], sigma2) == pytest.approx(2 + (1 - 3) ** 2 + (2 - 4) ** 2)


@pytest.mark.parametrize("n,d", [(12, 64), (200, 16)])
def test_fid_of_a_set_against_itself_is_zero(n, d):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(n, d))
    assert abs(fid_from_features(features, features)) < 1e-6
    other = rng.normal(size=(n, d)) + 0.5
    assert fid_from_features(features, other) > 1.0


def test_fid_few_samples_matches_full_computation():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(15, 40)), rng.normal(size=(13, 40)) * 1.5 + 0.2
    full = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert fid_from_features(real, fake) == pytest.approx(full, rel=1e-4)


def test_tiny_inception_fid(tiny_models):
    features = load_feature_extractor(tiny_models["inception"])
    rng = np.random.default_rng(3)
    dark = [rng.integers(0, 90, (50 + i, 50, 3), dtype=np.uint8) for i in range(6)]
    bright = [rng.integers(160, 256, (50, 50 + i, 3), dtype=np.uint8) for i in range(6)]
    f_dark = features(dark)
    assert f_dark.shape == (6, 232) and np.isfinite(f_dark).all()
    assert abs(fid_from_features(f_dark, features(dark))) < 1e-3
    assert fid_from_features(f_dark, features(bright)) > 1e-3


def test_inception_v3_state_dict_file_loads(tmp_path):
    """A plain torchvision Inception-v3 state_dict with 1008 classes (pytorch-fid's pt_inception layout)."""
    import torch
    from torchvision.models.inception import Inception3

    path = tmp_path / "pt_inception.pth"
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), path)
    features = load_feature_extractor(path)
    assert features.input_size == 299
    assert type(features.net.Mixed_7c).__name__ == "FIDInceptionE_2"  # pytorch-fid's own blocks
    assert features([np.zeros((40, 30, 3), np.uint8)]).shape == (1, 2048)


def test_inception_features_match_pytorch_fid(tmp_path, monkeypatch):
    """Features of a pt_inception-layout file equal pytorch-fid's InceptionV3 pool3 output on the same weights."""
    import torch
    from pytorch_fid import inception as fid_inception
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=True)
    with torch.no_grad():  # random BN statistics, so the test sees every block's output
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    torch.save(state, tmp_path / "pt_inception.pth")
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)  # no download
    reference = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    images = [np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8) for i in range(2)]
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        expected = reference(batch)[0].flatten(1).double().numpy()
    ours = load_feature_extractor(tmp_path / "pt_inception.pth")(images)
    # random weights grow activations to ~1e10: compare at the features' own scale
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_missing_models_give_clear_errors(tmp_path):
    with pytest.raises(InstSynthError, match="huggingface-cli download openai/clip-vit-base-patch32"):
        load_clip("instsynth-tests/no-such-clip")  # HF_HUB_OFFLINE=1 (conftest): no network tried
    with pytest.raises(InstSynthError, match="pt_inception-2015-12-05"):
        load_feature_extractor("instsynth-tests/no-such-inception")
    with pytest.raises(InstSynthError, match="not found"):
        load_feature_extractor(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InstSynthError, match="CLIP"):
        load_clip(tmp_path / "empty")


# --------------------------------------------------------------------------- evaluation of a run
def test_clip_scores_are_cosines(tiny_models):
    clip = load_clip(tiny_models["clip"])
    image, _ = random_pair()
    images = clip.images([image, 255 - image])
    texts = clip.texts(["a photo of a red car", "a photo of a man"])
    scores = images @ texts.T
    assert np.isfinite(scores).all() and (np.abs(scores) <= 1 + 1e-9).all()
    assert np.allclose(clip.texts(["a photo of a man"]), texts[1:])  # independent of batching


def test_evaluate_recolor_run(recolor_run, tiny_models, tmp_path, capsys):
    out = tmp_path / "evaluation.json"
    result = evaluate_generation(recolor_run, inception=tiny_models["inception"], clip=tiny_models["clip"],
                                         out=out, device="cpu", batch_size=4)
    manifest = json.loads(recolor_run.read_text())
    n_samples = sum(len(e["samples"]) for e in manifest["instances"].values())
    summary = result["summary"]
    assert summary["samples"] == n_samples == len(result["samples"]) and summary["instances"] == len(manifest["instances"])
    # recolor pastes through the mask: outside is untouched, inside changed
    assert summary["outside_identical"] == n_samples and summary["ssim_out"] == 1.0 and summary["psnr_out"] == math.inf
    assert summary["mask_leak_max"] == 0.0 and summary["ssim_in"] < 1.0 and math.isfinite(summary["psnr_in"])
    assert math.isfinite(summary["fid"]) and summary["fid"] > 0
    for record in result["samples"]:
        assert -1 <= record["clip_prompt"] <= 1 and -1 <= record["clip_source"] <= 1
    written = read_json(out)  # strict JSON: infinity as "inf"
    assert written["summary"]["psnr_out"] == "inf" and written["samples"][0]["ssim_out"] == 1.0
    assert "Infinity" not in out.read_text()
    table = format_table(result)
    assert "psnr_out" in table and "inf" in table and f"{n_samples}/{n_samples}" in table


def test_evaluate_without_models_skips_with_notes(recolor_run, tmp_path):
    result = evaluate_generation(recolor_run, out=tmp_path / "e.json", device="cpu")
    assert result["summary"]["fid"] is None and result["summary"]["clip_prompt"] is None
    assert any("FID skipped" in n for n in result["notes"]) and any("CLIP scores skipped" in n for n in result["notes"])
    assert "skipped" in format_table(result)


def test_evaluate_detects_a_sample_changed_outside_its_mask(run_copy, tmp_path):
    from instsynth.core.io import read_png, write_png

    entry = next(iter(json.loads(run_copy.read_text())["instances"].values()))
    sample_path = run_copy.parent / entry["samples"][0]
    sample = read_png(sample_path, rgb=True)
    sample[0, 0] = 255 - sample[0, 0]  # a corner pixel: outside every demo crop's mask
    write_png(sample_path, sample)
    result = evaluate_generation(run_copy, out=tmp_path / "e.json", device="cpu")
    assert result["summary"]["outside_identical"] == result["summary"]["samples"] - 1
    assert result["summary"]["mask_leak_max"] > 0 and math.isfinite(result["summary"]["psnr_out"])


def test_pixel_metrics_do_not_depend_on_workers(recolor_run, monkeypatch):
    _, refs = load_run(recolor_run)
    one = sample_pixel_metrics(refs, workers=1)
    monkeypatch.setattr(runs, "MIN_INSTANCES_PER_WORKER", 1)
    assert sample_pixel_metrics(refs, workers=2) == one and len(one) == len(refs)


def test_bad_sample_names_the_file(run_copy, tmp_path):
    from instsynth.core.io import write_png

    entry = next(iter(json.loads(run_copy.read_text())["instances"].values()))
    write_png(run_copy.parent / entry["samples"][-1], np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(InstSynthError, match=entry["samples"][-1].split("/")[-1] + ".*expected size"):
        evaluate_generation(run_copy, out=tmp_path / "e.json", device="cpu")


# --------------------------------------------------------------------------- quality gate
def test_filter_writes_scores_and_is_idempotent(run_copy, tiny_models):
    report = score_generation(run_copy, clip=tiny_models["clip"], device="cpu")
    manifest = json.loads(run_copy.read_text())
    for entry in manifest["instances"].values():
        assert len(entry["scores"]) == len(entry["samples"])
        for score in entry["scores"]:
            assert set(SCORE_NAMES) <= set(score)
            assert -1 <= score["clip_prompt"] <= 1 and score["mask_leak"] == 0.0
            assert score["clip_margin"] is not None and -2 <= score["clip_margin"] <= 2
    assert report["scored_now"] == report["samples"] > 0
    kept = [row["samples_kept"] for row in report["min_clip_score"]]
    assert kept == sorted(kept, reverse=True)  # stricter threshold, fewer samples
    assert report["top_fraction"][-1] == {"fraction": 1.0, "samples_kept": report["samples"],
                                          "instances_kept": report["instances"]}
    assert read_json(run_copy.parent / FILTER_REPORT_NAME)["samples"] == report["samples"]

    before = run_copy.read_bytes()
    again = score_generation(run_copy, clip=tiny_models["clip"], device="cpu")
    assert again["scored_now"] == 0 and run_copy.read_bytes() == before
    from instsynth.core.manifests import load_manifest

    assert load_manifest(run_copy)["instances"]  # still a valid manifest (contract 2)


def test_filter_cli(run_copy, tiny_models, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("filter_generation", REPO / "generation" / "filter_generation.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--manifest", str(run_copy.parent), "--clip", str(tiny_models["clip"]), "--device", "cpu",
              "--thresholds", "0.0", "0.5"])
    out = capsys.readouterr().out
    assert "min_clip_score 0.00" in out and "top_fraction 0.50" in out
    with pytest.raises(SystemExit, match="error: .*no-such"):
        cli.main(["--manifest", str(run_copy), "--clip", "instsynth-tests/no-such", "--device", "cpu", "--force"])


def test_passing_samples_thresholds_and_top_fraction():
    scores = {"a": [0.30, 0.10], "b": [0.25, 0.20, 0.05]}
    manifest = {"instances": {k: {"samples": [f"{k}{i}.png" for i in range(len(v))],
                                  "scores": [{"clip_prompt": s} for s in v]} for k, v in scores.items()}}
    assert passing_samples(manifest) == {"a": [0, 1], "b": [0, 1, 2]}
    assert passing_samples(manifest, min_clip_score=0.2) == {"a": [0], "b": [0, 1]}
    assert passing_samples(manifest, top_fraction=0.4) == {"a": [0], "b": [0]}  # ceil(0.4 * 5) = 2
    assert passing_samples(manifest, min_clip_score=0.26, top_fraction=0.4) == {"a": [0], "b": []}
    del manifest["instances"]["b"]["scores"]
    with pytest.raises(InstSynthError, match="filter_generation"):
        passing_samples(manifest, min_clip_score=0.2)


def test_clip_class_margin_is_own_class_minus_best_other_class(run_copy, tiny_models):
    from instsynth.core.manifests import load_manifest

    score_generation(run_copy, clip=tiny_models["clip"], device="cpu")
    manifest = load_manifest(run_copy)
    key, entry = next(iter(manifest["instances"].items()))
    assert class_prompt("a photo of {}", "car") == "a photo of a car"
    scorer = load_clip(tiny_models["clip"], "cpu")
    image = scorer.images([read_png(entry["sample_paths"][0], rgb=True)])[0]
    from instsynth.core.labels import load_prompt_bank

    _, bank = load_prompt_bank(manifest["params"]["prompts"])
    texts = [class_prompt("a photo of {}", c) for c in [entry["class"]] + [c for c in bank if c != entry["class"]]]
    cosines = scorer.texts(texts) @ image
    assert entry["scores"][0]["clip_class_margin"] == pytest.approx(cosines[0] - cosines[1:].max(), abs=1e-5)
    report = read_json(run_copy.parent / FILTER_REPORT_NAME)
    kept = [row["samples_kept"] for row in report["min_clip_margin"]]
    assert kept == sorted(kept, reverse=True)


def test_gate_failures_per_criterion():
    scores = [{"clip_prompt": 0.3, "clip_class_margin": 0.05, "mask_iou": 0.8, "mask_class_ok": True},
              {"clip_prompt": 0.3, "clip_class_margin": -0.01, "mask_iou": 0.8, "mask_class_ok": True},
              {"clip_prompt": 0.1, "clip_class_margin": 0.05, "mask_iou": 0.9, "mask_class_ok": False},
              {"clip_prompt": 0.3, "clip_class_margin": 0.05, "mask_iou": 0.2, "mask_class_ok": True}]
    manifest = {"instances": {"a": {"samples": ["a0", "a1", "a2", "a3"], "scores": scores}}}
    failed = gate_failures(manifest, min_clip_score=0.2, min_mask_iou=0.5, min_clip_margin=0.0)
    assert failed == {("a", 0): [], ("a", 1): ["min_clip_margin"], ("a", 2): ["min_clip_score", "min_mask_iou"],
                      ("a", 3): ["min_mask_iou"]}
    assert passing_samples(manifest, min_mask_iou=0.5) == {"a": [0, 1]}
    del scores[0]["mask_iou"]
    with pytest.raises(InstSynthError, match="--mask_model"):
        gate_failures(manifest, min_mask_iou=0.5)
