"""Metrics of trained models: COCO AP (pycocotools) and Cityscapes AP (cityscapesscripts)."""
