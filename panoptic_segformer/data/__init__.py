"""Data: dataset registration (Detectron2 catalog) and the dataset mapper."""
from .dataset_mapper import PanopticSegFormerDatasetMapper
from .io import DatasetError, read_image_rgb, read_panoptic_png
from .datasets import register_all

register_all()
