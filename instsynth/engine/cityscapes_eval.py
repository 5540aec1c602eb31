"""Official Cityscapes instance AP (cityscapesscripts' ``evalInstanceLevelSemanticLabeling``).

:func:`evaluate_cityscapes` writes the per-image prediction files in the format that script reads
(``<output_dir>/cityscapes_instances/<image_id>_pred.txt`` with one ``masks/<png> <labelId> <score>``
line per instance, masks as 0/255 PNGs at the image size) and runs its ``evaluateImgLists`` on exactly
the evaluated images: the ground truth list is passed explicitly (``gtFine/<split>/<city>/
<image_id>_gtFine_instanceIds.png`` next to each ``leftImg8bit`` file), the ground-truth cache
(``gtInstancesFile``) goes to a fresh temporary folder so a stale cache is never reused, and the
script's own JSON export and its ``matches.json`` (written to the working directory) stay in that
temporary folder too. Nothing is written outside ``output_dir``.
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
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from instsynth.io import InstSynthError, gt_path, image_id_of, progress, write_bytes, write_json, write_png
from instsynth.labels import class_name

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


def _decode(mask) -> np.ndarray:
    """A bool HxW array from a tensor, an array or a COCO RLE dict."""
    if isinstance(mask, dict):
        rle = dict(mask)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        return mask_utils.decode(rle).astype(bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.cpu().numpy()
    return np.asarray(mask).astype(bool)


def group_predictions(predictions: list[dict], contiguous_to_label_id: dict[int, int]) -> dict:
    """``{image_id: [(mask, label_id, score), ...]}`` from either COCO result entries (``image_id``,
    ``category_id`` = Cityscapes label id, RLE ``segmentation``, ``score``; what the trainer collects)
    or per-image model outputs ``{"image_id", "instances": {"pred_masks", "pred_classes", "scores"}}``
    (contiguous classes, mapped with ``contiguous_to_label_id``)."""
    grouped: dict = defaultdict(list)
    for pred in predictions:
        if "instances" in pred:
            inst = pred["instances"]
            for mask, cls, score in zip(inst["pred_masks"], inst["pred_classes"].tolist(), inst["scores"].tolist()):
                grouped[pred["image_id"]].append((mask, contiguous_to_label_id[int(cls)], float(score)))
        else:
            grouped[pred["image_id"]].append((pred["segmentation"], int(pred["category_id"]), float(pred["score"])))
    return grouped


def write_prediction_files(grouped: dict, dataset_dicts: list[dict], pred_dir: Path) -> list[Path]:
    """One ``<image_id>_pred.txt`` (and its mask PNGs) per dataset image, in ``dataset_dicts`` order."""
    if pred_dir.exists():  # our own output of an earlier evaluation: start clean
        shutil.rmtree(pred_dir)
    (pred_dir / "masks").mkdir(parents=True)
    known = {d["image_id"] for d in dataset_dicts}
    unknown = sorted(map(str, set(grouped) - known))
    if unknown:
        raise InstSynthError(pred_dir, f"predictions for images that are not in the dataset: {unknown[:5]}")
    txt_files = []
    for record in progress(dataset_dicts, "cityscapes prediction files"):
        stem = image_id_of(record["file_name"])
        lines = []
        for k, (mask, label_id, score) in enumerate(grouped.get(record["image_id"], [])):
            array = _decode(mask)
            if array.shape != (record["height"], record["width"]):
                raise InstSynthError(record["file_name"], f"predicted mask is {array.shape[::-1]}, the image is "
                                                          f"{record['width']}x{record['height']}")
            png = f"masks/{stem}_{k:04d}_{class_name(label_id)}.png"
            write_png(pred_dir / png, array.astype(np.uint8) * 255)
            lines.append(f"{png} {label_id} {score:.6f}\n")
        txt_files.append(write_bytes(pred_dir / f"{stem}_pred.txt", "".join(lines).encode()))
    return txt_files


def _script_args(pred_dir: Path, gt_files: list[Path], tmp: Path):
    """A private copy of cityscapesscripts' module-level ``args`` set up for one evaluation."""
    from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as script

    args = copy.deepcopy(script.args)
    args.predictionPath = os.path.abspath(pred_dir)
    args.predictionWalk = None
    args.groundTruthSearch = " ".join(map(str, gt_files))  # informative only: the list is passed explicitly
    args.gtInstancesFile = str(tmp / "gtInstances.json")  # fresh: never a stale cache
    args.exportFile = str(tmp / "resultInstanceLevelSemanticLabeling.json")
    args.JSONOutput = False
    args.quiet = True
    args.csv = False
    args.colorized = False
    return script, args


class _NumpyWithIn1d(types.ModuleType):
    """numpy plus ``in1d`` (removed in NumPy 2.4, still called by cityscapesscripts 2.3)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(a, b, **kwargs):
        return np.isin(np.ravel(a), b, **kwargs)


def _skip_json_dump(data, path) -> None:
    """Stands in for the script's ``writeDict2JSON``: its ground-truth cache and ``matches.json`` are
    never reused here, and its dump fails on NumPy 2 integers."""


@contextlib.contextmanager
def _script_compat(script):
    """For one call: a numpy with ``in1d`` and no JSON side files (restored afterwards)."""
    original = script.np, script.writeDict2JSON
    if not hasattr(np, "in1d"):
        script.np = _NumpyWithIn1d("numpy")
    script.writeDict2JSON = _skip_json_dump
    try:
        yield
    finally:
        script.np, script.writeDict2JSON = original


def _number(value) -> float | None:
    """Percent, or None where cityscapesscripts has no ground truth (NaN)."""
    value = float(value)
    return None if math.isnan(value) else value * 100


def run_official_evaluation(txt_files: list[Path], gt_files: list[Path], pred_dir: Path) -> dict:
    """cityscapesscripts' averages (``allAp``, ``allAp50%``, ``classes``) for matching file lists."""
    with tempfile.TemporaryDirectory(prefix="instsynth_cs_eval_") as tmp:
        script, args = _script_args(pred_dir, gt_files, Path(tmp))
        out = io.StringIO()
        try:
            with contextlib.chdir(tmp), contextlib.redirect_stdout(out), warnings.catch_warnings(), \
                    _script_compat(script):
                warnings.simplefilter("ignore", RuntimeWarning)  # NaN means of classes without ground truth
                result = script.evaluateImgLists([str(p.resolve()) for p in txt_files],
                                                 [str(p.resolve()) for p in gt_files], args)
        except SystemExit:  # cityscapesscripts' printError
            raise InstSynthError(pred_dir, "cityscapesscripts evaluation failed: " + out.getvalue().strip()[-500:]) from None
    return result["averages"]


def evaluate_cityscapes(predictions: list[dict], dataset_dicts: list[dict], output_dir: str | os.PathLike,
                        contiguous_to_label_id: dict[int, int]) -> dict:
    """Official Cityscapes instance AP of ``predictions`` on the images of ``dataset_dicts`` (Detectron2
    dicts whose ``file_name`` is a ``leftImg8bit`` image of a Cityscapes tree).

    Returns ``{"AP", "AP50", "AP-<class>", "AP50-<class>", ...}`` in percent (None for a class without
    ground truth) and writes it to ``output_dir/cityscapes_instance_results.json``."""
    output_dir = Path(output_dir)
    if not dataset_dicts:
        raise InstSynthError(output_dir, "no images to evaluate")
    gt_files = [ground_truth_path(d["file_name"]) for d in dataset_dicts]
    pred_dir = output_dir / PREDICTION_FOLDER
    grouped = group_predictions(predictions, contiguous_to_label_id)
    txt_files = write_prediction_files(grouped, dataset_dicts, pred_dir)
    averages = run_official_evaluation(txt_files, gt_files, pred_dir)
    metrics = {"AP": _number(averages["allAp"]), "AP50": _number(averages["allAp50%"])}
    for name, values in averages["classes"].items():
        metrics[f"AP-{name}"] = _number(values["ap"])
    for name, values in averages["classes"].items():
        metrics[f"AP50-{name}"] = _number(values["ap50%"])
    write_json(output_dir / RESULTS_FILE, {**metrics, "num_images": len(dataset_dicts),
                                           "num_predictions": sum(len(v) for v in grouped.values())})
    return metrics
