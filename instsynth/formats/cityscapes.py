"""The Cityscapes tree: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_instanceIds.png``.

Instances are the values of the instanceIds map: ``labelId * 1000 + k`` (category = labelId) and the
group regions of the thing classes (a thing labelId below 1000, ``crowd``). Categories are the ten
Cityscapes thing classes (``cityscapesscripts``). New images keep the source's city and sequence and
append fixed-width fields to the frame (:func:`new_image_id`) under ``OUT/{leftImg8bit,gtFine}/<split>/<city>_syn/``;
``finish`` writes stage 4's ``cropped_region_coordinates.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from instsynth.core.imageops import crop_resize_labels
from instsynth.core.io import (CityscapesImage, InstSynthError, encode_png, image_id_of, iter_cityscapes_images,
                               read_png, split_image_id, write_json)
from instsynth.core.labels import (INSTANCE_ID_OFFSET, THING_CLASSES, THING_LABEL_IDS, class_name, colorize,
                                   instance_ids_to_label_ids, label_id)
from .base import (Annotations, Box, Category, Dataset, DatasetWriter, Instance, NewImage, NewInstance, SourceImage,
                   WrittenImage, check_fields, fresh_instance_ids)

COORDINATES_NAME = "cropped_region_coordinates.json"
"""Stage 1's crop boxes and stage 2's new-image boxes (the input of stage 4) are both in a file of this name."""
COORDINATES_VERSION = 1
MAX_SAMPLE_INDEX = 9999
MAX_CROPS_PER_SAMPLE = 99
"""Name fields are fixed-width: instance id 5 digits, sample 4, crop 2."""


# --------------------------------------------------------------------------- naming
def new_image_id(source_image_id: str, instance_id: int, sample: int, crop: int) -> str:
    """``<city>_<seq>_<frame><instance_id:05d><sample:04d><crop:02d>``: unique per (image, instance, sample, crop)."""
    city, seq, frame = split_image_id(source_image_id)
    if not (0 <= instance_id < 100_000 and 0 <= sample <= MAX_SAMPLE_INDEX and 0 <= crop <= MAX_CROPS_PER_SAMPLE):
        raise ValueError(f"name fields out of range: instance {instance_id}, sample {sample}, crop {crop}")
    return f"{city}_{seq}_{frame}{instance_id:05d}{sample:04d}{crop:02d}"


def output_paths(split: str, city: str, image_id: str) -> dict[str, str]:
    """Paths (relative to OUT) of a new image's files: leftImg8bit, instanceIds, labelIds, color."""
    image = CityscapesImage(Path("."), split, f"{city}_syn", image_id)
    paths = {"leftImg8bit": image.left}
    paths.update({kind: image.gt(kind) for kind in ("instanceIds", "labelIds", "color")})
    return {k: p.as_posix() for k, p in paths.items()}


def coordinates_entry(entry: dict, dataset_root: Path) -> dict:
    """The stage-4 record of a new image: its box, size, source label files and output paths."""
    source = CityscapesImage(dataset_root, entry["split"], entry["city"], entry["source_image_id"])
    return {"image_id": entry["image_id"], "kind": entry["kind"], "bbox_coordinate": entry["bbox_coordinate"],
            "size": entry["size"], "source": {k: str(source.gt(k)) for k in ("instanceIds", "labelIds", "color")},
            "output": entry["outputs"]}


# --------------------------------------------------------------------------- reading
def pixel_counts(instance_ids: np.ndarray) -> np.ndarray:
    """Pixels per value of a uint16 map (length 65536); OpenCV's histogram is ~4x faster than bincount."""
    if instance_ids.size >= 1 << 24:  # float32 bins stop being exact
        return np.bincount(instance_ids.ravel(), minlength=1 << 16)
    return cv2.calcHist([instance_ids], [0], None, [1 << 16], [0, 1 << 16]).ravel().astype(np.int64)


def read_instance_ids(path: Path) -> np.ndarray:
    """A checked single-channel uint16 instanceIds map."""
    instance_ids = read_png(path, dtype=np.uint16)
    if instance_ids.ndim != 2:
        raise InstSynthError(path, f"expected a single-channel instanceIds image, found {instance_ids.shape[2]} channels")
    return instance_ids


def _instance(ids: np.ndarray, counts: np.ndarray, value: int) -> Instance:
    def mask_of(box: Box | None) -> np.ndarray:
        if box is None:
            return ids == value
        x0, y0, x1, y1 = box
        return ids[y0:y1, x0:x1] == value

    crowd = value < INSTANCE_ID_OFFSET
    return Instance(value, value if crowd else value // INSTANCE_ID_OFFSET, crowd, lambda: counts[value], mask_of)


def map_instances(ids: np.ndarray) -> list[Instance]:
    """The instances of an instanceIds map in value order: individual ones (``>= 1000``, any class) and thing
    group regions."""
    counts = pixel_counts(ids)
    present = np.flatnonzero(counts)
    return [_instance(ids, counts, int(v)) for v in present if v >= INSTANCE_ID_OFFSET or v in THING_LABEL_IDS]


@dataclass(frozen=True)
class CityscapesSource(SourceImage):
    """One image of a Cityscapes tree (``stem`` is its image id, ``folder`` its city)."""

    root: Path = Path(".")

    @property
    def cityscapes(self) -> CityscapesImage:
        return CityscapesImage(self.root, self.split, self.folder, self.stem)

    def annotations(self) -> Annotations:
        """Instances in value order: individual ones (``>= 1000``, any class) and thing group regions."""
        ids = read_instance_ids(self.cityscapes.gt("instanceIds"))
        height, width = ids.shape
        return Annotations(self, height, width, map_instances(ids), lambda: ids, native=ids)

    def read_pixels(self, bgr: bool = False, shape: tuple[int, int] | None = None) -> np.ndarray:
        pixels = read_png(self.path, rgb=True, bgr=bgr)
        if shape is not None and pixels.shape[:2] != tuple(shape):
            (h, w), (lh, lw) = shape, pixels.shape[:2]
            raise InstSynthError(self.cityscapes.gt("instanceIds"), f"size {w}x{h} differs from its image {self.path} "
                                                                    f"({lw}x{lh})")
        return pixels

    def metadata_fields(self) -> dict:
        return {"instance_ids": self.cityscapes.relative(self.cityscapes.gt("instanceIds"))}

    @property
    def report_id(self) -> str:
        return self.stem

    @property
    def report_name(self) -> str:
        return self.stem


class CityscapesDataset(Dataset):
    """A Cityscapes tree at ``root`` (any city names; ``*_syn`` folders are InstSynth's own and skipped)."""

    kind = "cityscapes"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def images(self, split: str, include_generated: bool = False) -> list[CityscapesSource]:
        """Every annotated image of the split, sorted as :func:`instsynth.io.iter_cityscapes_images`."""
        return [CityscapesSource(split, im.city, im.image_id, im.left, im.relative(im.left), self.root)
                for im in iter_cityscapes_images(self.root, split, include_generated=include_generated)]

    def categories(self) -> list[Category]:
        return [Category(label_id(name), name) for name in THING_CLASSES]

    def category_ids(self, names=None) -> tuple[int, ...]:
        """Sorted labelIds of the named thing classes (default all ten); unknown names raise InstSynthError."""
        names = list(dict.fromkeys(names or ()))
        unknown = [c for c in names if c not in THING_CLASSES]
        if unknown:
            raise InstSynthError(self.root, f"unknown thing classes {unknown}; choose from {list(THING_CLASSES)}")
        return tuple(sorted(label_id(c) for c in names or THING_CLASSES))

    def writer(self, out: str | Path, split: str, complete: bool = False) -> "CityscapesWriter":
        return CityscapesWriter(out, split, self.root, complete)

    # stage 1's records, as the paper's pipeline has them: no format field, thing classes by labelId
    plain_folders = True
    metadata_paths = {"instance_ids": "instance_ids_path"}

    def selection_header(self, split: str) -> dict:
        return {"dataset_root": str(self.root), "split": split}

    def selection_fields(self, class_counts: dict[str, int]) -> dict:
        return {"class_counts": class_counts}

    @classmethod
    def metadata_checker(cls, path: Path, meta: dict):
        return lambda n, inst: check_identity(path, n, inst)

    def stage_inputs(self, images: Sequence[CityscapesSource]) -> list[str]:
        """leftImg8bit + instanceIds are every stage's input; labelIds, color and polygons are optional (counted)."""
        found = {kind: sum(im.cityscapes.gt(kind).is_file() for im in images) for kind in ("labelIds", "color", "polygons")}
        n = len(images)
        return [f"inputs: leftImg8bit + gtFine instanceIds {n}/{n} (stages 1-5)",
                f"inputs: gtFine labelIds {found['labelIds']}/{n} (stage 4; where absent, read from instanceIds)",
                f"inputs: gtFine color {found['color']}/{n} (stage 4; where absent, colours come from labelIds)",
                f"inputs: gtFine polygons {found['polygons']}/{n} (stage 5 writes them from instanceIds where absent)"]


def check_identity(path: Path, n: int, inst: dict) -> None:
    """key, label_id, class and file names must agree with instance_id and image_id, as stage 1 writes
    them: a hand edit would give the instance another class's prompt and label."""
    check_fields(path, n, inst, {"instance_ids": str})
    iid, image_id = inst["instance_id"], inst["image_id"]
    where = f"instances[{n}] ({inst['key']!r})"
    label = iid // INSTANCE_ID_OFFSET
    if label not in THING_LABEL_IDS:
        raise InstSynthError(path, f"{where}: instance_id {iid} is not a thing instance "
                                   f"(labelId x {INSTANCE_ID_OFFSET} + k with a thing labelId {THING_LABEL_IDS})")
    found = {"key": inst["key"], "label_id": inst["label_id"], "class": inst["class"]}
    expected = {"key": f"{image_id}_{iid}", "label_id": label, "class": class_name(label)}
    for name, value in found.items():
        if value != expected[name]:
            raise InstSynthError(path, f"{where}: {name} {value!r} disagrees with instance_id {iid} of image "
                                       f"{image_id!r} (expected {expected[name]!r}: label {label} = "
                                       f"{class_name(label)!r} in instanceIds); was the file edited by hand?")
    for name in ("image", "instance_ids"):
        try:
            of = image_id_of(inst[name])
        except InstSynthError:
            of = None
        if of != image_id:
            raise InstSynthError(path, f"{where}: {name} {inst[name]!r} is not a file of image_id {image_id!r}")


class CityscapesWriter(DatasetWriter):
    """Writes leftImg8bit + instanceIds of new images; labelIds and color are stage 4's, or, when
    ``complete``, derived from the new instanceIds here (then ``finish`` leaves stage 4 nothing to do)."""

    def __init__(self, out: str | Path, split: str, root: Path, complete: bool = False):
        super().__init__(out, split)
        self.root, self.complete = Path(root), complete

    def new_name(self, source: SourceImage, instance_id: int, sample: int, crop: int) -> str:
        return new_image_id(source.stem, instance_id, sample, crop)

    def pasted_ids(self, source: Annotations, pasted: Sequence[NewInstance]) -> list[int | None]:
        """``labelId * 1000 + k`` with the next free k of the class (None: the class has 1000 instances)."""
        return fresh_instance_ids(source.native, [p.category_id for p in pasted])

    def instance_ids(self, image: NewImage) -> np.ndarray:
        """The new image's instanceIds: the source's with pasted instances painted on, cut and resized."""
        ids = image.source.native
        if image.pasted:
            ids = ids.copy()
            for new, value in zip(image.pasted, self.pasted_ids(image.source, image.pasted)):
                if value is not None:
                    ids[new.mask] = value
        return crop_resize_labels(ids, image.box, image.size)

    def label_bytes(self, image: NewImage) -> bytes:
        """instanceIds PNG of a new image: the source file itself for a panorama, else the cut labels."""
        if image.is_identity:
            return image.source.image.cityscapes.gt("instanceIds").read_bytes()
        return encode_png(self.instance_ids(image))

    def write(self, image: NewImage) -> WrittenImage:
        paths = output_paths(self.split, image.source.image.folder, image.name)
        files = [(paths["leftImg8bit"], encode_png(image.rgb)), (paths["instanceIds"], self.label_bytes(image))]
        if self.complete:
            label_ids = instance_ids_to_label_ids(self.instance_ids(image))
            files += [(paths["labelIds"], encode_png(label_ids)), (paths["color"], encode_png(colorize(label_ids)))]
        return WrittenImage(image.name, {"outputs": paths}).put(self.out, files)

    def finish(self, entries: list[dict], info: dict) -> list[Path]:
        """Stage 4's ``cropped_region_coordinates.json`` (entries need image_id, kind, split, city,
        source_image_id, bbox_coordinate, size, outputs); nothing for a ``complete`` writer."""
        if self.complete:
            return []
        coordinates = {"version": COORDINATES_VERSION, "dataset_root": str(self.root),
                       "images": [coordinates_entry(e, self.root) for e in entries]}
        return [write_json(self.out / COORDINATES_NAME, coordinates, indent=1)]
