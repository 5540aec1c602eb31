"""What stage 2 records, per dataset format: the fields of integration.json and its report, the files a
new image owns, the fingerprints that let a rerun reuse a sample, and removing what a rerun no longer makes.

The integration itself is one code path (:mod:`instsynth.stages.integration`); a format's
:class:`Layout` only names and orders its record fields, so that every format keeps the files it had:

- Cityscapes: an entry per new image named by ``image_id``; its files are ``outputs`` (leftImg8bit and
  instanceIds written here, labelIds and color by stage 4); the report counts the gate and file reuse.
- COCO / LVIS: an entry named by ``file_name`` (under ``OUT/images``) with its ``annotations``; the
  originals are hard-linked into ``OUT/images`` and the report counts annotations and original images.
  An entry names ``instance_source`` only for the gate's fallback (``"original"``): absent means generated.
- folder: an entry named by ``name`` with its ``outputs`` (image, instance PNG, sidecar), Cityscapes' report.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from instsynth.core.io import GENERATED_FOLDER_SUFFIXES, InstSynthError, progress, read_json
from instsynth.core.paths import remove_stale_files
from instsynth.formats import Dataset, SourceImage
from instsynth.formats.coco import SYNTHETIC_FOLDER as COCO_SYNTHETIC_FOLDER
from instsynth.stages.assemble import place_file

INTEGRATION_VERSION = 1
INTEGRATION_NAME = "integration.json"
REPORT_NAME = "integration_report.json"

_ENTRY_MIDDLE = ("key", "instance_id", "sample", "sample_index", "crop_index", "bbox_coordinate", "size", "blend",
                 "ratio", "tries", "fallback", "sample_notes", "instance_source")
_GATE_COUNTS = ("samples_accepted", "samples_fallen_back", "samples_dropped_by_gate", "gate_accept_rate")
_DONE = ("samples_integrated", "samples_reused", "samples_skipped", "skip_reasons", "skipped",
         "instances_not_generated", "new_images", "panoramas", "crops")
_FILES_REPORT = ("files_written", "files_already_right", "stale_images_removed", "crop_redraws", "crop_fallbacks",
                 "samples_converted")


def _outputs(entry: dict) -> list[str]:
    return list(entry["outputs"].values())


@dataclass(frozen=True)
class Layout:
    """How one format records stage 2 (see the module docstring)."""

    name: str  # the entry field naming a new image
    header: tuple[str, ...]  # integration.json / report header fields, in order
    entry: tuple[str, ...]  # fields of a new-image entry, in order
    report: tuple[str, ...]  # report fields after the header and the gate's counts, in order
    written: Callable[[dict], list[str]]  # files (relative to OUT) stage 2 writes for an entry
    owned: Callable[[dict], list[str]]  # files removed when the entry's image is no longer produced
    every_filter: bool = False  # header filters list every criterion (else only those in use)
    always_source: bool = True  # entries name instance_source also when "generated"
    renames: dict[str, str] = field(default_factory=dict)  # common field -> this format's name
    prepare: Callable[[Dataset, Path], dict] | None = None  # before the run: report fields (e.g. linked originals)
    info: Callable[[dict, list[dict]], dict] = lambda header, entries: {}  # what the writer's finish records
    counts: Callable[[Dataset, list[dict], list[Path]], dict] | None = None  # report fields after finish


# --------------------------------------------------------------------------- COCO: originals and the merged file
def link_original(src: str, dst: str, folders: set[str]) -> str:
    """:func:`~instsynth.stages.assemble.place_file` of one original, with its two common cases made cheap:
    ``dst`` already the same inode (a rerun: "skipped", two stats) and ``dst`` missing (one ``link``, atomic
    by itself; ``folders``: the folders known to exist). Anything else (a different file, another device,
    no hard links) goes through place_file."""
    try:
        held = os.lstat(dst)
    except FileNotFoundError:
        try:
            folder = os.path.dirname(dst)
            if folder not in folders:
                os.makedirs(folder, exist_ok=True)
                folders.add(folder)
            os.link(src, dst)
            return "linked"
        except OSError:
            pass  # e.g. across devices: place_file copies (or names what is wrong)
    else:
        own = os.stat(src)
        if (held.st_dev, held.st_ino) == (own.st_dev, own.st_ino):
            return "skipped"
    return place_file(Path(src), Path(dst))


def link_originals(dataset: Dataset, out: Path) -> dict:
    """COCO: hard-link (or copy) every kept source image to ``OUT/images/<file_name>`` once per output folder
    (a link already there is left alone); counts by action."""
    actions: Counter = Counter()
    source = dataset.source
    target = (out / "images").resolve()
    if target == source.images_dir:
        return {}
    folders: set[str] = set()
    src_dir, dst_dir = str(source.images_dir), str(target)
    for img in progress(source.images, "linking original images"):
        name = img["file_name"]  # confined to the images folder by load_coco_source
        actions[link_original(os.path.join(src_dir, name), os.path.join(dst_dir, name), folders)] += 1
    return dict(actions)


def coco_info(header: dict, entries: list[dict]) -> dict:
    """``info.instsynth`` of the merged COCO file."""
    return {"source_json": header["coco_json"], "images_dir": header["images_dir"],
            "generation_manifest": header["manifest"], "metadata": header["metadata"], "backend": header["backend"],
            "params": header["params"], "filters": header["filters"], "synthetic_images": len(entries),
            "synthetic_annotations": sum(len(e["annotations"]) for e in entries)}


def coco_counts(dataset: Dataset, entries: list[dict], written: list[Path]) -> dict:
    """The COCO report's merged file and counts of new annotations and of the source file."""
    source = dataset.source
    return {"merged_json": str(written[0]), "new_annotations": sum(len(e["annotations"]) for e in entries),
            "original_images": len(source.images),
            "original_annotations": sum(map(len, source.annotations.values())), "bad_source_items_left_out": source.bad}


LAYOUTS = {
    "cityscapes": Layout(
        "image_id", ("version", "manifest", "backend", "metadata", "dataset_root", "split", "params", "filters"),
        ("image_id", "kind", "split", "city", "source_image_id", *_ENTRY_MIDDLE, "outputs", "fingerprint"),
        (*_GATE_COUNTS, *_DONE, *_FILES_REPORT),
        lambda e: [e["outputs"]["leftImg8bit"], e["outputs"]["instanceIds"]], _outputs),
    "coco": Layout(
        "file_name",
        ("version", "format", "manifest", "backend", "metadata", "coco_json", "images_dir", "split", "params", "filters"),
        ("file_name", "width", "height", "kind", "source_image_id", "key", "annotation_id",
         *_ENTRY_MIDDLE[2:6], *_ENTRY_MIDDLE[7:], "fingerprint", "annotations"),
        ("merged_json", *_DONE, "new_annotations", "original_images", "original_annotations",
         "bad_source_items_left_out", "original_images_linked", "files_written", "stale_images_removed",
         "crop_fallbacks"),
        lambda e: [f"images/{e['file_name']}"],
        lambda e: [f"images/{e['file_name']}"] if e["file_name"].startswith(COCO_SYNTHETIC_FOLDER + "/") else [],
        every_filter=True, always_source=False, renames={"instance_id": "annotation_id"},
        prepare=lambda dataset, out: {"original_images_linked": link_originals(dataset, out)}, info=coco_info,
        counts=coco_counts),
    "folder": Layout(
        "name", ("version", "format", "manifest", "backend", "metadata", "dataset_root", "split", "params", "filters"),
        ("name", "kind", "split", "source_image_id", *_ENTRY_MIDDLE, "outputs", "fingerprint"),
        (*_GATE_COUNTS, *_DONE, *_FILES_REPORT), _outputs, _outputs),
}


def layout_of(dataset: Dataset) -> Layout:
    return LAYOUTS[dataset.kind]


def ordered(fields: dict, keys: tuple[str, ...]) -> dict:
    """``fields`` restricted to ``keys``, in their order (keys absent from ``fields`` are left out)."""
    return {k: fields[k] for k in keys if k in fields}


def entry_record(layout: Layout, fields: dict) -> dict:
    """The format's entry of a new image from the common fields the worker computed."""
    fields = {layout.renames.get(k, k): v for k, v in fields.items()}
    if not layout.always_source and fields.get("instance_source") == "generated":
        del fields["instance_source"]
    return ordered(fields, layout.entry)


def filters_of(layout: Layout, criteria: dict, fallback: str) -> dict:
    """The header's ``filters``: the gate's criteria (None: off) and a fallback other than drop."""
    optional = ("min_mask_iou", "min_clip_margin")
    return {"min_clip_score": criteria.get("min_clip_score"), "top_fraction": criteria.get("top_fraction"),
            **{k: criteria.get(k) for k in optional if layout.every_filter or criteria.get(k) is not None},
            **({"fallback": fallback} if fallback != "drop" else {})}


def header_of(layout: Layout, dataset: Dataset, split: str, fields: dict) -> dict:
    """integration.json's header: ``fields`` (version, manifest, ...) with the dataset's own, in the format's order."""
    return ordered({**fields, **dataset.selection_header(split), "images_dir": str(dataset.root)}, layout.header)


# --------------------------------------------------------------------------- fingerprints and reuse
def source_digest(image: SourceImage, inst: dict, label_files: list[str]) -> bytes:
    """What a sample's outputs depend on in the source labels: the label files' bytes, or the image's
    COCO annotations (a COCO image has no label file of its own)."""
    digest = hashlib.sha256()
    for name in label_files:
        digest.update(Path(inst[name]).read_bytes())
    digest.update(json.dumps(list(getattr(image, "anns", ())), sort_keys=True).encode())
    return digest.digest()


def fingerprint(params: Any, inst: dict, sample_path: Path | None, source: bytes) -> str:
    """SHA-256 of everything a sample's outputs depend on: parameters, instance, sample bytes (None: the
    gate's fallback, the original instance) and the source labels."""
    fields = {"version": INTEGRATION_VERSION, "params": asdict(params), "key": inst["key"], "bbox": inst["bbox"],
              "crop_box": inst["crop_box"], "image": str(inst["image_path"])}
    if sample_path is None:
        fields["instance_source"] = "original"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    if sample_path is not None:
        digest.update(sample_path.read_bytes())
    digest.update(source)
    return digest.hexdigest()


def previous_entries(layout: Layout, path: Path) -> dict[str, dict]:
    """New-image entries of an earlier run by name (empty if none or unreadable)."""
    try:
        return {e[layout.name]: e for e in read_json(path)["images"]}
    except (InstSynthError, KeyError, TypeError):
        return {}


def reusable(layout: Layout, names: list[str], fingerprint_: str, previous: dict[str, dict],
             out: Path) -> list[dict] | None:
    """The earlier entries of a sample's images if its fingerprint is unchanged and its files exist, else None."""
    entries = []
    for name in names:
        entry = previous.get(name)
        if entry is None or entry.get("fingerprint") != fingerprint_:
            return None
        if not all((out / rel).is_file() for rel in layout.written(entry)):
            return None
        if layout.always_source:
            entry = {**entry, "instance_source": entry.get("instance_source", "generated")}
        entries.append(entry)
    return entries


def remove_stale(layout: Layout, previous: dict[str, dict], entries: list[dict], out: Path) -> list[str]:
    """Delete the files of images an earlier run wrote that this run no longer produces; their names."""
    stale = sorted(set(previous) - {e[layout.name] for e in entries})
    manifest, records = out / INTEGRATION_NAME, []
    for name in stale:
        try:
            owned = layout.owned(previous[name])
        except (KeyError, TypeError, AttributeError):
            raise InstSynthError(manifest, f"images[{name!r}]: no outputs recorded; not deleting anything") from None
        records += [(f"images[{name!r}].outputs", rel) for rel in owned]
    # only files this manifest recorded, inside OUT, PNGs (and folder sidecars) under a *_syn / instsynth_syn folder
    remove_stale_files(out, records, (".png", ".json"), manifest, GENERATED_FOLDER_SUFFIXES)
    return stale
