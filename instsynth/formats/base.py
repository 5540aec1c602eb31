"""The dataset-format interface: what every stage needs from a dataset, whatever its files look like.

A :class:`Dataset` lists the images of a split (:class:`SourceImage`, small picklable records that
worker processes receive) and gives its :class:`Category` list. A source image reads its own pixels
and its :class:`Annotations`: the :class:`Instance` list (id, category, area, box, crowd flag, mask
decoded only when asked) and a uint16 instance-id label map for the context-crop rule. A
:class:`DatasetWriter` writes new images with their instances in the same format (``write`` runs in
workers, ``finish`` once at the end). A format is one module implementing these three classes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar, Mapping, Sequence

import cv2
import numpy as np

from instsynth.core.io import InstSynthError, encode_png, write_if_changed
from instsynth.core.labels import INSTANCE_ID_OFFSET

Box = tuple[int, int, int, int]
"""Half-open pixel box ``(x0, y0, x1, y1)``."""


def mask_box(mask: np.ndarray) -> Box:
    """Half-open box of a boolean mask's pixels (``(0, 0, 0, 0)`` when it has none)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return x, y, x + w, y + h


@dataclass(frozen=True)
class Category:
    """One category: its id, name and the source's own object verbatim (LVIS ``frequency``, ``synonyms``, ...)."""

    id: int
    name: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def frequency(self) -> str | None:
        """LVIS frequency (``r``, ``c``, ``f``) or None."""
        return self.raw.get("frequency")

    @property
    def synonyms(self) -> list[str]:
        return list(self.raw.get("synonyms") or [])

    def as_dict(self) -> dict:
        """The category object as the source has it (``{"id", "name"}`` for a format without one)."""
        return dict(self.raw) if self.raw else {"id": self.id, "name": self.name}


@dataclass(frozen=True, eq=False)
class Instance:
    """One annotated object of an image. ``area`` (pixels), ``bbox`` and masks are computed on first use."""

    id: int  # Cityscapes: instanceIds value; COCO: annotation id; folder: PNG value
    category_id: int
    crowd: bool  # a group region (Cityscapes value < 1000) or COCO ``iscrowd``
    area_of: Callable[[], int] = field(repr=False)
    mask_of: Callable[[Box | None], np.ndarray] = field(repr=False)

    @cached_property
    def area(self) -> int:
        """Pixels of the instance, counted as today's stage 1 counts them."""
        return int(self.area_of())

    @cached_property
    def bbox(self) -> Box:
        """Half-open box of the instance's pixels."""
        return mask_box(self.mask())

    def mask(self, box: Box | None = None) -> np.ndarray:
        """Boolean mask of the whole image, or only of ``box`` (cut, not resized)."""
        return self.mask_of(None if box is None else tuple(map(int, box)))


@dataclass(eq=False)
class Annotations:
    """An image's instances (in the format's order) and its instance-id label map, read once."""

    image: "SourceImage"
    height: int
    width: int
    instances: list[Instance]
    label_map_of: Callable[[], np.ndarray] = field(repr=False)
    native: Any = field(default=None, repr=False)  # the format's own decoded labels (its writer uses them)

    @cached_property
    def label_map(self) -> np.ndarray:
        """uint16 (H, W) map, one value per instance: what the context-crop rule reads."""
        return self.label_map_of()

    @cached_property
    def by_id(self) -> dict[int, Instance]:
        return {inst.id: inst for inst in self.instances}


@dataclass(frozen=True)
class SourceImage(ABC):
    """One image of a split. ``folder`` and ``stem`` name it in outputs (Cityscapes: city and image id)."""

    split: str
    folder: str
    stem: str
    path: Path  # the image file
    relative: str  # ``path`` relative to the dataset root (metadata's ``image`` field)
    pixels_checked: ClassVar[bool] = True
    """Stage 1 reads (and so checks) every image's pixels against its labels, not only images with a
    selected instance (False where the annotation file gives the size, as COCO's does)."""

    @abstractmethod
    def annotations(self) -> Annotations:
        """Read the image's labels; bad files raise InstSynthError naming them."""

    @abstractmethod
    def read_pixels(self, bgr: bool = False, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 pixels, RGB or OpenCV's BGR; ``shape`` (from its annotations) is checked."""

    def metadata_fields(self) -> dict:
        """Stage 1's per-format fields of this image's instances in metadata.json (after ``image``)."""
        return {}

    @property
    def report_id(self) -> Any:
        """How stage 1's report names this image in ``bad_images``."""
        return self.relative

    @property
    def report_name(self) -> str:
        """How stage 1's report names this image in ``images_without_instances``."""
        return self.relative


@dataclass(frozen=True, eq=False)
class NewInstance:
    """An instance pasted onto a new image (copy-paste): full-size mask of the new image and category."""

    mask: np.ndarray
    category_id: int
    crowd: bool = False


@dataclass(frozen=True, eq=False)
class NewImage:
    """A new image made from a source image: ``rgb`` (RGB uint8) is ``box`` of the source, resized.

    Its instances are the source's, with ``pasted`` instances painted on top in order (source
    instances lose the pixels they cover), then cut with ``box`` and resized to ``rgb``'s size.
    ``regenerated`` names the source instance whose pixels were regenerated (provenance)."""

    name: str  # from DatasetWriter.new_name
    source: Annotations
    rgb: np.ndarray
    box: Box
    pasted: tuple[NewInstance, ...] = ()
    regenerated: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the new image."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def is_identity(self) -> bool:
        """True when the image is the whole source at its own size with nothing pasted (a panorama)."""
        return (not self.pasted and tuple(self.box) == (0, 0, self.source.width, self.source.height)
                and self.size == (self.source.width, self.source.height))


JPEG_SUFFIXES = (".jpg", ".jpeg")
JPEG_QUALITY = 95
"""Quality (OpenCV, 0-100) of new images written as JPEG: those made from a JPEG source."""


def output_suffix(source_name: str | Path) -> str:
    """Suffix of a new image made from the source file ``source_name``: JPEG in, JPEG out (the source's own
    ``.jpg`` / ``.jpeg``); every other source (PNG, BMP, TIFF, WebP) gives a lossless ``.png``."""
    suffix = PurePosixPath(str(source_name)).suffix
    return suffix if suffix.lower() in JPEG_SUFFIXES else ".png"


def encode_image(rgb: np.ndarray, name: str | Path) -> bytes:
    """Bytes of an RGB uint8 image in the format ``name``'s suffix names: JPEG at JPEG_QUALITY, else PNG."""
    if PurePosixPath(str(name)).suffix.lower() not in JPEG_SUFFIXES:
        return encode_png(rgb)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV failure
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class WrittenImage:
    """What a writer wrote for one new image: its name, the format's entry fields, file counts."""

    name: str
    fields: dict
    written: int = 0
    existing: int = 0

    def put(self, out: Path, files: Sequence[tuple[str | Path, bytes]]) -> "WrittenImage":
        """Write each ``(path relative to out, bytes)`` unless its bytes are already right, counting both."""
        for rel, data in files:
            if write_if_changed(out / rel, data):
                self.written += 1
            else:
                self.existing += 1
        return self


class DatasetWriter(ABC):
    """Writes new images into ``out`` in the dataset's format. Picklable: ``write`` runs in workers."""

    def __init__(self, out: Path, split: str):
        self.out, self.split = Path(out), split

    @abstractmethod
    def new_name(self, source: SourceImage, instance_id: int, sample: int, crop: int) -> str:
        """Name of a new image, unique per (source image, instance, sample, crop); today's names."""

    def pasted_ids(self, source: Annotations, pasted: Sequence[NewInstance]) -> list[int | None]:
        """The id each of ``pasted`` will have in the labels of a new image made from ``source``; None where
        the format has no id left for it (the writer leaves it out). Formats whose ids are given by
        ``finish`` (COCO) return the pasted instances' order, 0, 1, ..."""
        return list(range(len(pasted)))

    @abstractmethod
    def write(self, image: NewImage) -> WrittenImage:
        """Write the image and its labels (files whose bytes are right are left alone)."""

    def finish(self, entries: list[dict], info: dict) -> list[Path]:
        """After every image (``entries``: each written image's entry, including its ``fields``): write
        what covers all of them (e.g. the merged COCO file); returns the paths written."""
        return []


class Dataset(ABC):
    """A dataset in one format. ``root`` is what metadata records as ``dataset_root``."""

    kind: ClassVar[str]
    root: Path

    @property
    def where(self) -> Path:
        """The path bad-input errors about the whole dataset name (root folder or annotation file)."""
        return self.root

    def input_paths(self) -> list[Path]:
        """The dataset's own files and folders: no stage may write inside them, nor into a folder holding them."""
        return [self.root, self.where]

    @abstractmethod
    def images(self, split: str, include_generated: bool = False) -> list[SourceImage]:
        """The split's images in the order every stage processes them; images InstSynth wrote
        (``*_syn`` cities, ``instsynth_syn/`` folders) only with ``include_generated``."""

    @abstractmethod
    def categories(self) -> list[Category]:
        """Every category, sorted by id."""

    def category_names(self) -> dict[int, str]:
        return {c.id: c.name for c in self.categories()}

    def category_ids(self, names: Sequence[str] | None = None) -> tuple[int, ...]:
        """Sorted ids of the named categories (all when ``names`` is empty); unknown names raise InstSynthError."""
        by_name = {c.name: c.id for c in self.categories()}
        unknown = [n for n in names or () if n not in by_name]
        if unknown:
            raise InstSynthError(self.where, f"unknown category names {unknown}; the dataset has {sorted(by_name)[:50]}")
        return tuple(sorted(by_name[n] for n in names) if names else sorted(by_name.values()))

    @abstractmethod
    def writer(self, out: str | Path, split: str, complete: bool = False) -> DatasetWriter:
        """A writer of new images of ``split`` under ``out``. ``complete``: it writes every label file of the
        format itself (Cityscapes: labelIds and color too, which stage 4 derives otherwise)."""

    # ---- what stage 1 records of the dataset (metadata.json, selection_report.json); each format keeps its own fields
    plain_folders: ClassVar[bool] = False
    """True when an image's folder (metadata ``city``) is one plain name (Cityscapes); else sub-folders are allowed."""
    metadata_paths: ClassVar[dict[str, str]] = {}
    """Per-instance metadata fields naming a label file under ``dataset_root`` -> the path field load_metadata adds."""

    def selection_header(self, split: str) -> dict:
        """Fields of stage 1's metadata and report after ``version``."""
        return {"format": self.kind, "dataset_root": str(self.root), "split": split}

    def selection_fields(self, class_counts: dict[str, int]) -> dict:
        """Metadata fields between ``k`` and ``instances`` (``class_counts``: instances per selected class)."""
        return {"categories": [c.as_dict() for c in self.categories()], "class_counts": class_counts}

    def selection_counts(self, class_counts: dict[str, int], selected: dict[str, int]) -> dict:
        """Report fields after ``images_with_fewer_than_k``: instances per class in the split and selected."""
        return {"instances_per_class": class_counts, "selected_per_class": selected}

    def stage_inputs(self, images: Sequence[SourceImage]) -> list[str]:
        """Lines stage 1 logs: the files of ``images`` each later stage reads, and what it does where one is missing."""
        return [f"inputs of the later stages: integration reads these {len(images)} images and their "
                f"annotations again, nothing else of the dataset"]

    def selection_extras(self) -> dict:
        """Report fields after ``bad_images`` (e.g. what opening the dataset left out)."""
        return {}

    @classmethod
    def metadata_checker(cls, path: Path, meta: dict) -> Callable[[int, dict], None]:
        """Check the format's header fields of a stage-1 ``meta`` read from ``path``; returns the check of one
        instance (``n``, entry): its own fields and that key, class and files agree with its ids."""
        categories = category_table(path, meta)
        return lambda n, inst: check_named_instance(path, n, inst, categories, {"instances": str})


def painted_masks(source: Annotations, pasted: Sequence[NewInstance]
                  ) -> list[tuple[Instance | NewInstance, np.ndarray]]:
    """(instance, full mask) of every instance of a new image before cropping: the source's instances
    (in order) minus the pixels pasted ones cover, then the pasted ones (later on top); empty ones left out."""
    covered = np.zeros((source.height, source.width), bool)
    visible: list[tuple[Instance | NewInstance, np.ndarray]] = []
    for new in reversed(pasted):
        visible.append((new, new.mask & ~covered))
        covered |= new.mask
    kept = [(inst, inst.mask() & ~covered) for inst in source.instances]
    return [(i, m) for i, m in kept + visible[::-1] if m.any()]


def fresh_instance_ids(ids: np.ndarray, categories: list[int]) -> list[int | None]:
    """New values ``category * 1000 + k`` with the next free k of each category in ``ids`` (None: none left)."""
    next_index: dict[int, int] = {}
    for v in np.unique(ids[ids >= INSTANCE_ID_OFFSET]):
        label = int(v) // INSTANCE_ID_OFFSET
        next_index[label] = max(next_index.get(label, 0), int(v) % INSTANCE_ID_OFFSET + 1)
    values = []
    for label in categories:
        index = next_index.get(label, 0)
        values.append(label * INSTANCE_ID_OFFSET + index if index < INSTANCE_ID_OFFSET else None)
        next_index[label] = index + 1
    return values


# --------------------------------------------------------------------------- stage-1 metadata checks shared by formats
def category_table(path: Path, meta: dict) -> dict[int, str]:
    """``{id: name}`` of a metadata's ``categories`` list (checked)."""
    if not (isinstance(meta.get("categories"), list) and all(isinstance(c, dict) for c in meta["categories"])):
        raise InstSynthError(path, "field 'categories' missing or not a list of objects")
    return {c.get("id"): c.get("name") for c in meta["categories"]}


def check_fields(path: Path, n: int, inst: dict, fields: Mapping[str, type]) -> None:
    """Each of ``fields`` is present in instance ``n`` with its type (bool is not an int)."""
    for name, kind in fields.items():
        if not isinstance(inst.get(name), kind) or isinstance(inst.get(name), bool):
            raise InstSynthError(path, f"instances[{n}]: field {name!r} missing or not {kind.__name__}")


def check_named_instance(path: Path, n: int, inst: dict, categories: dict[int, str], fields: Mapping[str, type]) -> None:
    """An instance named ``<stem>_<instance id>`` whose ``image`` has that stem and whose ``label_id`` /
    ``class`` are a category of ``categories``: a hand edit would give it another class's prompt and label."""
    check_fields(path, n, inst, fields)
    where = f"instances[{n}] ({inst['key']!r})"
    if inst["key"] != f"{inst['image_id']}_{inst['instance_id']}" or Path(inst["image"]).stem != inst["image_id"]:
        raise InstSynthError(path, f"{where}: key, image_id and image disagree with annotation {inst['instance_id']}; "
                                   "was the file edited by hand?")
    if categories.get(inst["label_id"]) != inst["class"]:
        raise InstSynthError(path, f"{where}: class {inst['class']!r} is not category {inst['label_id']} of the "
                                   "file's categories; was the file edited by hand?")
