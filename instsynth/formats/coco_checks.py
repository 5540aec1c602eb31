"""Checks of a COCO / LVIS file's numbers before pycocotools or OpenCV sees them (issues 19, 21).

pycocotools can crash the process on NaN, infinite or far-away polygon coordinates and on RLE whose
run lengths disagree with its image, so every segmentation and bbox is checked first, with numpy and
not a Python loop per coordinate: polygons (:func:`polygon_problems`, all polygons of a file in one
array), RLE (:func:`rle_problem`: size, non-negative run lengths summing to height x width, compressed
counts decodable by :func:`compressed_runs`) and bboxes (:func:`bbox_problem`). Each problem is one line.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Any, Sequence

import numpy as np

FAR = 1.0
"""A polygon coordinate more than ``FAR`` image sizes outside its image is refused (exported files
overshoot by a pixel or two; pycocotools rasterises the polygon's whole extent)."""
NOT_NUMBERS = "polygon must be a flat list of x, y numbers"
MAX_RUN_DIGITS = 12
"""Characters of one compressed RLE value (5 bits each): 60 bits, far above any image's pixel count."""


def numbers(values: list) -> np.ndarray | None:
    """float64 array of a flat list of JSON numbers; None when one is not a number (or is nested)."""
    try:
        array = np.array(values)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        return None
    if array.ndim != 1 or array.dtype.kind not in "biuf":
        return None
    return array.astype(np.float64, copy=False)


def _structure_problem(seg: list) -> str | None:
    """Problem of a polygon list's shape (list of even-length lists of >= 6 values), or None."""
    if not seg:
        return "empty segmentation"
    for poly in seg:
        if type(poly) is not list or len(poly) % 2:
            return NOT_NUMBERS
        if len(poly) < 6:
            return f"polygon with {len(poly) // 2} points (needs at least 3)"
    return None


def polygon_problems(segs: Sequence[list], sizes: Sequence[tuple[int, int]]) -> list[str | None]:
    """Problem of each polygon segmentation ``segs[i]`` (a list of polygons) of an image of ``sizes[i]``
    (height, width), or None; every coordinate of all of them is checked in one array."""
    problems = [_structure_problem(seg) for seg in segs]
    ok = [i for i, p in enumerate(problems) if p is None]
    coords = numbers(list(chain.from_iterable(chain.from_iterable(segs[i] for i in ok))))
    if coords is None:  # some annotation holds a non-number: find it, check the others together
        for i in ok:
            if numbers(list(chain.from_iterable(segs[i]))) is None:
                problems[i] = NOT_NUMBERS
        ok = [i for i in ok if problems[i] is None]
        coords = numbers(list(chain.from_iterable(chain.from_iterable(segs[i] for i in ok))))
    if not ok:
        return problems
    points = coords.reshape(-1, 2)
    per_ann = np.fromiter((sum(map(len, segs[i])) // 2 for i in ok), np.int64, len(ok))
    starts = np.concatenate(([0], np.cumsum(per_ann)[:-1]))
    lo = np.minimum.reduceat(points, starts, axis=0)  # NaN propagates, and fails every comparison below
    hi = np.maximum.reduceat(points, starts, axis=0)
    wh = np.array([(sizes[i][1], sizes[i][0]) for i in ok], np.float64)
    good = (lo >= -FAR * wh).all(1) & (hi <= (1 + FAR) * wh).all(1)
    for j in np.flatnonzero(~good):
        i = ok[j]
        height, width = sizes[i]
        finite = np.isfinite(lo[j]).all() and np.isfinite(hi[j]).all()
        problems[i] = (f"polygon coordinates far outside the {width}x{height} image (x {lo[j][0]:.6g}..{hi[j][0]:.6g},"
                       f" y {lo[j][1]:.6g}..{hi[j][1]:.6g})" if finite else "polygon has a NaN or infinite coordinate")
    return problems


def compressed_runs(counts: str, pixels: int) -> np.ndarray | None:
    """Run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``, decoded with numpy);
    None when it is not one: a character outside ``0``..``o``, a value cut off or too long, a value
    larger than ``pixels`` (no RLE of an image that size has one)."""
    try:
        code = np.frombuffer(counts.encode("ascii"), np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    if code.size == 0 or ((code < 0) | (code >= 64)).any() or code[-1] & 0x20:
        return None
    ends = np.flatnonzero((code & 0x20) == 0)  # the last character of each value
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_RUN_DIGITS or len(ends) > pixels + 1:
        return None
    position = np.arange(code.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((code & 0x1F) << (5 * position), starts)
    negative = (code[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    if np.abs(values).max() > pixels:
        return None
    runs = values.copy()  # each value from the third on is a difference to the run two before it
    runs[2::2] = np.cumsum(values[2::2])
    runs[1::2] = np.cumsum(values[1::2])
    return runs


def rle_problem(seg: dict, height: int, width: int) -> str | None:
    """Problem of an RLE segmentation ``{size, counts}`` of a ``height`` x ``width`` image, or None."""
    size, counts = seg.get("size"), seg.get("counts")
    if not (type(size) is list and len(size) == 2 and all(type(v) is int for v in size)):
        return f"RLE size must be [height, width], got {size!r}"
    if size != [height, width]:
        return f"RLE size {size} differs from its image's [height, width] [{height}, {width}]"
    pixels = height * width
    if isinstance(counts, str):
        runs = compressed_runs(counts, pixels)
        if runs is None:
            return "RLE counts are not a valid compressed string"
    elif isinstance(counts, list):
        runs = np.array(counts) if counts else np.zeros(0, np.int64)
        if runs.ndim != 1 or runs.dtype.kind not in "iu":
            return "RLE counts must be a list of integers or a compressed string"
    else:
        return "RLE counts must be a list of integers or a compressed string"
    if runs.size == 0 or runs.min() < 0 or runs.max() > pixels or runs.size > pixels + 1 or runs.sum() != pixels:
        total = int(runs.sum()) if runs.size and runs.max() <= pixels else "too large"
        return f"RLE run lengths do not cover the {width}x{height} image (sum {total}, negative runs?)"
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bbox_problem(box: Any, height: int, width: int, tolerance: float) -> str | None:
    """Problem of a bbox ``[x, y, w, h]``: not 4 finite numbers, no area, or more than ``tolerance``
    pixels outside its image; or None."""
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return f"bbox must be [x, y, w, h], got {box!r}"
    if not all(_finite(v) for v in box):
        return f"bbox {box} has a NaN or infinite number"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"bbox {box} has no area"
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        return f"bbox {box} lies outside its {width}x{height} image"
    return None
