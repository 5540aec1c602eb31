"""Training configs: fvcore's _BASE_ loader gives every shipped config its values, the automatic OUTPUT_DIR,
the CPU time estimate and the checkpoint keeper."""
import logging
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO

CONFIGS = REPO / "configs"
QUICK = CONFIGS / "quick_schedules" / "fastinst_R50_quick.yaml"
CS = CONFIGS / "cityscapes" / "instance-segmentation"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parts[-2] in ("instance-segmentation", "quick_schedules"))


def reference_tree(path):
    """An independent reading of a _BASE_ chain (plain YAML + recursive update), for comparison."""
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    merged = reference_tree(path.parent / base)

    def update(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                update(dst[k], v)
            else:
                dst[k] = v
    update(merged, data)
    return merged


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves_as_its_files_say(path):
    from instsynth.config import get_cfg, load_config, merge_dict

    expected = get_cfg()
    merge_dict(expected, reference_tree(path), str(path))
    got = load_config(path)
    if not expected.OUTPUT_DIR:
        expected.OUTPUT_DIR = got.OUTPUT_DIR
    assert got == expected
    assert type(got).__mro__[1].__module__ == "fvcore.common.config"  # fvcore's CfgNode, as Detectron2's
    assert len(TRAINING_CONFIGS) >= 15


def test_fvcore_base_features_and_clear_errors(tmp_path):
    from instsynth.config import ConfigError, load_config

    (tmp_path / "a.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n  BASE_LR: 1\n")
    (tmp_path / "b.yaml").write_text("SOLVER:\n  MAX_ITER: 8\nSEED: 3\n")
    (tmp_path / "list.yaml").write_text("_BASE_: [a.yaml, b.yaml]\nSEED: 5\n")
    cfg = load_config(tmp_path / "list.yaml")  # a list of bases, merged in order (fvcore)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SEED) == (8, 1.0, 5)
    assert isinstance(cfg.SOLVER.BASE_LR, float)  # int -> float, as before

    (tmp_path / "missing_base.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*config file not found"):
        load_config(tmp_path / "missing_base.yaml")
    (tmp_path / "list_file.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad_base.yaml").write_text("_BASE_: list_file.yaml\n")
    with pytest.raises(ConfigError, match="list_file.yaml.*must be a mapping"):
        load_config(tmp_path / "bad_base.yaml")
    (tmp_path / "loop.yaml").write_text("_BASE_: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("_BASE_: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular _BASE_"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "url.yaml").write_text("_BASE_: https://example.com/base.yaml\n")
    with pytest.raises(ConfigError, match="local path"):
        load_config(tmp_path / "url.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml").SOLVER.MAX_ITER == 90000


def test_output_dir_defaults_to_config_and_training_data():
    from instsynth.config import load_config

    assert load_config(QUICK).OUTPUT_DIR == "output/fastinst_R50_quick/cityscapes_demo_instance_seg_train"
    mine = load_config(QUICK, ["DATASETS.TRAIN", "('my_syn', 'my base/train')"])
    assert mine.OUTPUT_DIR == "output/fastinst_R50_quick/my_syn+my_base_train"
    baseline = load_config(CS / "fastinst_R50_ppm-fpn_x3_1024_D3.yaml").OUTPUT_DIR
    synthetic = load_config(CS / "fastinst_R50_ppm-fpn_x3_1024_D3_instsynth.yaml").OUTPUT_DIR
    assert baseline == "output/fastinst_R50_ppm-fpn_x3_1024_D3/cityscapes_fine_instance_seg_train"
    assert synthetic == "output/fastinst_R50_ppm-fpn_x3_1024_D3_instsynth/cityscapes_instsynth_train"
    assert load_config(QUICK, ["OUTPUT_DIR", "runs/x"]).OUTPUT_DIR == "runs/x"  # explicit wins
    assert load_config(CS / "fastinst_R50_ppm-fpn_x1_576_D1.yaml").OUTPUT_DIR == "output/fastinst_R50_ppm-fpn_x1_576_D1"
    assert load_config(None).OUTPUT_DIR == "output/defaults/cityscapes_fine_instance_seg_train"


def test_quick_schedule_shows_learning_with_few_checkpoints():
    """The README's quick command: the measured schedule (docs/training.md), two checkpoint files at most."""
    from instsynth.config import load_config

    s = load_config(QUICK).SOLVER
    assert (s.BASE_LR, s.MAX_ITER, s.CHECKPOINT_PERIOD, s.CHECKPOINT_KEEP) == (0.001, 300, 100, 1)
    assert load_config(QUICK).TEST.EVAL_PERIOD == 100


def fake_accelerator(device):
    return SimpleNamespace(device=SimpleNamespace(type=device))


@pytest.fixture
def project_log(caplog):
    """caplog that sees each record of the project logger once, whether or not it propagates."""
    logger = logging.getLogger("instsynth")
    caplog.set_level(logging.INFO, logger="instsynth")
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def test_time_estimate_is_one_line_and_loud_for_long_cpu_runs(project_log):
    caplog = project_log
    from instsynth.config import load_config
    from instsynth.engine.trainer import format_duration, log_estimate

    cfg = load_config(CS / "fastinst_R50_ppm-fpn_x3_1024_D3.yaml")
    total = log_estimate(cfg, fake_accelerator("cpu"), 12.5, 4, 90000)
    assert total == pytest.approx(12.5 * 89996)
    [record] = [r for r in caplog.records if "estimated training time" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "on CPU: 13 days, 0:29:10 for the remaining 89996 of 90000 iterations at 12.50 s each" in record.getMessage()
    caplog.clear()
    log_estimate(cfg, fake_accelerator("cpu"), 0.3, 4, 300)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert format_duration(59) == "0:00:59" and format_duration(86400 + 3661) == "1 day, 1:01:01"


def test_checkpoint_keeper_keeps_newest(tmp_path):
    from instsynth.engine.checkpoint import CheckpointKeeper

    keeper = CheckpointKeeper(tmp_path, 2)
    for i in range(4):
        (tmp_path / f"model_{i:07d}.pth").write_bytes(b"x")
        keeper.saved(f"model_{i:07d}.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000002.pth", "model_0000003.pth"]
    every = CheckpointKeeper(tmp_path, 0)
    (tmp_path / "model_0000009.pth").write_bytes(b"x")
    assert every.saved("model_0000009.pth") == [] and len(list(tmp_path.iterdir())) == 3
