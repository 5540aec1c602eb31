"""Diffusion backends end to end from disk with tiny random pipelines: contract, batch invariance,
scale-out over 2 processes, kill -9 and resume, OOM halving, missing weights."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from instsynth.generation import GenerationSettings, generate_instances, load_manifest
from instsynth.generation.common import SampleJob, composite
from instsynth.core.imageops import resize_image, resize_mask
from instsynth.generation.runner import _RunState, generate_with_oom_halving
from instsynth.core.io import InstSynthError, read_png
from instsynth.stages.selection import load_metadata, select_instances

torch = pytest.importorskip("torch")

N_INSTANCES = 4
STEPS = 3
CASES = {"diffinpainting": "sd-inpaint", "bld-sdxl": "sdxl", "bld-sd": "sd", "gligen": "gligen"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from instsynth.testing.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def small_meta(demo_root, tmp_path_factory):
    """Stage-1 metadata of the demo tree cut to a few instances (crops stay next to it)."""
    out = tmp_path_factory.mktemp("stage1_small")
    select_instances(demo_root, "train", k=3, out=out, workers=1)
    meta = json.loads((out / "metadata.json").read_text())
    meta["instances"] = meta["instances"][:N_INSTANCES]
    path = out / "metadata_small.json"
    path.write_text(json.dumps(meta))
    return path


def settings(case, tiny, **kw):
    mode = case.split("-")[0]
    return GenerationSettings(mode=mode, model_path=str(tiny[CASES[case]]), steps=STEPS, **kw)


def pngs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_end_to_end_and_batch_invariant(case, tiny, small_meta, tmp_path):
    one = generate_instances(small_meta, tmp_path / "b1", settings(case, tiny, num_samples=2, batch_size=1))
    three = generate_instances(small_meta, tmp_path / "b3", settings(case, tiny, num_samples=2, batch_size=3))
    assert one.samples_written == three.samples_written == 2 * N_INSTANCES
    assert pngs(tmp_path / "b1") == pngs(tmp_path / "b3")  # byte-identical for any batch size

    manifest = load_manifest(three.manifest, check_files=True)
    assert manifest["model_id"] == str(tiny[CASES[case]])
    assert manifest["params"]["resolved"]["dtype"] == "float32" and manifest["params"]["resolved"]["working_resolution"] == 32
    meta = load_metadata(small_meta)
    for inst in meta["instances"]:
        crop, mask = read_png(inst["crop_rgb_path"], rgb=True), read_png(inst["crop_mask_path"]) > 0
        outs = [read_png(p, rgb=True) for p in manifest["instances"][inst["key"]]["sample_paths"]]
        for out in outs:
            assert out.shape == crop.shape
            assert np.array_equal(out[~mask], crop[~mask])  # no VAE leak outside the instance
            assert not np.array_equal(out[mask], crop[mask])
        assert not np.array_equal(outs[0], outs[1])  # samples differ


def test_sharded_run_over_two_processes_equals_one_process(tiny, small_meta, tmp_path):
    # --mode diffpainting (the paper script's spelling) is diffinpainting: identical outputs and manifest
    common = ["--mode", "diffpainting", "--model_path", str(tiny["sd-inpaint"]), "--metadata", str(small_meta),
              "--steps", str(STEPS), "--num_samples", "2", "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTSYNTH_NO_PROGRESS": "1"}
    script = str(REPO / "generation/instance_generation.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run([*launcher, script, *common, "--folder", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    generate_instances(small_meta, tmp_path / "one", settings("diffinpainting", tiny, num_samples=2, batch_size=2))
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one")
    two_dir, one_dir = tmp_path / "two/DiffPainting", tmp_path / "one/DiffPainting"
    assert (two_dir / "generation.json").read_bytes() == (one_dir / "generation.json").read_bytes()
    assert sorted(p.name for p in two_dir.glob("*.json")) == ["generation.json", "generation_report.json"]  # shards merged
    report = json.loads((two_dir / "generation_report.json").read_text())
    assert report["processes"] == 2 and report["samples_written"] == 2 * N_INSTANCES


def test_kill_9_then_resume_completes_the_same_set(demo_root, tmp_path):
    """A run killed mid-way leaves no partial PNG; the rerun finishes and equals an uninterrupted run."""
    out = tmp_path / "out"
    select_instances(demo_root, "train", k=3, out=tmp_path, workers=1)
    cmd = [sys.executable, str(REPO / "generation/instance_generation.py"), "--metadata", str(tmp_path / "metadata.json"),
           "--folder", str(out), "--num_samples", "20", "--batch_size", "2"]
    env = {**os.environ, "INSTSYNTH_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "Recolor" / "generation.json"
    deadline = time.time() + 120
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = load_manifest(manifest)["instances"]
    n_recorded = sum(len(e["samples"]) for e in recorded.values())
    assert all(p in set(out.rglob("*.png")) for e in recorded.values() for p in e["sample_paths"])
    for path in out.rglob("*.png"):
        if not path.name.startswith("."):  # hidden names are temporary files of atomic writes
            read_png(path, rgb=True)  # every PNG under its final name is complete
    assert n_recorded < 20 * len(load_metadata(tmp_path / "metadata.json")["instances"]), "run finished before the kill"

    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not list(out.rglob(".*.tmp.*"))
    fresh = tmp_path / "fresh"
    subprocess.run([*cmd[:5], str(fresh), *cmd[6:]], env=env, check=True, capture_output=True)
    assert pngs(out) == pngs(fresh)
    assert manifest.read_bytes() == (fresh / "Recolor" / "generation.json").read_bytes()


class _OomBelow:
    """A backend stub that runs out of memory for calls with more than ``limit`` images."""

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def generate(self, jobs):
        self.calls.append(len(jobs))
        if len(jobs) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [np.full((2, 2, 3), job.sample, np.uint8) for job in jobs]


def test_out_of_memory_halves_the_batch_and_keeps_order():
    jobs = [SampleJob("k", j, j, "p", "t", "car", np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), bool))
            for j in range(8)]
    backend, limit, state = _OomBelow(2), [8], _RunState()
    images = generate_with_oom_halving(backend, jobs, limit, state)
    assert [int(im[0, 0, 0]) for im in images] == list(range(8))
    assert limit == [2] and state.oom_halvings == 2 and backend.calls[:3] == [8, 4, 2]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_with_oom_halving(_OomBelow(0), jobs[:1], [1], _RunState())


def test_missing_weights_give_one_clear_error(small_meta, tmp_path, tiny):
    with pytest.raises(InstSynthError, match=r"someorg/no-such-model.*(HF_HOME|--model_path)"):
        generate_instances(small_meta, tmp_path, GenerationSettings(mode="diffinpainting", model_path="someorg/no-such-model"))
    with pytest.raises(InstSynthError, match="model folder not found"):
        generate_instances(small_meta, tmp_path, GenerationSettings(mode="bld", model_path=str(tmp_path / "nowhere")))
    with pytest.raises(InstSynthError, match="inpainting model"):
        generate_instances(small_meta, tmp_path, GenerationSettings(mode="diffinpainting", model_path=str(tiny["sd"])))


def test_resizing_uses_proper_filters_and_composite_keeps_the_background():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 45, 3), dtype=np.uint8)
    mask = np.zeros((45, 45), bool)
    mask[10:30, 3:4] = True  # one pixel wide: must survive shrinking
    small = resize_mask(mask, (16, 16))
    assert small.any() and resize_image(image, (16, 16)).shape == (16, 16, 3)
    assert resize_mask(small, (45, 45)).shape == (45, 45)
    flat = np.full((45, 45, 3), 100, np.uint8)
    assert np.array_equal(resize_image(flat, (64, 64)), np.full((64, 64, 3), 100, np.uint8))  # no ringing on flat
    generated = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = composite(image, generated, mask)
    assert np.array_equal(out[~mask], image[~mask]) and out.shape == image.shape


def test_sampler_and_blending_options(tiny, small_meta, tmp_path):
    """gligen with DDIM (--no_plms) and bld blending from the first step both run and record their settings."""
    ddim = generate_instances(small_meta, tmp_path / "g", settings("gligen", tiny, plms=False, batch_size=2))
    assert load_manifest(ddim.manifest)["params"]["resolved"]["scheduler"] == "DDIMScheduler"
    full = generate_instances(small_meta, tmp_path / "b", settings("bld-sd", tiny, blending_start_percentage=0.0,
                                                                    batch_size=2))
    assert full.samples_written == N_INSTANCES
    with pytest.raises(InstSynthError, match="blending_start_percentage"):
        generate_instances(small_meta, tmp_path / "c", settings("bld-sd", tiny, blending_start_percentage=1.0))
