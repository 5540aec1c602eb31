"""Pictures of a run: instance sheets, COCO annotation overlays and class statistics.

- :func:`instance_sheets`: one PNG per page; a row per instance: source crop | mask | every sample
  with its prompt (and its quality score when the filter has run), all in cells of one size;
- :func:`coco_overlays`: COCO annotations over their images: translucent masks with outlines, boxes
  and class names in a colour per instance; crowd regions hatched and labelled "(crowd)";
- :func:`class_stats_chart`: grouped bar chart of instances per class in several COCO files
  (before and after synthesis), drawn with matplotlib's Agg backend.

Text is drawn with OpenCV's built-in Hershey font (no font files needed).
"""
from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from instsynth.core.io import InstSynthError, get_logger, progress, read_json, read_png, write_png
from instsynth.core.lock import holds_output
from instsynth.core.labels import class_name

log = get_logger("instsynth.viz")

FONT = cv2.FONT_HERSHEY_SIMPLEX
BACKGROUND = (245, 245, 245)
TEXT_COLOR = (20, 20, 20)
CELL_SIZE = 192
CAPTION_LINES = 3


# --------------------------------------------------------------------------- text and cells
def text_size(text: str, scale: float, thickness: int = 1) -> tuple[int, int]:
    """(width, height above baseline) of ``text`` in pixels."""
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thickness)
    return w, h


def wrap_text(text: str, width: int, scale: float, max_lines: int = CAPTION_LINES) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line is cut with '...' if text remains."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_size(lines[-1] + " " + word, scale)[0] <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    for i, line in enumerate(lines):  # a single over-long word: cut characters
        while text_size(line, scale)[0] > width and len(line) > 4:
            line = line[:-4] + "..."
        lines[i] = line
    return lines


def put_lines(image: np.ndarray, lines: Sequence[str], x: int, y: int, scale: float,
              color: tuple[int, int, int] = TEXT_COLOR, line_gap: int = 4) -> None:
    """Draw lines of text in place, the first line's top at ``y``."""
    height = text_size("Ag", scale)[1]
    for line in lines:
        y += height
        cv2.putText(image, line, (x, y), FONT, scale, color, 1, cv2.LINE_AA)
        y += line_gap + 2


def fit_in_cell(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """``image`` (gray or RGB) scaled to fit a ``size`` x ``size`` RGB cell, centred on the background."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    cell = np.full((size, size, 3), BACKGROUND, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    cell[y:y + nh, x:x + nw] = resized
    return cell


def captioned(image: np.ndarray, caption: str, size: int, scale: float, nearest: bool = False) -> np.ndarray:
    """A cell image with a caption block of :data:`CAPTION_LINES` lines below it."""
    line_h = text_size("Ag", scale)[1] + 6
    block = np.full((size + 8 + CAPTION_LINES * line_h, size, 3), BACKGROUND, np.uint8)
    block[:size] = fit_in_cell(image, size, nearest)
    cv2.rectangle(block, (0, 0), (size - 1, size - 1), (170, 170, 170), 1)
    put_lines(block, wrap_text(caption, size - 8, scale), 4, size + 4, scale)
    return block


def grid(cells: Sequence[Sequence[np.ndarray]], gap: int = 8) -> np.ndarray:
    """Rows of equal-size cells on the background (short rows padded with empty cells)."""
    cell_h, cell_w = cells[0][0].shape[:2]
    cols = max(len(row) for row in cells)
    out = np.full((gap + len(cells) * (cell_h + gap), gap + cols * (cell_w + gap), 3), BACKGROUND, np.uint8)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            y, x = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
            out[y:y + cell_h, x:x + cell_w] = cell
    return out


def title_bar(text: str, width: int, scale: float) -> np.ndarray:
    height = text_size("Ag", scale * 1.3)[1] + 16
    bar = np.full((height, width, 3), (60, 60, 60), np.uint8)
    cv2.putText(bar, text, (8, height - 8), FONT, scale * 1.3, (255, 255, 255), 1, cv2.LINE_AA)
    return bar


# --------------------------------------------------------------------------- instance sheets
def _sample_caption(entry: dict, index: int) -> str:
    caption = f"#{index} {entry['prompt']}"
    scores = entry.get("scores")
    if isinstance(scores, list) and index < len(scores) and isinstance(scores[index], dict):
        score = scores[index]
        parts = [f"CLIP {score['clip_prompt']:.3f}"] if isinstance(score.get("clip_prompt"), (int, float)) else []
        if isinstance(score.get("mask_iou"), (int, float)):  # the mask gate: IoU, and the class if it is wrong
            wrong = "" if score.get("mask_class_ok") else f" {score.get('mask_class') or 'none'}"
            parts.append(f"IoU {score['mask_iou']:.2f}{wrong}")
        if parts:
            caption += f" ({', '.join(parts)})"
    return caption


def instance_row(key: str, entry: dict, crop_rgb: np.ndarray, crop_mask: np.ndarray, size: int,
                 scale: float) -> list[np.ndarray]:
    """Cells of one instance: source crop, mask, then each sample captioned with its prompt."""
    row = [captioned(crop_rgb, f"{entry['class']} {key}", size, scale),
           captioned(crop_mask, f"mask ({int((crop_mask > 0).sum())} px)", size, scale, nearest=True)]
    for index, path in enumerate(entry["sample_paths"]):
        sample = read_png(path, rgb=True, dtype=np.uint8)
        row.append(captioned(sample, _sample_caption(entry, index), size, scale))
    return row


@holds_output(lambda args: (args["out"], []))
def instance_sheets(manifest: str | os.PathLike, out: str | os.PathLike, per_page: int = 8,
                    cell: int = CELL_SIZE, max_pages: int | None = None) -> list[Path]:
    """Write ``sheet_<page:03d>.png`` pages (``per_page`` instances each) of a generation run to ``out``."""
    from instsynth.core.manifests import load_manifest
    from instsynth.stages.metadata import load_metadata

    if per_page < 1 or cell < 32:
        raise ValueError(f"per_page must be >= 1 and cell >= 32, got {per_page}, {cell}")
    run = load_manifest(manifest)
    crops = {i["key"]: i for i in load_metadata(run["metadata"], check_files=False)["instances"]}
    keys = [k for k in run["instances"] if k in crops]
    missing = len(run["instances"]) - len(keys)
    if missing:
        log.warning("%d instances of the manifest are not in %s; left out of the sheets", missing, run["metadata"])
    pages = math.ceil(len(keys) / per_page)
    pages = min(pages, max_pages) if max_pages else pages
    scale = max(0.35, cell / 480)
    written = []
    for page in progress(range(pages), "instance sheets", pages):
        page_keys = keys[page * per_page:(page + 1) * per_page]
        rows = []
        for key in page_keys:
            inst = crops[key]
            rgb = read_png(inst["crop_rgb_path"], rgb=True, dtype=np.uint8)
            mask = read_png(inst["crop_mask_path"], dtype=np.uint8, shape=rgb.shape[:2])
            rows.append(instance_row(key, run["instances"][key], rgb, mask, cell, scale))
        body = grid(rows)
        first, last = page * per_page + 1, page * per_page + len(page_keys)
        title = (f"{run['mode_name']} ({run['backend']}): instances {first}-{last} of {len(keys)}"
                 f"   |  source | mask | samples")
        image = np.concatenate([title_bar(title, body.shape[1], scale), body])
        written.append(write_png(Path(out) / f"sheet_{page:03d}.png", image))
    return written


# --------------------------------------------------------------------------- COCO overlays
def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated RGB colours (golden-ratio hue steps)."""
    colors = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.12 + i * 0.618033988749895) % 1.0, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Bool (H, W) mask of a COCO segmentation: polygon list, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def hatch_pattern(height: int, width: int, period: int = 10) -> np.ndarray:
    """Bool (H, W) diagonal stripes, half of each ``period``."""
    yy, xx = np.mgrid[:height, :width]
    return ((xx + yy) % period) < period // 2


def draw_label(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    """A filled label box with ``text`` whose bottom-left corner is at (x, y), kept inside the image."""
    w, h = text_size(text, scale)
    x = int(np.clip(x, 0, max(0, image.shape[1] - w - 4)))
    y = int(np.clip(y, h + 4, image.shape[0]))
    cv2.rectangle(image, (x, y - h - 4), (x + w + 4, y), color, -1)
    light = sum(c * k for c, k in zip(color, (0.299, 0.587, 0.114))) > 150
    cv2.putText(image, text, (x + 2, y - 3), FONT, scale, (0, 0, 0) if light else (255, 255, 255), 1, cv2.LINE_AA)


def draw_annotations(image: np.ndarray, annotations: Sequence[dict], alpha: float = 0.45,
                     names: dict[int, str] | None = None) -> np.ndarray:
    """RGB image with the annotations drawn: masks, outlines, boxes, class names (``names``: the dataset's
    category names by id; default the Cityscapes label names); crowd hatched."""
    height, width = image.shape[:2]
    canvas = image.astype(np.float32)
    scale = float(np.clip(width / 1800, 0.4, 1.0))
    thickness = max(1, round(width / 1000))
    colors = instance_colors(len(annotations))
    stripes = hatch_pattern(height, width, period=max(8, width // 100))
    masks = [segmentation_mask(a["segmentation"], height, width) for a in annotations]
    for ann, mask, color in zip(annotations, masks, colors):  # fills first, so outlines stay on top
        fill = mask & stripes if ann.get("iscrowd") else mask
        canvas[fill] = (1 - alpha) * canvas[fill] + alpha * np.array(color, np.float32)
    out = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    for ann, mask, color in zip(annotations, masks, colors):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, thickness, cv2.LINE_AA)
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        if ann.get("iscrowd"):
            for x0 in range(x, x + w, 12 * thickness):  # dashed box for crowd regions
                cv2.line(out, (x0, y), (min(x0 + 6 * thickness, x + w), y), color, thickness)
                cv2.line(out, (x0, y + h - 1), (min(x0 + 6 * thickness, x + w), y + h - 1), color, thickness)
        else:
            cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), color, thickness)
    for ann, color in zip(annotations, colors):  # labels last, so no outline crosses them
        name = (names[ann["category_id"]] if names else class_name(ann["category_id"])) + (
            " (crowd)" if ann.get("iscrowd") else "")
        draw_label(out, name, int(round(ann["bbox"][0])), int(round(ann["bbox"][1])), color, scale)
    return out


def resolve_image_root(coco_json: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    """The folder COCO file names are relative to: ``image_root``, or its ``leftImg8bit/<split>`` (a Cityscapes
    root) or ``images/`` (a COCO output root) when it has one; when None, that folder of the dataset
    ``DIR`` of ``DIR/annotations/<file>.json`` (``instancesonly_filtered_gtFine_<split>.json`` or
    ``instances_<split>_instsynth.json``)."""
    coco_json = Path(coco_json).resolve()
    stem = coco_json.stem.removesuffix("_instsynth")
    split = stem.rsplit("_", 1)[-1]
    root = Path(image_root) if image_root is not None else coco_json.parent.parent
    if image_root is None or (root / "leftImg8bit" / split).is_dir() or (root / "images").is_dir():
        root = root / "leftImg8bit" / split if (root / "leftImg8bit" / split).is_dir() or not (root / "images").is_dir() \
            else root / "images"
    if not root.is_dir():
        raise InstSynthError(root, f"image folder of {coco_json.name} not found (pass --image-root: the folder its "
                                   f"file names are relative to)")
    return root


@holds_output(lambda args: (args["out"], [resolve_image_root(args["coco_json"], args["image_root"])]))
def coco_overlays(coco_json: str | os.PathLike, image_root: str | os.PathLike | None, out: str | os.PathLike,
                  max_images: int | None = 8, match: str | None = None) -> list[Path]:
    """Write ``<image stem>_overlay.png`` (``0.jpg`` -> ``0_overlay.png``) for up to ``max_images`` images of a COCO file (sorted by name).

    ``image_root`` as in :func:`resolve_image_root`; ``match`` keeps only images whose file name
    contains it (e.g. ``_syn`` for synthetic ones).
    """
    from instsynth.data.coco import load_coco_json

    root = resolve_image_root(coco_json, image_root)
    records = sorted(load_coco_json(coco_json, root), key=lambda r: r["file_name"])
    names = {c["id"]: c["name"] for c in read_json(coco_json)["categories"]}
    if match:
        records = [r for r in records if match in str(r["file_name"])]
    records = records[:max_images] if max_images else records
    if not records:
        raise InstSynthError(coco_json, "no images to draw" + (f" matching {match!r}" if match else ""))
    written = []
    for record in progress(records, "overlays", len(records)):
        image = read_png(record["file_name"], rgb=True)
        if image.shape[:2] != (record["height"], record["width"]):
            raise InstSynthError(record["file_name"], f"size {image.shape[1]}x{image.shape[0]} differs from the COCO "
                                                      f"record ({record['width']}x{record['height']}) in {coco_json}")
        drawn = draw_annotations(image, record["annotations"], names=names)
        name = Path(record["file_name"]).stem + "_overlay.png"
        written.append(write_png(Path(out) / name, drawn))
    return written


# --------------------------------------------------------------------------- class statistics
def coco_class_counts(coco_json: str | os.PathLike) -> dict:
    """``{"images": n, "instances": {class: n}, "crowd": {class: n}}`` of a COCO file (every category listed)."""
    data = read_json(coco_json)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InstSynthError(coco_json, "not a COCO instances file (needs images, annotations, categories lists)")
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = {"images": len(data["images"]), "instances": dict.fromkeys(names.values(), 0),
              "crowd": dict.fromkeys(names.values(), 0)}
    for ann in data["annotations"]:
        name = names.get(ann["category_id"])
        if name is None:
            raise InstSynthError(coco_json, f"annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        counts["crowd" if ann.get("iscrowd") else "instances"][name] += 1
    return counts


def class_stats_chart(coco_jsons: Sequence[str | os.PathLike], out: str | os.PathLike,
                      labels: Sequence[str] | None = None, title: str = "Instances per class") -> Path:
    """Grouped bar chart (PNG) of non-crowd instances per class in each COCO file, counts on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not coco_jsons:
        raise ValueError("need at least one COCO file")
    labels = list(labels) if labels else (["before", "after"] if len(coco_jsons) == 2 else [Path(p).stem for p in coco_jsons])
    if len(labels) != len(coco_jsons):
        raise ValueError(f"{len(labels)} labels for {len(coco_jsons)} COCO files")
    stats = [coco_class_counts(p) for p in coco_jsons]
    classes = list(dict.fromkeys(name for s in stats for name in s["instances"]))
    width = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(classes) + 2), 4.5), dpi=100)
    for n, (label, s) in enumerate(zip(labels, stats)):
        values = [s["instances"].get(c, 0) for c in classes]
        xs = np.arange(len(classes)) + (n - (len(stats) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=f"{label}: {sum(values)} instances, {s['images']} images")
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=20)
    ax.set_ylabel("instances (non-crowd)")
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    from instsynth.core.io import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
