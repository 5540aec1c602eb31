"""Stage 2: paste generated instances back into their images and cut new image/label pairs around them.

For every kept sample of the generation manifest (``GEN_DIR/generation.json``):

1. the sample is resized to its instance's stage-1 crop box (area filter to shrink, bicubic to
   enlarge; samples are normally crop-sized already) and pasted into the full source image through
   the instance's mask (``instanceIds == instance_id`` inside the box). ``blend``: ``hard`` (outside
   the mask the source, byte for byte), ``feather`` (alpha ramping from the mask edge to 1 over
   ``feather_pixels`` pixels inside the mask; outside still the source) or ``normalized`` (the paper's
   colour correction: the mean sample - source difference on the box's background pixels is
   subtracted inside the mask);
2. the full-size result is a new image, the *panorama* (crop index 0), with the source's labels;
3. ``crops_per_sample`` random context crops (crop index 1, 2, ...) as in the paper: the image's
   aspect ratio (2:1 on Cityscapes), area r x the area of the aspect-shaped box around the instance
   with r = max(1, ceil(N(3, 1))) redrawn until the crop fits in the image, placed uniformly at
   random so that it contains the whole instance box and stays inside the image, then resized to the
   full image size (RGB: area/bilinear filter; labels: nearest). A crop is redrawn while it cuts an
   instance down to a fragment of fewer than ``min_instance_pixels`` pixels in the written label map
   (instances it leaves whole are never a reason). After ``max_tries`` rejected draws the fallback
   is the smallest crop (r = 1) centred on the instance box, counted in the report.

Every random draw of crop c of sample s of instance ``key`` comes from its own generator seeded by a
stable hash of (seed, key, s, c), so the output does not depend on order, workers or resumption.

Names: a new image keeps the source's city and sequence number and appends fixed-width fields to its
frame number: ``<city>_<seq>_<frame><instance_id:05d><sample:04d><crop:02d>`` (crop 0 = panorama), in
``OUT/{leftImg8bit,gtFine}/<split>/<city>_syn/``; distinct (image, instance, sample, crop) give
distinct names because the appended fields have a fixed width. Stage 2 writes leftImg8bit and
instanceIds, ``OUT/integration.json`` (each new image: source, instance key, sample, box, kind,
blend), ``OUT/cropped_region_coordinates.json`` (the input of stage 4, :mod:`instsynth.label_crops`)
and ``OUT/integration_report.json``. Reruns skip samples whose recorded fingerprint (parameters and
sample bytes) is unchanged and rewrite no file whose bytes are already right.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from .formats.cityscapes import (MAX_CROPS_PER_SAMPLE, MAX_SAMPLE_INDEX, coordinates_entry,  # noqa: F401
                                 new_image_id, output_paths)
from instsynth.core.imageops import resize_image
from instsynth.core.seeds import stable_seed
from instsynth.core.manifests import load_manifest
from instsynth.core.parallel import ordered_map
from instsynth.core.io import (CityscapesImage, InstSynthError, default_workers, encode_png, get_logger, progress,
                               read_json, read_png, write_if_changed)
from instsynth.stages.label_crops import COORDINATES_VERSION, crop_resize_labels, crop_resize_rgb
from .formats.cityscapes import COORDINATES_NAME
from .stages.metadata import load_metadata

INTEGRATION_VERSION = 1
INTEGRATION_NAME = "integration.json"
REPORT_NAME = "integration_report.json"
BLENDS = ("hard", "feather", "normalized")

log = get_logger("instsynth.integration")


@dataclass(frozen=True)
class IntegrationParams:
    """How samples are pasted and cropped (recorded in integration.json; part of every fingerprint)."""

    blend: str = "hard"
    crops_per_sample: int = 1
    seed: int = 1
    min_instance_pixels: int = 4
    max_tries: int = 100
    feather_pixels: int = 3

    def validate(self, where: Path) -> None:
        if self.blend not in BLENDS:
            raise InstSynthError(where, f"blend must be one of {BLENDS}, got {self.blend!r}")
        if not 0 <= self.crops_per_sample <= MAX_CROPS_PER_SAMPLE:
            raise InstSynthError(where, f"crops_per_sample must be in [0, {MAX_CROPS_PER_SAMPLE}], got {self.crops_per_sample}")
        if self.min_instance_pixels < 0 or self.max_tries < 1 or self.feather_pixels < 1:
            raise InstSynthError(where, "min_instance_pixels must be >= 0, max_tries and feather_pixels >= 1")


# --------------------------------------------------------------------------- pasting
def as_rgb_sample(image: np.ndarray, path: Path) -> tuple[np.ndarray, str | None]:
    """An RGB uint8 sample and what was converted (grayscale/RGBA -> RGB), or InstSynthError."""
    if image.dtype != np.uint8:
        raise InstSynthError(path, f"sample must be 8-bit, found {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB), "grayscale -> RGB"
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB), "RGBA -> RGB (alpha dropped)"
    if image.shape[2] != 3:
        raise InstSynthError(path, f"sample must be RGB, found {image.shape[2]} channels")
    return image, None


def instance_mask(instance_ids: np.ndarray, box: Sequence[int], instance_id: int) -> np.ndarray:
    """Boolean mask of ``instance_id`` inside ``box`` (x0, y0, x1, y1) of a full instanceIds map."""
    x0, y0, x1, y1 = box
    return instance_ids[y0:y1, x0:x1] == instance_id


def feather_alpha(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Alpha in (0, 1] inside ``mask`` rising with the distance to its edge (1 from ``pixels`` in), 0 outside."""
    distance = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(distance / float(pixels), 0.0, 1.0) * mask


def normalize_colors(sample: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``sample`` minus its mean per-channel difference to ``source`` over the background (``~mask``) pixels."""
    background = ~mask
    if not background.any():
        return sample
    offset = (sample[background].astype(np.float32) - source[background].astype(np.float32)).mean(axis=0)
    return np.clip(np.rint(sample.astype(np.float32) - offset), 0, 255).astype(np.uint8)


def paste(image: np.ndarray, sample: np.ndarray, mask: np.ndarray, box: Sequence[int], blend: str = "hard",
          feather_pixels: int = 3) -> np.ndarray:
    """A copy of ``image`` with ``sample`` (box-sized, RGB) pasted through ``mask`` into ``box``.

    Pixels outside the mask are always the image's own.
    """
    x0, y0, x1, y1 = box
    source = image[y0:y1, x0:x1]
    if blend == "normalized":
        sample = normalize_colors(sample, source, mask)
    if blend == "feather":
        alpha = feather_alpha(mask, feather_pixels)[..., None]
        mixed = np.rint(alpha * sample + (1.0 - alpha) * source).astype(np.uint8)
    elif blend in ("hard", "normalized"):
        mixed = sample
    else:
        raise ValueError(f"unknown blend {blend!r}; choose from {BLENDS}")
    out = image.copy()
    out[y0:y1, x0:x1] = np.where(mask[..., None], mixed, source)
    return out


# --------------------------------------------------------------------------- context crops
@dataclass
class ContextCrop:
    """A chosen context crop: its box, its ratio r, draws made, and whether it is the fallback."""

    box: tuple[int, int, int, int]
    ratio: int
    tries: int
    fallback: bool
    labels: np.ndarray | None = field(default=None, repr=False)  # resized instanceIds, if computed


def aspect_box_area(bbox: Sequence[int], aspect: float) -> float:
    """Area of the smallest box of width/height ``aspect`` around ``bbox``."""
    x0, y0, x1, y1 = bbox
    height = max(y1 - y0, (x1 - x0) / aspect)
    return height * height * aspect


def crop_size(area: float, ratio: float, aspect: float) -> tuple[int, int]:
    """(width, height) of a crop of width/height ``aspect`` and area ``ratio`` x ``area`` (rounded up)."""
    height = math.ceil(math.sqrt(ratio * area / aspect) - 1e-9)
    return math.ceil(height * aspect - 1e-9), height


def place_crop(rng: np.random.Generator, bbox: Sequence[int], size: tuple[int, int],
               image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A uniformly placed crop of ``size`` (w, h) containing ``bbox`` inside the image (w, h)."""
    (w, h), (width, height) = size, image_size
    x0, y0, x1, y1 = bbox
    cx = int(rng.integers(max(0, x1 - w), min(x0, width - w) + 1))
    cy = int(rng.integers(max(0, y1 - h), min(y0, height - h) + 1))
    return cx, cy, cx + w, cy + h


def centred_crop(bbox: Sequence[int], size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop of ``size`` centred on ``bbox``, shifted inside the image."""
    (w, h), (width, height) = size, image_size
    x0, y0, x1, y1 = bbox
    cx = min(max((x0 + x1 - w) // 2, 0), width - w)
    cy = min(max((y0 + y1 - h) // 2, 0), height - h)
    return cx, cy, cx + w, cy + h


def smallest_crop_size(bbox: Sequence[int], image_size: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the r = 1 crop around ``bbox``, never larger than the image."""
    width, height = image_size
    aspect = width / height
    w, h = crop_size(aspect_box_area(bbox, aspect), 1, aspect)
    return min(w, width), min(h, height)


def draw_crop_size(rng: np.random.Generator, bbox: Sequence[int], image_size: tuple[int, int],
                   max_tries: int) -> tuple[tuple[int, int], int]:
    """((w, h), r): r = max(1, ceil(N(3, 1))) redrawn until the crop fits; r = 1 after ``max_tries`` misfits."""
    width, height = image_size
    aspect = width / height
    area = aspect_box_area(bbox, aspect)
    for _ in range(max_tries):
        ratio = max(1, math.ceil(rng.normal(3.0, 1.0)))
        w, h = crop_size(area, ratio, aspect)
        if w <= width and h <= height:
            return (w, h), ratio
    return smallest_crop_size(bbox, image_size), 1


def cut_fragments(instance_ids: np.ndarray, box: Sequence[int], size: tuple[int, int],
                  source_counts: np.ndarray, min_pixels: int) -> tuple[bool, np.ndarray | None]:
    """(True if the crop leaves no cut instance with 0 < pixels < ``min_pixels``, resized labels or None).

    An instance is cut when the box holds only part of it. Enlarging with nearest neighbour never
    loses a pixel, so only instances with fewer than ``min_pixels`` pixels inside the box need the
    resized map, which is then computed once and returned for reuse.
    """
    x0, y0, x1, y1 = box
    inside = np.bincount(instance_ids[y0:y1, x0:x1].ravel(), minlength=len(source_counts))
    ids = np.flatnonzero(inside[1000:]) + 1000
    cut = ids[inside[ids] < source_counts[ids]]
    suspects = cut[inside[cut] < min_pixels]
    if suspects.size == 0:
        return True, None
    labels = crop_resize_labels(instance_ids, box, size)
    resized = np.bincount(labels.ravel(), minlength=len(source_counts))
    return bool((resized[suspects] >= min_pixels).all()), labels


def choose_context_crop(instance_ids: np.ndarray, bbox: Sequence[int], seed: int, params: IntegrationParams,
                        source_counts: np.ndarray | None = None) -> ContextCrop:
    """The paper's random context crop around ``bbox`` (see the module docstring), seeded by ``seed``."""
    height, width = instance_ids.shape
    if source_counts is None:
        source_counts = np.bincount(instance_ids.ravel())
    rng = np.random.default_rng(seed)
    for tries in range(1, params.max_tries + 1):
        size, ratio = draw_crop_size(rng, bbox, (width, height), params.max_tries)
        box = place_crop(rng, bbox, size, (width, height))
        ok, labels = cut_fragments(instance_ids, box, (width, height), source_counts, params.min_instance_pixels)
        if ok:
            return ContextCrop(box, ratio, tries, False, labels)
    box = centred_crop(bbox, smallest_crop_size(bbox, (width, height)), (width, height))
    return ContextCrop(box, 1, params.max_tries, True)


# --------------------------------------------------------------------------- sample selection
FALLBACKS = ("drop", "original")
"""What happens to a sample failing the quality gate: left out, or replaced by the original instance."""


@dataclass
class GateDecision:
    """Which samples the quality gate accepts, which fall back to the original instance, and the counts."""

    accepted: dict[str, list[int]]
    fallback: dict[str, list[int]]
    stats: dict
    failures: list[dict]


def gate_samples(instances: dict[str, dict], min_clip_score: float | None = None, top_fraction: float | None = None,
                 min_mask_iou: float | None = None, min_clip_margin: float | None = None, fallback: str = "drop",
                 where: Path = Path(".")) -> GateDecision:
    """Apply the quality gate (:func:`instsynth.quality.gate_failures`) to a manifest's instances.

    A sample passes when it meets every given criterion. A failing sample is left out (``fallback``
    ``"drop"``) or integrated with the original instance in place of the generated one
    (``"original"``: the pair is still written, labelled ``instance_source: "original"``).
    ``stats`` holds the counts of integration_report.json: samples failing each criterion, accepted,
    fallen back, dropped and the accept rate.
    """
    from instsynth.quality.gate import GATE_CRITERIA, gate_failures

    if fallback not in FALLBACKS:
        raise InstSynthError(where, f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    criteria = dict(zip(GATE_CRITERIA, (min_clip_score, top_fraction, min_mask_iou, min_clip_margin)))
    try:
        failed = gate_failures({"instances": instances}, where, **criteria)
    except ValueError as exc:
        raise InstSynthError(where, str(exc)) from None
    accepted = {key: [i for i in range(len(e["samples"])) if not failed[key, i]] for key, e in instances.items()}
    rejected = {key: [i for i in range(len(e["samples"])) if failed[key, i]] for key, e in instances.items()}
    total, n_failed = len(failed), sum(1 for f in failed.values() if f)
    fails = {name: sum(1 for f in failed.values() if name in f) for name in GATE_CRITERIA}
    by_score_only = sum(1 for f in failed.values() if "top_fraction" in f and "min_clip_score" not in f)
    stats = {"samples_in_manifest": total, "dropped_below_min_clip_score": fails["min_clip_score"],
             "dropped_outside_top_fraction": by_score_only,
             "samples_selected": total - n_failed if fallback == "drop" else total}
    stats["gate"] = {"criteria": {k: v for k, v in criteria.items() if v is not None}, "fallback": fallback,
                     "samples": total, "accepted": total - n_failed,
                     "fallen_back": n_failed if fallback == "original" else 0,
                     "dropped": n_failed if fallback == "drop" else 0,
                     "accept_rate": round((total - n_failed) / total, 6) if total else None,
                     "failed_by": {k: fails[k] for k, v in criteria.items() if v is not None}}
    failures = [{"key": key, "sample_index": i, "failed": f, "action": "dropped" if fallback == "drop" else "original"}
                for (key, i), f in failed.items() if f]
    fallback_idx = rejected if fallback == "original" else {}
    return GateDecision({k: v for k, v in accepted.items() if v}, {k: v for k, v in fallback_idx.items() if v},
                        stats, failures)


def select_samples(instances: dict[str, dict], min_clip_score: float | None = None,
                   top_fraction: float | None = None, where: Path = Path("."),
                   min_mask_iou: float | None = None, min_clip_margin: float | None = None) -> tuple[dict[str, list[int]], dict]:
    """Sample indices that pass the quality gate per instance key, and the gate's counts.

    Without criteria every sample is kept; see :func:`gate_samples` for the criteria. Criteria need
    the quality filter's ``scores`` (generation/filter_generation.py).
    """
    decision = gate_samples(instances, min_clip_score, top_fraction, min_mask_iou, min_clip_margin, "drop", where)
    return decision.accepted, decision.stats


# --------------------------------------------------------------------------- per-image work
@dataclass
class SampleTask:
    """One sample to integrate: its instance (metadata entry), index, file and fingerprint."""

    key: str
    instance_id: int
    bbox: list[int]
    crop_box: list[int]
    area: int
    sample: int
    sample_path: Path
    sample_rel: str
    fingerprint: str
    original: bool = False  # the quality gate's fallback: integrate the original instance instead


@dataclass
class ImageTask:
    """All samples of one source image (read once for all of them)."""

    source: CityscapesImage
    samples: list[SampleTask]
    params: IntegrationParams
    out: Path


@dataclass
class SampleResult:
    """New-image entries of one sample, or the error that stopped it; files written / already right."""

    task: SampleTask
    entries: list[dict] = field(default_factory=list)
    written: int = 0
    existing: int = 0
    error: tuple[str, str, str] | None = None  # (path, problem, reason)


def read_source(image: CityscapesImage) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, instanceIds uint16) of a source image, checked to have the same size."""
    rgb = read_png(image.left, rgb=True)
    ids_path = image.gt("instanceIds")
    instance_ids = read_png(ids_path, dtype=np.uint16, shape=rgb.shape[:2])
    if instance_ids.ndim != 2:
        raise InstSynthError(ids_path, "expected a single-channel instanceIds image")
    return rgb, instance_ids


def load_sample(task: SampleTask) -> tuple[np.ndarray, list[str]]:
    """The task's sample as RGB uint8 of its crop box's size, and notes on what had to be converted."""
    x0, y0, x1, y1 = task.crop_box
    image, note = as_rgb_sample(read_png(task.sample_path), task.sample_path)
    notes = [note] if note else []
    if image.shape[:2] != (y1 - y0, x1 - x0):
        notes.append(f"resized {image.shape[1]}x{image.shape[0]} -> {x1 - x0}x{y1 - y0}")
        image = resize_image(image, (y1 - y0, x1 - x0))
    return image, notes


def crop_seed(seed: int, key: str, sample: int, crop: int) -> int:
    """Seed of crop ``crop`` of sample ``sample`` of instance ``key`` (a stable hash, order-independent)."""
    return stable_seed(seed, "context-crop", key, sample, crop)


def integrate_sample(task: SampleTask, image: CityscapesImage, rgb: np.ndarray, instance_ids: np.ndarray,
                     ids_bytes: bytes, source_counts: np.ndarray, params: IntegrationParams, out: Path) -> SampleResult:
    """Paste one sample, cut its context crops and write every new image with its instanceIds."""
    result = SampleResult(task)
    height, width = instance_ids.shape
    x0, y0, x1, y1 = task.crop_box
    if not (x1 <= width and y1 <= height):
        raise InstSynthError(image.gt("instanceIds"), f"crop box {task.crop_box} of {task.key} lies outside the "
                                                      f"{width}x{height} image (metadata of another dataset?)")
    mask = instance_mask(instance_ids, task.crop_box, task.instance_id)
    if not mask.any():
        result.error = (str(image.gt("instanceIds")), f"instance {task.instance_id} (key {task.key}) has no pixel "
                                                       f"inside its crop box {task.crop_box}", "empty_mask")
        return result
    found = int(source_counts[task.instance_id])
    if found != task.area:  # the label map disagrees with the instance stage 1 selected
        result.error = (str(image.gt("instanceIds")), f"instance {task.key!r}: {found} pixels of id {task.instance_id}, "
                        f"but metadata.json says area {task.area} (edited metadata or another dataset?)", "area_mismatch")
        return result
    if task.original:
        pasted, notes = rgb, []
    else:
        sample, notes = load_sample(task)
        pasted = paste(rgb, sample, mask, task.crop_box, params.blend, params.feather_pixels)
    full = (0, 0, width, height)
    crops = [ContextCrop(full, 0, 0, False)]
    crops += [choose_context_crop(instance_ids, task.bbox, crop_seed(params.seed, task.key, task.sample, c),
                                  params, source_counts) for c in range(1, params.crops_per_sample + 1)]
    for c, crop in enumerate(crops):
        new_id = new_image_id(image.image_id, task.instance_id, task.sample, c)
        paths = output_paths(image.split, image.city, new_id)
        if c == 0:
            left, ids = encode_png(pasted), ids_bytes
        else:
            labels = crop.labels if crop.labels is not None else crop_resize_labels(instance_ids, crop.box, (width, height))
            left, ids = encode_png(crop_resize_rgb(pasted, crop.box, (width, height))), encode_png(labels)
        for rel, data in ((paths["leftImg8bit"], left), (paths["instanceIds"], ids)):
            if write_if_changed(out / rel, data):
                result.written += 1
            else:
                result.existing += 1
        result.entries.append({
            "image_id": new_id, "kind": "panorama" if c == 0 else "crop", "split": image.split, "city": image.city,
            "source_image_id": image.image_id, "key": task.key, "instance_id": task.instance_id,
            "sample": task.sample_rel, "sample_index": task.sample, "crop_index": c,
            "bbox_coordinate": list(map(int, crop.box)), "size": [width, height], "blend": params.blend,
            "ratio": crop.ratio, "tries": crop.tries, "fallback": crop.fallback, "sample_notes": notes,
            "instance_source": "original" if task.original else "generated",
            "outputs": paths, "fingerprint": task.fingerprint})
    return result


def integrate_image(task: ImageTask) -> list[SampleResult]:
    """Worker: integrate every sample of one source image; bad input becomes ``SampleResult.error``."""
    try:
        rgb, instance_ids = read_source(task.source)
        ids_bytes = task.source.gt("instanceIds").read_bytes()
    except InstSynthError as exc:
        return [SampleResult(s, error=(str(exc.path), exc.problem, "bad_source")) for s in task.samples]
    source_counts = np.bincount(instance_ids.ravel(), minlength=1 << 16)
    results = []
    for sample in task.samples:
        try:
            results.append(integrate_sample(sample, task.source, rgb, instance_ids, ids_bytes, source_counts,
                                            task.params, task.out))
        except InstSynthError as exc:
            results.append(SampleResult(sample, error=(str(exc.path), exc.problem, "bad_sample")))
    return results


# --------------------------------------------------------------------------- inputs
def check_coordinates_match(path: Path, coordinates: Any, instances: list[dict]) -> None:
    """Stage 1's cropped_region_coordinates.json must list the metadata's instances, in order, with their boxes."""
    if not isinstance(coordinates, list):
        raise InstSynthError(path, "expected stage 1's list of {key, cropped_instance_mask, bbox_coordinate}")
    if len(coordinates) != len(instances):
        raise InstSynthError(path, f"{len(coordinates)} entries but the metadata lists {len(instances)} instances "
                                   "(files from different stage-1 runs?)")
    for n, (entry, inst) in enumerate(zip(coordinates, instances)):
        key = entry.get("key", inst["key"]) if isinstance(entry, dict) else None
        box = entry.get("bbox_coordinate") if isinstance(entry, dict) else None
        if key != inst["key"] or box != inst["crop_box"]:
            raise InstSynthError(path, f"entry {n} ({key!r}, box {box}) does not match metadata instance {n} "
                                       f"({inst['key']!r}, crop_box {inst['crop_box']}): files from different runs?")


def sample_fingerprint(params: IntegrationParams, inst: dict, sample_path: Path) -> str:
    """SHA-256 of everything a sample's outputs depend on: parameters, instance, source and sample bytes."""
    digest = hashlib.sha256(json.dumps({"version": INTEGRATION_VERSION, "params": asdict(params), "key": inst["key"], "bbox": inst["bbox"],
                                        "crop_box": inst["crop_box"], "image": str(inst["image_path"])},
                                       sort_keys=True).encode())
    digest.update(sample_path.read_bytes())
    return digest.hexdigest()


def original_fingerprint(params: IntegrationParams, inst: dict) -> str:
    """Fingerprint of the quality gate's fallback pair: the original instance in place of a sample."""
    return hashlib.sha256(json.dumps({"version": INTEGRATION_VERSION, "params": asdict(params), "key": inst["key"],
                                      "bbox": inst["bbox"], "crop_box": inst["crop_box"], "image": str(inst["image_path"]),
                                      "instance_source": "original"}, sort_keys=True).encode()).hexdigest()


def previous_entries(path: Path) -> dict[str, dict]:
    """New-image entries of an earlier run (empty if none or unreadable)."""
    try:
        data = read_json(path)
        return {e["image_id"]: e for e in data["images"]}
    except (InstSynthError, KeyError, TypeError):
        return {}


def reusable(task: SampleTask, image: CityscapesImage, params: IntegrationParams, previous: dict[str, dict],
             out: Path) -> list[dict] | None:
    """The earlier entries of a sample if its fingerprint is unchanged and its files exist, else None."""
    entries = []
    for c in range(params.crops_per_sample + 1):
        entry = previous.get(new_image_id(image.image_id, task.instance_id, task.sample, c))
        if entry is None or entry.get("fingerprint") != task.fingerprint:
            return None
        if not all((out / entry["outputs"][k]).is_file() for k in ("leftImg8bit", "instanceIds")):
            return None
        entries.append({**entry, "instance_source": entry.get("instance_source", "generated")})
    return entries


def remove_stale(previous: dict[str, dict], entries: list[dict], out: Path) -> list[str]:
    """Delete the files of images an earlier run wrote that this run no longer produces; their ids."""
    current = {e["image_id"] for e in entries}
    stale = sorted(set(previous) - current)
    for image_id in stale:
        for rel in previous[image_id].get("outputs", {}).values():
            path = out / rel
            if path.is_file() and path.resolve().is_relative_to(out):
                path.unlink()
    return stale


# --------------------------------------------------------------------------- the stage
@dataclass
class IntegrationSummary:
    """Where stage 2 wrote and what it did."""

    integration: Path
    coordinates: Path
    report: Path
    samples: int
    new_images: int
    files_written: int
    skipped: int
    gate: dict | None = None  # the quality gate's counts (integration_report.json "gate")


@dataclass
class _Plan:
    """What a run has to do: samples to compute (grouped by source image), samples reused, skips."""

    order: list[tuple[str, int]] = field(default_factory=list)
    tasks: dict[str, ImageTask] = field(default_factory=dict)
    reused: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    previous: dict[str, dict] = field(default_factory=dict)  # new-image entries of the last run
    skip_bad: bool = False

    def skip(self, key: str, sample: int, path: str, problem: str, reason: str) -> None:
        """Record a bad sample (InstSynthError unless skip_bad)."""
        if not self.skip_bad:
            raise InstSynthError(path, problem)
        log.warning("skipping %s sample %d: %s: %s", key, sample, path, problem)
        self.skipped.append({"key": key, "sample_index": sample, "reason": reason, "path": path, "problem": problem})


def load_inputs(inpainting_dir: str | os.PathLike, out: Path, metadata_path: str | os.PathLike | None,
                coordinates_path: str | os.PathLike | None) -> tuple[Path, dict, Path, dict]:
    """(manifest path, manifest, metadata path, metadata), validated against each other."""
    gen_dir = Path(inpainting_dir).resolve()
    manifest_path = gen_dir / "generation.json" if gen_dir.is_dir() else gen_dir
    manifest = load_manifest(manifest_path)
    if metadata_path is None and not isinstance(manifest.get("metadata"), str):
        raise InstSynthError(manifest_path, "names no stage-1 metadata; pass --metadata_path")
    meta_path = Path(metadata_path or manifest["metadata"]).resolve()
    meta = load_metadata(meta_path)
    if coordinates_path is not None:
        coordinates_path = Path(coordinates_path).resolve()
        if coordinates_path == out / COORDINATES_NAME:
            raise InstSynthError(out, f"stage 2 writes its own {COORDINATES_NAME} here; choose an output folder "
                                      "other than the one holding stage 1's")
        check_coordinates_match(coordinates_path, read_json(coordinates_path), meta["instances"])
    unknown = sorted(set(manifest["instances"]) - {inst["key"] for inst in meta["instances"]})
    if unknown:
        raise InstSynthError(manifest_path, f"{len(unknown)} instances not in {meta_path}, e.g. {unknown[0]!r}")
    return manifest_path, manifest, meta_path, meta


def plan_samples(manifest_path: Path, manifest: dict, meta: dict, chosen: dict[str, list[int]],
                 params: IntegrationParams, out: Path, skip_bad: bool,
                 originals: dict[str, list[int]] | None = None) -> _Plan:
    """Every chosen sample in metadata order: reused (unchanged since the last run), to do, or skipped.

    ``originals``: samples the quality gate replaces by the original instance (no sample file needed)."""
    originals = originals or {}
    previous = previous_entries(out / INTEGRATION_NAME)
    plan = _Plan(previous=previous, skip_bad=skip_bad)
    root = Path(meta["dataset_root"])
    for inst in meta["instances"]:
        entry = manifest["instances"].get(inst["key"])
        image = CityscapesImage(root, meta["split"], inst["city"], inst["image_id"])
        fallback = set(originals.get(inst["key"], []))
        for i in sorted({*chosen.get(inst["key"], []), *fallback}) if entry is not None else []:
            sample_path = entry["sample_paths"][i]
            if i > MAX_SAMPLE_INDEX:
                plan.skip(inst["key"], i, str(manifest_path), f"sample index {i} > {MAX_SAMPLE_INDEX}", "sample_index")
                continue
            if i in fallback:
                task = SampleTask(inst["key"], inst["instance_id"], inst["bbox"], inst["crop_box"], inst["area"], i,
                                  sample_path, entry["samples"][i], original_fingerprint(params, inst), original=True)
            elif not sample_path.is_file():
                plan.skip(inst["key"], i, str(sample_path), "sample file not found", "sample_missing")
                continue
            else:
                task = SampleTask(inst["key"], inst["instance_id"], inst["bbox"], inst["crop_box"], inst["area"], i,
                                  sample_path, entry["samples"][i], sample_fingerprint(params, inst, sample_path))
            plan.order.append((task.key, i))
            done = reusable(task, image, params, previous, out)
            if done is not None:
                plan.reused[task.key, i] = done
            else:
                plan.tasks.setdefault(image.image_id, ImageTask(image, [], params, out)).samples.append(task)
    return plan


def run_samples(plan, tasks: list, integrate, workers: int, desc: str) -> tuple[list[dict], list]:
    """Run ``integrate`` over the image tasks in worker processes, counting failed samples as the plan's skips.

    Returns every new-image entry in plan order (reused ones included) and the sample results computed."""
    results: dict[tuple[str, int], Any] = {}
    bar = progress(None, desc, sum(len(t.samples) for t in tasks))
    try:
        for sample_results in ordered_map(integrate, tasks, workers):
            for res in sample_results:
                results[res.task.key, res.task.sample] = res
                bar.update(1)
                if res.error is not None:
                    plan.skip(res.task.key, res.task.sample, *res.error)
    finally:
        bar.close()
    entries: list[dict] = []
    for pair in plan.order:
        if pair in plan.reused:
            entries += plan.reused[pair]
        elif pair in results and results[pair].error is None:
            entries += results[pair].entries
    return entries, list(results.values())


def run_plan(plan: _Plan, workers: int) -> tuple[list[dict], Counter]:
    """Compute the plan's samples; every new-image entry in plan order and file counts (written, existing)."""
    entries, results = run_samples(plan, list(plan.tasks.values()), integrate_image, workers, "stage 2: integrating")
    files = Counter(written=sum(r.written for r in results), existing=sum(r.existing for r in results))
    return entries, files


def make_report(header: dict, selection: dict, plan: _Plan, entries: list[dict], files: Counter,
                not_generated: list[str], stale: list[str]) -> dict:
    """integration_report.json: what was selected, integrated, reused, skipped (and why), written."""
    kinds = Counter(e["kind"] for e in entries)
    converted = sorted({(e["sample"], note) for e in entries for note in e["sample_notes"]})
    gate = selection["gate"]
    return {**header, **selection, "samples_accepted": gate["accepted"], "samples_fallen_back": gate["fallen_back"],
            "samples_dropped_by_gate": gate["dropped"], "gate_accept_rate": gate["accept_rate"],
            "samples_integrated": len({(e["key"], e["sample_index"]) for e in entries}),
            "samples_reused": len(plan.reused), "samples_skipped": len(plan.skipped),
            "skip_reasons": dict(Counter(s["reason"] for s in plan.skipped)), "skipped": plan.skipped,
            "instances_not_generated": not_generated,
            "new_images": len(entries), "panoramas": kinds["panorama"], "crops": kinds["crop"],
            "files_written": files["written"], "files_already_right": files["existing"],
            "stale_images_removed": stale,
            "crop_redraws": sum(e["tries"] - 1 for e in entries if e["kind"] == "crop" and not e["fallback"]),
            "crop_fallbacks": [e["image_id"] for e in entries if e["fallback"]],
            "samples_converted": [{"sample": s, "note": n} for s, n in converted]}


def format_gate_counts(gate: dict) -> str:
    """One line of the gate's counts: ``accepted 8, fallen back 2, dropped 0 of 10 samples (accept rate 80.0%)``."""
    rate = "-" if gate["accept_rate"] is None else f"{100 * gate['accept_rate']:.1f}%"
    return (f"accepted {gate['accepted']}, fallen back {gate['fallen_back']}, dropped {gate['dropped']} of "
            f"{gate['samples']} samples (accept rate {rate})")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def integrate_samples(inpainting_dir: str | os.PathLike, out: str | os.PathLike,
                      metadata_path: str | os.PathLike | None = None,
                      coordinates_path: str | os.PathLike | None = None,
                      params: IntegrationParams = IntegrationParams(), workers: int | None = None,
                      skip_bad: bool = False, min_clip_score: float | None = None,
                      top_fraction: float | None = None, min_mask_iou: float | None = None,
                      min_clip_margin: float | None = None, fallback: str = "drop") -> IntegrationSummary:
    """Run stage 2 over the samples of ``inpainting_dir/generation.json`` (see the module docstring).

    ``metadata_path`` defaults to the manifest's metadata; ``coordinates_path`` (stage 1's
    cropped_region_coordinates.json, optional) is checked against it. Bad input raises
    InstSynthError naming the file; with ``skip_bad`` the sample is skipped and listed in
    integration_report.json. The JSON files are written after every sample was handled. For a
    COCO-format metadata the outputs are new images and one merged COCO file (instsynth.coco_output).
    The quality gate (``min_clip_score``, ``top_fraction``, ``min_mask_iou``, ``min_clip_margin``,
    ``fallback``; see :func:`gate_samples`) decides which samples are integrated.
    """
    out = Path(out).resolve()
    params.validate(out)
    manifest_path, manifest, meta_path, meta = load_inputs(inpainting_dir, out, metadata_path, coordinates_path)
    gate = gate_samples(manifest["instances"], min_clip_score, top_fraction, min_mask_iou, min_clip_margin, fallback,
                        manifest_path)
    selection = {**gate.stats, "gate_failures": gate.failures}
    if meta.get("format") == "coco":  # your own dataset: new images + one merged COCO file (instsynth.coco_output)
        from .coco_output import integrate_coco

        if gate.fallback:
            raise InstSynthError(manifest_path, "--fallback original is not supported for COCO-format datasets yet; "
                                                "use --fallback drop")
        return integrate_coco(manifest_path, manifest, meta_path, meta, gate.accepted, selection, params, out,
                              default_workers() if workers is None else max(1, int(workers)), skip_bad,
                              {"min_clip_score": min_clip_score, "top_fraction": top_fraction,
                               "min_mask_iou": min_mask_iou, "min_clip_margin": min_clip_margin})
    plan = plan_samples(manifest_path, manifest, meta, gate.accepted, params, out, skip_bad, gate.fallback)
    entries, files = run_plan(plan, default_workers() if workers is None else max(1, int(workers)))
    stale = remove_stale(plan.previous, entries, out)

    root = Path(meta["dataset_root"])
    header = {"version": INTEGRATION_VERSION, "manifest": str(manifest_path), "backend": manifest["backend"],
              "metadata": str(meta_path), "dataset_root": str(root), "split": meta["split"], "params": asdict(params),
              "filters": {"min_clip_score": min_clip_score, "top_fraction": top_fraction,
                          **({"min_mask_iou": min_mask_iou} if min_mask_iou is not None else {}),
                          **({"min_clip_margin": min_clip_margin} if min_clip_margin is not None else {}),
                          **({"fallback": fallback} if fallback != "drop" else {})}}
    not_generated = [i["key"] for i in meta["instances"] if i["key"] not in manifest["instances"]]
    report = make_report(header, selection, plan, entries, files, not_generated, stale)
    coordinates = {"version": COORDINATES_VERSION, "dataset_root": str(root),
                   "images": [coordinates_entry(e, root) for e in entries]}
    paths = out / INTEGRATION_NAME, out / COORDINATES_NAME, out / REPORT_NAME
    for path, obj in zip(paths, ({**header, "images": entries}, coordinates, report)):
        write_if_changed(path, _json_bytes(obj))
    log.info("stage 2: %d samples -> %d new images (%d panoramas, %d crops), %d files written, %d skipped -> %s",
             report["samples_integrated"], len(entries), report["panoramas"], report["crops"], files["written"],
             len(plan.skipped), out)
    if gate.stats["gate"]["criteria"]:
        log.info("quality gate: %s", format_gate_counts(gate.stats["gate"]))
    return IntegrationSummary(*paths, samples=report["samples_integrated"], new_images=len(entries),
                              files_written=files["written"], skipped=len(plan.skipped), gate=gate.stats["gate"])
