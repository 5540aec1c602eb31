"""Load the COCO JSON written by :mod:`instsynth.coco` into Detectron2-style dataset dicts."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from instsynth.core.io import InstSynthError, read_json

BBOX_MODE_XYWH_ABS = "XYWH_ABS"


def _load(json_path: str | Path) -> dict:
    json_path = Path(json_path)
    data = read_json(json_path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise InstSynthError(json_path, "not a COCO instances file (needs lists 'images', 'annotations', 'categories')")
    return data


def load_coco_categories(json_path: str | Path) -> list[dict]:
    """The file's categories ``[{"id": Cityscapes label id, "name": class name, ...}]``, sorted by id."""
    return sorted(_load(json_path)["categories"], key=lambda c: c["id"])


def load_coco_json(json_path: str | Path, image_root: str | Path) -> list[dict]:
    """Detectron2-style dataset dicts of a COCO instances file, one per image (images without
    annotations included), in the file's image order.

    Each dict: ``{file_name (absolute, image_root / file_name), height, width, image_id,
    annotations: [{bbox [x, y, w, h], bbox_mode "XYWH_ABS", category_id (Cityscapes label id),
    segmentation (polygon list or RLE dict), iscrowd, area}]}``. ``image_root`` is the folder the
    file names are relative to (``DIR/leftImg8bit/<split>``). A malformed file raises InstSynthError.
    """
    json_path, image_root = Path(json_path), Path(image_root).resolve()
    data = _load(json_path)
    known = {c["id"] for c in data["categories"]}
    per_image = defaultdict(list)
    for ann in data["annotations"]:
        try:
            if ann["category_id"] not in known:
                raise InstSynthError(json_path, f"annotation {ann['id']} has unknown category {ann['category_id']}")
            per_image[ann["image_id"]].append({
                "bbox": [float(v) for v in ann["bbox"]], "bbox_mode": BBOX_MODE_XYWH_ABS,
                "category_id": int(ann["category_id"]), "segmentation": ann["segmentation"],
                "iscrowd": int(ann.get("iscrowd", 0)), "area": float(ann["area"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise InstSynthError(json_path, f"malformed annotation {ann!r:.200}: {exc!r}") from None
    dataset = []
    for img in data["images"]:
        try:
            dataset.append({"file_name": str(image_root / img["file_name"]), "height": int(img["height"]),
                            "width": int(img["width"]), "image_id": img["id"],
                            "annotations": per_image.pop(img["id"], [])})
        except (KeyError, TypeError, ValueError) as exc:
            raise InstSynthError(json_path, f"malformed image entry {img!r:.200}: {exc!r}") from None
    if per_image:
        raise InstSynthError(json_path, f"annotations refer to unknown image ids {sorted(per_image)[:5]}")
    return dataset
