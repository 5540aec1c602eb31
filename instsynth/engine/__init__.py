"""Training engine: trainer (accelerate), checkpoints, COCO evaluation, multi-process launch."""
