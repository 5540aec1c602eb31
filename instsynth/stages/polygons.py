"""Cityscapes ``_gtFine_polygons.json`` of an instanceIds map, drawn back exactly by cityscapesScripts.

cityscapesScripts' ``json2instanceImg`` fills each object's one polygon in file order with PIL, later
objects on top, and numbers the individual objects of a class in the order they appear; Detectron2's
``from_json`` loader makes one instance of every such object. So an individual instance (value >= 1000)
and a thing group region (24..33) is one object here, and the file is a drawing order:

1. stuff (values < 24): one object per 8-connected piece, larger outlines first (painter's order);
2. things, one object each: the outlines of its pieces and of their holes joined into one polygon by
   zero-width cuts (a hole is reached through the piece itself, a keyhole, so it stays unpainted) and
   bridges between pieces, routed through stuff pixels where possible (a minimum-cost path,
   :func:`bridges`). An object that paints another thing's pixels (a bridge over it) is drawn before
   that thing: this is the depth order (:func:`drawing_order`); among things free to go, lower ids
   first, so a class's objects keep the order of their instance ids where depth allows;
3. patches: the stuff pixels that the things' bridges covered, drawn again as stuff objects (hole-free
   pieces only, so a patch covers nothing else).

Polygons run through boundary pixel centres, as Cityscapes' own; PIL paints a polygon's outline
pixels too, so an outline polygon fills exactly its piece and the holes inside it. The result is drawn
(:func:`render`) and compared with the map: :func:`polygons_json` returns the pixels that still differ
(0 unless two things each cover the other, a depth cycle).
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw
from skimage.graph import MCP

from instsynth.core.labels import THING_LABEL_IDS, class_name, decode_instance_id

MIN_THING_VALUE = min(THING_LABEL_IDS)
"""Values below this are stuff (any number of objects); from it on, things (one object each)."""
FREE_COST, THING_COST = 1.0, 20.0
"""Cost of a bridge pixel over stuff and over another thing (which must then be drawn after it)."""
EARLIER_COST = 1e4
"""Cost of a bridge pixel over a thing drawn before it (a bridge that would have to be overwritten)."""
MARGIN = 8
"""Pixels around a thing's box that its bridges may use."""


def label_of(value: int) -> str:
    """Cityscapes label of a map value: ``car`` for 26000-26999, ``cargroup`` for 26, ``road`` for 7."""
    lab, index = decode_instance_id(value)
    name = class_name(lab)
    return name if index is not None or lab not in THING_LABEL_IDS else name + "group"


# --------------------------------------------------------------------------- outlines
def outlines(mask: np.ndarray, chain: int = cv2.CHAIN_APPROX_SIMPLE) -> list[np.ndarray]:
    """(N, 2) x, y boundary-centre outlines of a mask's 8-connected pieces (1-2 points closed to 3)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, chain)
    return [c[:, 0, :] if len(c) >= 3 else np.resize(c[:, 0, :], (3, 2)) for c in contours]


def has_holes(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] != -1).any())


def compress(points: list[tuple[int, int]]) -> list[list[int]]:
    """Drop the middle points of straight runs (equal steps) of a closed unit-step path."""
    pts = np.asarray(points, np.int64)
    if len(pts) < 4:
        return pts.tolist()
    before, after = pts - np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0) - pts
    keep = np.any(before != after, axis=1)
    kept = pts[keep] if keep.sum() >= 3 else pts
    return kept.tolist()


def hole_free_pieces(mask: np.ndarray) -> list[np.ndarray]:
    """Outlines of hole-free pieces that together are exactly ``mask``: a piece with holes is cut into its
    upper and lower rows, recursively."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    pieces = []
    for k in range(1, n):
        piece = labels == k
        rows = np.flatnonzero(piece.any(axis=1))
        if len(rows) > 1 and has_holes(piece):
            middle = (rows[0] + rows[-1] + 1) // 2
            pieces += hole_free_pieces(piece[:middle])
            pieces += [p + (0, middle) for p in hole_free_pieces(piece[middle:])]
        else:
            pieces += outlines(piece)
    return pieces


# --------------------------------------------------------------------------- one polygon per thing
def bridges(mask: np.ndarray, costs: np.ndarray) -> tuple[list[np.ndarray], list[tuple]]:
    """Every outline of a mask (its pieces' outer and hole boundaries, CHAIN_APPROX_NONE; the largest outer
    one first) and the bridges joining each other outline to the first.

    Each bridge ``(0, point on outline 0, outline b, point on b, [points between])`` is the cheapest 8-connected
    path from outline 0 to outline b (``costs``: per pixel, 0 on the mask, so a piece reaches its own holes
    through itself, a keyhole cut, and a bridge to a far piece runs through the nearer ones)."""
    found, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer = [int(hierarchy[0][i][3]) == -1 for i in range(len(found))]
    root = max(range(len(found)), key=lambda i: (outer[i], cv2.contourArea(found[i]), -i))
    contours = [found[root][:, 0, :]] + [c[:, 0, :] for i, c in enumerate(found) if i != root]
    if len(contours) == 1:
        return contours, []
    on_root = {(int(x), int(y)) for x, y in contours[0]}
    mcp = MCP(costs, fully_connected=True)
    cumulative, _ = mcp.find_costs([(y, x) for x, y in on_root])
    edges = []
    for b, contour in enumerate(contours[1:], start=1):
        x, y = contour[int(np.argmin(cumulative[contour[:, 1], contour[:, 0]]))]
        path = [(int(px), int(py)) for py, px in mcp.traceback((int(y), int(x)))]
        first = max(i for i, point in enumerate(path) if point in on_root)
        edges.append((0, path[first], b, path[-1], path[first + 1:-1]))
    return contours, edges


def tour(contours: list[np.ndarray], edges: list[tuple]) -> list[tuple[int, int]]:
    """One closed point path around every outline: the first, leaving it along each bridge and coming back."""
    children: dict[tuple[int, tuple], list[tuple]] = {}
    for a, pa, b, pb, between in edges:
        children.setdefault((a, pa), []).append((b, pb, between))

    def walk(piece: int, start: tuple[int, int]) -> list[tuple[int, int]]:
        points = [tuple(map(int, p)) for p in contours[piece]]
        k = points.index(start)
        ring, out = points[k:] + points[:k], []
        for p in ring + [start]:
            out.append(p)
            for child, pc, between in children.pop((piece, p), []):
                out += between + walk(child, pc) + between[::-1] + [p]
        return out

    points = walk(0, tuple(map(int, contours[0][0])))[:-1]
    return points if len(points) >= 3 else (points * 3)[:3]  # PIL and shapely need 3 points


def thing_polygon(ids: np.ndarray, value: int, box: tuple[slice, slice], earlier: frozenset = frozenset()
                  ) -> list[list[int]]:
    """The one polygon (image x, y) of a thing's pieces joined by bridges; bridges avoid the ``earlier``
    things (drawn before it, so it would cover them) where they can."""
    h, w = ids.shape
    y0, x0 = max(0, box[0].start - MARGIN), max(0, box[1].start - MARGIN)
    y1, x1 = min(h, box[0].stop + MARGIN), min(w, box[1].stop + MARGIN)
    local = ids[y0:y1, x0:x1]
    mask = local == value
    costs = np.where(mask, 0.0, np.where(local >= MIN_THING_VALUE, THING_COST, FREE_COST))
    if earlier:
        costs[np.isin(local, list(earlier))] = EARLIER_COST
    contours, edges = bridges(mask, costs)
    return (np.asarray(compress(tour(contours, edges))) + (x0, y0)).tolist()


# --------------------------------------------------------------------------- drawing order
def render(objects: list[tuple[int, list]], shape: tuple[int, int]) -> np.ndarray:
    """The map PIL draws from ``(value, polygon)`` objects in order (cityscapesScripts' drawing, own values)."""
    image = Image.new("I", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(image)
    for value, polygon in objects:
        draw.polygon([tuple(p) for p in polygon], fill=int(value))
    return np.asarray(image, np.int64)


def covered(polygon: list, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """(box, mask in the box) of the pixels a polygon paints."""
    pts = np.asarray(polygon)
    x0, y0 = pts.min(axis=0)
    x1, y1 = np.minimum(pts.max(axis=0) + 1, (shape[1], shape[0]))
    image = Image.new("1", (int(x1 - x0), int(y1 - y0)), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in (pts - (x0, y0)).tolist()], fill=1)
    return (slice(int(y0), int(y1)), slice(int(x0), int(x1))), np.asarray(image, bool)


def painted(ids: np.ndarray, polygons: dict[int, list]) -> dict[int, dict[int, int]]:
    """``{v: {u: pixels}}``: the pixels of each other thing u that thing v's polygon paints (u must follow v)."""
    after: dict[int, dict[int, int]] = {}
    for v, polygon in polygons.items():
        box, paint = covered(polygon, ids.shape)
        values, counts = np.unique(ids[box][paint], return_counts=True)
        after[v] = {u: n for u, n in zip(values.tolist(), counts.tolist()) if u != v and u in polygons}
    return after


def depth_order(after: dict[int, dict[int, int]]) -> list[int]:
    """Things in depth order: one that paints another's pixels comes first; ties by value, and in a cycle
    the thing whose waiting painters cover it least goes first."""
    waiting = {v: {u for u in after if v in after[u]} for v in after}  # v -> things to draw before v
    order: list[int] = []
    while waiting:
        ready = [v for v, before in waiting.items() if not before]
        v = min(ready) if ready else min(waiting, key=lambda t: (sum(after[u][t] for u in waiting[t]), t))
        order.append(v)
        del waiting[v]
        for before in waiting.values():
            before.discard(v)
    return order


def drawing_order(ids: np.ndarray, regions: dict[int, tuple]) -> list[tuple[int, list]]:
    """``(value, polygon)`` of every thing in depth order. A thing that paints one drawn before it (a cycle)
    has its bridges routed again around the things before it, and the order is found again (up to 3 times)."""
    polygons = {v: thing_polygon(ids, v, box) for v, box in regions.items() if v >= MIN_THING_VALUE}
    for _ in range(3):
        after = painted(ids, polygons)
        order = depth_order(after)
        rank = {v: n for n, v in enumerate(order)}
        late = [v for v in order if any(rank[u] < rank[v] for u in after[v])]
        if not late:
            break
        for v in late:
            polygons[v] = thing_polygon(ids, v, regions[v], frozenset(order[:rank[v]]))
    else:
        order = depth_order(painted(ids, polygons))
    return [(v, polygons[v]) for v in order]


def polygons_json(instance_ids: np.ndarray, regions: dict[int, tuple]) -> tuple[dict, int]:
    """``(polygons.json content, pixels its drawing gets wrong)`` of an instanceIds map.

    ``regions`` maps each nonzero value present to its bounding slices (``coco.image_regions``)."""
    h, w = instance_ids.shape
    stuff = []
    for value, box in regions.items():
        if value < MIN_THING_VALUE:
            for poly in outlines(instance_ids[box] == value):
                area = cv2.contourArea(poly.reshape(-1, 1, 2).astype(np.int32))
                stuff.append((-area, value, (poly + (box[1].start, box[0].start)).tolist()))
    objects = [(value, poly) for _, value, poly in sorted(stuff, key=lambda o: (o[0], o[1]))]
    objects += drawing_order(instance_ids, regions)
    wrong = render(objects, (h, w)) != instance_ids
    for value in np.unique(instance_ids[wrong & (instance_ids < MIN_THING_VALUE)]).tolist():
        objects += [(value, p.tolist()) for p in hole_free_pieces(wrong & (instance_ids == value))]
    differing = int(np.count_nonzero(render(objects, (h, w)) != instance_ids))
    content = {"imgHeight": int(h), "imgWidth": int(w),
               "objects": [{"label": label_of(v), "polygon": p} for v, p in objects]}
    return content, differing
