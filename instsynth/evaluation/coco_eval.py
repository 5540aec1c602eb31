"""COCO mask AP (AP, AP50, AP75, APs/m/l and per-class AP) of instance predictions, with pycocotools."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instsynth.core.io import get_logger, write_json

log = get_logger("instsynth.eval")


def instances_to_coco(instances: dict, image_id, contiguous_to_label_id: dict[int, int]) -> list[dict]:
    """COCO result entries (RLE segmentation) of one image's predicted instances."""
    masks = instances["pred_masks"]
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    results = []
    for rle, cls, score in zip(rles, instances["pred_classes"].tolist(), instances["scores"].tolist()):
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": contiguous_to_label_id[int(cls)],
                        "segmentation": rle, "score": float(score)})
    return results


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def evaluate_coco(results: list[dict], json_file: str | Path, class_names: dict[int, str],
                  output_dir: str | Path | None = None) -> dict[str, float]:
    """Mask AP of ``results`` against a COCO file, in percent: ``AP``, ``AP50``, ``AP75``, ``APs``,
    ``APm``, ``APl`` and ``AP-<class>`` (None where the ground truth has no instance of that kind).
    Writes ``coco_instances_results.json`` to ``output_dir``."""
    if output_dir is not None:
        write_json(Path(output_dir) / "coco_instances_results.json", results, indent=None)
    with _quiet():
        gt = COCO(str(json_file))
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not results:
        log.warning("no predictions: every AP is 0")
        present = {a["category_id"] for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)}
        return {**{n: 0.0 for n in names},
                **{f"AP-{class_names[c]}": 0.0 if c in present else None for c in sorted(class_names)}}
    with _quiet():
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {n: float(v * 100) if v >= 0 else None for n, v in zip(names, ev.stats[:6])}
    precision = ev.eval["precision"]  # T, R, K, A, M
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics[f"AP-{class_names.get(cat_id, cat_id)}"] = float(p.mean() * 100) if p.size else None
    return metrics


def format_table(metrics: dict, title: str) -> str:
    """A two-column text table of metrics (numbers with two decimals, None as n/a)."""
    width = max(len(k) for k in metrics) if metrics else 6
    lines = [title, f"{'metric':<{width}} | value", f"{'-' * width}-|-------"]
    lines += [f"{k:<{width}} | " + (f"{v:6.2f}" if isinstance(v, (int, float)) else f"{'n/a':>6}")
              for k, v in metrics.items()]
    return "\n".join(lines)
