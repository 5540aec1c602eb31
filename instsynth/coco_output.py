"""Stage 2 on your own dataset: paste samples into COCO images, write new images and one merged COCO file.

:func:`integrate_coco` is what :func:`instsynth.integration.integrate_samples` runs for a COCO-format
stage-1 metadata (``"format": "coco"``). Every kept sample is pasted, exactly as on Cityscapes,
through its annotation's mask (rasterised by pycocotools) into the full source image (the
*panorama*, crop 0), and ``crops_per_sample`` random context crops are cut around it and resized
back to the image size (the same draws, seeds and redraw rule as on Cityscapes; the label map the
rule checks is the image's annotations painted largest first). Under ``OUT`` it writes

- ``images/instsynth_syn/<split>/<folder>/<stem>_<annotation id>_<sample:04d>_<crop:02d>.png``: the new images;
- ``images/<file_name>``: every original image, hard-linked (copied across devices), so that
  ``OUT/images`` is the one image root of the merged file;
- ``annotations/instances_<split>_instsynth.json``: the source file's images and annotations
  unchanged, plus one image and its annotations per new image. A panorama carries copies of every
  source annotation (the pasted one rasterises to exactly the mask the sample was pasted through);
  a crop carries every annotation that survives the crop, cut and resized with nearest neighbour
  (pixel centres) and written as pixel-edge polygons where those rasterise back exactly, else as
  RLE (holes, crowd regions). New image and annotation ids start above the source's largest, so they
  never collide; ``info.instsynth`` names the source JSON, the generation manifest and the parameters;
- ``integration.json`` (every new image, its annotations without ids and a fingerprint) and
  ``integration_report.json``.

Reruns reuse every sample whose fingerprint (parameters, instance, sample bytes, source annotations)
is unchanged and whose image exists, rewrite no file whose bytes are right, and remove images an
earlier run wrote that this one no longer produces. The source JSON and images are only read.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instsynth.stages.assemble import place_file
from .formats.coco import (LVIS_IMAGE_FIELDS, SYNTHETIC_FOLDER, CocoSource, annotation_mask,  # noqa: F401 (names kept)
                           crop_annotations, exact_segmentation, instance_map, mask_bbox, merge_coco, merged_json_path,
                           panorama_annotations, synthetic_file_name)
from .formats.coco import load_coco_source
from instsynth.core.io import InstSynthError, encode_png, get_logger, progress, read_json, read_png, write_if_changed
from .integration import (INTEGRATION_NAME, INTEGRATION_VERSION, REPORT_NAME, ContextCrop, IntegrationSummary,
                          SampleResult, SampleTask, _json_bytes, _Plan, choose_context_crop, crop_seed, load_sample,
                          paste, run_samples, sample_fingerprint)
from instsynth.stages.label_crops import crop_resize_rgb

log = get_logger("instsynth.coco_output")


# --------------------------------------------------------------------------- per image
@dataclass
class CocoImageTask:
    """All samples of one source image: its COCO entry, annotations, and where to write."""

    image: dict
    anns: list[dict]
    images_dir: Path
    split: str
    samples: list[SampleTask]
    params: Any  # instsynth.integration.IntegrationParams
    out: Path


def integrate_sample(task: SampleTask, img: dict, rgb: np.ndarray, anns: list[dict], masks: dict[int, np.ndarray],
                     labels: np.ndarray, counts: np.ndarray, split: str, params, out: Path) -> SampleResult:
    """Paste one sample, cut its context crops, write every new image and return its entries."""
    result = SampleResult(task)
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = task.crop_box
    if task.instance_id not in masks or not (x1 <= width and y1 <= height):
        raise InstSynthError(task.sample_path, f"instance {task.key}: annotation {task.instance_id} or its crop box "
                                               f"{task.crop_box} is not in image {img['file_name']} (metadata of another file?)")
    mask = masks[task.instance_id][y0:y1, x0:x1]
    if not mask.any():
        result.error = (img["file_name"], f"annotation {task.instance_id} has no pixel in its crop box", "empty_mask")
        return result
    found = int(masks[task.instance_id].sum())
    if found != task.area:  # the annotation is not the one stage 1 selected
        result.error = (img["file_name"], f"instance {task.key!r}: annotation {task.instance_id} has {found} pixels, "
                        f"but metadata.json says area {task.area} (edited metadata or another file?)", "area_mismatch")
        return result
    sample, notes = load_sample(task)
    pasted = paste(rgb, sample, mask, task.crop_box, params.blend, params.feather_pixels)
    crops = [ContextCrop((0, 0, width, height), 0, 0, False)]
    crops += [choose_context_crop(labels, task.bbox, crop_seed(params.seed, task.key, task.sample, c), params, counts)
              for c in range(1, params.crops_per_sample + 1)]
    for c, crop in enumerate(crops):
        name = synthetic_file_name(split, img["file_name"], task.instance_id, task.sample, c)
        if c == 0:
            image, new_anns = pasted, panorama_annotations(anns, task.instance_id)
        else:
            image = crop_resize_rgb(pasted, crop.box, (width, height))
            new_anns = crop_annotations(anns, masks, crop.box, (width, height), task.instance_id)
        if write_if_changed(out / "images" / name, encode_png(image)):
            result.written += 1
        else:
            result.existing += 1
        result.entries.append({
            "file_name": name, "width": width, "height": height, "kind": "panorama" if c == 0 else "crop",
            "source_image_id": img["id"], "key": task.key, "annotation_id": task.instance_id,
            "sample": task.sample_rel, "sample_index": task.sample, "crop_index": c,
            "bbox_coordinate": list(map(int, crop.box)), "blend": params.blend, "ratio": crop.ratio,
            "tries": crop.tries, "fallback": crop.fallback, "sample_notes": notes,
            "fingerprint": task.fingerprint, "annotations": new_anns})
    return result


def integrate_image(task: CocoImageTask) -> list[SampleResult]:
    """Worker: every sample of one source image; bad input becomes ``SampleResult.error``."""
    img = task.image
    path = task.images_dir / img["file_name"]
    try:
        rgb = read_png(path, rgb=True, shape=(img["height"], img["width"]))
    except InstSynthError as exc:
        return [SampleResult(s, error=(str(exc.path), exc.problem, "bad_source")) for s in task.samples]
    height, width = rgb.shape[:2]
    masks = {a["id"]: annotation_mask(a, height, width) for a in task.anns}
    labels = instance_map(task.anns, masks, height, width)
    counts = np.bincount(labels.ravel(), minlength=1 << 16)
    results = []
    for sample in task.samples:
        try:
            results.append(integrate_sample(sample, img, rgb, task.anns, masks, labels, counts, task.split,
                                            task.params, task.out))
        except InstSynthError as exc:
            results.append(SampleResult(sample, error=(str(exc.path), exc.problem, "bad_sample")))
    return results


def link_originals(source: CocoSource, out: Path) -> Counter:
    """Hard-link (or copy) every kept source image to ``OUT/images/<file_name>``; counts by action."""
    actions = Counter()
    target = (out / "images").resolve()
    if target == source.images_dir:
        return actions
    for img in progress(source.images, "linking original images"):
        actions[place_file(source.images_dir / img["file_name"], target / img["file_name"])] += 1
    return actions


# --------------------------------------------------------------------------- the stage
def sample_fingerprint_coco(params, inst: dict, sample_path: Path, anns: list[dict]) -> str:
    """The Cityscapes sample fingerprint extended by the source image's annotations."""
    digest = hashlib.sha256(sample_fingerprint(params, inst, sample_path).encode())
    digest.update(json.dumps(anns, sort_keys=True).encode())
    return digest.hexdigest()


def plan_coco(source: CocoSource, manifest: dict, meta: dict, chosen: dict[str, list[int]], params, out: Path,
              previous: dict[str, dict], skip_bad: bool):
    """Every chosen sample in metadata order: reused (unchanged since the last run), to do, or skipped.

    Returns ``(plan, tasks by source image id)``; ``plan`` is an :class:`instsynth.integration._Plan`."""
    images = {img["id"]: img for img in source.images}
    plan = _Plan(skip_bad=skip_bad)
    tasks: dict[int, CocoImageTask] = {}
    for inst in meta["instances"]:
        entry = manifest["instances"].get(inst["key"])
        for i in chosen.get(inst["key"], []) if entry is not None else []:
            sample_path, img = entry["sample_paths"][i], images.get(inst["coco_image_id"])
            if img is None:
                plan.skip(inst["key"], i, str(source.json_path), f"image id {inst['coco_image_id']} is not (or no "
                          "longer) in the file", "bad_source")
                continue
            if not sample_path.is_file():
                plan.skip(inst["key"], i, str(sample_path), "sample file not found", "sample_missing")
                continue
            anns = source.annotations[img["id"]]
            task = SampleTask(inst["key"], inst["instance_id"], inst["bbox"], inst["crop_box"], inst["area"], i,
                              sample_path, entry["samples"][i], sample_fingerprint_coco(params, inst, sample_path, anns))
            plan.order.append((task.key, i))
            names = [synthetic_file_name(meta["split"], img["file_name"], task.instance_id, i, c)
                     for c in range(params.crops_per_sample + 1)]
            old = [previous.get(n) for n in names]
            if all(e is not None and e.get("fingerprint") == task.fingerprint and (out / "images" / n).is_file()
                   for e, n in zip(old, names)):
                plan.reused[task.key, i] = old
            else:
                tasks.setdefault(img["id"], CocoImageTask(img, anns, source.images_dir, meta["split"], [], params,
                                                          out)).samples.append(task)
    return plan, tasks


def run_coco_plan(plan, tasks: dict[int, CocoImageTask], workers: int) -> tuple[list[dict], int]:
    """Compute the plan's samples; every new-image entry in plan order and the number of files written."""
    entries, results = run_samples(plan, list(tasks.values()), integrate_image, workers, "stage 2: integrating (COCO)")
    return entries, sum(r.written for r in results)


def remove_stale_images(previous: dict[str, dict], entries: list[dict], out: Path) -> list[str]:
    """Delete new images an earlier run wrote that this run no longer produces; their file names."""
    stale = sorted(set(previous) - {e["file_name"] for e in entries})
    for name in stale:
        path = out / "images" / name
        if name.startswith(SYNTHETIC_FOLDER + "/") and path.is_file():
            path.unlink()
    return stale


def integrate_coco(manifest_path: Path, manifest: dict, meta_path: Path, meta: dict, chosen: dict[str, list[int]],
                   selection: dict, params, out: Path, workers: int, skip_bad: bool, filters: dict):
    """Stage 2 for COCO metadata (see the module docstring); returns an IntegrationSummary."""
    source = load_coco_source(meta["coco_json"], meta["dataset_root"], skip_bad=skip_bad)
    try:
        previous = {e["file_name"]: e for e in read_json(out / INTEGRATION_NAME)["images"]}
    except (InstSynthError, KeyError, TypeError):
        previous = {}
    plan, tasks = plan_coco(source, manifest, meta, chosen, params, out, previous, skip_bad)
    linked = link_originals(source, out)
    entries, written = run_coco_plan(plan, tasks, workers)
    stale = remove_stale_images(previous, entries, out)

    merged_path = merged_json_path(out, meta["split"])
    header = {"version": INTEGRATION_VERSION, "format": "coco", "manifest": str(manifest_path),
              "backend": manifest["backend"], "metadata": str(meta_path), "coco_json": str(source.json_path),
              "images_dir": str(source.images_dir), "split": meta["split"], "params": asdict(params),
              "filters": filters}
    n_anns = sum(len(e["annotations"]) for e in entries)
    merged = merge_coco(source, entries, {
        "source_json": str(source.json_path), "images_dir": str(source.images_dir),
        "generation_manifest": str(manifest_path), "metadata": str(meta_path), "backend": manifest["backend"],
        "params": asdict(params), "filters": filters, "synthetic_images": len(entries),
        "synthetic_annotations": n_anns})
    kinds = Counter(e["kind"] for e in entries)
    report = {**header, **selection, "merged_json": str(merged_path),
              "samples_integrated": len({(e["key"], e["sample_index"]) for e in entries}),
              "samples_reused": len(plan.reused), "samples_skipped": len(plan.skipped),
              "skip_reasons": dict(Counter(s["reason"] for s in plan.skipped)), "skipped": plan.skipped,
              "instances_not_generated": [i["key"] for i in meta["instances"] if i["key"] not in manifest["instances"]],
              "new_images": len(entries), "panoramas": kinds["panorama"], "crops": kinds["crop"],
              "new_annotations": n_anns, "original_images": len(source.images),
              "original_annotations": sum(map(len, source.annotations.values())),
              "bad_source_items_left_out": source.bad, "original_images_linked": dict(linked),
              "files_written": written, "stale_images_removed": stale,
              "crop_fallbacks": [e["file_name"] for e in entries if e["fallback"]]}
    write_if_changed(out / INTEGRATION_NAME, _json_bytes({**header, "images": entries}))
    write_if_changed(merged_path, (json.dumps(merged) + "\n").encode())
    write_if_changed(out / REPORT_NAME, _json_bytes(report))
    log.info("stage 2 (COCO): %d samples -> %d new images, %d annotations (%d files written, %d skipped) -> %s",
             report["samples_integrated"], len(entries), n_anns, written, len(plan.skipped), merged_path)
    return IntegrationSummary(out / INTEGRATION_NAME, merged_path, out / REPORT_NAME,
                              samples=report["samples_integrated"], new_images=len(entries), files_written=written,
                              skipped=len(plan.skipped))
