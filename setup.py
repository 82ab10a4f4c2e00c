#!/usr/bin/env python
"""Panoptic SegFormer for Detectron2. Install with `make setup` (which also installs Detectron2)
or, in an environment that already has torch and Detectron2, `pip install -e .`."""
from setuptools import find_packages, setup

setup(
    name="panoptic_segformer",
    version="0.1.0",
    description="Panoptic SegFormer (CVPR'22) for Detectron2",
    packages=find_packages(include=("panoptic_segformer", "panoptic_segformer.*")),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "pycocotools",
        "fvcore",
        "timm",
        "tqdm",
        "matplotlib",
    ],
)
