"""Pipeline stages: selection budgets, label crops, assembly, the Cityscapes -> COCO conversion, the demo dataset."""
