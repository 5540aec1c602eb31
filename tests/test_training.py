"""Training stage: quick config on the demo data (CPU), resume, eval-only, overfitting, clear errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

QUICK = REPO / "configs" / "quick_schedules" / "fastinst_R50_quick.yaml"
# the quick schedule as the tests run it: 20 iterations, a checkpoint after 10, every step logged
SHORT = ("SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "10", "SOLVER.BASE_LR", "0.0005", "TEST.EVAL_PERIOD", "0",
         "LOG_PERIOD", "1")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private demo cache: the quick config builds the demo dataset and COCO files there on first use."""
    path = tmp_path_factory.mktemp("demo_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("INSTSYNTH_DEMO_DIR", str(path))
    yield path
    mp.undo()


def train_net(*args, env_dir, check=True):
    env = {**os.environ, "INSTSYNTH_DEMO_DIR": str(env_dir), "INSTSYNTH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics_lines(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_run(demo_cache, tmp_path_factory):
    """The quick config shortened (20 iterations, checkpoint every 10), from the command line."""
    out = tmp_path_factory.mktemp("quick")
    train_net("--config-file", QUICK, *SHORT, "OUTPUT_DIR", out, env_dir=demo_cache)
    return out


def test_quick_config_trains_writes_outputs_and_loss_falls(quick_run):
    for name in ("config.yaml", "log.txt", "metrics.json", "model_0000009.pth", "model_final.pth", "last_checkpoint",
                 "inference/coco_instances_results.json", "inference/metrics.json"):
        assert (quick_run / name).is_file(), name
    assert (quick_run / "last_checkpoint").read_text() == "model_final.pth"
    losses = [r["total_loss"] for r in metrics_lines(quick_run) if "total_loss" in r]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    from instsynth.config import load_config
    saved = load_config(quick_run / "config.yaml")  # the merged config reproduces the run
    assert saved == load_config(QUICK, [*SHORT, "OUTPUT_DIR", str(quick_run)])
    log = (quick_run / "log.txt").read_text()
    assert "estimated training time on CPU:" in log and "for the remaining 16 of 20 iterations" in log


def test_two_processes_train_and_evaluate(demo_cache, tmp_path):
    """--num-gpus 2 (here two CPU processes over gloo) splits the batch and gathers the predictions."""
    train_net("--config-file", QUICK, "--num-gpus", "2", *SHORT, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100",
              "TEST.EVAL_PERIOD", "2", "OUTPUT_DIR", tmp_path, env_dir=demo_cache)
    log = (tmp_path / "log.txt").read_text()
    assert "2 process(es)" in log and log.count("iter 4/4") == 1  # only the main process logs
    assert "DDP find_unused_parameters=False" in log  # FastInst: every parameter gets a gradient
    assert [r["iteration"] for r in metrics_lines(tmp_path) if "total_loss" in r] == [0, 1, 2, 3]
    assert (tmp_path / "model_final.pth").is_file()
    final = json.loads((tmp_path / "inference" / "metrics.json").read_text())
    assert final["segm"]["AP"] is not None
    # TEST.EVAL_PERIOD 2: evaluated after iteration 2 and at the end, written as Detectron2's EvalHook does
    evals = [r for r in metrics_lines(tmp_path) if "segm/AP" in r]
    assert [r["iteration"] for r in evals] == [1, 3]
    assert evals[-1]["segm/AP"] == final["segm"]["AP"] and evals[-1]["cityscapes/AP"] == final["cityscapes"]["AP"]
    assert evals[-1]["cityscapes_demo_instance_seg_val/segm/AP50"] == final["segm"]["AP50"]


def test_resume_continues_from_saved_iteration_with_same_state(quick_run, demo_cache, tmp_path):
    """Resuming from the iteration-10 checkpoint reproduces the uninterrupted run's last 10 iterations."""
    shutil.copy(quick_run / "model_0000009.pth", tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    train_net("--config-file", QUICK, "--resume", *SHORT, "OUTPUT_DIR", tmp_path, env_dir=demo_cache)
    assert "continuing at iteration 10" in (tmp_path / "log.txt").read_text()
    resumed = [r for r in metrics_lines(tmp_path) if "total_loss" in r]
    full = {r["iteration"]: r for r in metrics_lines(quick_run) if "total_loss" in r}
    assert [r["iteration"] for r in resumed] == list(range(10, 20))
    for r in resumed:  # same scheduler position and same updates
        assert r["lr"] == pytest.approx(full[r["iteration"]]["lr"], rel=1e-9)
        assert r["total_loss"] == pytest.approx(full[r["iteration"]]["total_loss"], rel=1e-3)
    a = torch.load(quick_run / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert b["iteration"] == a["iteration"] == 19
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 20
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=1e-4)
    exp_avg = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
    got = [s["exp_avg"] for s in b["optimizer"]["state"].values()]
    for x, y in zip(exp_avg, got):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-5)


def test_eval_only_writes_ap_numbers(quick_run, demo_cache, tmp_path):
    train_net("--config-file", QUICK, "--eval-only", "MODEL.WEIGHTS", quick_run / "model_final.pth",
              "OUTPUT_DIR", tmp_path, env_dir=demo_cache)
    metrics = json.loads((tmp_path / "inference" / "metrics.json").read_text())["segm"]
    for key in ("AP", "AP50", "AP75", "AP-car", "AP-person"):
        assert isinstance(metrics[key], float) and 0 <= metrics[key] <= 100, key
    assert "AP50" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "model_final.pth").exists()


def test_tiny_fastinst_overfits_two_images(demo_cache, tmp_path):
    """Trained and evaluated on the same two demo images, FastInst reaches mask AP50 >= 0.5."""
    from instsynth.config import load_config
    from instsynth.data.catalog import get_spec, register_coco_instances
    from instsynth.engine.trainer import run

    spec = get_spec("cityscapes_demo_instance_seg_train")
    coco = json.loads(spec.json_file.read_text())
    keep = [im["id"] for im in coco["images"]][:2]
    two = {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}
    assert len(two["annotations"]) >= 10
    (tmp_path / "two.json").write_text(json.dumps(two))
    register_coco_instances("test_two_demo_images", tmp_path / "two.json", spec.image_root)
    cfg = load_config(QUICK, [
        "DATASETS.TRAIN", "('test_two_demo_images',)", "DATASETS.TEST", "('test_two_demo_images',)",
        "INPUT.CROP.ENABLED", "False", "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "MODEL.FASTINST.DEC_LAYERS", "1", "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITER", "150",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "LOG_PERIOD", "50", "OUTPUT_DIR", str(tmp_path / "out")])
    metrics = run(cfg)["test_two_demo_images"]["segm"]
    assert metrics["AP50"] >= 50, metrics


def test_checkpoint_keep_deletes_older_periodic_checkpoints_of_the_run(demo_cache, tmp_path):
    """SOLVER.CHECKPOINT_KEEP 2: of the checkpoints after iterations 2, 4, 6 only the newest two stay, with
    model_final; a checkpoint of an earlier run in the folder is left alone (Detectron2's max_to_keep)."""
    (tmp_path / "model_0000000.pth").write_bytes(b"earlier run")
    train_net("--config-file", QUICK, *SHORT, "SOLVER.MAX_ITER", "7", "SOLVER.CHECKPOINT_PERIOD", "2",
              "SOLVER.CHECKPOINT_KEEP", "2", "OUTPUT_DIR", tmp_path, env_dir=demo_cache)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth", "model_0000003.pth",
                                                               "model_0000005.pth", "model_final.pth"]
    assert "deleted model_0000001.pth (SOLVER.CHECKPOINT_KEEP 2)" in (tmp_path / "log.txt").read_text()


def test_bad_config_key_lists_valid_keys(tmp_path):
    from instsynth.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(QUICK, ["SOLVER.MAX_ITERS", "5"])
    assert "SOLVER.MAX_ITERS" in str(err.value) and "Did you mean SOLVER.MAX_ITER?" in str(err.value)
    assert "BASE_LR" in str(err.value) and "IMS_PER_BATCH" in str(err.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {QUICK}\nMODEL:\n  FASTINST:\n    NUM_QUERIES: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "MODEL.FASTINST.NUM_QUERIES" in str(err.value)
    assert "NUM_OBJECT_QUERIES" in str(err.value)
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER must be of type int"):
        load_config(None, ["SOLVER.MAX_ITER", "many"])

    proc = train_net("--config-file", QUICK, "SOLVER.BASE_RL", "0.1", env_dir=tmp_path, check=False)
    assert proc.returncode != 0 and "Did you mean SOLVER.BASE_LR?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_base_chain_and_opts_override(tmp_path):
    from instsynth.config import load_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 0.5\nINPUT:\n  MIN_SIZE_TRAIN: (64, 96)\n")
    (tmp_path / "sub" / "child.yaml").write_text("_BASE_: ../base.yaml\nSOLVER:\n  BASE_LR: 0.25\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["SOLVER.MAX_ITER", "9"])
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.INPUT.MIN_SIZE_TRAIN) == (9, 0.25, (64, 96))
    assert cfg.SOLVER.WEIGHT_DECAY == 0.05  # untouched default


def test_unknown_dataset_and_model_names_list_registered(monkeypatch):
    from instsynth.config import load_config
    from instsynth.data.catalog import get_dataset_dicts
    from instsynth.core.io import InstSynthError
    from instsynth.modeling import build_model

    with pytest.raises(InstSynthError) as err:
        get_dataset_dicts("cityscapes_fine_instance_seg_trian")
    msg = str(err.value)
    assert "Did you mean 'cityscapes_fine_instance_seg_train'" in msg
    assert "cityscapes_instsynth_train" in msg and "cityscapes_fine_instance_seg_val" in msg
    with pytest.raises(InstSynthError) as err:
        build_model(load_config(QUICK, ["MODEL.META_ARCHITECTURE", "FastInts"]))
    assert "Did you mean 'FastInst'" in str(err.value)
    monkeypatch.setenv("INSTSYNTH_DATASETS", "/nonexistent/datasets")
    with pytest.raises(InstSynthError, match="main_defined_clean_ver.py"):
        get_dataset_dicts("cityscapes_fine_instance_seg_val")


def test_tree_roots_from_environment(demo_cache, monkeypatch):
    from instsynth.data.catalog import demo_root, get_dataset_dicts, get_spec

    get_spec("cityscapes_demo_instance_seg_val")  # builds the demo tree
    monkeypatch.setenv("INSTSYNTH_CITYSCAPES_INSTSYNTH", str(demo_root()))
    dicts = get_dataset_dicts("cityscapes_instsynth_val")
    assert len(dicts) == 6 and all(str(demo_root()) in d["file_name"] for d in dicts)


def test_mapper_flip_crop_and_crowd(demo_cache):
    from instsynth.config import load_config
    from instsynth.data.catalog import get_dataset_dicts, get_metadata
    from instsynth.data.mapper import DatasetMapper, Geometry

    cfg = load_config(QUICK)
    meta = get_metadata("cityscapes_demo_instance_seg_train")
    mapper = DatasetMapper(cfg, True, meta.label_id_to_contiguous)
    record = max(get_dataset_dicts("cityscapes_demo_instance_seg_train"), key=lambda d: len(d["annotations"]))
    crowd = sum(a["iscrowd"] for a in record["annotations"])
    plain = Geometry(256, 512, 256, 512, 0, 0, 256, 512, False)  # unscaled: pixel-exact comparisons
    out = mapper.targets(record["annotations"], plain)
    assert len(out["gt_classes"]) == len(record["annotations"]) - crowd
    flipped = mapper.targets(record["annotations"], Geometry(256, 512, 256, 512, 0, 0, 256, 512, True))
    assert torch.equal(flipped["gt_masks"], out["gt_masks"].flip(-1))
    cropped = mapper.targets(record["annotations"], Geometry(256, 512, 256, 512, 300, 150, 100, 200, False))
    kept = out["gt_masks"][:, 150:250, 300:500]
    assert 0 < len(cropped["gt_classes"]) < len(out["gt_classes"])
    assert torch.equal(cropped["gt_masks"], kept[kept.flatten(1).any(1)])
    # polygons (transformed as coordinates) and RLE masks (warped as arrays) stay pixel-aligned when upscaled
    from pycocotools import mask as mask_utils

    from instsynth.data.mapper import annotation_mask
    zoom = Geometry(256, 512, 512, 1024, 300, 100, 200, 400, True)
    polys = [a["segmentation"] for a in record["annotations"] if isinstance(a["segmentation"], list)]
    for poly in polys:
        rle = mask_utils.merge(mask_utils.frPyObjects(poly, 256, 512))
        assert np.array_equal(annotation_mask(poly, zoom), annotation_mask(rle, zoom))
    assert sum(annotation_mask(p, zoom).sum() for p in polys) > 1000
    sample = mapper(record, np.random.default_rng(0))
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 128, 256)
    assert sample["instances"]["gt_masks"].shape[1:] == (128, 256)


def test_lr_schedule_warmup_and_poly():
    from instsynth.config import load_config
    from instsynth.engine.trainer import lr_factor

    cfg = load_config(None, ["SOLVER.MAX_ITER", "100", "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.1"])
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 5) == pytest.approx(0.55 * 0.95 ** 0.9)
    assert lr_factor(cfg, 50) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(cfg, 100) == 0


def test_fastinst_configs_load_with_paper_settings():
    from instsynth.config import load_config

    folder = REPO / "configs" / "cityscapes" / "instance-segmentation"
    d1 = load_config(folder / "fastinst_R50_ppm-fpn_x1_576_D1.yaml")
    d3 = load_config(folder / "fastinst_R50_ppm-fpn_x3_640_D3_instsynth.yaml")
    assert (d1.MODEL.FASTINST.DEC_LAYERS, d3.MODEL.FASTINST.DEC_LAYERS) == (1, 3)
    assert d1.MODEL.FASTINST.NUM_CLASSES == 8 and d1.MODEL.RESNETS.DEPTH == 50
    assert d1.DATASETS.TRAIN == ("cityscapes_fine_instance_seg_train",)
    assert d3.DATASETS.TRAIN == ("cityscapes_instsynth_train",)
    assert d3.DATASETS.TEST == ("cityscapes_instsynth_val",)
    assert d1.INPUT.CROP.SIZE == (512, 1024) and d1.SOLVER.MAX_ITER == 90000
    assert (d1.INPUT.MIN_SIZE_TEST, d1.INPUT.MAX_SIZE_TEST) == (1024, 2048)  # the "1024" of the new names
    for old, new in (("x1_576_D1", "x1_1024_D1"), ("x3_640_D3", "x3_1024_D3")):  # old names: same configs
        for suffix in ("", "_instsynth"):
            was = load_config(folder / f"fastinst_R50_ppm-fpn_{old}{suffix}.yaml")
            now = load_config(folder / f"fastinst_R50_ppm-fpn_{new}{suffix}.yaml", ["OUTPUT_DIR", was.OUTPUT_DIR])
            assert was == now and was.OUTPUT_DIR == f"output/fastinst_R50_ppm-fpn_{old}{suffix}"


def test_torchvision_resnet_weights_load_into_backbone(tmp_path):
    import torchvision

    from instsynth.config import load_config
    from instsynth.engine.checkpoint import maybe_load_weights
    from instsynth.core.io import InstSynthError
    from instsynth.modeling import build_model

    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(load_config(QUICK))
    assert maybe_load_weights(model, str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.backbone.body.layer2[0].conv1.weight, resnet.layer2[0].conv1.weight)
    with pytest.raises(InstSynthError, match="resnet50-0676ba61.pth"):
        maybe_load_weights(model, str(tmp_path / "missing.pth"))


def test_class_count_mismatch_is_a_clear_error(demo_cache):
    from types import SimpleNamespace

    from instsynth.engine.trainer import check_num_classes
    from instsynth.core.io import InstSynthError

    check_num_classes(SimpleNamespace(num_classes=8), ["cityscapes_demo_instance_seg_val"])
    with pytest.raises(InstSynthError, match="has 8 categories .*person.* predicts 10 classes"):
        check_num_classes(SimpleNamespace(num_classes=10), ["cityscapes_demo_instance_seg_val"])


def test_color_aug_ssd_changes_only_colours_and_is_seeded(demo_cache):
    from instsynth.config import load_config
    from instsynth.data.catalog import get_dataset_dicts, get_metadata
    from instsynth.data.mapper import DatasetMapper, color_aug_ssd

    meta = get_metadata("cityscapes_demo_instance_seg_train")
    record = max(get_dataset_dicts("cityscapes_demo_instance_seg_train"), key=lambda d: len(d["annotations"]))
    plain = DatasetMapper(load_config(QUICK), True, meta.label_id_to_contiguous)
    assert load_config(QUICK).INPUT.COLOR_AUG_SSD is False  # off unless asked for
    ssd = DatasetMapper(load_config(QUICK, ["INPUT.COLOR_AUG_SSD", "True"]), True, meta.label_id_to_contiguous)
    changed = 0
    for seed in range(4):
        a, b = plain(record, np.random.default_rng(seed)), ssd(record, np.random.default_rng(seed))
        assert torch.equal(a["instances"]["gt_masks"], b["instances"]["gt_masks"])  # same geometry
        assert b["image"].shape == a["image"].shape and b["image"].dtype == torch.uint8
        assert torch.equal(b["image"], ssd(record, np.random.default_rng(seed))["image"])
        changed += not torch.equal(a["image"], b["image"])
    assert changed >= 2
    gray = np.full((8, 8, 3), 100, np.uint8)
    outs = [color_aug_ssd(gray, np.random.default_rng(s)) for s in range(16)]
    assert all((o == o[..., :1]).all() for o in outs)  # saturation and hue cannot colour a grey image
    assert len({int(o[0, 0, 0]) for o in outs}) > 4  # brightness and contrast do change it
