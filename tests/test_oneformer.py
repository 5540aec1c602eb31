"""OneFormer wrapper (tiny model, CPU) and the official Cityscapes instance evaluation on the demo data."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from instsynth.engine.checkpoint import maybe_load_weights
from instsynth.evaluation.cityscapes_eval import evaluate_cityscapes
from instsynth.evaluation.coco_eval import instances_to_coco
from instsynth.core.io import InstSynthError, iter_cityscapes_images, read_png
from instsynth.core.labels import EVAL_THING_CLASSES, label_id
from instsynth.modeling import build_model
from instsynth.modeling.oneformer import CLASS_HEAD, instance_texts
from instsynth.testing.tiny_oneformer import build_tiny_oneformer, tiny_oneformer, tiny_oneformer_cfg

EVAL_IDS = [label_id(c) for c in EVAL_THING_CLASSES]
CONTIGUOUS_TO_LABEL = dict(enumerate(EVAL_IDS))


def gt_instances(instance_ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Bool masks [N, H, W] and contiguous classes of the evaluated thing instances of an instanceIds map."""
    values = [int(v) for v in np.unique(instance_ids) if v >= 1000 and v // 1000 in EVAL_IDS]
    masks = np.stack([instance_ids == v for v in values]) if values else np.zeros((0, *instance_ids.shape), bool)
    return masks, [EVAL_IDS.index(v // 1000) for v in values]


def demo_sample(image, split="train", index=0, size=(128, 256)) -> dict:
    """A model input (shared interface) from a demo image, resized to ``size`` (H, W)."""
    left = read_png(image.left, rgb=True)
    masks, classes = gt_instances(read_png(image.gt("instanceIds")))
    h, w = size
    small = cv2.resize(left, (w, h), interpolation=cv2.INTER_LINEAR)
    small_masks = [cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) for m in masks]
    keep = [i for i, m in enumerate(small_masks) if m.any()]
    return {"image": torch.from_numpy(small.transpose(2, 0, 1).copy()), "height": left.shape[0], "width": left.shape[1],
            "instances": {"gt_classes": torch.tensor([classes[i] for i in keep], dtype=torch.long),
                          "gt_masks": torch.from_numpy(np.stack([small_masks[i] for i in keep])).bool()}}


@pytest.fixture(scope="module")
def train_batch(demo_root):
    images = [im for im in iter_cityscapes_images(demo_root, "train")
              if gt_instances(read_png(im.gt("instanceIds")))[1]]
    return [demo_sample(im) for im in images[:2]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_oneformer(tmp_path_factory.mktemp("tiny_oneformer"))


def test_text_queries_built_from_ground_truth_like_oneformer(train_batch):
    names = EVAL_THING_CLASSES  # person, rider, car, truck, bus, train, motorcycle, bicycle
    assert instance_texts([2, 0, 2, 7], names, 6) == [
        "a photo with a person", "a photo with a car", "a photo with a car", "a photo with a bicycle",
        "an instance photo", "an instance photo"]
    assert instance_texts([1, 1, 1], names, 2) == ["a photo with a rider"] * 2  # more instances than texts
    model = tiny_oneformer()
    config = model.oneformer.config
    _, _, tokens = model.targets(train_batch, (128, 256))
    assert tokens.shape == (2, config.num_queries - config.text_encoder_n_ctx, config.text_encoder_context_length)
    decoded = [model.tokenizer.decode(t[t > 0], skip_special_tokens=True) for t in tokens[0]]
    classes = train_batch[0]["instances"]["gt_classes"].tolist()
    assert decoded == instance_texts(classes, names, len(decoded))
    task = model.task_tokens[0]
    assert model.tokenizer.decode(task[task > 0], skip_special_tokens=True) == "the task is instance"
    assert task.argmax() == (task > 0).sum() - 1  # end-of-text has the largest id (the text encoder pools there)


def test_forward_backward_finite_losses_that_fall(train_batch):
    model = tiny_oneformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(6):
        losses = model(train_batch)
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_contrastive"} <= set(losses)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert losses["loss_contrastive"] > 0  # two images: the query-text contrastive term is active
    assert totals[-1] < totals[0] * 0.9, totals


def test_eval_returns_instances_at_original_size(train_batch):
    model = tiny_oneformer("MODEL.ONE_FORMER.TEST.SCORE_THRESHOLD", "-1.0").eval()
    with torch.no_grad():
        out = model(train_batch)
    assert len(out) == 2
    for sample, result in zip(train_batch, out):
        inst = result["instances"]
        assert inst["pred_masks"].dtype == torch.bool
        assert inst["pred_masks"].shape == (20, sample["height"], sample["width"])  # TEST.DETECTIONS_PER_IMAGE
        assert inst["pred_classes"].dtype == torch.long and inst["pred_classes"].max() < 8
        assert ((inst["scores"] >= 0) & (inst["scores"] <= 1)).all()
    assert model.training is False and model.oneformer.config.is_training is False


def test_save_pretrained_folder_loads_offline_as_model_weights(tiny_folder, train_batch):
    assert (tiny_folder / "tokenizer.json").is_file()
    reference = tiny_oneformer().eval()
    loaded = build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", str(tiny_folder))).eval()
    assert maybe_load_weights(loaded, str(tiny_folder)) is False  # the trainer leaves the folder to the model
    ref_state, state = reference.state_dict(), loaded.state_dict()
    assert ref_state.keys() == state.keys() and all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    with torch.no_grad():
        a, b = reference(train_batch[:1])[0]["instances"], loaded(train_batch[:1])[0]["instances"]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["pred_masks"], b["pred_masks"])


def test_imagenet_backbone_folder_as_model_weights_initialises_the_backbone(tmp_path):
    from transformers import ResNetForImageClassification

    config = tiny_oneformer().oneformer.config.backbone_config  # saved like microsoft/resnet-50: a classifier
    classifier = ResNetForImageClassification(type(config)(**{**config.to_dict(), "num_labels": 10}))
    classifier.save_pretrained(tmp_path)
    model = build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", str(tmp_path)))
    assert maybe_load_weights(model, str(tmp_path)) is False  # the trainer leaves it to the model
    encoder = model.oneformer.model.pixel_level_module.encoder.state_dict()
    imagenet = {k[len("resnet."):]: v for k, v in classifier.state_dict().items() if k.startswith("resnet.")}
    assert encoder.keys() <= imagenet.keys()
    assert all(torch.equal(v, imagenet[k]) for k, v in encoder.items() if "num_batches" not in k)


def test_class_head_of_a_checkpoint_is_mapped_by_class_name(tmp_path):
    names = list(reversed(EVAL_THING_CLASSES))
    source = tiny_oneformer("MODEL.ONE_FORMER.CLASS_NAMES", str(names))
    source.save_pretrained(tmp_path)
    loaded = build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", str(tmp_path)))  # default class order
    src = source.state_dict()[f"oneformer.{CLASS_HEAD}weight"]
    dst = loaded.state_dict()[f"oneformer.{CLASS_HEAD}weight"]
    assert torch.equal(dst[:-1], src[:-1].flip(0)) and torch.equal(dst[-1], src[-1])  # no-object row kept

    other = tmp_path / "other_classes"  # a checkpoint that lacks our classes: its head starts from scratch
    tiny_oneformer("MODEL.ONE_FORMER.NUM_CLASSES", "3", "MODEL.ONE_FORMER.CLASS_NAMES", "['road', 'sky', 'car']",
                   seed=2).save_pretrained(other)
    fresh = build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", str(other)))
    assert fresh.state_dict()[f"oneformer.{CLASS_HEAD}weight"].shape == (9, 64)
    assert fresh.oneformer.config.num_labels == 8 and fresh.oneformer.config.id2label[7] == "bicycle"


def test_missing_weights_and_bad_sizes_give_clear_errors(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(InstSynthError, match=r"hf download shi-labs/oneformer_cityscapes_swin_large --local-dir"):
        build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", "shi-labs/oneformer_cityscapes_swin_large"))
    with pytest.raises(InstSynthError, match="hf download microsoft/resnet-50 --local-dir weights/resnet-50"):
        build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", "microsoft/resnet-50"))
    with pytest.raises(InstSynthError, match="folder not found"):
        build_model(tiny_oneformer_cfg("MODEL.WEIGHTS", str(tmp_path / "no_such_model")))
    with pytest.raises(InstSynthError, match="CONVS_DIM"):  # transformers would leave projections unregistered
        build_model(tiny_oneformer_cfg("MODEL.ONE_FORMER.CONVS_DIM", "32"))


# --------------------------------------------------------------------------- Cityscapes evaluation
def val_dicts_and_gt(root):
    dicts, gts = [], []
    for i, image in enumerate(iter_cityscapes_images(root, "val")):
        masks, classes = gt_instances(read_png(image.gt("instanceIds")))
        dicts.append({"file_name": str(image.left), "height": masks.shape[1], "width": masks.shape[2], "image_id": i})
        gts.append((masks, classes))
    return dicts, gts


def as_outputs(masks, classes, scores=None):
    return {"pred_masks": torch.from_numpy(masks), "pred_classes": torch.tensor(classes, dtype=torch.long),
            "scores": torch.ones(len(classes)) if scores is None else torch.tensor(scores)}


def test_cityscapes_eval_is_perfect_for_ground_truth_and_drops_when_corrupted(demo_root, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    dicts, gts = val_dicts_and_gt(demo_root)
    coco_results = [r for d, (m, c) in zip(dicts, gts)  # the trainer's format: COCO result entries
                    for r in instances_to_coco(as_outputs(m, c), d["image_id"], CONTIGUOUS_TO_LABEL)]
    perfect = evaluate_cityscapes(coco_results, dicts, tmp_path / "gt", CONTIGUOUS_TO_LABEL, workers=1)
    assert perfect["AP"] == pytest.approx(100) and perfect["AP50"] == pytest.approx(100)
    assert perfect["AP-car"] == pytest.approx(100) and perfect["AP-bicycle"] is None  # no bicycle in the demo val

    out = tmp_path / "corrupted"
    corrupted = []
    for d, (masks, classes) in zip(dicts, gts):  # shift every mask; the first half also gets a wrong class
        shifted = np.roll(masks, 12, axis=2)
        wrong = [(c + 1) % 8 if k < len(classes) // 2 else c for k, c in enumerate(classes)]
        corrupted.append({"image_id": d["image_id"], "instances": as_outputs(shifted, wrong)})
    worse = evaluate_cityscapes(corrupted, dicts, out, CONTIGUOUS_TO_LABEL, workers=2)
    assert worse["AP"] < 60 and worse["AP50"] < perfect["AP50"]
    assert evaluate_cityscapes(corrupted, dicts, tmp_path / "serial", CONTIGUOUS_TO_LABEL, workers=1) == worse

    txts = sorted((out / "cityscapes_instances").glob("*_pred.txt"))
    assert len(txts) == len(dicts)  # one file per evaluated image, also for the image without instances
    first = next(t for t in txts if t.read_text()).read_text().splitlines()[0].split(" ")
    assert first[0].startswith("masks/") and int(first[1]) in EVAL_IDS and float(first[2]) == 1.0
    mask = read_png(out / "cityscapes_instances" / first[0])
    assert mask.shape == (dicts[0]["height"], dicts[0]["width"]) and set(np.unique(mask)) <= {0, 255}
    assert json.loads((out / "cityscapes_instance_results.json").read_text())["AP"] == pytest.approx(worse["AP"])
    assert list(cwd.iterdir()) == []  # nothing (matches.json, gtInstances.json) in the working directory


def test_cityscapes_eval_names_missing_ground_truth(demo_copy, tmp_path):
    dicts, _ = val_dicts_and_gt(demo_copy)
    gt = demo_copy / "gtFine" / "val" / dicts[0]["file_name"].split("/")[-2]
    victim = sorted(gt.glob("*_gtFine_instanceIds.png"))[0]
    victim.unlink()
    with pytest.raises(InstSynthError, match=victim.name):
        evaluate_cityscapes([], dicts, tmp_path, CONTIGUOUS_TO_LABEL)


# --------------------------------------------------------------------------- train_net.py
def test_quick_config_trains_and_loss_falls(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "INSTSYNTH_DEMO_DIR": str(tmp_path / "demo_cache"), "INSTSYNTH_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train_net.py", "--config-file", "configs/quick_schedules/oneformer_quick.yaml",
               "OUTPUT_DIR", str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (out / "model_final.pth").is_file()
    metrics = json.loads((out / "inference" / "metrics.json").read_text())
    assert "AP" in metrics["segm"] and "AP" in metrics["cityscapes"]
