"""Checkpoint converters: release checkpoints -> Detectron2 checkpoints for ``MODEL.WEIGHTS``."""
