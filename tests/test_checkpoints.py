"""MODEL.WEIGHTS in the official FastInst / Detectron2 formats, built from a model's own weights renamed to the
official names, and the converter CLI."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import REPO

QUICK = REPO / "configs" / "quick_schedules" / "fastinst_R50_quick.yaml"
D3 = REPO / "configs" / "cityscapes" / "instance-segmentation" / "fastinst_R50_ppm-fpn_x3_640_D3.yaml"


def tiny_fastinst(seed, *opts):
    from instsynth.config import load_config
    from instsynth.modeling import build_model

    torch.manual_seed(seed)
    return build_model(load_config(QUICK, list(opts))).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, 128, 256), dtype=torch.uint8, generator=g), "height": 128,
             "width": 256}]


@pytest.fixture(scope="module")
def source():
    return tiny_fastinst(0)


def predictions(model, images):
    with torch.no_grad():
        return model(images)[0]["instances"]


def assert_same_predictions(a, b):
    assert torch.equal(a["pred_masks"], b["pred_masks"]) and torch.equal(a["pred_classes"], b["pred_classes"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)


def official_checkpoint(model, path):
    from instsynth.modeling.convert import to_official

    state = to_official(model.state_dict())
    state["criterion.empty_weight"] = torch.ones(model.num_classes + 1)
    torch.save({"model": state, "iteration": 89999}, path)  # as Detectron2's checkpointer saves it
    return state


def d2_resnet_pickle(model, path, **extra):
    """Detectron2's torchvision-converted R-50.pkl layout: numpy arrays, backbone names without prefix, stem.fc."""
    from instsynth.modeling.convert import to_official

    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    arrays = {k[len("backbone."):]: v.numpy() for k, v in to_official(backbone).items()}
    arrays.update({"stem.fc.weight": np.zeros((1000, 512), np.float32), "stem.fc.bias": np.zeros(1000, np.float32)})
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True, **extra}, f)
    return arrays


def test_key_map_is_one_to_one_on_fastinst_d3_r50_with_official_names_and_size():
    """Every tensor of FastInst-D3-R50 (80 classes, as the official COCO model) has one official name and back."""
    from instsynth.config import load_config
    from instsynth.modeling import build_model
    from instsynth.modeling.convert import our_name, to_official

    model = build_model(load_config(D3, ["MODEL.FASTINST.NUM_CLASSES", "80", "MODEL.WEIGHTS", ""]))
    assert sum(p.numel() for p in model.parameters()) == 34_176_597  # the official model's count
    state = model.state_dict()
    official = to_official(state)
    assert len(official) == len(state)
    assert all(our_name(name) == key for key, name in zip(state, official))
    assert all(name.startswith(("backbone.stem.", "backbone.res", "sem_seg_head.")) for name in official)
    expected = {"backbone.stem.conv1.norm.running_var": (64,), "backbone.res2.0.conv1.weight": (64, 64, 1, 1),
                "backbone.res2.0.shortcut.norm.running_mean": (256,), "backbone.res5.2.conv3.weight": (2048, 512, 1, 1),
                "sem_seg_head.pixel_decoder.adapter_1.weight": (256, 512, 1, 1),
                "sem_seg_head.pixel_decoder.adapter_3.norm.bias": (256,),
                "sem_seg_head.pixel_decoder.layer_2.weight": (256, 256, 3, 3),
                "sem_seg_head.pixel_decoder.ppm.bottleneck.weight": (256, 512, 1, 1),
                "sem_seg_head.predictor.meta_pos_embed": (1, 256, 10, 10),
                "sem_seg_head.predictor.empty_query_features.weight": (8, 256),
                "sem_seg_head.predictor.query_proposal.conv_proposal_cls_logits.2.weight": (81, 256, 1, 1),
                "sem_seg_head.predictor.transformer_mask_cross_attention_layers.0.multihead_attn.in_proj_weight":
                    (768, 256),
                "sem_seg_head.predictor.transformer_query_self_attention_layers.2.self_attn.out_proj.weight":
                    (256, 256),
                "sem_seg_head.predictor.transformer_mask_ffn_layers.1.linear1.weight": (1024, 256),
                "sem_seg_head.predictor.class_embed_layers.3.layers.2.weight": (81, 256),
                "sem_seg_head.predictor.mask_features_layers.0.weight": (256, 256)}
    for name, shape in expected.items():
        assert tuple(official[name].shape) == shape, name


def test_official_fastinst_checkpoint_gives_the_same_outputs(source, images, tmp_path):
    from instsynth.engine.checkpoint import maybe_load_weights

    official_checkpoint(source, tmp_path / "fastinst_official.pth")
    target = tiny_fastinst(1)
    assert not torch.equal(target.decoder.meta_pos, source.decoder.meta_pos)
    assert maybe_load_weights(target, str(tmp_path / "fastinst_official.pth"))
    assert_same_predictions(predictions(target, images), predictions(source, images))


def test_class_heads_of_another_size_are_reinitialised_with_a_warning(tmp_path, caplog):
    from instsynth.engine.checkpoint import load_model_weights

    ten = tiny_fastinst(0, "MODEL.FASTINST.NUM_CLASSES", "10")
    official_checkpoint(ten, tmp_path / "ten.pth")
    eight = tiny_fastinst(1)
    fresh = {k: v.clone() for k, v in eight.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="instsynth"):
        load_model_weights(eight, tmp_path / "ten.pth")
    heads = {k for k, v in eight.state_dict().items() if v.shape != ten.state_dict()[k].shape}
    assert heads == {f"decoder.class_embed.{i}.layers.2.{p}" for i in range(3) for p in ("weight", "bias")} | \
        {f"decoder.proposal.cls_head.2.{p}" for p in ("weight", "bias")}
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(k in warning for k in heads) and "re-initialised" in warning
    for k, v in eight.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in heads else ten.state_dict()[k], rtol=0, atol=0)


def test_detectron2_r50_pkl_loads_into_the_backbone(source, images, tmp_path):
    from instsynth.engine.checkpoint import maybe_load_weights

    d2_resnet_pickle(source, tmp_path / "R-50.pkl")
    target = tiny_fastinst(1)
    decoder = {k: v.clone() for k, v in target.decoder.state_dict().items()}
    assert maybe_load_weights(target, str(tmp_path / "R-50.pkl"))
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        for name, feature in source.backbone(x).items():
            torch.testing.assert_close(target.backbone(x)[name], feature, rtol=0, atol=0)
    for k, v in target.decoder.state_dict().items():  # only the backbone came from the file
        assert torch.equal(v, decoder[k]), k

    # FastInst's own converter: torchvision names under "backbone." (no stem./res names)
    state = {"backbone." + k[len("backbone.body."):]: v.numpy() for k, v in source.state_dict().items()
             if k.startswith("backbone.body.")}
    with open(tmp_path / "r50_fastinst.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    other = tiny_fastinst(2)
    maybe_load_weights(other, str(tmp_path / "r50_fastinst.pkl"))
    torch.testing.assert_close(other.backbone.body.layer3[1].conv2.weight, source.backbone.body.layer3[1].conv2.weight)


def test_caffe2_pickles_and_unsafe_pickles_are_refused(tmp_path, source):
    from instsynth.engine.checkpoint import load_model_weights
    from instsynth.core.io import InstSynthError

    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(64, np.float32),
             "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32)}
    for name, content in (("msra.pkl", {"blobs": blobs}), ("msra_plain.pkl", blobs)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
        with pytest.raises(InstSynthError, match=r"res2_0_branch2a_w.*not supported.*stride in the 1x1") as err:
            load_model_weights(source, tmp_path / name)
        assert name in str(err.value) and "R-50.pkl" in str(err.value)

    class Payload:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Payload()}}))
    with pytest.raises(InstSynthError, match="not allowed"):
        load_model_weights(source, tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()


def test_convert_tool_writes_this_projects_checkpoint(source, images, tmp_path, capsys):
    from instsynth.engine.checkpoint import load_model_weights
    from instsynth.cli.convert import main

    official = official_checkpoint(source, tmp_path / "official.pth")
    assert main([str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")]) == 0
    assert "official" in capsys.readouterr().out
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    assert set(ours) == set(source.state_dict())
    target = tiny_fastinst(1)
    load_model_weights(target, tmp_path / "ours.pth")
    assert_same_predictions(predictions(target, images), predictions(source, images))

    assert main([str(tmp_path / "ours.pth"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == set(official) - {"criterion.empty_weight"}

    d2_resnet_pickle(source, tmp_path / "R-50.pkl")
    main([str(tmp_path / "R-50.pkl"), str(tmp_path / "r50.pth")])
    r50 = torch.load(tmp_path / "r50.pth", weights_only=True)["model"]
    assert set(r50) == {k for k in source.state_dict() if k.startswith("backbone.body.")}

    with pytest.raises(SystemExit, match="not found"):
        main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pth")])


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


def test_d1_checkpoint_into_d3_model_warns_naming_the_random_layers(tmp_path, project_log):
    """Decoder layers 1-2 (and their heads) of a D3 model are not in a D1 checkpoint: a WARNING names them."""
    from instsynth.engine.checkpoint import load_model_weights, save_checkpoint

    d1 = tiny_fastinst(0, "MODEL.FASTINST.DEC_LAYERS", "1")
    save_checkpoint(tmp_path, "d1.pth", d1)
    d3 = tiny_fastinst(1, "MODEL.FASTINST.DEC_LAYERS", "3")
    report = load_model_weights(d3, tmp_path / "d1.pth")
    [warning] = [r.getMessage() for r in project_log.records if r.levelno == logging.WARNING]
    missing = set(d3.state_dict()) - set(d1.state_dict())
    assert set(report["missing"]) == missing and len(missing) == 92
    assert f"{len(missing)} tensors of this model are not in the checkpoint" in warning
    assert "decoder.layers.1 (30 tensors), decoder.layers.2 (30 tensors)" in warning
    assert "decoder.class_embed.2 (6 tensors)" in warning and "backbone" not in warning
    assert len(report["loaded"]) == len(d1.state_dict()) and not report["unused"]
    info = [r.getMessage() for r in project_log.records if r.getMessage().startswith("loaded ")]
    assert info == [f"loaded 197 of 289 model tensors from {tmp_path / 'd1.pth'} (ours names); 92 model tensors not "
                    "in the file, 0 re-initialised for another shape, 0 checkpoint tensors unused"]
    for k, v in d1.state_dict().items():
        assert torch.equal(d3.state_dict()[k], v), k


def test_r50_pkl_counts_no_batchnorm_counters_and_expects_a_fresh_head(tmp_path, project_log):
    """An R-50.pkl as convert-torchvision-to-d2.py writes it (num_batches_tracked included) into a BN model:
    the counters are not "loaded weights", and the non-backbone part starting fresh is INFO, not a WARNING."""
    from instsynth.engine.checkpoint import load_model_weights

    bn = tiny_fastinst(0, "MODEL.RESNETS.NORM", "BN")
    arrays = d2_resnet_pickle(bn, tmp_path / "R-50.pkl")
    counters = [k for k in arrays if k.endswith("num_batches_tracked")]
    assert counters
    target = tiny_fastinst(1, "MODEL.RESNETS.NORM", "BN")
    report = load_model_weights(target, tmp_path / "R-50.pkl")
    backbone = [k for k in bn.state_dict() if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert sorted(report["loaded"]) == sorted(backbone)
    assert not [r for r in project_log.records if r.levelno >= logging.WARNING]
    assert any("holds a backbone only (d2_resnet)" in r.getMessage() for r in project_log.records)

    partial = {k: v for k, v in arrays.items() if not k.startswith("res5.")}  # a backbone file without res5
    with open(tmp_path / "partial.pkl", "wb") as f:
        pickle.dump({"model": partial}, f)
    project_log.clear()
    load_model_weights(target, tmp_path / "partial.pkl")
    [warning] = [r.getMessage() for r in project_log.records if r.levelno == logging.WARNING]
    assert "backbone.body.layer4.0 (15 tensors), backbone.body.layer4.1 (10 tensors)" in warning  # ResNet-18
