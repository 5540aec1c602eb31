"""Built-in demo dataset: synthetic street scenes in the Cityscapes format.

``python -m instsynth.demo OUT [--cities N] [--images-per-city M] [--size 2048x1024] [--seed S]
[--domain-shift] [--layout street|simple]``

Each scene is a list of polygons in drawing order (back to front), exactly like a Cityscapes
``_gtFine_polygons.json``. The label PNGs are rasterised from that file with ``cityscapesscripts``
(so they are consistent by construction) and the RGB image is painted with matching textures.
Scenes contain cars, trucks, buses, persons, riders on bicycles and motorcycles, occlusions, a car
split in two by a pole, a bus with a hole (a person in front of it), group regions, objects cut by
the image border, tiny objects and, in the first city of each split, one image with no instances.
``--layout simple`` draws instead two or three large cars, buses and persons side by side (a scene
a small model learns from quickly; the CPU experiment's dataset).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image, ImageDraw

from instsynth.core.io import CityscapesImage, progress, write_json, write_png

CITY_NAMES = ("ashford", "bellmont", "corvallis", "dunmore", "eastwick", "fairhaven", "glenrock", "halden")
SPLITS = ("train", "val")

# Base RGB colours used to paint each class (labels use the official Cityscapes colours).
_PAINT = {
    "car": [(150, 20, 25), (30, 60, 140), (200, 200, 205), (35, 35, 40), (90, 110, 60)],
    "truck": [(220, 160, 20), (60, 70, 90), (180, 180, 170)],
    "bus": [(230, 200, 40), (40, 120, 170), (200, 60, 40)],
    "person": [(70, 50, 120), (40, 90, 60), (160, 40, 40), (50, 50, 60)],
    "rider": [(200, 90, 20), (30, 30, 30), (60, 90, 160)],
    "bicycle": [(20, 20, 20), (120, 20, 20)],
    "motorcycle": [(25, 25, 30), (160, 30, 30)],
}

# Domain shift (``--domain-shift``): train objects wear colours that no prompt of configs/prompts.yaml asks
# for (blue, yellow, purple, brown, orange, teal), val objects wear the prompts' colours (red, white, black,
# green). Regenerating train instances from the prompts covers val's colours; repeating train images cannot.
SHIFT_PAINT = {
    "train": {
        "car": [(30, 60, 140), (210, 180, 30), (90, 40, 120)],
        "truck": [(30, 60, 140), (210, 180, 30)],
        "bus": [(30, 60, 140), (90, 40, 120)],
        "person": [(30, 60, 140), (210, 180, 30), (110, 70, 40)],
        "rider": [(30, 60, 140), (200, 110, 20)],
        "bicycle": [(30, 60, 140), (200, 110, 20)],
        "motorcycle": [(30, 60, 140), (20, 120, 120)],
    },
    "val": {
        "car": [(160, 20, 25), (215, 215, 220)],
        "truck": [(160, 20, 25), (40, 130, 50)],
        "bus": [(160, 20, 25), (40, 130, 50)],
        "person": [(160, 20, 25), (40, 130, 50), (215, 215, 220)],
        "rider": [(160, 20, 25), (20, 20, 20)],
        "bicycle": [(215, 215, 220), (20, 20, 20)],
        "motorcycle": [(215, 215, 220), (20, 20, 20)],
    },
}


@dataclass
class Scene:
    """A scene under construction: objects (label, integer polygon) in drawing order."""

    width: int
    height: int
    rng: np.random.Generator
    objects: list[dict] = field(default_factory=list)

    def add(self, label: str, points) -> None:
        pts = np.round(np.asarray(points, float)).astype(int)
        pts[:, 0] = pts[:, 0].clip(0, self.width - 1)
        pts[:, 1] = pts[:, 1].clip(0, self.height - 1)
        keep = np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]  # drop repeated vertices
        pts = pts[keep]
        if len(pts) >= 3 and len({tuple(p) for p in pts}) >= 3:
            self.objects.append({"label": label, "polygon": pts.tolist()})

    def to_json(self) -> dict:
        return {"imgHeight": self.height, "imgWidth": self.width, "objects": self.objects}


# --------------------------------------------------------------------------- shapes
def _box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx, cy, rx, ry, n=16):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _car(x, yb, w, h):
    return [(x, yb), (x, yb - .5 * h), (x + .18 * w, yb - .58 * h), (x + .3 * w, yb - h), (x + .72 * w, yb - h),
            (x + .85 * w, yb - .58 * h), (x + w, yb - .5 * h), (x + w, yb)]


def _truck(x, yb, w, h):
    return [(x, yb), (x, yb - .6 * h), (x + .08 * w, yb - .75 * h), (x + .25 * w, yb - .75 * h),
            (x + .25 * w, yb - h), (x + w, yb - h), (x + w, yb)]


def _bus(x, yb, w, h):
    r = .06 * h
    return [(x, yb), (x, yb - h + r), (x + r, yb - h), (x + w - r, yb - h), (x + w, yb - h + r), (x + w, yb)]


def _person(cx, yb, h):
    w = .32 * h
    head = _ellipse(cx, yb - .91 * h, .09 * h, .09 * h, 10)[[3, 4, 5, 6, 7, 8, 9, 0, 1, 2]]  # start at bottom
    body = [(cx + .2 * w, yb - .82 * h), (cx + .5 * w, yb - .75 * h), (cx + .5 * w, yb - .42 * h),
            (cx + .3 * w, yb - .45 * h), (cx + .28 * w, yb), (cx + .05 * w, yb), (cx, yb - .45 * h),
            (cx - .05 * w, yb), (cx - .28 * w, yb), (cx - .3 * w, yb - .45 * h), (cx - .5 * w, yb - .42 * h),
            (cx - .5 * w, yb - .75 * h), (cx - .2 * w, yb - .82 * h)]
    return np.concatenate([np.asarray(body[:1]), head[::-1], np.asarray(body[1:])])


def _two_wheeler(x, yb, w, h):
    """Outline of a bicycle/motorcycle seen from the side: two wheels joined by a frame on top."""
    r = .35 * h

    def arc(cx, t0, t1, n=10):
        t = np.linspace(t0, t1, n)
        return np.stack([cx + r * np.cos(t), yb - r + r * np.sin(t)], 1)

    back = arc(x + r, 1.5 * np.pi, 0)          # top, left, bottom, right of the back wheel
    front = arc(x + w - r, np.pi, -.5 * np.pi)  # left, bottom, right, top of the front wheel
    frame = [(x + w - r, yb - h), (x + r, yb - .85 * h)]
    return np.concatenate([back, front, np.asarray(frame)])


# --------------------------------------------------------------------------- scene layout
LAYOUTS = ("street", "simple")
SIMPLE_CLASSES = ("car", "bus", "person")
"""Thing classes of the simple layout."""


def _background(scene: Scene) -> int:
    """Sky, skyline, tree, road and sidewalks; returns the horizon row."""
    W, H, rng = scene.width, scene.height, scene.rng
    horizon = int(H * rng.uniform(.38, .46))
    scene.add("sky", _box(0, 0, W - 1, horizon))
    x = 0
    while x < W:  # skyline
        bw = int(W * rng.uniform(.08, .2))
        scene.add("building", _box(x, horizon - int(H * rng.uniform(.12, .32)), x + bw, horizon + 2))
        x += bw
    tx = int(W * rng.uniform(.6, .9))
    scene.add("vegetation", _ellipse(tx, horizon - .05 * H, .07 * W, .09 * H))
    scene.add("road", _box(0, horizon, W - 1, H - 1))
    scene.add("sidewalk", [(0, horizon), (.12 * W, horizon), (0, .75 * H)])
    scene.add("sidewalk", [(W - 1, horizon), (.88 * W, horizon), (W - 1, .75 * H)])
    return horizon


def _simple_layout(scene: Scene, empty: bool) -> None:
    """Two or three large objects of :data:`SIMPLE_CLASSES`, one per equal slot of the width, barely overlapping."""
    W, H, rng = scene.width, scene.height, scene.rng
    _background(scene)
    if empty:
        return
    n = int(rng.integers(2, 4))
    slot = W / n
    for i in range(n):
        label = SIMPLE_CLASSES[int(rng.integers(len(SIMPLE_CLASSES)))]
        yb = rng.uniform(.8 * H, H - 2)
        if label == "person":
            h = rng.uniform(.5, .8) * H
            scene.add(label, _person((i + rng.uniform(.35, .65)) * slot, yb, h))
            continue
        w = min(slot * rng.uniform(.75, .95), (.45 if label == "car" else .6) * W)
        x = i * slot + rng.uniform(0, slot - w)
        scene.add(label, _car(x, yb, w, .45 * w) if label == "car" else _bus(x, yb, w, .5 * w))


def _layout(scene: Scene, index_in_city: int, empty: bool) -> None:
    W, H, rng = scene.width, scene.height, scene.rng
    horizon = _background(scene)
    if empty:
        scene.add("pole", _box(.5 * W, horizon - .25 * H, .5 * W + 8, H * .8))
        return

    def depth(yb):  # perspective scale of an object standing at yb
        return (yb - horizon) / (H - horizon)

    things = []  # (yb, draw) drawn far to near
    for _ in range(rng.integers(2, 4)):  # cars
        yb = rng.uniform(horizon + .2 * (H - horizon), H - 2)
        s = depth(yb)
        w = .33 * W * s
        things.append((yb, lambda x=rng.uniform(-.1 * W, W - .3 * w), yb=yb, w=w:
                       scene.add("car", _car(x, yb, w, .45 * w))))
    kind = ("truck", "bus")[index_in_city % 2]
    yb = horizon + .45 * (H - horizon)
    s = depth(yb)
    bx, bw = rng.uniform(.05 * W, .5 * W), .45 * W * s
    things.append((yb, lambda: scene.add(kind, (_truck if kind == "truck" else _bus)(bx, yb, bw, .5 * bw))))
    if kind == "bus":  # a person fully in front of the bus: the bus mask gets a hole
        things.append((yb + .1, lambda: scene.add("person", _person(bx + .5 * bw, yb - .06 * bw, .3 * bw))))
    for _ in range(rng.integers(2, 4)):  # pedestrians
        yb = rng.uniform(horizon + .1 * (H - horizon), H - 2)
        h = .5 * H * depth(yb)
        things.append((yb, lambda cx=rng.uniform(.02 * W, .98 * W), yb=yb, h=h:
                       scene.add("person", _person(cx, yb, h))))
    # a rider on a bicycle or motorcycle (rider drawn in front of the vehicle)
    yb = rng.uniform(horizon + .5 * (H - horizon), H - 2)
    s = depth(yb)
    veh = ("bicycle", "motorcycle")[int(rng.integers(0, 2))]
    w = (.14 if veh == "bicycle" else .18) * W * s
    vx = rng.uniform(0, W - w)
    things.append((yb, lambda: scene.add(veh, _two_wheeler(vx, yb, w, .6 * w))))
    things.append((yb + .1, lambda: scene.add("rider", _person(vx + .45 * w, yb - .3 * w, .9 * w))))
    # a car cut by the left image border and a tiny far-away person
    yb = H - 1 - .05 * H
    things.append((yb, lambda: scene.add("car", _car(-.12 * W, yb, .3 * W, .13 * W))))
    yb_tiny = horizon + 8
    things.append((yb_tiny, lambda: scene.add("person", _person(.4 * W, yb_tiny, 7))))
    # a group region: a crowd too far to tell apart
    yb_group = horizon + .06 * (H - horizon)
    gx = rng.uniform(.1 * W, .8 * W)
    things.append((yb_group, lambda: scene.add("persongroup", _box(gx, yb_group - .05 * H, gx + .06 * W, yb_group))))
    # a parked car split in two by a pole drawn in front of it
    yb_split = horizon + .3 * (H - horizon)
    sx, sw = rng.uniform(.55 * W, .7 * W), .33 * W * depth(yb_split)

    def split_car():
        scene.add("car", _car(sx, yb_split, sw, .45 * sw))
        px = sx + .5 * sw
        scene.add("pole", _box(px, horizon - .2 * H, px + max(3, .008 * W), H * .75))
    things.append((yb_split, split_car))
    for _, draw in sorted(things, key=lambda t: t[0]):
        draw()


# --------------------------------------------------------------------------- painting
def _texture(rng, h, w, base, amount=12.0):
    noise = rng.normal(0, amount, (h, w, 1)).astype(np.float32)
    return np.asarray(base, np.float32)[None, None] + noise


def _paint_object(img, rng, label, mask, box, paint):
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    if label == "sky":
        tex = np.array([70, 130, 200], np.float32) + ys * np.array([110, 80, 40], np.float32) + _texture(rng, h, w, 0, 2)
    elif label == "building":
        tex = _texture(rng, h, w, rng.integers(90, 170, 3), 8)
        step = max(6, w // 8)
        for wy in range(y0 % step + step // 2, h - step // 2, step):
            for wx in range(step // 3, w - step // 2, step):
                tex[wy:wy + step // 2, wx:wx + step // 2] = (40, 50, 70)
    elif label == "road":
        tex = _texture(rng, h, w, (85, 85, 90), 6)
        lane = slice(max(0, w // 2 - 4), w // 2 + 4)
        for sy in range(0, h, 40):
            tex[sy + 20: sy + 40, lane] = (230, 230, 230)
    elif label == "sidewalk":
        tex = _texture(rng, h, w, (170, 150, 150), 10)
    elif label == "vegetation":
        tex = _texture(rng, h, w, (50, 120, 40), 25)
    elif label in ("pole", "traffic sign"):
        tex = _texture(rng, h, w, (110, 110, 110), 4)
    else:
        base = paint.get(label.replace("group", ""), [(120, 120, 120)])
        tex = _texture(rng, h, w, base[int(rng.integers(len(base)))], 10)
        tex *= (1.15 - .35 * ys)  # top-lit shading
        if label in ("car", "truck", "bus"):
            tex[int(.12 * h):int(.4 * h), int(.1 * w):int(.9 * w)] = (60, 80, 100)  # windows
            r = max(2, int(.14 * h))
            for cx in (int(.2 * w), int(.8 * w)):
                yy, xx = np.ogrid[:h, :w]
                tex[(yy - (h - r)) ** 2 + (xx - cx) ** 2 < r * r] = (20, 20, 20)  # wheels
    region = img[y0:y1, x0:x1]
    region[mask] = tex[mask].clip(0, 255)


def _render_rgb(scene: Scene, rng: np.random.Generator, paint: dict) -> np.ndarray:
    img = np.zeros((scene.height, scene.width, 3), np.float32)
    for obj in scene.objects:
        pts = np.asarray(obj["polygon"])
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0) + 1
        canvas = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in (pts - (x0, y0)).tolist()], fill=1)
        _paint_object(img, rng, obj["label"], np.asarray(canvas, bool), (int(x0), int(y0), int(x1), int(y1)), paint)
    return img.round().astype(np.uint8)


# --------------------------------------------------------------------------- dataset
def make_scene(width: int, height: int, seed: int, index_in_city: int = 0, empty: bool = False,
               layout: str = "street") -> Scene:
    """Lay out one scene deterministically from ``seed`` (``layout``: one of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    scene = Scene(width, height, np.random.default_rng(seed))
    if layout == "simple":
        _simple_layout(scene, empty)
    else:
        _layout(scene, index_in_city, empty)
    return scene


def render_scene(scene: Scene, seed: int, paint: dict | None = None) -> dict[str, np.ndarray]:
    """Rasterise a scene: ``leftImg8bit`` (RGB), ``instanceIds`` (uint16), ``labelIds``, ``color``;
    ``paint`` maps thing classes to the RGB colours objects are painted in (default: the demo's)."""
    ann = Annotation()
    ann.fromJsonText(json.dumps(scene.to_json()))
    return {
        "leftImg8bit": _render_rgb(scene, np.random.default_rng([seed, 1]), paint or _PAINT),
        "instanceIds": np.asarray(createInstanceImage(ann, "ids"), np.int32).astype(np.uint16),
        "labelIds": np.asarray(createLabelImage(ann, "ids"), np.uint8),
        "color": np.asarray(createLabelImage(ann, "color"))[..., :3].copy(),
    }


def demo_images(root: Path, cities: int, images_per_city: int) -> list[tuple[CityscapesImage, int]]:
    """The (image, index-in-city) pairs of a demo tree; split s gets its own city names."""
    if not 1 <= cities <= len(CITY_NAMES) // len(SPLITS):
        raise ValueError(f"--cities must be between 1 and {len(CITY_NAMES) // len(SPLITS)}")
    out = []
    for s, split in enumerate(SPLITS):
        for c in range(cities):
            city = CITY_NAMES[s * cities + c]
            for i in range(images_per_city):
                image_id = f"{city}_{c:06d}_{19 + 20 * i:06d}"
                out.append((CityscapesImage(root, split, city, image_id), i))
    return out


def write_demo_dataset(out: str | Path, cities: int = 2, images_per_city: int = 3,
                       size: tuple[int, int] = (2048, 1024), seed: int = 0,
                       domain_shift: bool = False, layout: str = "street") -> list[CityscapesImage]:
    """Write a complete demo Cityscapes tree under ``out`` (train and val); return its images.

    Idempotent: an image whose four files already exist is not rewritten. The first city of each
    split has one image without instances (its last image, when it has two or more). ``domain_shift``
    paints each split's objects with its own colours (:data:`SHIFT_PAINT`); the layouts are unchanged.
    ``layout``: ``street`` (the default scenes) or ``simple`` (see :func:`_simple_layout`).
    """
    out, (width, height) = Path(out), size
    images = demo_images(out, cities, images_per_city)
    written = []
    for n, (img, i) in enumerate(progress(images, "demo scenes")):
        written.append(img)
        files = {"leftImg8bit": img.left, "instanceIds": img.gt("instanceIds"), "labelIds": img.gt("labelIds"),
                 "color": img.gt("color"), "polygons": img.gt("polygons")}
        if all(p.exists() for p in files.values()):
            continue
        empty = images_per_city >= 2 and i == images_per_city - 1 and img.city in (CITY_NAMES[0], CITY_NAMES[cities])
        image_seed = seed * 1_000_003 + n
        scene = make_scene(width, height, image_seed, i, empty, layout)
        paint = SHIFT_PAINT[img.split] if domain_shift else None
        for kind, array in render_scene(scene, image_seed, paint).items():
            write_png(files[kind], array)
        write_json(files["polygons"], scene.to_json(), indent=None)
    return written


COCO_FORMATS = ("cityscapes", "coco")


def export_coco(cityscapes_root: str | Path, out: str | Path, workers: int | None = 1) -> dict[str, Path]:
    """The demo tree at ``cityscapes_root`` as a plain COCO dataset under ``out``; returns ``{split: json}``.

    Writes ``out/images/<split>/<city>/<image_id>.png`` (hard links to the leftImg8bit PNGs) and
    ``out/annotations/instances_<split>.json`` (all ten thing classes, category id = Cityscapes label
    id; exact pixel-edge polygons, compressed RLE for instances with holes, ``iscrowd`` RLE for group
    regions), the tree's own stage-5 conversion with file names relative to ``out/images/<split>``.
    """
    from instsynth.stages.assemble import place_file
    from instsynth.stages.coco_conversion import convert_cityscapes_to_coco
    from instsynth.core.io import LEFT_SUFFIX, read_json

    root, out = Path(cityscapes_root), Path(out)
    converted = convert_cityscapes_to_coco(root, splits=SPLITS, include_ignored=True, workers=workers)
    written = {}
    for split, json_path in converted.items():
        coco = read_json(json_path)
        for img in coco["images"]:
            name = img["file_name"].removesuffix(LEFT_SUFFIX) + ".png"
            place_file(root / "leftImg8bit" / split / img["file_name"], out / "images" / split / name)
            img["file_name"] = name
        for ann in coco["annotations"]:
            ann.pop("instance_id", None)  # a Cityscapes detail a COCO file does not have
        coco["info"] = {"description": f"InstSynth demo dataset, split {split} (COCO export)", "version": "1.0"}
        written[split] = write_json(out / "annotations" / f"instances_{split}.json", coco, indent=None)
    return written


def write_demo_coco_dataset(out: str | Path, cities: int = 2, images_per_city: int = 3,
                            size: tuple[int, int] = (2048, 1024), seed: int = 0,
                            domain_shift: bool = False, layout: str = "street") -> dict[str, Path]:
    """The demo dataset in COCO format: the Cityscapes tree in ``out/cityscapes`` and its :func:`export_coco`."""
    write_demo_dataset(Path(out) / "cityscapes", cities, images_per_city, size, seed, domain_shift, layout)
    return export_coco(Path(out) / "cityscapes", out)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 2048x1024, got {text!r}") from None
    if w < 64 or h < 32:
        raise argparse.ArgumentTypeError("size must be at least 64x32")
    return w, h
