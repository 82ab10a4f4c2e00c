#!/usr/bin/env python
"""Panoptic quality and speed of the post-processors on one model (paper Sec. 3.5, Table 7, Table B.2).

    python -m projects.benchmarks.compare_postprocessors \
        --config-file configs/coco/panoptic_segformer_R50_24ep.yaml --dataset coco_2017_val_panoptic \
        MODEL.WEIGHTS model_final.pth
    python -m projects.benchmarks.compare_postprocessors --config-file configs/shapes/panoptic_segformer_shapes.yaml \
        --dataset shapes_panoptic_val --postprocessors mask_wise pixel_argmax MODEL.WEIGHTS output/model_final.pth

The network runs ONCE per image (``model.forward_outputs``); the same per-query predictions then go
through each post-processor via the meta-architecture's own ``inference`` (same resizing, same
inputs as in training-time evaluation), and each post-processor's outputs feed its own
``COCOPanopticEvaluator``. The post-processor named by ``MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR``
is the model's own (with the config's thresholds); the others use their constructors' defaults
(the values of their original papers). Prints a Table-7-style markdown table: PQ, SQ, RQ, PQ^th,
PQ^st and the mean time of one merge call (ms per image, CUDA-synchronised on GPU). A tqdm bar on
stderr shows the progress over the images.
"""
import argparse
import logging
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import tqdm
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.modeling import build_model

from panoptic_segformer import PanopticSegFormerDatasetMapper
from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.postprocessing import build_postprocessor, registered_postprocessors

from .bench_utils import first_images_dataset

__all__ = ["TimedPostProcessor", "predict_with_postprocessors", "compare_postprocessors", "format_table",
           "load_model", "main"]

logger = logging.getLogger("panoptic_segformer_benchmarks")

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")


class TimedPostProcessor:
    """Wraps a post-processor (common signature) and records the wall time of each call in ms
    (synchronising CUDA before and after, so queued work is not attributed to another step)."""

    def __init__(self, postprocessor):
        self.postprocessor = postprocessor
        self.times_ms: List[float] = []

    def __getattr__(self, name):  # the wrapped post-processor's members (masks_to_image, ...)
        if "postprocessor" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["postprocessor"], name)

    def __call__(self, mask_probs, *args, **kwargs):
        cuda = mask_probs.is_cuda
        if cuda:
            torch.cuda.synchronize(mask_probs.device)
        start = time.perf_counter()
        out = self.postprocessor(mask_probs, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize(mask_probs.device)
        self.times_ms.append(1000.0 * (time.perf_counter() - start))
        return out


def predict_with_postprocessors(model, batched_inputs: List[Dict], postprocessors: Dict) -> Dict[str, List[Dict]]:
    """Detectron2 outputs of ``model`` on ``batched_inputs`` with each post-processor, from ONE
    forward pass: ``forward_outputs`` once, then the meta-architecture's own ``inference`` (same
    resizing to the original size, same per-query predictions) once per post-processor.

    Args:
        model: a PanopticSegFormer in eval mode.
        batched_inputs: Detectron2 model inputs ("image" (3, H, W), optional "height"/"width").
        postprocessors: {name: post-processor with the common signature}.

    Returns:
        {name: [per-image output dict with "panoptic_seg" (and "instances"/"sem_seg" if enabled)]}.
    """
    results = OrderedDict()
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        outputs = model.forward_outputs(images, num_mask_layers=model.test_mask_decoder_layers)
        for name, postprocessor in postprocessors.items():
            results[name] = model.inference(outputs, batched_inputs, images, postprocessor=postprocessor)
    return results


def compare_postprocessors(cfg, model, dataset_name: str, names: Sequence[str],
                           max_images: Optional[int] = None) -> "OrderedDict[str, Dict[str, float]]":
    """Score the post-processors ``names`` on ``dataset_name`` from one forward pass per image.

    Args:
        cfg: the config the model was built from (test-time input size, data loader).
        model: a PanopticSegFormer in eval mode.
        names: registered post-processor names; ``cfg``'s TEST.POSTPROCESSOR uses ``model``'s own.
        max_images: only the first this many images, scored against their own ground truth (default: all).

    Returns:
        {name: {"PQ", "SQ", "RQ", "PQ_th", "PQ_st" (percent), "merge_ms" (mean per image),
        "images"}} in the order of ``names``.
    """
    if not model.panoptic_on:
        raise ValueError("MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON must be True")
    if max_images is not None:  # the evaluators score exactly the images seen
        dataset_name = first_images_dataset(dataset_name, max_images)
    own = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR
    timed = OrderedDict(
        (name, TimedPostProcessor(model.postprocessor if name == own else build_postprocessor(name)))
        for name in names)
    evaluators = OrderedDict((name, COCOPanopticEvaluator(dataset_name)) for name in names)
    for evaluator in evaluators.values():
        evaluator.reset()
    loader = build_detection_test_loader(
        cfg, dataset_name, mapper=PanopticSegFormerDatasetMapper(cfg, is_train=False))
    count = 0
    with tqdm.tqdm(total=len(loader.dataset), desc=dataset_name, unit="img") as progress:
        for inputs in loader:
            if max_images is not None and count >= max_images:
                break
            for name, results in predict_with_postprocessors(model, inputs, timed).items():
                evaluators[name].process(inputs, results)
            count += len(inputs)
            progress.update(len(inputs))
    if count == 0:
        raise ValueError(f"dataset {dataset_name!r} has no image")
    table = OrderedDict()
    for name, evaluator in evaluators.items():
        pq = evaluator.evaluate()["panoptic_seg"]
        row = {k: float(pq[k]) for k in METRICS}
        row["merge_ms"] = sum(timed[name].times_ms) / len(timed[name].times_ms)
        row["images"] = count
        table[name] = row
    return table


def format_table(table: Dict[str, Dict[str, float]], title: str = "") -> str:
    """Markdown table with one row per post-processor (Table 7 layout)."""
    lines = [title] if title else []
    lines.append("| post-processing | PQ | SQ | RQ | PQ^th | PQ^st | merge (ms/img) |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in METRICS)
                     + f" | {row['merge_ms']:.1f} |")
    return "\n".join(lines)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None,
                        help="registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--postprocessors", nargs="+", default=None, metavar="NAME",
                        help=f"registered names (default: all: {' '.join(registered_postprocessors())})")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model.pth")
    return parser


def comparison_cfg(args):
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if args.dataset:
        cfg.DATASETS.TEST = (args.dataset,)
    if not cfg.DATASETS.TEST:
        raise ValueError("no dataset: give --dataset or set DATASETS.TEST")
    # Only the panoptic output is scored; instance / semantic outputs would only cost time.
    t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = True, False, False
    cfg.freeze()
    return cfg


def load_model(cfg):
    """The config's model with MODEL.WEIGHTS loaded (a warning if empty), in eval mode."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        PanopticSegFormerCheckpointer.from_config(model, cfg).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: scoring a randomly initialised model")
    return model.eval()


def main(argv=None):
    """Parse ``argv``, run the comparison, print the table; returns the table dict."""
    args = get_parser().parse_args(argv)
    names = args.postprocessors or registered_postprocessors()
    unknown = [n for n in names if n not in registered_postprocessors()]
    if unknown:
        raise SystemExit(f"unknown post-processor(s) {unknown}; registered: {registered_postprocessors()}")
    cfg = comparison_cfg(args)
    model = load_model(cfg)
    dataset = cfg.DATASETS.TEST[0]
    table = compare_postprocessors(cfg, model, dataset, names, args.max_images)
    n = next(iter(table.values()))["images"]
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "CPU"
    print(format_table(table, f"Post-processors on {dataset} ({n} images, {device}; "
                              f"weights: {cfg.MODEL.WEIGHTS or 'random init'})"))
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    main()
    sys.exit(0)
