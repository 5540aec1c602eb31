"""``--mode diffusers`` with tiny random SDXL-inpaint and FLUX.1-Fill pipelines (real diffusers classes,
saved with save_pretrained, loaded by path): contract, batch invariance, sharding, resume, options, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from instsynth.generation import GenerationSettings, generate_instances, load_manifest
from instsynth.core.io import InstSynthError, read_png
from instsynth.stages.selection import load_metadata, select_instances

torch = pytest.importorskip("torch")

N_INSTANCES = 3
STEPS = 2
PIPELINES = {"sdxl-inpaint": "StableDiffusionXLInpaintPipeline", "flux-fill": "FluxFillPipeline",
             "kandinsky-inpaint": "KandinskyV22InpaintCombinedPipeline"}
EXTRA = {"sdxl-inpaint": {}, "flux-fill": {"resolution": 32, "pipeline_options": {"max_sequence_length": 16}},
         "kandinsky-inpaint": {"pipeline_options": {"prior_guidance_scale": 4, "prior_num_inference_steps": 2}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from instsynth.testing.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"), names=list(PIPELINES) + ["sd"])


@pytest.fixture(scope="module")
def small_meta(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_small")
    select_instances(demo_root, "train", k=3, out=out, workers=1)
    meta = json.loads((out / "metadata.json").read_text())
    meta["instances"] = meta["instances"][:N_INSTANCES]
    path = out / "metadata_small.json"
    path.write_text(json.dumps(meta))
    return path


def settings(name, tiny, **kw):
    return GenerationSettings(mode="diffusers", model_path=str(tiny[name]), steps=STEPS, **{**EXTRA[name], **kw})


def pngs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_diffusers_backend_end_to_end_and_batch_invariant(name, tiny, small_meta, tmp_path):
    one = generate_instances(small_meta, tmp_path / "b1", settings(name, tiny, num_samples=2, batch_size=1))
    three = generate_instances(small_meta, tmp_path / "b3", settings(name, tiny, num_samples=2, batch_size=3))
    assert one.samples_written == three.samples_written == 2 * N_INSTANCES
    assert pngs(tmp_path / "b1") == pngs(tmp_path / "b3")  # byte-identical for any batch size
    assert (three.manifest.parent.name) == "Diffusers"

    manifest = load_manifest(three.manifest, check_files=True)
    resolved = manifest["params"]["resolved"]
    assert manifest["backend"] == "diffusers" and manifest["model_id"] == str(tiny[name])
    assert resolved["pipeline"] == PIPELINES[name] and resolved["working_resolution"] == 32
    assert resolved["call_options"]["num_inference_steps"] == STEPS
    for inst in load_metadata(small_meta)["instances"]:
        crop, mask = read_png(inst["crop_rgb_path"], rgb=True), read_png(inst["crop_mask_path"]) > 0
        outs = [read_png(p, rgb=True) for p in manifest["instances"][inst["key"]]["sample_paths"]]
        for out in outs:
            assert out.shape == crop.shape and np.array_equal(out[~mask], crop[~mask])
            assert not np.array_equal(out[mask], crop[mask])
        assert not np.array_equal(outs[0], outs[1])


def test_flux_fill_options_change_the_pixels_and_resume_refuses_other_settings(tiny, small_meta, tmp_path):
    base = generate_instances(small_meta, tmp_path / "a", settings("flux-fill", tiny))
    params = load_manifest(base.manifest)["params"]
    assert params["pipeline_options"] == {"max_sequence_length": 16} and "true_cfg_scale" not in params
    generate_instances(small_meta, tmp_path / "g", settings("flux-fill", tiny, guidance_scale=30.0))
    assert pngs(tmp_path / "a") != pngs(tmp_path / "g")  # FLUX's distilled guidance reaches the transformer
    with pytest.raises(InstSynthError, match="other settings.*guidance_scale"):
        generate_instances(small_meta, tmp_path / "a", settings("flux-fill", tiny, guidance_scale=30.0))
    with pytest.raises(InstSynthError, match="other settings.*pipeline_options"):
        generate_instances(small_meta, tmp_path / "a", settings("flux-fill", tiny, pipeline_options={}))

    more = generate_instances(small_meta, tmp_path / "a", settings("flux-fill", tiny, num_samples=2))
    assert (more.samples_written, more.samples_existing) == (N_INSTANCES, N_INSTANCES)
    generate_instances(small_meta, tmp_path / "fresh", settings("flux-fill", tiny, num_samples=2))
    assert pngs(tmp_path / "a") == pngs(tmp_path / "fresh")
    assert (tmp_path / "a/Diffusers/generation.json").read_bytes() == (tmp_path / "fresh/Diffusers/generation.json").read_bytes()


def test_options_a_pipeline_does_not_take_are_errors(tiny, small_meta, tmp_path):
    with pytest.raises(InstSynthError, match="takes no true_cfg_scale"):
        generate_instances(small_meta, tmp_path, settings("flux-fill", tiny, true_cfg_scale=4.0))
    with pytest.raises(InstSynthError, match="takes no negative_prompt"):
        generate_instances(small_meta, tmp_path, settings("flux-fill", tiny, negative_prompt="blurry"))
    with pytest.raises(InstSynthError, match="takes no no_such_option"):
        generate_instances(small_meta, tmp_path, settings("sdxl-inpaint", tiny, pipeline_options={"no_such_option": 1}))
    with pytest.raises(InstSynthError, match="model folder not found"):
        generate_instances(small_meta, tmp_path, GenerationSettings(mode="diffusers", model_path=str(tmp_path / "x")))


def test_pipeline_options_parsing():
    from instsynth.generation.common import parse_pipeline_options

    assert parse_pipeline_options("max_sequence_length=256, prior_guidance_scale=4.5,padding_mask_crop=null") == \
        {"max_sequence_length": 256, "padding_mask_crop": None, "prior_guidance_scale": 4.5}
    assert parse_pipeline_options('{"a": true}') == {"a": True} and parse_pipeline_options(None) == {}
    for bad in ("max_sequence_length", "1x=2", "strength=0.5", "[1]"):
        with pytest.raises(ValueError):
            parse_pipeline_options(bad)


def test_cli_sharded_over_two_processes_equals_one_process(tiny, small_meta, tmp_path):
    """The CLI with FLUX options (guidance, pipeline_options) under torchrun: shards merge to one process's run."""
    common = ["--mode", "diffusers", "--model_path", str(tiny["flux-fill"]), "--metadata", str(small_meta),
              "--steps", str(STEPS), "--num_samples", "2", "--batch_size", "2", "--resolution", "32",
              "--guidance_scale", "30", "--pipeline_options", "max_sequence_length=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTSYNTH_NO_PROGRESS": "1"}
    script = str(REPO / "generation/instance_generation.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = subprocess.run([*launcher, script, *common, "--folder", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    generate_instances(small_meta, tmp_path / "one", settings("flux-fill", tiny, num_samples=2, batch_size=2,
                                                               guidance_scale=30.0))
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one")
    assert (tmp_path / "two/Diffusers/generation.json").read_bytes() == \
        (tmp_path / "one/Diffusers/generation.json").read_bytes()
