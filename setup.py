#!/usr/bin/env python
"""Panoptic SegFormer for Detectron2. Install with `make setup` (which also installs Detectron2)
or, in an environment that already has torch and Detectron2, `pip install -e .`."""
from setuptools import find_packages, setup

setup(
    name="panoptic_segformer",
    version="0.1.0",
    description="Panoptic SegFormer (CVPR'22) for Detectron2",
    packages=find_packages(include=("panoptic_segformer", "panoptic_segformer.*")),
    # The 2-image COCO panoptic sample (dataset ``coco_panoptic_sample``), so that an installed
    # package has it too.
    package_data={"panoptic_segformer.data": [
        "coco_panoptic_sample/*.json",
        "coco_panoptic_sample/*.md",
        "coco_panoptic_sample/*.txt",
        "coco_panoptic_sample/images/*.jpg",
        "coco_panoptic_sample/panoptic/*.png",
    ]},
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
