"""Stage 5's gtFine_polygons.json drawn back by cityscapesScripts' own json2instanceImg (issue 20 point 7):
one object per instance, and the drawing equals the instanceIds map pixel for pixel."""
import json
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

from instsynth.stages.coco_conversion import image_regions
from instsynth.stages.polygons import polygons_json


def redraw(content: dict) -> np.ndarray:
    """cityscapesScripts' instanceIds drawing of a polygons.json content."""
    annotation = Annotation()
    annotation.fromJsonText(json.dumps(content))
    return np.asarray(createInstanceImage(annotation, "ids"), np.int64)


def agreement(content: dict, ids: np.ndarray) -> dict:
    """How json2instanceImg's drawing of ``content`` compares with the map ``ids``: instances (values >= 1000)
    in each, and pixels that differ once each drawn id is read as the map id it overlaps most (json2instanceImg
    numbers a class's objects 0, 1, ... in file order; a crop's ids need not start at 0)."""
    drawn = redraw(content)
    mapping = {}
    for d in np.unique(drawn).tolist():
        values, counts = np.unique(ids[drawn == d], return_counts=True)
        mapping[d] = int(values[counts.argmax()])
    same_class = all(d // 1000 == v // 1000 if d >= 1000 else d == v for d, v in mapping.items())
    lut = np.vectorize(mapping.get)(drawn)
    return {"png": int((np.unique(ids) >= 1000).sum()), "drawn": int((np.unique(drawn) >= 1000).sum()),
            "differing": int((lut != ids).sum()), "one_to_one": len(set(mapping.values())) == len(mapping) and same_class}


def check_exact(ids: np.ndarray) -> dict:
    content, differing = polygons_json(ids, image_regions(ids, Path("x.png")))
    found = agreement(content, ids)
    things = [o for o in content["objects"] if o["label"] not in STUFF]
    assert len(things) == int((np.unique(ids) >= 24).sum())  # one object per instance and per group region
    assert found["one_to_one"] and found["png"] == found["drawn"] and found["differing"] == differing == 0, found
    return content


STUFF = {"unlabeled", "road", "sidewalk", "building", "pole", "vegetation", "sky", "terrain", "traffic sign"}


def scene(rng: np.random.Generator, h: int = 96, w: int = 160) -> np.ndarray:
    """A random instanceIds map: stuff blocks, then ellipses, rings and boxes of things (and group regions)
    painted over each other, cut by poles, speckled, and cropped (so instance ids need not start at 0)."""
    ids = np.zeros((h, w), np.uint16)
    for value in (7, 8, 11, 21, 23):
        x, y = rng.integers(0, w), rng.integers(0, h)
        ids[max(0, y - 30):y + 30, max(0, x - 40):x + 40] = value
    index: dict[int, int] = {}
    for _ in range(rng.integers(3, 12)):
        label = int(rng.choice([24, 25, 26, 27, 33]))
        mask = np.zeros((h, w), np.uint8)
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.ellipse(mask, centre, (int(rng.integers(2, 30)), int(rng.integers(2, 20))), float(rng.uniform(0, 180)),
                        0, 360, 1, -1)
        elif kind == 1:  # a ring: a hole showing what lies behind
            cv2.ellipse(mask, centre, (int(rng.integers(8, 30)), int(rng.integers(8, 20))), 0, 0, 360, 1,
                        int(rng.integers(1, 4)))
        else:
            cv2.rectangle(mask, centre, (centre[0] + int(rng.integers(1, 30)), centre[1] + int(rng.integers(1, 30))), 1, -1)
        if rng.random() < 0.2:
            value = label
        else:
            value, index[label] = label * 1000 + index.get(label, 0), index.get(label, 0) + 1
        ids[mask.astype(bool)] = value
    for _ in range(rng.integers(0, 4)):
        x = int(rng.integers(0, w))
        ids[:, x:x + int(rng.integers(1, 3))] = 17  # a pole splits what it crosses
    ys, xs = rng.integers(0, h, 20), rng.integers(0, w, 20)
    ids[ys, xs] = 20
    y0, x0 = rng.integers(0, h // 4), rng.integers(0, w // 4)
    return np.ascontiguousarray(ids[y0:, x0:])


def test_random_scenes_are_drawn_back_exactly():
    rng = np.random.default_rng(0)
    for _ in range(60):
        check_exact(scene(rng))


def test_split_instance_with_a_hole_is_one_object_drawn_in_depth_order():
    """A car split by a pole, with a window (a hole) showing a person, and a rider inside the window split
    by the car's bar: each is one polygon, and the rider, whose bridge crosses the bar, is drawn before the car
    (behind it, as it is)."""
    ids = np.full((40, 60), 7, np.uint16)
    ids[5:30, 5:55] = 26000
    ids[10:20, 15:40] = 11  # the window shows a building
    ids[12:18, 18:24] = 24000  # a person behind the window
    ids[12:18, 30:36] = 25000  # and a rider
    ids[10:20, 33] = 26000  # the window bar cuts the rider
    ids[:, 45:47] = 17  # a pole cuts the car
    content = check_exact(ids)
    labels = [o["label"] for o in content["objects"]]
    assert labels.count("car") == labels.count("person") == labels.count("rider") == 1
    assert labels.index("rider") < labels.index("car")
    assert np.array_equal(redraw(content), ids)  # ids from 0 per class: json2instanceImg gives the same values


def test_one_pixel_pieces_and_lines():
    ids = np.zeros((12, 12), np.uint16)
    ids[2, 2] = ids[9, 9] = 26003  # one instance of two single pixels
    ids[5, 1:11] = 24001  # a one-pixel-wide line
    ids[0:12, 6] = 33000  # crossing it
    check_exact(ids)
