"""Visualizations: instance sheets, COCO overlays, class statistics (files written, sizes and content sane)."""
import json
import math
import shutil

import numpy as np
import pytest

from instsynth.reports import viz
from instsynth.core.io import read_png


@pytest.fixture(scope="module")
def recolor_run(demo_root, tmp_path_factory):
    """Stage 1 (k=2) and the recolor backend (3 samples per instance) on the demo train split."""
    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.runner import generate_instances
    from instsynth.stages.selection import select_instances

    out = tmp_path_factory.mktemp("viz_run")
    selection = select_instances(demo_root, "train", k=2, out=out / "stage1", workers=1)
    return generate_instances(selection.metadata, out / "gen", GenerationSettings(mode="recolor", num_samples=3)).manifest


@pytest.fixture(scope="module")
def coco_root(demo_root, tmp_path_factory):
    """A copy of the demo tree converted to COCO (train and val)."""
    from instsynth.stages.coco_conversion import convert_cityscapes_to_coco

    root = tmp_path_factory.mktemp("viz_coco") / "cityscapes"
    shutil.copytree(demo_root, root)
    convert_cityscapes_to_coco(root, workers=1)
    return root


def coco_json(root, split="train"):
    return root / "annotations" / f"instancesonly_filtered_gtFine_{split}.json"


def test_wrap_text_fits_the_width():
    lines = viz.wrap_text("#12 a photo of a remarkably long prompt about a white motorcycle parked next to a red bus in the rain", 150, 0.4)
    assert 1 < len(lines) <= viz.CAPTION_LINES and lines[-1].endswith("...")
    assert all(viz.text_size(line, 0.4)[0] <= 150 for line in lines)


def test_instance_sheets(recolor_run, tmp_path):
    manifest = json.loads(recolor_run.read_text())
    n = len(manifest["instances"])
    cell, per_page = 96, 4
    pages = viz.instance_sheets(recolor_run, tmp_path / "sheets", per_page=per_page, cell=cell)
    assert [p.name for p in pages] == [f"sheet_{i:03d}.png" for i in range(math.ceil(n / per_page))]
    first = read_png(pages[0], rgb=True)
    cell_w = cell + 8  # cell plus gap
    assert first.shape[1] == 8 + (2 + 3) * cell_w  # source | mask | 3 samples
    last = read_png(pages[-1], rgb=True)
    assert last.shape[1] == first.shape[1] and last.shape[0] <= first.shape[0]
    assert first.std() > 20  # not blank
    # the mask cell (row 0, column 1) is black and white only
    title_h = int(np.argmax((first[:, 0] != 60).any(axis=1)))  # the dark title bar on top
    mask_cell = first[title_h + 8: title_h + 8 + cell, 8 + cell_w: 8 + cell_w + cell]
    assert (mask_cell[0] == 170).all() and (mask_cell[:, -1] == 170).all()  # the cell frame, where expected
    inner = mask_cell[1:-1, 1:-1]
    assert set(np.unique(inner)) <= {0, 255, *viz.BACKGROUND} and (inner == 255).any() and (inner == 0).any()


def test_overlays_mark_instances_and_crowd(coco_root, tmp_path):
    from instsynth.data.coco import load_coco_json

    paths = viz.coco_overlays(coco_json(coco_root), None, tmp_path / "overlay", max_images=3)
    records = sorted(load_coco_json(coco_json(coco_root), coco_root / "leftImg8bit" / "train"),
                     key=lambda r: r["file_name"])[:3]
    assert len(paths) == 3
    for path, record in zip(paths, records):
        drawn, image = read_png(path, rgb=True), read_png(record["file_name"], rgb=True)
        assert drawn.shape == image.shape
        changed = (drawn != image).any(axis=2)
        for ann in record["annotations"]:
            if not ann["iscrowd"]:
                assert changed[viz.segmentation_mask(ann["segmentation"], record["height"], record["width"])].mean() > 0.9
        if not record["annotations"]:
            assert not changed.any()
        else:
            assert changed.mean() < 0.6  # the background stays visible
    assert viz.coco_overlays(coco_json(coco_root), coco_root, tmp_path / "o2", max_images=1, match="bellmont")[0].name \
        .startswith("bellmont")


def test_crowd_regions_are_hatched():
    from pycocotools import mask as mask_utils

    image = np.full((200, 300, 3), 90, np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    mask[50:150, 100:250] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    ann = {"bbox": [100, 50, 150, 100], "category_id": 24, "segmentation": rle, "iscrowd": 1}
    changed = (viz.draw_annotations(image, [ann]) != image).any(axis=2)
    inner = changed[60:140, 110:240]  # away from the outline and the label
    assert 0.3 < inner.mean() < 0.7  # stripes coloured, the pixels between them not
    solid = (viz.draw_annotations(image, [{**ann, "iscrowd": 0}]) != image).any(axis=2)
    assert solid[60:140, 110:240].all()


def test_class_stats_chart(coco_root, tmp_path):
    counts = viz.coco_class_counts(coco_json(coco_root))
    data = json.loads(coco_json(coco_root).read_text())
    assert counts["images"] == len(data["images"])
    assert sum(counts["instances"].values()) + sum(counts["crowd"].values()) == len(data["annotations"])
    out = viz.class_stats_chart([coco_json(coco_root, "val"), coco_json(coco_root)], tmp_path / "stats.png")
    chart = read_png(out, rgb=True)
    n_classes = len(counts["instances"])
    assert chart.shape == (450, int(100 * max(6.0, 1.1 * n_classes + 2)), 3)
    assert (chart < 100).any() and chart.std() > 10  # bars and text drawn


def test_visualize_cli(recolor_run, coco_root, tmp_path, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("visualize", REPO / "visualization" / "visualize.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["sheets", "--manifest", str(recolor_run.parent), "--out", str(tmp_path / "s"), "--per-page", "50"])
    cli.main(["overlay", "--coco", str(coco_json(coco_root)), "--image-root", str(coco_root / "leftImg8bit" / "train"),
              "--out", str(tmp_path / "o"), "--max-images", "2"])
    cli.main(["stats", "--coco", str(coco_json(coco_root)), "--coco", str(coco_json(coco_root, "val")),
              "--out", str(tmp_path / "stats.png")])
    assert len(list((tmp_path / "s").glob("*.png"))) == 1 and len(list((tmp_path / "o").glob("*.png"))) == 2
    assert (tmp_path / "stats.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="error: .*no images"):
        cli.main(["overlay", "--coco", str(coco_json(coco_root)), "--out", str(tmp_path / "x"), "--match", "nowhere"])


def test_overlays_use_the_files_category_names_and_find_out_images(tmp_path):
    """A COCO output (OUT/images, OUT/annotations/instances_<split>_instsynth.json) with its own category
    ids and names: found without --image-root, labelled with its names (not Cityscapes label 1, "ego vehicle")."""
    from instsynth.core.io import write_png

    out = tmp_path / "OUT"
    write_png(out / "images" / "instsynth_syn" / "a.png", np.full((64, 96, 3), 90, np.uint8))
    coco = {"images": [{"id": 1, "file_name": "instsynth_syn/a.png", "width": 96, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 400,
                             "bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]}],
            "categories": [{"id": 1, "name": "zebra"}]}
    path = out / "annotations" / "instances_train_instsynth.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(coco))
    assert viz.resolve_image_root(path, None) == out / "images"
    assert viz.resolve_image_root(path, out) == out / "images"
    [written] = viz.coco_overlays(path, None, tmp_path / "ov")
    image = np.zeros((64, 96, 3), np.uint8) + 90
    named = viz.draw_annotations(image, coco["annotations"], names={1: "zebra"})
    assert np.array_equal(read_png(written, rgb=True), named)
    assert not np.array_equal(named, viz.draw_annotations(image, coco["annotations"]))  # "ego vehicle" differs


def test_overlay_of_a_jpeg_is_named_after_its_stem(tmp_path):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "0.jpg"), np.full((40, 60, 3), 120, np.uint8))
    coco = {"images": [{"id": 1, "file_name": "0.jpg", "height": 40, "width": 60}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 26, "iscrowd": 0, "area": 200.0,
                             "bbox": [10, 10, 20, 10], "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]}],
            "categories": [{"id": 26, "name": "car"}]}
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    paths = viz.coco_overlays(tmp_path / "instances_train.json", images, tmp_path / "out")
    assert [p.name for p in paths] == ["0_overlay.png"]
