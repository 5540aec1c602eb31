"""Official Cityscapes instance AP (cityscapesscripts' ``evalInstanceLevelSemanticLabeling``).

:func:`evaluate_cityscapes` writes the per-image prediction files in the format that script reads
(``<output_dir>/cityscapes_instances/<image_id>_pred.txt`` with one ``masks/<png> <labelId> <score>``
line per instance, masks as 0/255 PNGs at the image size) and evaluates exactly the given images
against their ``gtFine/<split>/<city>/<image_id>_gtFine_instanceIds.png`` (found next to each
``leftImg8bit`` file) with the script's own steps, as its ``evaluateImgLists`` runs them:
``instances2dict`` (ground-truth instances), ``matchGtWithPreds``, ``evaluateMatches``,
``computeAverages``. The first two run per image in worker processes (they read every mask PNG and
dominate the time), the last two once on the merged matches. The ground truth is read fresh from the
PNGs every time (the script's ``gtInstancesFile`` cache points into a temporary folder and is never
written, so a stale cache cannot be reused), and nothing is written outside ``output_dir`` (the
script's ``matches.json`` dump into the working directory and its JSON export are not made).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shutil
import tempfile
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from instsynth.core.io import (InstSynthError, default_workers, gt_path, image_id_of, progress, write_bytes, write_json,
                               write_png)
from instsynth.core.labels import class_name
from instsynth.core.parallel import ordered_map

PREDICTION_FOLDER = "cityscapes_instances"
RESULTS_FILE = "cityscapes_instance_results.json"


def ground_truth_path(file_name: str | os.PathLike) -> Path:
    """``gtFine/<split>/<city>/<id>_gtFine_instanceIds.png`` of a ``leftImg8bit/<split>/<city>/...`` image."""
    left = Path(file_name)
    if len(left.parents) < 4 or left.parents[2].name != "leftImg8bit":
        raise InstSynthError(left, "not inside a Cityscapes tree (<root>/leftImg8bit/<split>/<city>/<image>); "
                                   "the official Cityscapes evaluation needs its gtFine instanceIds file")
    path = gt_path(left.parents[3], left.parents[1].name, left.parent.name, image_id_of(left))
    if not path.is_file():
        raise InstSynthError(path, f"ground truth of {left.name} not found")
    return path


# --------------------------------------------------------------------------- predictions
def _to_rle(mask) -> dict:
    """A COCO RLE dict (bytes counts) of a mask given as an RLE dict, a tensor or an array."""
    if isinstance(mask, dict):
        rle = dict(mask)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        return rle
    if hasattr(mask, "cpu"):  # torch tensor
        mask = mask.cpu().numpy()
    return mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))


def group_predictions(predictions: list[dict], contiguous_to_label_id: dict[int, int]) -> dict:
    """``{image_id: [(rle, label_id, score), ...]}`` from either COCO result entries (``image_id``,
    ``category_id`` = Cityscapes label id, RLE ``segmentation``, ``score``; what the trainer collects)
    or per-image model outputs ``{"image_id", "instances": {"pred_masks", "pred_classes", "scores"}}``
    (contiguous classes, mapped with ``contiguous_to_label_id``)."""
    grouped: dict = defaultdict(list)
    for pred in predictions:
        if "instances" in pred:
            inst = pred["instances"]
            for mask, cls, score in zip(inst["pred_masks"], inst["pred_classes"].tolist(), inst["scores"].tolist()):
                grouped[pred["image_id"]].append((_to_rle(mask), contiguous_to_label_id[int(cls)], float(score)))
        else:
            grouped[pred["image_id"]].append((_to_rle(pred["segmentation"]), int(pred["category_id"]),
                                              float(pred["score"])))
    return grouped


@dataclass(frozen=True)
class ImageTask:
    """One evaluated image: where its files go and what was predicted for it."""
    file_name: str
    height: int
    width: int
    gt_file: str
    pred_dir: str
    predictions: tuple  # (rle, label_id, score), ...


def write_image_predictions(task: ImageTask) -> Path:
    """``<image_id>_pred.txt`` and one 0/255 PNG per predicted mask (``masks/``); returns the txt path."""
    pred_dir, stem = Path(task.pred_dir), image_id_of(task.file_name)
    lines = []
    for k, (rle, label_id, score) in enumerate(task.predictions):
        mask = mask_utils.decode(rle)
        if mask.shape != (task.height, task.width):
            raise InstSynthError(task.file_name, f"predicted mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                                                 f"is {task.width}x{task.height}")
        png = f"masks/{stem}_{k:04d}_{class_name(label_id)}.png"
        write_png(pred_dir / png, mask * np.uint8(255))
        lines.append(f"{png} {label_id} {score:.6f}\n")
    return write_bytes(pred_dir / f"{stem}_pred.txt", "".join(lines).encode())


# --------------------------------------------------------------------------- cityscapesscripts
class _NumpyWithIn1d(types.ModuleType):
    """numpy plus ``in1d`` (removed in NumPy 2.4, still called by cityscapesscripts 2.3)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(a, b, **kwargs):
        return np.isin(np.ravel(a), b, **kwargs)


def _skip_json_dump(data, path) -> None:
    """Stands in for the script's ``writeDict2JSON`` (its cache / match dumps are never reused here)."""


@contextlib.contextmanager
def cityscapes_script(pred_dir: str | os.PathLike):
    """The evaluation module and a private copy of its ``args`` set up for ``pred_dir``; for the
    duration, the module sees a numpy with ``in1d``, writes no JSON side files and prints nothing
    (its ``printError`` exits: that becomes an InstSynthError)."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script

    args = copy.deepcopy(script.args)
    args.predictionPath = os.path.abspath(pred_dir)
    args.predictionWalk = None
    args.gtInstancesFile = os.path.join(tempfile.gettempdir(), f"instsynth_unused_gtInstances_{os.getpid()}.json")
    args.JSONOutput = False
    args.quiet = True
    args.csv = False
    args.colorized = False
    script.setInstanceLabels(args)
    original = script.np, script.writeDict2JSON
    if not hasattr(np, "in1d"):
        script.np = _NumpyWithIn1d("numpy")
    script.writeDict2JSON = _skip_json_dump
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN means of classes without ground truth
            yield script, args
    except SystemExit:
        message = out.getvalue().strip()[-500:]
        raise InstSynthError(pred_dir, f"cityscapesscripts evaluation failed: {message}") from None
    finally:
        script.np, script.writeDict2JSON = original


def match_image(task: ImageTask) -> dict:
    """Write one image's prediction files and match them with its ground truth (the script's
    ``instances2dict`` + ``matchGtWithPreds``); returns the script's matches entry of that image."""
    txt = write_image_predictions(task)
    with cityscapes_script(task.pred_dir) as (script, args):
        gt_instances = script.instances2dict([task.gt_file], False)
        return script.matchGtWithPreds([str(txt.resolve())], [task.gt_file], gt_instances, args)


def _number(value) -> float | None:
    """Percent, or None where cityscapesscripts has no ground truth (NaN)."""
    value = float(value)
    return None if math.isnan(value) else value * 100


def evaluate_cityscapes(predictions: list[dict], dataset_dicts: list[dict], output_dir: str | os.PathLike,
                        contiguous_to_label_id: dict[int, int], workers: int | None = None) -> dict:
    """Official Cityscapes instance AP of ``predictions`` on the images of ``dataset_dicts`` (Detectron2
    dicts whose ``file_name`` is a ``leftImg8bit`` image of a Cityscapes tree), using ``workers``
    processes (default: all cores).

    Returns ``{"AP", "AP50", "AP-<class>", "AP50-<class>"}`` in percent (None for a class without
    ground truth) and writes it to ``output_dir/cityscapes_instance_results.json``."""
    output_dir = Path(output_dir)
    if not dataset_dicts:
        raise InstSynthError(output_dir, "no images to evaluate")
    grouped = group_predictions(predictions, contiguous_to_label_id)
    unknown = sorted(map(str, set(grouped) - {d["image_id"] for d in dataset_dicts}))
    if unknown:
        raise InstSynthError(output_dir, f"predictions for images that are not in the dataset: {unknown[:5]}")
    pred_dir = output_dir / PREDICTION_FOLDER
    if pred_dir.exists():  # our own output of an earlier evaluation: start clean
        shutil.rmtree(pred_dir)
    (pred_dir / "masks").mkdir(parents=True)
    tasks = [ImageTask(str(d["file_name"]), d["height"], d["width"], str(ground_truth_path(d["file_name"]).resolve()),
                       str(pred_dir.resolve()), tuple(grouped.get(d["image_id"], ()))) for d in dataset_dicts]
    matches = {}
    for entry in progress(ordered_map(match_image, tasks, workers or default_workers(), chunksize=4),
                          "cityscapes evaluation", total=len(tasks)):
        matches.update(entry)
    with cityscapes_script(pred_dir) as (script, args):
        averages = script.computeAverages(script.evaluateMatches(matches, args), args)
    metrics = {"AP": _number(averages["allAp"]), "AP50": _number(averages["allAp50%"])}
    metrics.update({f"AP-{name}": _number(v["ap"]) for name, v in averages["classes"].items()})
    metrics.update({f"AP50-{name}": _number(v["ap50%"]) for name, v in averages["classes"].items()})
    write_json(output_dir / RESULTS_FILE, {**metrics, "num_images": len(tasks),
                                           "num_predictions": sum(len(t.predictions) for t in tasks)})
    return metrics
