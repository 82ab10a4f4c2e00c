"""Panoptic SegFormer (CVPR'22) for Detectron2.

Importing the package registers the meta-architecture ``PanopticSegFormer`` in Detectron2's
``META_ARCH_REGISTRY`` and the datasets (COCO/ADE20K panoptic, ``coco_panoptic_sample``,
``shapes_panoptic_*``) in its catalog. ``register_panoptic_dataset`` registers your own dataset;
``PanopticSegFormerPredictor`` is Detectron2's ``DefaultPredictor`` for any image array layout;
``OnnxPredictor`` the same on an exported ONNX model run by onnxruntime (:mod:`.deploy`);
``Trainer`` (``panoptic_segformer.engine``) is the ``DefaultTrainer`` that ``train_net.py`` runs.
"""
from .config import add_panoptic_segformer_config
from . import data  # noqa: F401  (registers datasets)
from .data import PanopticSegFormerDatasetMapper
from .data.datasets import register_panoptic_dataset
from .engine import Trainer
from .modeling import backbone  # noqa: F401  (registers build_timm_backbone)
from .panoptic_segformer import PanopticSegFormer
from .predictor import PanopticSegFormerPredictor
from .deploy import OnnxPredictor

__all__ = [
    "add_panoptic_segformer_config",
    "PanopticSegFormerDatasetMapper",
    "PanopticSegFormer",
    "PanopticSegFormerPredictor",
    "OnnxPredictor",
    "register_panoptic_dataset",
    "Trainer",
]
