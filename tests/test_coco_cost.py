"""Integration's cost follows its work on a COCO file (issue 21): it trusts stage 1's check of the file only
while the file is the one stage 1 checked, streams the merged file and links the originals once.

Stage 1 records the file's size, mtime and sha256 in metadata.json when nothing in it was bad; integration
reads the file, and when the fingerprint matches it checks again only the annotations of the images it
decodes. An edit after stage 1 (even one that keeps size and mtime) changes the fingerprint: the whole
file is checked as before."""
import hashlib
import json
import os
import shutil

import pytest

from instsynth.core.io import InstSynthError, json_pieces, read_json, write_pieces_if_changed
from instsynth.formats import coco
from instsynth.generation import GenerationSettings, generate_instances
from instsynth.stages.integration import IntegrationParams, integrate_samples
from instsynth.stages.selection import select_coco_instances

PARAMS = IntegrationParams(crops_per_sample=1)


@pytest.fixture
def stage1(coco_files, tmp_path):
    """A private copy of the demo train file, stage 1 (k=1, buses: 2 of its 6 images) and recolor generation on
    it: (json, generation dir)."""
    path = tmp_path / "train.json"
    shutil.copyfile(coco_files["train"], path)
    images = coco_files["train"].parent.parent / "images/train"
    sel = select_coco_instances(path, images, k=1, classes=["bus"], out=tmp_path / "sel", workers=1)
    gen = generate_instances(sel.metadata, settings=GenerationSettings(mode="recolor"))
    return path, gen.manifest.parent


@pytest.fixture
def checks(monkeypatch):
    """The number of annotations each call of the file-wide annotation check was given."""
    calls = []
    original = coco.annotation_problems
    monkeypatch.setattr(coco, "annotation_problems", lambda anns, *a: calls.append(len(anns)) or original(anns, *a))
    return calls


def needed_annotations(path, gen) -> int:
    """Annotations of the images stage 1 selected from (integration decodes their masks)."""
    used = {i["coco_image_id"] for i in read_json(gen.parent / "metadata.json")["instances"]}
    return sum(a["image_id"] in used for a in read_json(path)["annotations"])


def test_stage1_records_the_fingerprint_of_the_bytes_it_checked(stage1):
    path, gen = stage1
    meta = read_json(gen.parent / "metadata.json")
    stat = path.stat()
    assert meta["coco_json_fingerprint"] == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_unchanged_file_is_not_checked_again_and_gives_the_same_output(stage1, checks, tmp_path):
    path, gen = stage1
    integrate_samples(gen, tmp_path / "trusted", params=PARAMS, workers=1)
    total = len(read_json(path)["annotations"])
    assert checks == [needed_annotations(path, gen)] and checks[0] < total  # trusted: only the selected images'
    meta_path = gen.parent / "metadata.json"
    meta = read_json(meta_path)
    del meta["coco_json_fingerprint"]  # as a metadata of before issue 21: the whole file is checked
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    integrate_samples(gen, tmp_path / "checked", params=PARAMS, workers=1)
    assert checks[1:] == [total]
    name = "annotations/instances_train_instsynth.json"
    trusted, checked = (tmp_path / "trusted" / name).read_bytes(), (tmp_path / "checked" / name).read_bytes()
    assert trusted == checked and len(json.loads(trusted)["images"]) > len(read_json(path)["images"])


def test_edited_file_is_checked_again_and_the_bad_annotation_is_caught(stage1, checks, tmp_path):
    path, gen = stage1
    stat = path.stat()
    data = read_json(path)
    used = {i["coco_image_id"] for i in read_json(gen.parent / "metadata.json")["instances"]}
    victim = [a for a in data["annotations"] if a["image_id"] not in used][-1]  # one trust would not re-check
    victim["bbox"] = [1, 1, 0, 4]  # no area: a bad annotation (shorter than the float box it replaces)
    text = json.dumps(data)
    path.write_text(text + " " * (stat.st_size - len(text)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)  # only the hash differs
    with pytest.raises(InstSynthError, match=f"annotation id {victim['id']}: bbox .* has no area") as err:
        integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1)
    assert str(path) in str(err.value) and checks == [len(data["annotations"])]
    integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1, skip_bad=True)
    report = read_json(tmp_path / "out" / "integration_report.json")
    assert [b["id"] for b in report["bad_source_items_left_out"]] == [victim["id"]]


def test_image_entries_are_checked_even_when_trusted(stage1, checks, tmp_path):
    """A listed original image deleted after stage 1 is still an error naming it (the merged file lists it)."""
    path, gen = stage1
    meta = read_json(gen.parent / "metadata.json")
    used = {i["image"] for i in meta["instances"]}
    images = [i for i in read_json(path)["images"] if i["file_name"] not in used]
    victim = images[0]
    image_dir = tmp_path / "images"
    shutil.copytree(meta["dataset_root"], image_dir)
    meta["dataset_root"] = str(image_dir)
    (gen.parent / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (image_dir / victim["file_name"]).unlink()
    with pytest.raises(InstSynthError, match=f"image id {victim['id']}: image file .* not found"):
        integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1)
    assert checks == []  # found at the image entries, before any annotation


def test_forged_fingerprint_still_checks_what_integration_decodes(stage1, tmp_path):
    """A metadata edited to carry the fingerprint of a hostile file: the annotations whose masks integration
    decodes are checked all the same (a hostile RLE never reaches pycocotools)."""
    path, gen = stage1
    meta_path = gen.parent / "metadata.json"
    meta = read_json(meta_path)
    data = read_json(path)
    victim = next(a for a in data["annotations"] if a["image_id"] == meta["instances"][0]["coco_image_id"])
    victim.update(iscrowd=1, segmentation={"size": [256, 512], "counts": "abc"})
    path.write_text(json.dumps(data))
    meta["coco_json_fingerprint"] = {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    with pytest.raises(InstSynthError, match=f"annotation id {victim['id']}: RLE counts are not a valid compressed"):
        integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1)


def test_no_fingerprint_when_stage1_left_something_out(coco_files, tmp_path):
    """A file with a bad annotation (skipped by --skip-bad) gets no fingerprint: integration checks it again."""
    data = read_json(coco_files["train"])
    data["annotations"][0]["bbox"] = [1, 1, 0, 4]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    images = coco_files["train"].parent.parent / "images/train"
    sel = select_coco_instances(path, images, k=1, out=tmp_path / "sel", workers=1, skip_bad=True)
    assert "coco_json_fingerprint" not in read_json(sel.metadata)


# --------------------------------------------------------------------------- the merged file, streamed
@pytest.mark.parametrize("batch", [1, 2, 3, 1000])
def test_json_pieces_are_json_dumps_byte_for_byte(batch):
    obj = {"info": {"a": 1, "é": [1.5, float("nan")]}, "empty": [], "one": [{"x": 1}], "images": list(range(7)),
           "annotations": [{"segmentation": [[0.1, 2.0, 3.25]], "bbox": [1, 2, 3, 4], "name": "ü\"q"}] * 5, "n": None}
    assert "".join(json_pieces(obj, batch)) == json.dumps(obj)
    assert max(len(p) for p in json_pieces(obj, 2)) < len(json.dumps(obj["annotations"]))  # never the whole list


def test_streamed_write_leaves_a_file_with_the_same_bytes_untouched(tmp_path):
    path = tmp_path / "a" / "merged.json"
    assert write_pieces_if_changed(path, ["{", '"a": 1', "}"]) and path.read_text() == '{"a": 1}'
    os.utime(path, ns=(0, 0))
    assert not write_pieces_if_changed(path, [b'{"a": ', "1}"]) and path.stat().st_mtime_ns == 0
    assert write_pieces_if_changed(path, ['{"a": 2}']) and path.read_text() == '{"a": 2}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["merged.json"]  # no temporary file left


def test_merged_file_is_json_dumps_of_the_merge(stage1, tmp_path):
    """The streamed merged file is exactly what the whole-string json.dumps of the merge gives."""
    path, gen = stage1
    integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1)
    merged = tmp_path / "out" / "annotations/instances_train_instsynth.json"
    text = merged.read_text()
    assert text == json.dumps(json.loads(text)) + "\n"
    assert json.loads(text)["annotations"][:len(read_json(path)["annotations"])] == read_json(path)["annotations"]


# --------------------------------------------------------------------------- originals, linked once
def test_originals_are_linked_once_per_output_folder(stage1, tmp_path):
    path, gen = stage1
    out = tmp_path / "out"
    integrate_samples(gen, out, params=PARAMS, workers=1)
    images = read_json(path)["images"]
    first = read_json(out / "integration_report.json")["original_images_linked"]
    assert first == {"linked": len(images)}
    source_dir = coco_source_dir(gen)
    assert all((out / "images" / i["file_name"]).samefile(source_dir / i["file_name"]) for i in images)
    victim = out / "images" / images[0]["file_name"]
    victim.unlink()
    victim.write_bytes(b"not the original")  # a different file at the link's place is replaced
    integrate_samples(gen, out, params=PARAMS, workers=1)
    again = read_json(out / "integration_report.json")["original_images_linked"]
    assert again == {"skipped": len(images) - 1, "linked": 1} and victim.samefile(source_dir / images[0]["file_name"])


def test_originals_are_copied_where_links_are_refused(stage1, tmp_path, monkeypatch):
    import errno

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    path, gen = stage1
    monkeypatch.setattr(os, "link", no_link)
    integrate_samples(gen, tmp_path / "out", params=PARAMS, workers=1)
    images = read_json(path)["images"]
    assert read_json(tmp_path / "out" / "integration_report.json")["original_images_linked"] == {"copied": len(images)}
    name = images[0]["file_name"]
    assert (tmp_path / "out/images" / name).read_bytes() == (coco_source_dir(gen) / name).read_bytes()


def coco_source_dir(gen):
    from pathlib import Path

    return Path(read_json(gen.parent / "metadata.json")["dataset_root"])
