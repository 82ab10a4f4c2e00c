#!/usr/bin/env python
"""Export a Panoptic SegFormer config + weights to ONNX.

    python -m projects.deploy.export --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \\
        --output model.onnx [--image-size 800x1088] MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

The graph goes from the normalised, padded image (1, 3, H, W) and its unpadded size (1, 2) to the
per-query predictions the post-processors take (:mod:`panoptic_segformer.deploy`), with H and W symbolic;
``--image-size`` is only the example input the export traces. The export runs on the CPU, with the
pure-PyTorch deformable attention (``MODEL.PANOPTIC_SEGFORMER.MSDA_IMPL 'triton'`` is an error). Run the
result with ``OnnxPredictor(cfg, "model.onnx")`` or ``python -m projects.demo.demo --backend onnx``.
MODEL.WEIGHTS is loaded by ``PanopticSegFormerCheckpointer``; empty, the model is exported at random
initialisation (with a warning).
"""
import argparse
import logging
import re
import sys
import time

from detectron2.modeling import build_model

from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.deploy import export_onnx

__all__ = ["get_parser", "parse_image_size", "main"]

logger = logging.getLogger("panoptic_segformer_export")


def parse_image_size(text: str):
    """"HxW" -> (H, W) positive ints; argparse error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or min(int(m.group(1)), int(m.group(2))) < 32:
        raise argparse.ArgumentTypeError(f"--image-size must be HxW with H, W >= 32 (e.g. 800x1088), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def get_parser():
    parser = argparse.ArgumentParser(description="Export Panoptic SegFormer to ONNX (onnxruntime)")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", default="model.onnx", metavar="FILE", help="the ONNX file to write")
    parser.add_argument("--image-size", type=parse_image_size, default=(512, 512), metavar="HxW",
                        help="size of the example input the export traces (the graph takes any size)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if cfg.MODEL.DEVICE != "cpu":
        logger.info("exporting on the CPU (MODEL.DEVICE %r ignored)", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        PanopticSegFormerCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting the randomly initialised model")
    start = time.perf_counter()
    outputs = export_onnx(model, args.output, args.image_size)
    logger.info("wrote %s (outputs %s) in %.1f s", args.output, ", ".join(outputs), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
