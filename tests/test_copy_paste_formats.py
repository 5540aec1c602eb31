"""Copy-paste on every format: a COCO / LVIS source gives a COCO output, a folder source a folder output."""
import json
import shutil

import numpy as np
import pytest

from instsynth.cli.copy_paste import main
from instsynth.experiments.copy_paste import CopyPasteParams, copy_paste_dataset
from instsynth.formats import open_dataset
from instsynth.formats.coco import annotation_mask
from instsynth.core.io import InstSynthError, read_json, read_png, write_json, write_png

PARAMS = CopyPasteParams(seed=4, scale_range=(0.5, 1.5))


def lvis_file(coco_files, tmp_path, neg: list[int]):
    """The demo train split with LVIS fields on categories and images (``neg``: every image's neg_category_ids)."""
    data = read_json(coco_files["train"])
    for cat in data["categories"]:
        cat.update(frequency="r" if cat["name"] == "bus" else "f", synonyms=[cat["name"]], **{"def": "a thing"})
    for img in data["images"]:
        img.update(not_exhaustive_category_ids=[24], neg_category_ids=neg)
    return write_json(tmp_path / "lvis.json", data, indent=None), data


def test_coco_source_gives_a_merged_coco_file_with_exact_pasted_masks(coco_files, tmp_path):
    images = coco_files["train"].parent.parent / "images" / "train"
    all_ids = [c["id"] for c in read_json(coco_files["train"])["categories"]]
    path, data = lvis_file(coco_files, tmp_path, neg=all_ids)  # every category "verified absent": pasting one
    out = tmp_path / "out"                                       # must take it off the new image's list
    report = copy_paste_dataset(open_dataset("coco", path, images), out, 7, params=PARAMS, workers=1)
    merged = read_json(out / "annotations" / "instances_train_instsynth.json")
    entries = read_json(out / "copy_paste.json")["images"]
    assert report["new_images"] == len(entries) == 7 and report["instances_pasted"] >= 7
    assert merged["categories"] == data["categories"] and merged["info"]["instsynth"]["method"] == "copy_paste"
    assert merged["images"][:len(data["images"])] == data["images"]
    assert all((out / "images" / im["file_name"]).is_file() for im in merged["images"])  # originals linked
    by_image = {}
    for a in merged["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    source = {im["id"]: im for im in data["images"]}
    source_anns = {a["id"]: a for a in data["annotations"]}
    for entry, new in zip(entries, merged["images"][len(data["images"]):]):
        target = source[entry["target_image_id"]]
        assert new["file_name"] == entry["image_id"] and new["source_image_id"] == target["id"]
        h, w = target["height"], target["width"]
        anns = by_image[new["id"]]
        pasted = [a for a in anns if a["pasted"]]
        assert len(pasted) == len(entry["pasted"]) and all(a["source_annotation_id"] is None for a in pasted)
        copied = [source_anns[int(i)] for i in entry["pasted"]]
        assert [a["category_id"] for a in pasted] == [a["category_id"] for a in copied]
        assert all(a["image_id"] == entry["source_image_id"] for a in copied)
        assert new["neg_category_ids"] == [c for c in all_ids if c not in {a["category_id"] for a in anns}]
        assert new["not_exhaustive_category_ids"] == [24]
        union = np.zeros((h, w), bool)
        for a in pasted:
            mask = annotation_mask(a, h, w)
            assert mask.sum() == a["area"] >= PARAMS.min_pixels and not (mask & union).any()
            union |= mask
        for a in anns:
            if not a["pasted"]:  # an occluded target instance loses exactly the pixels pasted over it
                expected = annotation_mask(source_anns[a["source_annotation_id"]], h, w) & ~union
                assert np.array_equal(annotation_mask(a, h, w), expected)
        rgb = read_png(out / "images" / new["file_name"], rgb=True)
        assert (rgb[~union] == read_png(images / target["file_name"], rgb=True)[~union]).all()

    again = copy_paste_dataset(open_dataset("coco", path, images), out, 7, params=PARAMS, workers=2)
    assert again["files_written"] == 0  # same bytes with two workers
    fewer = copy_paste_dataset(open_dataset("coco", path, images), out, 4, params=PARAMS, workers=1)
    assert len(fewer["stale_images_removed"]) == 3
    assert len(list((out / "images" / "instsynth_syn").rglob("*.png"))) == 4
    merged = read_json(out / "annotations" / "instances_train_instsynth.json")
    assert len(merged["images"]) == len(data["images"]) + 4


def test_folder_source_gives_a_folder_output(folder_root, tmp_path):
    out = tmp_path / "out"
    report = copy_paste_dataset(open_dataset("folder", folder_root), out, 8, params=PARAMS, workers=1)
    entries = read_json(out / "copy_paste.json")["images"]
    assert report["new_images"] == 8 and read_json(out / "copy_paste.json")["format"] == "folder"
    written = {c["id"]: c["name"] for c in read_json(out / "categories.json")["categories"]}
    assert written == {int(k): v for k, v in read_json(folder_root / "categories.json").items()}
    for e in entries:
        target = folder_root / "instances" / e["target_image_id"].removeprefix("images/")
        ids = read_png(target.with_suffix(".png"))
        rgb = read_png(folder_root / e["target_image_id"], rgb=True)
        new_ids, new_rgb = read_png(out / e["outputs"]["instances"]), read_png(out / e["outputs"]["image"], rgb=True)
        values = [int(v) for v in e["pasted"].values()]
        assert values and not set(values) & set(np.unique(ids).tolist())  # fresh values
        assert all(int(old) // 1000 == new // 1000 for old, new in e["pasted"].items())  # same category
        assert all((new_ids == v).sum() >= PARAMS.min_pixels for v in values)
        pasted = np.isin(new_ids, values)
        assert (new_ids[~pasted] == ids[~pasted]).all() and (new_rgb[~pasted] == rgb[~pasted]).all()
    back = open_dataset("folder", out).images("train", include_generated=True)  # OUT reads as a folder dataset
    assert len(back) == 8 and all(im.annotations().instances for im in back)
    assert copy_paste_dataset(open_dataset("folder", folder_root), out, 8, params=PARAMS, workers=2)[
        "files_written"] == 0
    fewer = copy_paste_dataset(open_dataset("folder", folder_root), out, 5, params=PARAMS, workers=1)
    assert len(fewer["stale_images_removed"]) == 3
    assert len(list((out / "instances").rglob("*.png"))) == len(list((out / "images").rglob("*.png"))) == 5


def test_folder_with_sidecars_numbers_pasted_instances_after_the_largest(folder_root, tmp_path):
    """uint8 PNGs numbered 1, 2, ... with a sidecar: pasted values follow, and the sidecar names their category."""
    root = tmp_path / "src"
    shutil.copytree(folder_root, root)
    for png in (root / "instances").rglob("*.png"):
        ids = read_png(png)
        values = [int(v) for v in np.unique(ids) if v]
        write_png(png, np.searchsorted([0, *values], ids).astype(np.uint8))
        (png.with_suffix(".json")).write_text(json.dumps({str(j + 1): v // 1000 for j, v in enumerate(values)}))
    out = tmp_path / "out"
    copy_paste_dataset(open_dataset("folder", root), out, 4, params=PARAMS, workers=1)
    for e in read_json(out / "copy_paste.json")["images"]:
        source_sidecar = read_json(root / "instances" / f"{e['target_image_id'].removeprefix('images/')[:-4]}.json")
        sidecar = read_json(out / e["outputs"]["sidecar"])
        start = max([0, *map(int, source_sidecar)]) + 1
        assert sorted(e["pasted"].values()) == list(range(start, start + len(e["pasted"])))
        assert all(str(v) in sidecar for v in e["pasted"].values())
        assert {k: v for k, v in sidecar.items() if k in source_sidecar} == source_sidecar


def test_cli_takes_the_format_flags(coco_files, folder_root, tmp_path, capsys):
    images = coco_files["train"].parent.parent / "images" / "train"
    main(["--coco", str(coco_files["train"]), "--images", str(images), "--out", str(tmp_path / "c"),
          "--num_images", "2", "--workers", "1"])
    assert "2 images" in capsys.readouterr().out
    assert (tmp_path / "c" / "annotations" / "instances_train_instsynth.json").is_file()
    main(["--folder", str(folder_root), "--out", str(tmp_path / "f"), "--num_images", "1", "--workers", "1"])
    assert (tmp_path / "f" / "categories.json").is_file()
    with pytest.raises(SystemExit):
        main(["--coco", str(coco_files["train"]), "--out", str(tmp_path / "x"), "--num_images", "1"])
    with pytest.raises(SystemExit):
        main(["--dataset", str(folder_root), "--folder", str(folder_root), "--out", str(tmp_path / "x"),
              "--num_images", "1"])


def test_a_dataset_without_instances_to_paste_is_one_clear_error(folder_root, tmp_path):
    root = tmp_path / "empty"
    shutil.copytree(folder_root, root)
    for png in (root / "instances").rglob("*.png"):
        write_png(png, np.zeros_like(read_png(png)))
    with pytest.raises(InstSynthError, match="no image holds an instance to paste"):
        copy_paste_dataset(open_dataset("folder", root), tmp_path / "out", 2, workers=1)


CITYSCAPES_SHA256 = "c48220dcdbad28e82e8d5730ea7e043e18de6a3e21f7736dd381cc96df3bc775"
"""Every output file of 8 copy-paste images (seed 5) of the demo tree (conftest's DEMO_KW), recorded with the
Cityscapes-only copy_paste.py of commit 18aa3ad, before it was written against the format interface."""


def test_cityscapes_output_is_byte_identical_to_the_cityscapes_only_version(demo_root, tmp_path):
    import hashlib

    copy_paste_dataset(demo_root, tmp_path / "cp", 8, params=CopyPasteParams(seed=5), workers=1)
    digest = hashlib.sha256()
    for p in sorted((tmp_path / "cp").rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp_path / "cp").as_posix().encode()
            digest.update(rel + p.read_bytes().replace(str(demo_root).encode(), b"$ROOT"))
    assert digest.hexdigest() == CITYSCAPES_SHA256
