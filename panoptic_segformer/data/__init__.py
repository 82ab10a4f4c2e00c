"""Data: dataset registration (Detectron2 catalog) and the dataset mapper."""
from .dataset_mapper import DatasetError, PanopticSegFormerDatasetMapper, read_image_rgb
from .datasets import register_all

register_all()
