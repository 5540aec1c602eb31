"""Checks of a COCO / LVIS file's numbers before pycocotools or OpenCV sees them (issues 19, 21).

pycocotools can crash the process on NaN, infinite or far-away polygon coordinates and on RLE whose
run lengths disagree with its image, so every segmentation and bbox is checked first, with numpy and
not a Python loop per coordinate: polygons (:func:`polygon_problems`, all polygons of a file in one
array), RLE (:func:`rle_problem`: size, non-negative run lengths summing to height x width, compressed
counts decodable by :func:`compressed_runs`) and bboxes (:func:`bbox_problem`). Each problem is one line.
"""
from __future__ import annotations

from itertools import chain
from typing import Any, Iterable, Sequence

import numpy as np

FAR = 1.0
"""A polygon coordinate more than ``FAR`` image sizes outside its image is refused (exported files
overshoot by a pixel or two; pycocotools rasterises the polygon's whole extent)."""
NOT_NUMBERS = "polygon must be a flat list of x, y numbers"
MAX_RUN_DIGITS = 12
"""Characters of one compressed RLE value (5 bits each): 60 bits, far above any image's pixel count."""


def numbers(values: Iterable, count: int = -1) -> np.ndarray | None:
    """float64 array of JSON numbers (numeric strings read as pycocotools reads them); None when one is
    not a number or is nested."""
    try:
        return np.fromiter(values, np.float64, count)
    except (ValueError, TypeError, OverflowError):
        return None


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
    per_ann = np.fromiter((sum(map(len, segs[i])) // 2 for i in ok), np.int64, len(ok))
    coords = numbers(chain.from_iterable(chain.from_iterable(segs[i] for i in ok)), 2 * int(per_ann.sum()))
    if coords is None:  # some annotation holds a non-number: find it, check the others together
        for i in ok:
            if numbers(chain.from_iterable(segs[i])) is None:
                problems[i] = NOT_NUMBERS
        ok = [i for i in ok if problems[i] is None]
        per_ann = np.fromiter((sum(map(len, segs[i])) // 2 for i in ok), np.int64, len(ok))
        coords = numbers(chain.from_iterable(chain.from_iterable(segs[i] for i in ok)), 2 * int(per_ann.sum()))
    if not ok:
        return problems
    points = coords.reshape(-1, 2)
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


def bbox_problem(box: Any, height: int, width: int, tolerance: float) -> str | None:
    """Problem of a bbox ``[x, y, w, h]``: not 4 finite numbers, no area, or more than ``tolerance``
    pixels outside its image; or None."""
    return bbox_problems([box], [(height, width)], tolerance)[0]


def bbox_problems(boxes: Sequence[Any], sizes: Sequence[tuple[int, int]], tolerance: float) -> list[str | None]:
    """:func:`bbox_problem` of each of ``boxes`` (image ``sizes[i]``: height, width), all in one array."""
    problems: list[str | None] = [None if type(b) is list and len(b) == 4 else f"bbox must be [x, y, w, h], got {b!r}"
                                  for b in boxes]
    ok = [i for i, p in enumerate(problems) if p is None]
    values = numbers(chain.from_iterable(boxes[i] for i in ok), 4 * len(ok))
    if values is None:  # a non-number somewhere: find it, check the others together
        for i in ok:
            if numbers(boxes[i]) is None:
                problems[i] = f"bbox must be [x, y, w, h], got {boxes[i]!r}"
        ok = [i for i in ok if problems[i] is None]
        values = numbers(chain.from_iterable(boxes[i] for i in ok), 4 * len(ok))
    if not ok:
        return problems
    xywh = values.reshape(-1, 4)
    hw = np.array([sizes[i] for i in ok], np.float64)
    x, y, w, h = xywh.T
    finite = np.isfinite(xywh).all(1)
    area = (w > 0) & (h > 0)
    inside = (x >= -tolerance) & (y >= -tolerance) & (x + w <= hw[:, 1] + tolerance) & (y + h <= hw[:, 0] + tolerance)
    for j in np.flatnonzero(~(finite & area & inside)):
        i = ok[j]
        box = boxes[i]
        problems[i] = (f"bbox {box} has a NaN or infinite number" if not finite[j] else f"bbox {box} has no area"
                       if not area[j] else f"bbox {box} lies outside its {sizes[i][1]}x{sizes[i][0]} image")
    return problems
