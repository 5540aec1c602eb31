"""The dataset-format interface (instsynth.formats): Cityscapes, COCO / LVIS and folder on the demo data."""
import json
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from instsynth.stages.selection import select_coco_instances
from instsynth.formats import (CityscapesDataset, CocoDataset, FolderDataset, NewImage, NewInstance, dataset_from_args,
                               open_dataset)
from instsynth.core.imageops import crop_resize_labels, crop_resize_rgb
from instsynth.integration import new_image_id
from instsynth.core.io import InstSynthError, iter_cityscapes_images, read_json, read_png, write_json, write_png
from instsynth.coco_output import synthetic_file_name
from instsynth.core.labels import THING_CLASSES, THING_LABEL_IDS
from instsynth.stages.selection import select_instances, square_crop_box


def ranked(instances, k=3, min_area=64):
    """Stage 1's rule on the interface: the k largest non-crowd instances, ties by id."""
    things = [i for i in instances if not i.crowd and i.category_id in THING_LABEL_IDS and i.area >= max(min_area, 1)]
    return sorted(things, key=lambda i: (-i.area, i.id))[:k]


def selected_by_format(dataset, split: str, key=lambda im, inst: f"{im.stem}_{inst.id}") -> list[dict]:
    out = []
    for im in dataset.images(split):
        ann = im.annotations()
        for inst in ranked(ann.instances):
            crop = square_crop_box(inst.bbox, ann.width, ann.height)
            out.append({"key": key(im, inst), "area": inst.area, "bbox": list(inst.bbox), "crop_box": list(crop),
                        "image": im.relative, "mask": inst.mask(crop)})
    return out


def check_against_stage1(found: list[dict], metadata: Path) -> None:
    meta = read_json(metadata)
    assert [f["key"] for f in found] == [i["key"] for i in meta["instances"]]
    for f, inst in zip(found, meta["instances"]):
        assert (f["area"], f["bbox"], f["crop_box"], f["image"]) == (inst["area"], inst["bbox"], inst["crop_box"],
                                                                     inst["image"])
        assert np.array_equal(f["mask"], read_png(metadata.parent / inst["crop_mask"]) > 0)


# --------------------------------------------------------------------------- reading
def test_cityscapes_lists_images_and_instances_as_stage_1(demo_root, tmp_path):
    data = open_dataset("cityscapes", demo_root)
    images = data.images("train")
    assert [(i.folder, i.stem) for i in images] == [(i.city, i.image_id) for i in iter_cityscapes_images(demo_root, "train")]
    assert [(c.id, c.name) for c in data.categories()] == list(zip(THING_LABEL_IDS, THING_CLASSES))
    ann = images[0].annotations()
    ids = read_png(images[0].cityscapes.gt("instanceIds"), dtype=np.uint16)
    bgr = read_png(images[0].cityscapes.left, rgb=True, bgr=True)
    assert np.array_equal(ann.label_map, ids) and np.array_equal(images[0].read_pixels(bgr=True, shape=ids.shape), bgr)
    crowd = [i for i in ann.instances if i.crowd]
    assert crowd and all(i.id == i.category_id < 1000 for i in crowd)
    assert sum(i.area for i in ann.instances) == int(np.isin(ids, [i.id for i in ann.instances]).sum())
    summary = select_instances(demo_root, out=tmp_path, workers=1)
    check_against_stage1(selected_by_format(data, "train"), summary.metadata)


def test_coco_lists_images_and_instances_as_stage_1(coco_files, tmp_path):
    path = coco_files["train"]
    data = open_dataset("coco", path, path.parent.parent / "images/train")
    coco = read_json(path)
    assert [i.info["id"] for i in data.images("train")] == [i["id"] for i in sorted(coco["images"], key=lambda i: (i["file_name"], i["id"]))]
    assert [c.as_dict() for c in data.categories()] == sorted(coco["categories"], key=lambda c: c["id"])
    summary = select_coco_instances(path, data.root, out=tmp_path, workers=1)
    check_against_stage1(selected_by_format(data, "train"), summary.metadata)
    ann = data.images("train")[0].annotations()
    assert {i.id for i in ann.instances} == {a["id"] for a in coco["annotations"] if a["image_id"] == ann.image.coco_id}
    assert ann.label_map.dtype == np.uint16 and ann.label_map.max() >= 1000


def test_folder_reads_the_same_instances_as_cityscapes(demo_root, folder_root, tmp_path):
    folder, cityscapes = open_dataset("folder", folder_root), CityscapesDataset(demo_root)
    assert [(i.folder, i.stem) for i in folder.images("train")] == [(i.folder, i.stem) for i in cityscapes.images("train")]
    for a, b in zip(folder.images("train"), cityscapes.images("train")):
        fa, ca = a.annotations(), b.annotations()
        things = [i for i in ca.instances if not i.crowd]
        assert [(i.id, i.category_id, i.area, i.bbox) for i in fa.instances] == \
               [(i.id, i.category_id, i.area, i.bbox) for i in things]
        assert np.array_equal(a.read_pixels(), b.read_pixels())
    # the same, as a labelling tool exports it: uint8 values 1, 2, ... and a sidecar naming their categories
    im = cityscapes.images("train")[0]
    ids = read_png(im.cityscapes.gt("instanceIds"))
    values = [v for v in np.unique(ids) if v >= 1000]
    (tmp_path / "images").mkdir()
    shutil.copyfile(im.path, tmp_path / "images/one.png")
    write_png(tmp_path / "instances/one.png", np.searchsorted([0, *values], np.where(ids >= 1000, ids, 0)).astype(np.uint8))
    write_json(tmp_path / "instances/one.json", {str(j + 1): THING_CLASSES[THING_LABEL_IDS.index(v // 1000)]
                                                 for j, v in enumerate(values)})
    (tmp_path / "categories.yaml").write_text("".join(f"{i}: {n}\n" for i, n in zip(THING_LABEL_IDS, THING_CLASSES)))
    got = FolderDataset(tmp_path).images("any")[0].annotations()
    assert [(i.category_id, i.area) for i in got.instances] == [(v // 1000, int((ids == v).sum())) for v in values]
    assert sorted(np.unique(got.label_map)) == [0, *range(1000, 1000 + len(values))]


def test_lvis_fields_are_kept(coco_files, tmp_path):
    data = read_json(coco_files["train"])
    for cat in data["categories"]:
        cat.update(frequency="r" if cat["name"] == "bus" else "f", synonyms=[cat["name"], "x"], **{"def": "a thing"})
    for img in data["images"]:
        img.update(not_exhaustive_category_ids=[24], neg_category_ids=[31])
    lvis = write_json(tmp_path / "lvis.json", data, indent=None)
    dataset = CocoDataset(lvis, coco_files["train"].parent.parent / "images/train")
    bus = next(c for c in dataset.categories() if c.name == "bus")
    assert (bus.frequency, bus.synonyms, bus.raw["def"]) == ("r", ["bus", "x"], "a thing")
    assert dataset.category_ids(frequency=["r"]) == (bus.id,)
    source = next(im for im in dataset.images("train") if im.annotations().instances)
    writer = dataset.writer(tmp_path / "out", "train")
    written = write_new(writer, source, (0, 0, source.info["width"], source.info["height"]))
    merged = read_json(writer.finish([{**written.fields, "source_image_id": source.coco_id}], {"run": 1})[0])
    new = merged["images"][-1]
    assert new["not_exhaustive_category_ids"] == [24] and new["neg_category_ids"] == [31]
    assert merged["categories"] == data["categories"] and merged["info"]["instsynth"]["run"] == 1


# --------------------------------------------------------------------------- writing and reading back
def write_new(writer, source, box, pasted=()):
    ann = source.annotations()
    rgb = crop_resize_rgb(source.read_pixels(), box, (ann.width, ann.height))
    name = writer.new_name(source, ann.instances[-1].id, 2, 1)
    return writer.write(NewImage(name, ann, rgb, box, tuple(pasted), regenerated=ann.instances[-1].id))


def expected_areas(ann, box, pasted=None):
    """{category: sorted areas} of the source's instances cut by ``box`` (and ``pasted`` painted first)."""
    out = {}
    for inst in ann.instances:
        mask = inst.mask() & ~pasted[0] if pasted is not None else inst.mask()
        area = int(crop_resize_labels(mask.view(np.uint8), box, (ann.width, ann.height)).sum())
        if area and not inst.crowd:
            out.setdefault(inst.category_id, []).append(area)
    if pasted is not None:
        out.setdefault(pasted[1], []).append(int(pasted[0].sum()))
    return {k: sorted(v) for k, v in out.items()}


def read_back_areas(dataset, split, name_part):
    [im] = [i for i in dataset.images(split, **({} if isinstance(dataset, CocoDataset) else {"include_generated": True}))
            if name_part in i.relative]
    out = {}
    for inst in im.annotations().instances:
        if not inst.crowd:
            out.setdefault(inst.category_id, []).append(inst.area)
    return {k: sorted(v) for k, v in out.items()}, im


@pytest.mark.parametrize("kind", ["cityscapes", "coco", "folder"])
def test_written_images_read_back_by_the_same_format(kind, demo_root, coco_files, folder_root, tmp_path):
    path = coco_files["train"]
    dataset = {"cityscapes": lambda: CityscapesDataset(demo_root), "folder": lambda: FolderDataset(folder_root),
               "coco": lambda: CocoDataset(path, path.parent.parent / "images/train")}[kind]()
    source = next(im for im in dataset.images("train") if len(im.annotations().instances) > 3)
    ann = source.annotations()
    box = (ann.width // 4, ann.height // 4, ann.width // 4 + ann.width // 2, ann.height // 4 + ann.height // 2)
    square = np.zeros((ann.height, ann.width), bool)
    square[10:40, 20:70] = True
    writer = dataset.writer(tmp_path, "train")
    cases = [((0, 0, ann.width, ann.height), ()), (box, ()),
             ((0, 0, ann.width, ann.height), (NewInstance(square, THING_LABEL_IDS[2]),))]
    entries = []
    for n, (b, pasted) in enumerate(cases):
        ann_n = source.annotations()
        rgb = crop_resize_rgb(source.read_pixels(), b, (ann.width, ann.height))
        name = writer.new_name(source, ann.instances[-1].id, n, 0)
        done = pickle.loads(pickle.dumps(writer)).write(NewImage(name, ann_n, rgb, b, pasted))  # as in a worker
        assert done.written == (1 if kind == "coco" else 2) and done.name == name
        entries.append({**done.fields, "image_id": name, "kind": "crop", "split": "train", "city": source.folder,
                        "source_image_id": source.info["id"] if kind == "coco" else source.stem,
                        "bbox_coordinate": list(b), "size": [ann.width, ann.height]})
    finished = writer.finish(entries, {})
    if kind == "cityscapes":
        assert read_json(finished[0])["images"][1]["bbox_coordinate"] == list(box)
        assert writer.new_name(source, 26001, 3, 1) == new_image_id(source.stem, 26001, 3, 1)
        reread = CityscapesDataset(tmp_path)
        panorama = tmp_path / entries[0]["outputs"]["instanceIds"]
        assert panorama.read_bytes() == source.cityscapes.gt("instanceIds").read_bytes()
    elif kind == "coco":
        assert writer.new_name(source, 7, 3, 1) == synthetic_file_name("train", source.relative, 7, 3, 1)
        reread = CocoDataset(finished[0], tmp_path / "images", check_images=False)
    else:
        reread = FolderDataset(tmp_path)
    for n, (b, pasted) in enumerate(cases):
        areas, im = read_back_areas(reread, "train", entries[n].get("image_id") if kind != "coco" else entries[n]["file_name"])
        expected = expected_areas(ann, b, (square, THING_LABEL_IDS[2]) if pasted else None)
        assert areas == expected, (kind, n)
        assert np.array_equal(im.read_pixels(), crop_resize_rgb(source.read_pixels(), b, (ann.width, ann.height)))


# --------------------------------------------------------------------------- bad input, the table
def test_bad_input_is_one_clear_line(folder_root, coco_files, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder_root, bad)
    label = sorted((bad / "instances").rglob("*.png"))[0]
    ids = read_png(label)
    ids[0, 0] = 5  # neither category * 1000 + k nor in a sidecar
    write_png(label, ids)
    with pytest.raises(InstSynthError, match="value 5 is not category_id") as exc:
        FolderDataset(bad).images("train")[0].annotations()
    assert str(exc.value).startswith(str(label)) and "\n" not in str(exc.value)
    (bad / "categories.json").write_text('{"one": "car"}')
    with pytest.raises(InstSynthError, match="categories.json: category id 'one' is not an integer"):
        FolderDataset(bad)
    (bad / "categories.json").unlink()
    with pytest.raises(InstSynthError, match="no categories.json"):
        FolderDataset(bad)
    data = read_json(coco_files["train"])
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    broken = write_json(tmp_path / "dup.json", data)
    with pytest.raises(InstSynthError, match=f"dup.json: duplicate annotation id {data['annotations'][0]['id']}"):
        CocoDataset(broken, tmp_path)
    with pytest.raises(InstSynthError, match="gtFine/train: folder not found"):
        CityscapesDataset(tmp_path).images("train")
    with pytest.raises(ValueError, match="unknown dataset format 'voc'"):
        open_dataset("voc", tmp_path)


def test_dataset_from_cli_flags(demo_root, folder_root, coco_files):
    path = coco_files["train"]
    assert dataset_from_args(Namespace(train_folder=str(demo_root), coco=None, folder=None)).kind == "cityscapes"
    assert dataset_from_args(Namespace(folder=str(folder_root))).kind == "folder"
    got = dataset_from_args(Namespace(coco=str(path), images=str(path.parent.parent / "images/train"), skip_bad=True))
    assert got.kind == "coco" and got.where == path.resolve()
    assert pickle.loads(pickle.dumps(got.writer("/tmp/x", "train"))).dataset is None  # workers get no source file
    assert json.loads(json.dumps([c.as_dict() for c in got.categories()]))[0]["id"] == 24
