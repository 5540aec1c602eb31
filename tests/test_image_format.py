"""New images keep their source's format: JPEG in, JPEG out at quality 95, PNG otherwise (issue 20 point 6)."""
import cv2
import numpy as np
import pytest

from instsynth.formats import CocoDataset, FolderDataset, NewImage
from instsynth.formats.base import JPEG_QUALITY, encode_image, output_suffix
from instsynth.generation import GenerationSettings, generate_instances
from instsynth.core.imageops import crop_resize_rgb
from instsynth.stages.integration import IntegrationParams, integrate_samples
from instsynth.core.io import read_json, read_png, write_json
from instsynth.stages.selection import METADATA_NAME, select_coco_instances

JPEG_MAGIC = b"\xff\xd8\xff"


def as_jpeg(path, suffix=".jpg"):
    """Write ``path`` (a PNG) as a JPEG next to it and remove the PNG; returns the new path."""
    new = path.with_suffix(suffix)
    cv2.imwrite(str(new), cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 98])
    path.unlink()
    return new


@pytest.fixture
def jpeg_coco(coco_files, tmp_path):
    """The demo's COCO train export with every image a JPEG (file names .jpg)."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(coco_files["train"].parent.parent / "images/train", images)
    data = read_json(coco_files["train"])
    for img in data["images"]:
        as_jpeg(images / img["file_name"])
        img["file_name"] = img["file_name"][:-4] + ".jpg"
    return write_json(tmp_path / "instances.json", data, indent=None), images


def test_suffix_and_encoding_follow_the_source():
    assert [output_suffix(n) for n in ("a/b.jpg", "c.JPEG", "d.png", "e.webp", "f.tif")] == [
        ".jpg", ".JPEG", ".png", ".png", ".png"]
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    rgb = cv2.GaussianBlur(rgb, (7, 7), 3)
    jpeg, png = encode_image(rgb, "x.jpg"), encode_image(rgb, "x.png")
    assert jpeg.startswith(JPEG_MAGIC) and png.startswith(b"\x89PNG")
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(int) - rgb).mean() < 4.0
    at_95 = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert JPEG_QUALITY == 95 and jpeg == at_95  # the documented quality


def test_coco_writer_and_stage2_write_jpeg_from_jpeg(jpeg_coco, tmp_path):
    coco_json, images = jpeg_coco
    dataset = CocoDataset(coco_json, images)
    source = next(im for im in dataset.images("train") if im.annotations().instances)
    ann = source.annotations()
    writer = dataset.writer(tmp_path / "w", "train")
    name = writer.new_name(source, ann.instances[-1].id, 0, 0)
    assert name.endswith(".jpg")
    box = (0, 0, ann.width, ann.height)
    writer.write(NewImage(name, ann, crop_resize_rgb(source.read_pixels(), box, (ann.width, ann.height)), box))
    assert (tmp_path / "w" / "images" / name).read_bytes().startswith(JPEG_MAGIC)

    summary = select_coco_instances(coco_json, images, k=1, out=tmp_path / "work", workers=1)
    generate_instances(summary.metadata, settings=GenerationSettings(mode="recolor"))
    out = tmp_path / "out"
    integrate_samples(tmp_path / "work" / "Recolor", out, params=IntegrationParams(crops_per_sample=1), workers=1,
                      metadata_path=tmp_path / "work" / METADATA_NAME)
    merged = read_json(out / "annotations" / "instances_train_instsynth.json")
    new = [i for i in merged["images"] if i["file_name"].startswith("instsynth_syn/")]
    assert new and all(i["file_name"].endswith(".jpg") for i in new)
    for img in new:
        path = out / "images" / img["file_name"]
        assert path.read_bytes().startswith(JPEG_MAGIC)
        assert read_png(path, rgb=True).shape == (img["height"], img["width"], 3)


def test_folder_writer_keeps_png_and_jpeg(folder_root, tmp_path):
    import shutil

    root = tmp_path / "folder"
    shutil.copytree(folder_root, root)
    first = sorted((root / "images").rglob("*.png"))[0]
    as_jpeg(first)
    dataset = FolderDataset(root)
    writer = dataset.writer(tmp_path / "out", "train")
    for source in dataset.images("train")[:2]:
        ann = source.annotations()
        box = (0, 0, ann.width, ann.height)
        name = writer.new_name(source, 1, 0, 0)
        done = writer.write(NewImage(name, ann, source.read_pixels(), box))
        path = tmp_path / "out" / done.fields["outputs"]["image"]
        assert path.suffix == source.path.suffix and path.read_bytes().startswith(
            JPEG_MAGIC if source.path.suffix == ".jpg" else b"\x89PNG")
