"""Backbones beyond Detectron2's ResNets: timm models (Swin, PVTv2) as Detectron2 ``Backbone``s (App. D).

Importing this package registers ``build_timm_backbone`` in Detectron2's ``BACKBONE_REGISTRY``.
"""
from .timm_backbone import RES_LEVELS, TimmBackbone, build_timm_backbone, load_timm_weights

__all__ = ["RES_LEVELS", "TimmBackbone", "build_timm_backbone", "load_timm_weights"]
