"""Datasets for training: COCO-format Cityscapes annotations as Detectron2-style dataset dicts."""
from .coco import load_coco_categories, load_coco_json

__all__ = ["load_coco_categories", "load_coco_json"]
