"""FastInst (He et al., "FastInst: A Simple Query-Based Model for Real-Time Instance Segmentation",
CVPR 2023): ResNet + PPM-FPN pixel decoder + instance activation-guided queries + dual-path
transformer decoder with masked attention, trained with Hungarian matching and GT mask-guided learning.
"""
from .model import FastInst, build_fastinst

__all__ = ["FastInst", "build_fastinst"]
