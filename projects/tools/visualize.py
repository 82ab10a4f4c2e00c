#!/usr/bin/env python
"""Pictures of what a model outputs: panoptic predictions next to the ground truth, and the mask
decoder's attention maps of one segment (paper Sec. 3.3.3 and 3.5; Fig. 6 and Table 7).

    python -m projects.tools.visualize --config-file configs/shapes/panoptic_segformer_shapes.yaml \
        --dataset shapes_panoptic_val --num-images 3 --output-dir pictures/ MODEL.WEIGHTS model_final.pth

It writes two PNG files into ``--output-dir`` (their names start with ``--prefix``, so that
``--output-dir docs/ --prefix shapes_`` writes the README's ``docs/shapes_predictions.png`` and
``docs/shapes_attention.png``):

- ``predictions.png``: one row per validation image, columns input | ground truth | one column per
  ``--postprocessors`` name (default: ``mask_wise pixel_argmax``, the paper's mask-wise merging,
  Alg. 1, against DETR's pixel-wise argmax, Table 7). The network runs once per image and every
  post-processor gets the same per-query predictions (``compare_postprocessors.predict_with_postprocessors``);
  the post-processor named by ``TEST.POSTPROCESSOR`` is the model's own, the others use their
  constructors' defaults (their original papers' thresholds), unless ``--thresholds`` gives a column its
  arguments -- for a fair picture, the ones ``compare_postprocessors`` chose for this model on a held-out
  split (DETR's 0.85 was set for softmax classifiers and removes most things of a focal-loss model).
  Everything is drawn with Detectron2's ``Visualizer`` and the metadata of the dataset.
- ``attention.png``: the level-1 (stride 8) attention maps A of Eq. (1) for the highest-scoring thing
  segment (a stuff segment if the image has no thing) of the image ``--attention-image``: one row per
  mask-decoder layer, one column per head, over the image (the demo's ``--show-attention`` grid). These
  are the maps the mask decoder turns into the segment's mask (Eq. 2).

The images are the dataset's first ``--num-images`` (or ``--image-indices``), read as the demo reads
them and passed through the predictor's test resize.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from panoptic_segformer import PanopticSegFormerPredictor
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.data.io import read_image_rgb, read_panoptic_png
from panoptic_segformer.postprocessing import build_postprocessor, registered_postprocessors
from projects.benchmarks.compare_postprocessors import base_kwargs, predict_with_postprocessors
from projects.demo.demo import predict_with_attention, predictor_inputs, query_attention_maps, save_attention_grid

__all__ = ["get_parser", "parse_thresholds", "build_columns", "visualize_cfg", "ground_truth", "draw_panoptic_rgb", "prediction_rows",
           "save_prediction_grid", "save_segment_attention", "main"]

logger = logging.getLogger("panoptic_segformer_tools")

_TITLES = {"mask_wise": "mask-wise merging", "pixel_argmax": "pixel-wise argmax"}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None, help="registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=int, default=3, help="the dataset's first N images")
    parser.add_argument("--image-indices", type=int, nargs="+", default=None, metavar="I",
                        help="these dataset indices instead of the first --num-images")
    parser.add_argument("--postprocessors", nargs="+", default=["mask_wise", "pixel_argmax"], metavar="NAME",
                        help="one column per registered post-processor")
    parser.add_argument("--thresholds", action="append", default=[], metavar="NAME:ARG=V[,ARG=V]",
                        help="constructor arguments of a post-processor column (repeat per column), e.g. "
                             "pixel_argmax:threshold=0.4,area_threshold=64 (the values compare_postprocessors "
                             "chose for the model; default: the config's TEST.* keys for the model's own "
                             "post-processor, the constructor's defaults for the others)")
    parser.add_argument("--attention-image", type=int, default=0, metavar="K",
                        help="draw the attention maps of a segment of the K-th shown image (0-based)")
    parser.add_argument("--output-dir", required=True, help="folder for predictions.png and attention.png")
    parser.add_argument("--prefix", default="", help="start of both file names, e.g. shapes_")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model.pth")
    return parser


def parse_thresholds(items: Sequence[str], names: Sequence[str]) -> Dict[str, Dict]:
    """``["pixel_argmax:threshold=0.4,area_threshold=64", ...]`` -> {name: {argument: number}}; a
    SystemExit naming the item for a malformed one or a post-processor that is not drawn."""
    out = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or name not in names or not rest:
            raise SystemExit(f"--thresholds {item!r}: expected NAME:ARG=VALUE[,ARG=VALUE] with NAME one of "
                             f"--postprocessors {list(names)}")
        for pair in rest.split(","):
            arg, eq, value = pair.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = None
            if not eq or not arg or number is None:
                raise SystemExit(f"--thresholds {item!r}: {pair!r} is not ARG=NUMBER")
            out.setdefault(name, {})[arg] = int(number) if number.is_integer() and "." not in value else number
    return out


def build_columns(cfg, model, names: Sequence[str], thresholds: Dict[str, Dict]) -> Dict:
    """{name: post-processor} for the drawn columns: the model's own one (its config's TEST.* keys) unless
    ``thresholds`` names it, else ``build_postprocessor(name, **base + thresholds)``."""
    own_name = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR
    columns = {}
    for n in names:
        if n == own_name and n not in thresholds:
            columns[n] = model.postprocessor
            continue
        kwargs = {**base_kwargs(cfg, n), **thresholds.get(n, {})}
        try:
            columns[n] = build_postprocessor(n, **kwargs)
        except TypeError as e:
            raise SystemExit(f"--thresholds for {n}: {e}") from None
    return columns


def visualize_cfg(args):
    """Frozen config: ``--config-file`` + ``opts``, ``DATASETS.TEST = (--dataset,)``, panoptic output only."""
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if args.dataset:
        cfg.DATASETS.TEST = (args.dataset,)
    if not cfg.DATASETS.TEST:
        raise ValueError("no dataset: give --dataset or set DATASETS.TEST")
    t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = True, False, False  # only panoptic_seg is drawn
    cfg.freeze()
    return cfg


def ground_truth(record: Dict):
    """(segment-id map as an int64 tensor, segments_info) of a Detectron2 panoptic dataset record."""
    return torch.from_numpy(read_panoptic_png(record["pan_seg_file_name"])), record["segments_info"]


def draw_panoptic_rgb(rgb: np.ndarray, panoptic_seg: torch.Tensor, segments_info: List[Dict], metadata) -> np.ndarray:
    """(H, W, 3) uint8: ``panoptic_seg`` over ``rgb`` with Detectron2's Visualizer (ids absent from
    ``segments_info`` -- void -- are left undrawn)."""
    return Visualizer(rgb, metadata).draw_panoptic_seg(panoptic_seg.cpu(), segments_info).get_image()


def prediction_rows(predictor, records: Sequence[Dict], names: Sequence[str], metadata,
                    thresholds: Optional[Dict[str, Dict]] = None) -> List[List[np.ndarray]]:
    """Per record: [input, ground truth, one drawing per post-processor], all RGB at the image size;
    ``thresholds``: see :func:`build_columns`."""
    model = predictor.model
    postprocessors = build_columns(predictor.cfg, model, names, thresholds or {})
    rows = []
    for record in records:
        rgb = np.ascontiguousarray(read_image_rgb(record["file_name"], "RGB"))
        inputs = predictor_inputs(predictor, np.ascontiguousarray(rgb[:, :, ::-1]))
        results = predict_with_postprocessors(model, [inputs], postprocessors)
        row = [rgb, draw_panoptic_rgb(rgb, *ground_truth(record), metadata)]
        row += [draw_panoptic_rgb(rgb, *results[n][0]["panoptic_seg"], metadata) for n in names]
        rows.append(row)
    return rows


def save_prediction_grid(rows: List[List[np.ndarray]], titles: Sequence[str], path: str, panel_inches: float = 1.9):
    """Rows of images as one PNG with a title over each column."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = rows[0][0].shape[:2]
    fig = Figure(figsize=(panel_inches * len(titles), panel_inches * len(rows) * h / w + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            axes[i, j].imshow(image)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight(),
                        wspace=0.03, hspace=0.03)
    fig.savefig(path, dpi=100)
    quantize_png(path)


def quantize_png(path: str, colors: int = 256):
    """Rewrite the PNG at ``path`` with a palette of ``colors`` colours (median cut): textured pictures
    shrink about 3x, small enough to commit, with no visible change at this size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors)
    small.save(path, optimize=True)


def save_segment_attention(predictor, record: Dict, path: str, metadata) -> Dict:
    """Attention grid (layers x heads, level 1) of the best thing segment of ``record``'s image
    (the best stuff segment if it has none); returns that segment's info with its query."""
    bgr = np.ascontiguousarray(read_image_rgb(record["file_name"], "BGR"))
    run = predict_with_attention(predictor, bgr)
    _, segments = run["predictions"]["panoptic_seg"]
    if not segments:
        raise ValueError(f"{record['file_name']}: the model predicts no segment, so there is no attention "
                         "map to draw; choose another --attention-image or lower TEST.CONF_THRESHOLD_*")
    seg = max(segments, key=lambda s: (bool(s["isthing"]), s.get("score", 0.0)))
    query = run["segment_queries"][seg["id"]][0]
    names = metadata.get("thing_classes" if seg["isthing"] else "stuff_classes")
    rgb = run["inputs"]["image"].permute(1, 2, 0).numpy().astype(np.uint8)
    if predictor.input_format == "BGR":
        rgb = rgb[:, :, ::-1]
    save_attention_grid(query_attention_maps(run["outputs"], run["images"], query), path,
                        title=f"attention maps of the '{names[seg['category_id']]}' segment "
                              f"(score {seg.get('score', 0.0):.2f})", image_rgb=rgb)
    quantize_png(path)
    return dict(seg, query=query)


def main(argv=None) -> List[str]:
    """Parse ``argv``, write the pictures; returns their paths."""
    args = get_parser().parse_args(argv)
    unknown = [n for n in args.postprocessors if n not in registered_postprocessors()]
    if unknown:
        raise SystemExit(f"unknown post-processor(s) {unknown}; registered: {registered_postprocessors()}")
    thresholds = parse_thresholds(args.thresholds, args.postprocessors)
    cfg = visualize_cfg(args)
    dataset = cfg.DATASETS.TEST[0]
    records = DatasetCatalog.get(dataset)
    indices = args.image_indices if args.image_indices is not None else list(range(min(args.num_images, len(records))))
    bad = [i for i in indices if not 0 <= i < len(records)]
    if bad or not indices:
        raise SystemExit(f"--image-indices {bad or indices}: dataset {dataset!r} has {len(records)} images")
    if not 0 <= args.attention_image < len(indices):
        raise SystemExit(f"--attention-image {args.attention_image}: only {len(indices)} images are shown")
    metadata = MetadataCatalog.get(dataset)
    predictor = PanopticSegFormerPredictor(cfg)
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: drawing a randomly initialised model")
    os.makedirs(args.output_dir, exist_ok=True)
    shown = [records[i] for i in indices]
    build_columns(cfg, predictor.model, args.postprocessors, thresholds)  # bad arguments fail before drawing
    rows = prediction_rows(predictor, shown, args.postprocessors, metadata, thresholds)
    titles = ["input", "ground truth"] + [_TITLES.get(n, n) for n in args.postprocessors]
    paths = [os.path.join(args.output_dir, f"{args.prefix}{name}.png") for name in ("predictions", "attention")]
    save_prediction_grid(rows, titles, paths[0])
    seg = save_segment_attention(predictor, shown[args.attention_image], paths[1], metadata)
    logger.info("wrote %s and %s (segment %d, query %d)", paths[0], paths[1], seg["id"], seg["query"])
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    for p in main():
        print(p)
    sys.exit(0)
