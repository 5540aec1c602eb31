"""This project's outputs read by Detectron2's own code: its COCO, instanceIds-PNG and polygons loaders,
DatasetMapper, COCOEvaluator and ResNet backbone (issue 20 point 9). Skipped where Detectron2 is missing."""
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (.ci/run installs ../shared/wheels/detectron2-*.whl; "
                                         "see INSTALL.md)")
from pycocotools import mask as mask_util  # noqa: E402

from golden_runs import run_cityscapes_demo  # noqa: E402


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """`make demo`'s InstSynth output tree (original + synthetic Cityscapes pairs and their COCO files)."""
    return run_cityscapes_demo(tmp_path_factory.mktemp("d2")) / "demo_output" / "cityscapes_instsynth"


@pytest.fixture(scope="module")
def names(output):
    from instsynth.detectron2 import register_cityscapes, register_instsynth

    registered = register_instsynth(output, "t20_demo")
    for split in ("train", "val"):  # masks as RLE (exact) and from the polygons files
        register_cityscapes(f"t20_demo_png_{split}", output, split, to_polygons=False)
        register_cityscapes(f"t20_demo_json_{split}", output, split, from_json=True)
    return registered


def synthetic(output, file_names):
    """The file names that are not in the source tree (the synthetic pairs)."""
    source = output.parent / "cityscapes" / "leftImg8bit"
    return [f for f in file_names if not any(source.glob(f"*/*/{f.rsplit('/', 1)[-1]}"))]


def dicts(name):
    from detectron2.data import DatasetCatalog

    return {d["file_name"]: d for d in DatasetCatalog.get(name)}


def decode(segmentation, height, width):
    """A COCO segmentation (polygons, RLE or compressed RLE) as a boolean mask."""
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_util.decode(rle).astype(bool)


def instances(record, crowd=False):
    """(contiguous class, mask bytes) of an image's instances, as a multiset."""
    h, w = record["height"], record["width"]
    return Counter((a["category_id"], decode(a["segmentation"], h, w).tobytes()) for a in record["annotations"]
                   if bool(a.get("iscrowd", 0)) == crowd)


def test_register_instsynth_names_and_metadata(names, output):
    from detectron2.data import MetadataCatalog

    assert names == ["t20_demo_train", "t20_demo_coco_train", "t20_demo_val", "t20_demo_coco_val"]
    cs, coco = MetadataCatalog.get("t20_demo_train"), MetadataCatalog.get("t20_demo_coco_train")
    assert cs.evaluator_type == "cityscapes_instance" and coco.evaluator_type == "coco"
    assert cs.thing_classes == coco.thing_classes == ["person", "rider", "car", "truck", "bus", "train", "motorcycle",
                                                      "bicycle"]
    assert coco.thing_dataset_id_to_contiguous_id == {24: 0, 25: 1, 26: 2, 27: 3, 28: 4, 31: 5, 32: 6, 33: 7}
    assert cs.gt_dir == str((output / "gtFine" / "train").resolve())


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_and_instance_png_loaders_give_the_same_instances_and_masks(names, output, split):
    """Detectron2's load_coco_json on stage 5's COCO file and its load_cityscapes_instances on the instanceIds
    PNGs: same images, same classes, identical masks (crowd regions as crowd), synthetic images included."""
    png, coco = dicts(f"t20_demo_png_{split}"), dicts(f"t20_demo_coco_{split}")
    assert set(png) == set(coco) and len(png) >= 6
    if split == "train":
        assert len(synthetic(output, png)) > len(png) // 2
    for name in png:
        assert instances(png[name]) == instances(coco[name]), name
        assert instances(png[name], crowd=True) == instances(coco[name], crowd=True), name
    # the polygon form that training reads (to_polygons=True, register_instsynth's default) has the same instances
    poly = dicts(f"t20_demo_{split}")
    assert {n: len(d["annotations"]) for n, d in poly.items()} == {n: len(d["annotations"]) for n, d in png.items()}


SLIVER = 256  # pixels: a PNG-only instance this small is an occluded sliver that exact polygon geometry hides


def unmatched(a, b, h, w):
    """Instances (class, area) of ``a`` without a same-class partner of IoU >= 0.5 in ``b``."""
    def masks(d):
        return [(x["category_id"], decode(x["segmentation"], h, w)) for x in d["annotations"]]
    ma, mb = masks(a), masks(b)
    return [(c, int(m.sum())) for c, m in ma
            if not any(c == k and (m & n).sum() >= 0.5 * (m | n).sum() for k, n in mb)]


def polygon_loader_agrees(split, same_count=False):
    """Detectron2's gtFine_polygons.json loader finds each instance of its instanceIds-PNG loader (IoU >= 0.5,
    same class) and no other; only PNG slivers under SLIVER pixels may have no polygon (with ``same_count``:
    none, every image has as many instances from either loader)."""
    png, poly = dicts(f"t20_demo_png_{split}"), dicts(f"t20_demo_json_{split}")
    assert set(png) == set(poly)
    if same_count:
        counts = {n: (len(png[n]["annotations"]), len(poly[n]["annotations"])) for n in png}
        assert all(a == b for a, b in counts.values()), {n: c for n, c in counts.items() if c[0] != c[1]}
    for name in png:
        h, w = png[name]["height"], png[name]["width"]
        png_only = [x for x in unmatched(png[name], poly[name], h, w) if x[1] >= SLIVER]
        poly_only = unmatched(poly[name], png[name], h, w)
        assert not png_only and not poly_only, f"{name}: {len(png[name]['annotations'])} instances in the PNG, " \
            f"{len(poly[name]['annotations'])} in gtFine_polygons.json; PNG only {png_only}, polygons only {poly_only}"


def test_polygons_loader_agrees_on_the_source_images(names, output):
    """On the source images (drawn from their polygons by cityscapesScripts) the polygons loader finds what
    the PNG loader finds."""
    assert not synthetic(output, dicts("t20_demo_png_val"))  # val holds the unchanged source images
    polygon_loader_agrees("val")


def test_polygons_loader_agrees_on_the_synthetic_images(names, output):
    """Stage 5's gtFine_polygons.json of the synthetic images (one object per instance, in depth order): the
    polygons loader finds, image by image, as many instances as the PNG loader, and the same ones."""
    assert len(synthetic(output, dicts("t20_demo_png_train"))) > 0
    polygon_loader_agrees("train", same_count=True)


def test_dataset_mapper_maps_every_image(names):
    """Detectron2's DatasetMapper (training mode) maps every registered image of both forms. The COCO file holds
    RLE masks (instances with holes, crowd regions) next to polygons: INPUT.MASK_FORMAT bitmask reads both."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper

    cfg = get_cfg()
    # at the demo's own size (2048x1024): shrinking would make Detectron2 drop instances whose box vanishes
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.MODEL.MASK_ON = (1024,), 2048, True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    mapper = DatasetMapper(cfg, is_train=True)
    for name in ("t20_demo_train", "t20_demo_coco_train"):
        records = DatasetCatalog.get(name)
        for record in records:
            out = mapper(dict(record))
            inst = out["instances"]
            assert out["image"].shape[1:] == inst.image_size and out["image"].shape[1] == 1024
            assert len(inst) == sum(not a.get("iscrowd", 0) for a in record["annotations"]), record["file_name"]
            assert not len(inst) or inst.gt_masks.tensor.shape == (len(inst), *inst.image_size)  # empty: no field
        assert sum(len(r["annotations"]) == 0 for r in records) >= 1  # the demo's empty images map too


def test_coco_evaluator_of_ground_truth_gives_ap_100(names):
    """COCOEvaluator, given the ground truth of the val COCO file as predictions, scores mask AP 100."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    evaluator = COCOEvaluator("t20_demo_coco_val", tasks=("segm",), distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get("t20_demo_coco_val"):
        h, w = record["height"], record["width"]
        annos = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        inst = Instances((h, w))
        inst.pred_masks = torch.from_numpy(np.stack([decode(a["segmentation"], h, w) for a in annos])
                                           if annos else np.zeros((0, h, w), bool))
        inst.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
        inst.scores = torch.ones(len(annos))
        inst.pred_boxes = Boxes(torch.zeros(len(annos), 4))
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    segm = evaluator.evaluate()["segm"]
    assert segm["AP"] == pytest.approx(100.0) and segm["AP50"] == pytest.approx(100.0)


def torchvision_to_d2(state):
    """The renaming of Detectron2's tools/convert-torchvision-to-d2.py (written here): torchvision ResNet names
    -> stem / res2-res5 / conv{i}.norm / shortcut(.norm), numpy arrays, the classifier kept as stem.fc."""
    out = {}
    for key, value in state.items():
        name = key if "layer" in key else "stem." + key
        for t in range(1, 5):
            name = name.replace(f"layer{t}", f"res{t + 1}")
        for t in range(1, 4):
            name = name.replace(f"bn{t}", f"conv{t}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = value.detach().numpy()
    return {"model": out, "__author__": "torchvision", "matching_heuristics": True}


def test_r50_pkl_gives_the_same_features_in_detectron2_and_here(tmp_path):
    """A random torchvision ResNet-50 written as R-50.pkl: Detectron2's build_resnet_backbone (loaded by its
    DetectionCheckpointer) and this project's backbone (MODEL.WEIGHTS loader) give the same res2-res5."""
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    from instsynth.engine.checkpoint import load_model_weights
    from instsynth.modeling.backbone import ResNetBackbone

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    for m in tv.modules():  # non-trivial frozen statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump(torchvision_to_d2(tv.state_dict()), f)

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM, cfg.MODEL.RESNETS.STRIDE_IN_1X1 = 50, "FrozenBN", False
    cfg.MODEL.RESNETS.OUT_FEATURES, cfg.MODEL.BACKBONE.FREEZE_AT = ["res2", "res3", "res4", "res5"], 0
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(d2).load(str(tmp_path / "R-50.pkl"))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNetBackbone(50, ("res2", "res3", "res4", "res5"), "FrozenBN")
    ours = Wrapper().eval()
    report = load_model_weights(ours, tmp_path / "R-50.pkl")
    assert len(report["loaded"]) == len(ours.state_dict()) and not report["missing"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = d2(x), ours.backbone(x)
    assert set(a) == set(b) == {"res2", "res3", "res4", "res5"}
    for name in a:
        scale = a[name].abs().max().item()  # fp32 sums of another order: differences of 1e-6 x the scale
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * scale)
        assert a[name].abs().mean() > 1e-3
