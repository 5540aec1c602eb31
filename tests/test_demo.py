"""The built-in demo dataset is a valid, deterministic Cityscapes tree with the hard cases tests need."""
import json
import subprocess
import sys

import cv2
import numpy as np

from instsynth.core import labels
from instsynth.stages.demo_dataset import write_demo_dataset
from instsynth.core.io import iter_cityscapes_images, read_png

from conftest import DEMO_KW


def _all(root):
    return [img for split in ("train", "val") for img in iter_cityscapes_images(root, split)]


def test_tree_layout_and_encodings(demo_root):
    images = _all(demo_root)
    assert len(images) == 2 * DEMO_KW["cities"] * DEMO_KW["images_per_city"]
    assert {img.split for img in images} == {"train", "val"}
    for img in images:
        w, h = DEMO_KW["size"]
        rgb = read_png(img.left, rgb=True, shape=(h, w))
        inst = read_png(img.gt("instanceIds"), dtype=np.uint16, shape=(h, w))
        lab = read_png(img.gt("labelIds"), dtype=np.uint8, shape=(h, w))
        color = read_png(img.gt("color"), shape=(h, w))
        assert rgb.std() > 10  # textured, not flat
        assert np.array_equal(lab, labels.instance_ids_to_label_ids(inst))
        assert np.array_equal(color, labels.colorize(lab))
        assert img.left.name == f"{img.image_id}_leftImg8bit.png"


def test_scenes_contain_the_hard_cases(demo_root):
    classes, empty, split_parts, holes, groups, border, tiny = set(), 0, 0, 0, 0, 0, 0
    for img in _all(demo_root):
        inst = read_png(img.gt("instanceIds"))
        ids = [v for v in np.unique(inst) if v >= 1000]
        empty += not ids
        groups += any(labels.is_group_region(v) for v in np.unique(inst))
        for v in ids:
            mask = (inst == v).astype(np.uint8)
            classes.add(labels.class_name(v // 1000))
            n, _ = cv2.connectedComponents(mask, connectivity=8)
            split_parts += n - 1 >= 2
            _, hier = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
            holes += any(h[3] >= 0 for h in hier[0])
            border += mask[:, 0].any() or mask[:, -1].any() or mask[-1].any()
            tiny += mask.sum() < 64
    assert {"car", "truck", "bus", "person", "rider"} <= classes and classes & {"bicycle", "motorcycle"}
    assert empty >= 1 and split_parts >= 1 and holes >= 1 and groups >= 1 and border >= 1 and tiny >= 1


def _rasterise(ann, shape, fill_polygon):
    """Draw a polygons.json the Cityscapes way: in file order, instances numbered per class."""
    drawn = np.zeros(shape, np.int32)
    counters = {}
    for obj in ann["objects"]:
        name = obj["label"]
        value = labels.label_id(name.removesuffix("group"))
        if name in labels.THING_CLASSES:
            value = labels.encode_instance_id(value, counters.setdefault(name, 0))
            counters[name] += 1
        fill_polygon(drawn, obj["polygon"], int(value))
    return drawn


def _fill_cv2(canvas, polygon, value):
    cv2.fillPoly(canvas, [np.asarray(polygon, np.int32)], value)


def _fill_pil(canvas, polygon, value):
    from PIL import Image, ImageDraw

    layer = Image.new("L", canvas.shape[::-1], 0)
    ImageDraw.Draw(layer).polygon([tuple(p) for p in polygon], fill=1)
    canvas[np.asarray(layer, bool)] = value


def test_polygons_are_consistent_with_pngs(demo_root):
    """Re-rasterise each polygons.json: exact with PIL (as cityscapesscripts), IoU >= 0.95 with OpenCV."""
    checked = 0
    for img in _all(demo_root):
        ann = json.loads(img.gt("polygons").read_text())
        inst = read_png(img.gt("instanceIds"))
        assert (ann["imgHeight"], ann["imgWidth"]) == inst.shape
        assert np.array_equal(_rasterise(ann, inst.shape, _fill_pil), inst)
        drawn = _rasterise(ann, inst.shape, _fill_cv2)
        for v in np.unique(inst):
            a, b = inst == v, drawn == v
            if v >= 1000 and a.sum() >= 1000:  # small shapes are mostly boundary: rasterisers differ there
                assert (a & b).sum() / (a | b).sum() >= 0.95, (img.image_id, v)
                checked += 1
    assert checked >= 30


def test_deterministic_by_seed_and_idempotent(tmp_path, demo_root):
    kw = dict(DEMO_KW, cities=1, images_per_city=2)
    a = write_demo_dataset(tmp_path / "a", **kw)
    write_demo_dataset(tmp_path / "b", **kw)
    write_demo_dataset(tmp_path / "c", **dict(kw, seed=1))
    for img in a:
        rel = img.left.relative_to(tmp_path / "a")
        assert (tmp_path / "b" / rel).read_bytes() == img.left.read_bytes()
        assert (tmp_path / "c" / rel).read_bytes() != img.left.read_bytes()
    before = img.left.stat().st_mtime_ns
    write_demo_dataset(tmp_path / "a", **kw)
    assert img.left.stat().st_mtime_ns == before


def test_demo_cli(tmp_path):
    out = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "instsynth.demo", str(out), "--cities", "1", "--images-per-city", "1",
                    "--size", "256x128"], check=True, capture_output=True)
    assert len(list(out.glob("leftImg8bit/*/*/*_leftImg8bit.png"))) == 2
    bad = subprocess.run([sys.executable, "-m", "instsynth.demo", str(out), "--size", "big"], capture_output=True)
    assert bad.returncode == 2 and b"2048x1024" in bad.stderr


def test_domain_shift_paints_each_split_in_its_own_colours(tmp_path):
    """--domain-shift: the same scenes and labels, objects in the split's colours (val: the prompts' colours)."""
    from instsynth.stages.demo_dataset import SHIFT_PAINT
    from instsynth.core.io import read_png
    from instsynth.core.labels import INSTANCE_ID_OFFSET

    kw = dict(cities=1, images_per_city=2, size=(512, 256), seed=0)
    plain = write_demo_dataset(tmp_path / "plain", **kw)
    shifted = write_demo_dataset(tmp_path / "shift", **kw, domain_shift=True)
    names = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 32: "motorcycle", 33: "bicycle"}
    votes = {"right": 0, "wrong": 0}
    for a, b in zip(plain, shifted):
        ids = read_png(b.gt("instanceIds"))
        assert (read_png(a.gt("instanceIds")) == ids).all()  # the layout does not change
        rgb = read_png(b.left, rgb=True).astype(float)
        for value in np.unique(ids[ids >= INSTANCE_ID_OFFSET]):
            name = names.get(int(value) // INSTANCE_ID_OFFSET)
            if name is None or (ids == value).sum() < 40:
                continue
            colour = np.median(rgb[ids == value], axis=0)
            candidates = [(np.abs(colour - c).sum(), split) for split in SHIFT_PAINT for c in SHIFT_PAINT[split][name]]
            votes["right" if min(candidates)[1] == b.split else "wrong"] += 1
    assert votes["right"] >= 15 and votes["wrong"] <= 1, votes
    for name in SHIFT_PAINT["train"]:
        assert not set(SHIFT_PAINT["train"][name]) & set(SHIFT_PAINT["val"][name])


def test_simple_layout_draws_two_or_three_large_objects(tmp_path):
    """--layout simple: 2-3 large cars, buses or persons per image (none in the empty one), shifted colours."""
    from instsynth.stages.demo_dataset import SIMPLE_CLASSES
    from instsynth.core.labels import INSTANCE_ID_OFFSET

    ids_of = {24: "person", 26: "car", 28: "bus"}
    assert set(ids_of.values()) == set(SIMPLE_CLASSES)
    images = write_demo_dataset(tmp_path / "d", cities=1, images_per_city=6, size=(256, 128), domain_shift=True,
                                layout="simple")
    counts, seen = [], set()
    for img in images:
        inst = read_png(img.gt("instanceIds"))
        values = [int(v) for v in np.unique(inst) if v >= INSTANCE_ID_OFFSET]
        seen |= {ids_of[v // INSTANCE_ID_OFFSET] for v in values}
        assert all((inst == v).sum() >= 300 for v in values)  # large: at least ~1% of the image each
        counts.append(len(values))
    assert sorted(counts)[:2] == [0, 0] and {c for c in counts if c} <= {2, 3}  # one empty image per split
    assert seen == set(SIMPLE_CLASSES)
    again = write_demo_dataset(tmp_path / "e", cities=1, images_per_city=6, size=(256, 128), domain_shift=True,
                               layout="simple")
    assert all((read_png(a.left) == read_png(b.left)).all() for a, b in zip(images, again))  # deterministic


def test_demo_cli_refuses_an_unknown_layout(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "instsynth.demo", str(tmp_path / "d"), "--layout", "maze"],
                         capture_output=True)
    assert bad.returncode == 2 and b"simple" in bad.stderr
