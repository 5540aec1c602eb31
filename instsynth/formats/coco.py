"""A COCO / LVIS instances file and its image folder: reading, checking, and writing new images.

:func:`load_coco_source` reads and checks the file before any work: duplicate image / annotation /
category ids, annotations that point to an unknown image or category, polygons with fewer than 3
points, NaN, infinite or far-away coordinates, RLE of another size or with undecodable counts or run
lengths that do not cover the image, boxes with no area or outside their image
(:mod:`instsynth.formats.coco_checks`, before pycocotools sees them) and missing image files raise an
InstSynthError naming the file and the id; with ``skip_bad`` the offending annotation (or image) is
left out and listed in ``CocoSource.bad``. Segmentations may be polygons, uncompressed or compressed
RLE. LVIS fields are kept verbatim: categories' ``frequency``, ``synonyms``, ``def``; images'
``not_exhaustive_category_ids`` and ``neg_category_ids`` (which new images inherit). Stage 1 records the
fingerprint of a clean file (size, mtime_ns, sha256 of the bytes read); integration, reading a file with that
fingerprint, checks its structure, ids, categories, image entries and the annotations of the images it
decodes, but not every other annotation again.

Images are listed by ``(file_name, id)``; an image's ``folder`` is its file's folder (``images`` at the
top level) and its ``stem`` the file's stem. An instance is an annotation (area: the pycocotools
pixel count of its rasterised segmentation). New images are
``OUT/images/instsynth_syn/<split>/<folder>/<stem>_<annotation id>_<sample:04d>_<crop:02d>.png`` (``.jpg``
at quality 95 from a JPEG source);
``finish`` writes ``OUT/annotations/instances_<split>_instsynth.json``: the source file plus the new
images and their exact annotations (:func:`merge_coco`). The source JSON and images are only read.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Collection, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from instsynth.core.imageops import crop_resize_labels
from instsynth.core.io import InstSynthError, get_logger, json_pieces, read_json, read_png, write_pieces_if_changed
from instsynth.core.paths import confined, relative_name
from .base import (Annotations, Box, Category, Dataset, DatasetWriter, Instance, NewImage, SourceImage, WrittenImage,
                   category_table, check_named_instance, encode_image, painted_masks)
from .coco_annotations import (LVIS_IMAGE_FIELDS, SYNTHETIC_FOLDER, annotation_mask, crop_annotations,  # noqa: F401
                               exact_segmentation, inherited_fields, instance_map, mask_bbox, merge_coco,
                               merged_json_path, panorama_annotations, segmentation_rle, synthetic_file_name)
from .coco_checks import bbox_problems, polygon_problems, rle_problem

BOX_TOLERANCE = 1.0
"""Pixels an annotation's bbox may extend beyond its image (rounding in exported files) before it is bad."""
LVIS_FREQUENCIES = ("r", "c", "f")
TOP_LEVEL_FOLDER = "images"
"""``city`` of images at the top level of ``images_dir``."""
log = get_logger("instsynth.formats.coco")


# --------------------------------------------------------------------------- reading and checking
@dataclass
class CocoSource:
    """A checked COCO file: its raw dict, categories by id, kept images (sorted by file name), their annotations."""

    json_path: Path
    images_dir: Path
    data: dict
    categories: dict[int, dict]
    images: list[dict]
    annotations: dict[int, list[dict]]  # image id -> annotations in file order
    bad: list[dict] = field(default_factory=list)  # what skip_bad left out: {"kind", "id", "problem"}
    fingerprint: dict = field(default_factory=dict)  # of the bytes read: {"size", "mtime_ns", "sha256"}
    trusted: bool = False  # the fingerprint stage 1 recorded matched: only the needed images' annotations checked


def _annotation_problem(ann: Any, images: dict[int, dict], categories: dict[int, dict]) -> str | None:
    """Problem of an annotation's ids and RLE (polygons and bboxes are checked file-wide)."""
    if not isinstance(ann, dict):
        return "not an object"
    if ann.get("image_id") not in images:
        return f"points to image id {ann.get('image_id')!r}, which is not in the file"
    if ann.get("category_id") not in categories:
        return f"unknown category id {ann.get('category_id')!r}"
    img = images[ann["image_id"]]
    height, width = img["height"], img["width"]
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        problem = rle_problem(seg, height, width)
    elif not isinstance(seg, list):
        problem = "segmentation must be polygons or RLE {size, counts}"
    else:
        problem = None
    return problem


def annotation_problems(anns: list, images: dict[int, dict], categories: dict[int, dict]) -> list[str | None]:
    """Problem of each annotation of ``anns`` (checked images and categories by id), or None: ids and RLE
    per annotation, every polygon coordinate and every bbox of the file each in one numpy array."""
    problems = [_annotation_problem(ann, images, categories) for ann in anns]
    polygons = [n for n, (ann, p) in enumerate(zip(anns, problems)) if p is None and isinstance(ann["segmentation"], list)]
    sizes = [(images[anns[n]["image_id"]]["height"], images[anns[n]["image_id"]]["width"]) for n in polygons]
    for n, problem in zip(polygons, polygon_problems([anns[n]["segmentation"] for n in polygons], sizes)):
        problems[n] = problem
    boxed = [n for n, (ann, p) in enumerate(zip(anns, problems)) if p is None and ann.get("bbox") is not None]
    sizes = [(images[anns[n]["image_id"]]["height"], images[anns[n]["image_id"]]["width"]) for n in boxed]
    for n, problem in zip(boxed, bbox_problems([anns[n]["bbox"] for n in boxed], sizes, BOX_TOLERANCE)):
        problems[n] = problem
    return problems


def _unique(json_path: Path, items: list, what: str) -> dict[int, dict]:
    """Items by id; a missing or duplicate id raises InstSynthError naming it."""
    by_id: dict[int, dict] = {}
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            raise InstSynthError(json_path, f"{what}[{n}] has no integer 'id'")
        if item["id"] in by_id:
            raise InstSynthError(json_path, f"duplicate {what} id {item['id']}")
        by_id[item["id"]] = item
    return by_id


def file_fingerprint(path: Path, digest: Any) -> dict:
    """``{"size", "mtime_ns", "sha256"}`` of a file whose bytes ``digest`` (sha256) has just read."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def load_coco_source(coco_json: str | os.PathLike, images_dir: str | os.PathLike, skip_bad: bool = False,
                     check_images: bool = True, trusted: Any = None, needed: Collection[int] = ()) -> CocoSource:
    """Read and check a COCO / LVIS instances file (see the module docstring for what is checked).

    ``trusted``: the fingerprint stage 1 recorded of the file it checked and found clean
    (:func:`file_fingerprint`). When the file read has that fingerprint, only the annotations of the
    ``needed`` image ids (those whose masks will be decoded) are checked again; the others (the cost that
    grows with the file) are not. The file's structure, ids, categories and image entries (names confined
    to ``images_dir``, files present) are checked always."""
    json_path, images_dir = Path(coco_json).resolve(), Path(images_dir).resolve()
    digest = hashlib.sha256()
    data = read_json(json_path, digest)
    fingerprint = file_fingerprint(json_path, digest)
    trust = isinstance(trusted, dict) and trusted == fingerprint
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InstSynthError(json_path, "not a COCO instances file (needs lists 'images', 'annotations', 'categories')")
    categories = _unique(json_path, data["categories"], "category")
    for cat in categories.values():
        if not isinstance(cat.get("name"), str):
            raise InstSynthError(json_path, f"category id {cat['id']} has no name")
    names = Counter(c["name"] for c in categories.values())
    if any(n > 1 for n in names.values()):
        raise InstSynthError(json_path, f"duplicate category names {sorted(k for k, n in names.items() if n > 1)}")
    images = _unique(json_path, data["images"], "image")
    _unique(json_path, data["annotations"], "annotation")
    bad: list[dict] = []

    def reject(kind: str, item_id: Any, problem: str) -> None:
        if not skip_bad:
            raise InstSynthError(json_path, f"{kind} id {item_id}: {problem}")
        log.warning("skipping %s id %s: %s", kind, item_id, problem)
        bad.append({"kind": kind, "id": item_id, "problem": problem})

    kept: dict[int, dict] = {}
    for image_id, img in images.items():
        name, w, h = img.get("file_name"), img.get("width"), img.get("height")
        if not isinstance(name, str) or not all(isinstance(v, int) and v > 0 for v in (w, h)):
            reject("image", image_id, "needs a string 'file_name' and positive integer 'width' and 'height'")
        elif (escape := file_name_problem(images_dir, name)) is not None:
            reject("image", image_id, escape)
        elif check_images and not (images_dir / name).is_file():
            reject("image", image_id, f"image file {images_dir / name} not found")
        else:
            kept[image_id] = img
    annotations: dict[int, list[dict]] = {i: [] for i in kept}
    # every annotation except those of a skipped image; trusted: those of other images were checked by stage 1
    anns = [a for a in data["annotations"] if a.get("image_id") not in images or a["image_id"] in kept]
    check = [a for a in anns if a.get("image_id") in needed or a.get("image_id") not in kept] if trust else anns
    found = {id(a): p for a, p in zip(check, annotation_problems(check, images, categories)) if p}
    for ann in anns:
        if id(ann) in found:
            reject("annotation", ann.get("id"), found[id(ann)])
        else:
            annotations[ann["image_id"]].append(ann)
    ordered = sorted(kept.values(), key=lambda i: (i["file_name"], i["id"]))
    return CocoSource(json_path, images_dir, data, categories, ordered, annotations, bad, fingerprint, trust)


def select_categories(source: CocoSource, classes: Sequence[str] | None = None,
                      frequency: Sequence[str] | None = None) -> tuple[int, ...]:
    """Category ids named by ``classes`` (default: all) and of an LVIS ``frequency`` (r, c, f), sorted."""
    by_name = {c["name"]: i for i, c in source.categories.items()}
    if classes:
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise InstSynthError(source.json_path, f"unknown category names {unknown}; the file has "
                                                   f"{sorted(by_name)[:50]}")
        ids = {by_name[c] for c in classes}
    else:
        ids = set(source.categories)
    if frequency:
        wrong = sorted(set(frequency) - set(LVIS_FREQUENCIES))
        if wrong:
            raise InstSynthError(source.json_path, f"frequency must be among {LVIS_FREQUENCIES}, got {wrong}")
        if not any("frequency" in c for c in source.categories.values()):
            raise InstSynthError(source.json_path, "categories have no LVIS 'frequency' field; drop --frequency")
        ids = {i for i in ids if source.categories[i].get("frequency") in frequency}
    if not ids:
        raise InstSynthError(source.json_path, "no category matches the chosen classes and frequency")
    return tuple(sorted(ids))


def file_name_problem(images_dir: Path, name: str) -> str | None:
    """Why ``file_name`` leaves the images folder (absolute, ``..``, a symlink out: :mod:`instsynth.core.paths`), or None.

    Folders are resolved once each (cached), so a file of 100k images costs one ``lstat`` per image."""
    try:
        relative_name(images_dir, "file_name", name)
        parent = PurePosixPath(name).parent.as_posix()
        if not _real_folder(str(images_dir), parent).is_relative_to(_real_folder(str(images_dir), ".")):
            raise InstSynthError(images_dir, f"field 'file_name': {name!r} resolves outside {images_dir} (symlink?)")
        if os.path.islink(images_dir / name):
            confined(images_dir, name, images_dir, "file_name")
    except InstSynthError as exc:
        return f"file_name {name!r} must stay inside the images folder ({exc.problem.split(': ', 1)[-1]})"
    return None


@functools.lru_cache(maxsize=4096)
def _real_folder(images_dir: str, folder: str) -> Path:
    return Path(os.path.realpath(os.path.join(images_dir, folder)))


def image_location(file_name: str) -> tuple[str, str]:
    """(city, image_id) of a file name: its folder (``images`` at the top level) and its stem."""
    path = PurePosixPath(file_name)
    folder = path.parent.as_posix()
    return (TOP_LEVEL_FOLDER if folder == "." else folder), path.stem


def _read_image(source_path: Path, img: dict) -> np.ndarray:
    bgr = read_png(source_path, rgb=True, bgr=True)  # any format OpenCV decodes
    if bgr.shape[:2] != (img["height"], img["width"]):
        raise InstSynthError(source_path, f"size {bgr.shape[1]}x{bgr.shape[0]} differs from the annotation file's "
                                          f"{img['width']}x{img['height']} (image id {img['id']})")
    return bgr


# --------------------------------------------------------------------------- the format
def _instance(ann: dict, masks: "_Masks") -> Instance:
    def mask_of(box: Box | None) -> np.ndarray:
        full = masks.mask(ann)
        return full if box is None else full[box[1]:box[3], box[0]:box[2]]

    return Instance(int(ann["id"]), int(ann["category_id"]), bool(ann.get("iscrowd", 0)),
                    lambda: int(mask_utils.area(masks.rle(ann))), mask_of)


@dataclass(eq=False)
class _Masks:
    """Each annotation's RLE and decoded mask, made once and only when asked (areas need no decoding)."""

    height: int
    width: int
    rles: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)

    def rle(self, ann: dict) -> dict:
        if ann["id"] not in self.rles:
            self.rles[ann["id"]] = segmentation_rle(ann["segmentation"], self.height, self.width)
        return self.rles[ann["id"]]

    def mask(self, ann: dict) -> np.ndarray:
        if ann["id"] not in self.masks:
            self.masks[ann["id"]] = mask_utils.decode(self.rle(ann)).astype(bool)
        return self.masks[ann["id"]]

    def all(self, anns: Sequence[dict]) -> dict[int, np.ndarray]:
        return {a["id"]: self.mask(a) for a in anns}


@dataclass(frozen=True)
class CocoSourceImage(SourceImage):
    """One image of a COCO file: its entry (``info``) and annotations (file order) travel with it to workers."""

    info: dict = field(default_factory=dict, compare=False)
    anns: tuple = field(default=(), compare=False)
    pixels_checked: ClassVar[bool] = False

    @property
    def coco_id(self) -> int:
        return int(self.info["id"])

    def annotations(self) -> Annotations:
        height, width = self.info["height"], self.info["width"]
        masks = _Masks(height, width)
        anns = list(self.anns)
        return Annotations(self, height, width, [_instance(a, masks) for a in anns],
                           lambda: instance_map(anns, masks.all(anns), height, width), native=(anns, masks))

    def read_pixels(self, bgr: bool = False, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Pixels checked against the file's width and height (``shape`` is the same size)."""
        pixels = _read_image(self.path, self.info)
        return pixels if bgr else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)

    def metadata_fields(self) -> dict:
        return {"coco_image_id": self.coco_id}

    @property
    def report_id(self) -> int:
        return self.coco_id


class CocoDataset(Dataset):
    """A COCO / LVIS instances file ``coco_json`` with images under ``images_dir`` (checked on opening)."""

    kind = "coco"

    def __init__(self, coco_json: str | Path, images_dir: str | Path, skip_bad: bool = False, check_images: bool = True,
                 trusted: dict | None = None, needed: Collection[int] = ()):
        self.source = load_coco_source(coco_json, images_dir, skip_bad, check_images, trusted, needed)
        self.root = self.source.images_dir

    @property
    def where(self) -> Path:
        return self.source.json_path

    @property
    def bad(self) -> list[dict]:
        """What ``skip_bad`` left out: ``{"kind", "id", "problem"}``."""
        return self.source.bad

    def images(self, split: str, include_generated: bool = True) -> list[CocoSourceImage]:
        """Every kept image of the file, by (file_name, id), as stage 1 lists them (a merged file's new images
        included: ``include_generated`` is accepted and ignored); ``split`` only names outputs."""
        out = []
        for img in self.source.images:
            folder, stem = image_location(img["file_name"])
            out.append(CocoSourceImage(split, folder, stem, self.root / img["file_name"], img["file_name"], img,
                                       tuple(self.source.annotations[img["id"]])))
        return out

    def categories(self) -> list[Category]:
        cats = self.source.categories
        return [Category(i, cats[i]["name"], cats[i]) for i in sorted(cats)]

    def category_ids(self, names: Sequence[str] | None = None, frequency: Sequence[str] | None = None) -> tuple[int, ...]:
        """Ids named by ``names`` (default all) and of an LVIS ``frequency`` (r, c, f): :func:`select_categories`."""
        return select_categories(self.source, names, frequency)

    def writer(self, out: str | Path, split: str, complete: bool = False) -> "CocoWriter":
        return CocoWriter(out, split, self)

    # stage 1's records: the source file and its categories verbatim (LVIS fields kept)
    def selection_header(self, split: str) -> dict:
        return {"format": self.kind, "dataset_root": str(self.root), "split": split,
                "coco_json": str(self.source.json_path)}

    def selection_fields(self, class_counts: dict[str, int]) -> dict:
        """The source's fingerprint when nothing of it was bad (integration then trusts this check), categories."""
        checked = {} if self.bad else {"coco_json_fingerprint": self.source.fingerprint}
        return {**checked, "categories": [self.source.categories[i] for i in sorted(self.source.categories)]}

    def selection_counts(self, class_counts: dict[str, int], selected: dict[str, int]) -> dict:
        return {}

    def selection_extras(self) -> dict:
        return {"bad_annotations": [b for b in self.bad if b["kind"] == "annotation"],
                "bad_image_entries": [b for b in self.bad if b["kind"] == "image"]}

    @classmethod
    def metadata_checker(cls, path: Path, meta: dict):
        if not isinstance(meta.get("coco_json"), str):
            raise InstSynthError(path, "field 'coco_json' missing or not str")
        categories = category_table(path, meta)
        return lambda n, inst: check_named_instance(path, n, inst, categories, {"coco_image_id": int})


class CocoWriter(DatasetWriter):
    """Writes new images under ``OUT/images`` (PNG, or JPEG from a JPEG) and, in ``finish``, the merged COCO file.

    Pickles without its dataset (``write`` needs none); ``finish`` runs where the writer was made."""

    def __init__(self, out: str | Path, split: str, dataset: CocoDataset | None = None):
        super().__init__(out, split)
        self.dataset = dataset

    def __getstate__(self) -> dict:
        return {**self.__dict__, "dataset": None}

    def new_name(self, source: SourceImage, instance_id: int, sample: int, crop: int) -> str:
        return synthetic_file_name(self.split, source.relative, instance_id, sample, crop)

    def annotations(self, image: NewImage) -> list[dict]:
        """The new image's annotations without ids (exact segmentations; ``pasted``: the regenerated one)."""
        anns, masks = image.source.native
        if image.is_identity:
            return panorama_annotations(anns, image.regenerated)
        if not image.pasted:
            return crop_annotations(anns, masks.all(anns), image.box, image.size, image.regenerated)
        by_id = {a["id"]: a for a in anns}
        out = []
        for inst, full in painted_masks(image.source, image.pasted):
            mask = crop_resize_labels(full.view(np.uint8), image.box, image.size).astype(bool)
            if not mask.any():
                continue
            ann = by_id.get(inst.id) if isinstance(inst, Instance) else None
            out.append({"segmentation": exact_segmentation(mask, inst.crowd), "area": int(mask.sum()),
                        "bbox": mask_bbox(mask), "iscrowd": int(inst.crowd), "category_id": inst.category_id,
                        "source_annotation_id": None if ann is None else ann["id"],
                        "pasted": ann is None or ann["id"] == image.regenerated})
        return out

    def write(self, image: NewImage) -> WrittenImage:
        width, height = image.size
        fields = {"file_name": image.name, "width": width, "height": height, "annotations": self.annotations(image)}
        return WrittenImage(image.name, fields).put(self.out, [(Path("images") / image.name,
                                                                 encode_image(image.rgb, image.name))])

    def finish(self, entries: list[dict], info: dict) -> list[Path]:
        """The merged file (entries need file_name, width, height, source_image_id (COCO id), annotations)."""
        if self.dataset is None:
            raise RuntimeError("CocoWriter.finish needs the writer made by CocoDataset.writer (not a pickled copy)")
        path = merged_json_path(self.out, self.split)
        merged = merge_coco(self.dataset.source, entries, info)  # the source's items themselves, not copies
        write_pieces_if_changed(path, chain(json_pieces(merged), ["\n"]))  # streamed: never one string of it all
        return [path]
