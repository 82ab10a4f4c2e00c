#!/usr/bin/env python
"""Panoptic quality and speed of the post-processors on one model, each at thresholds chosen for that
model (paper Sec. 3.5, Table 7, Table B.2, App. B.1).

    python -m projects.benchmarks.compare_postprocessors --config-file configs/shapes/panoptic_segformer_shapes.yaml \
        --dataset shapes_panoptic_val MODEL.WEIGHTS output/model_final.pth
    python -m projects.benchmarks.compare_postprocessors \
        --config-file configs/coco/panoptic_segformer_R50_24ep.yaml --dataset coco_2017_val_panoptic \
        --tune-dataset coco_2017_train_panoptic --tune-images 500 MODEL.WEIGHTS model_final.pth

**Fair comparison (default).** The paper compares the merging methods on ONE model (Table 7); a threshold
set for another classifier is a handicap, not a property of the method (DETR's 0.85 and MaskFormer's 0.8
were set for softmax classifiers; this model's focal/sigmoid class probabilities are lower). So every
post-processor's thresholds are chosen for the model being scored:

1. *Tuning split* (``--tune-dataset``; default: the held-out split registered for the evaluation set in
   :data:`HELD_OUT_SPLITS`, e.g. ``shapes_panoptic_heldout`` for ``shapes_panoptic_val``; otherwise the
   first ``--tune-images`` images of ``DATASETS.TRAIN[0]``, a documented part of the training data).
2. *Sweep* (:func:`tune_thresholds`): coordinate-wise over each post-processor's thresholds of
   :data:`SWEEP_GRIDS` -- first its confidence threshold (others at their defaults), then each further
   threshold at the best values so far. Every sweep step is one pass over the tuning split: one forward
   pass per image feeds all candidate settings, each scored by its own COCOPanopticEvaluator. The best PQ
   wins (ties: the earlier grid value).
3. *Evaluation* on ``--dataset`` with the chosen values (printed in the table), plus one row per
   post-processor at ONE shared confidence threshold, the model's t_cnf
   (``TEST.CONF_THRESHOLD_THING``), its other thresholds at their defaults.

``--original-paper-thresholds`` instead scores each post-processor at its original paper's defaults
(DETR 0.85, MaskFormer 0.8, the heuristic's 0.5; the model's own post-processor at the config's values),
without tuning.

The network runs ONCE per image per pass (``model.forward_outputs``); the same per-query predictions go
through each post-processor via the meta-architecture's own ``inference`` (same resizing, same inputs as
training-time evaluation). The table has PQ, SQ, RQ, PQ^th, PQ^st and the mean time of one merge call
(ms per image, CUDA-synchronised on GPU). A tqdm bar on stderr shows the progress over the images.
"""
import argparse
import logging
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import tqdm
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.modeling import build_model

from panoptic_segformer import PanopticSegFormerDatasetMapper
from panoptic_segformer.builders import build_postprocessor_from_config
from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.postprocessing import POSTPROCESSOR_REGISTRY, build_postprocessor, registered_postprocessors

from .bench_utils import first_images_dataset

__all__ = ["TimedPostProcessor", "predict_with_postprocessors", "compare_postprocessors", "score_postprocessors",
           "tune_thresholds", "fair_comparison", "make_grids", "original_paper_comparison", "original_paper_rows",
           "tuned_rows", "confidence_threshold_of", "add_threshold_arguments", "format_table", "load_model",
           "SWEEP_GRIDS", "HELD_OUT_SPLITS", "main"]

logger = logging.getLogger("panoptic_segformer_benchmarks")

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")

#: Confidence thresholds tried for every method: low values for sigmoid (focal) classifiers, up to the
#: softmax-era defaults (MaskFormer 0.8, DETR 0.85).
CONF_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.85)
#: Per registered post-processor: [(constructor argument, values)], the confidence threshold first.
SWEEP_GRIDS: Dict[str, List[Tuple[str, Tuple]]] = {
    "mask_wise": [("conf_threshold", CONF_GRID), ("keep_threshold", (0.4, 0.5, 0.6, 0.7, 0.8))],
    "official": [("conf_threshold", CONF_GRID), ("keep_threshold", (0.4, 0.5, 0.6, 0.7, 0.8))],
    "pixel_argmax": [("threshold", CONF_GRID), ("area_threshold", (0, 4, 16, 64))],
    "pixel_argmax_prob": [("object_mask_threshold", CONF_GRID), ("overlap_threshold", (0.5, 0.6, 0.7, 0.8, 0.9))],
    "heuristic": [("thing_threshold", CONF_GRID), ("overlap_threshold", (0.3, 0.4, 0.5, 0.6, 0.7)),
                  ("stuff_area_limit", (0, 32 * 32, 64 * 64))],
}
#: Evaluation split -> registered held-out split of the same distribution used to choose thresholds.
HELD_OUT_SPLITS = {"shapes_panoptic_val": "shapes_panoptic_heldout"}


def make_grids(names: Sequence[str], conf_grid: Optional[Sequence[float]] = None, conf_only: bool = False
               ) -> Dict[str, List[Tuple[str, Tuple]]]:
    """:data:`SWEEP_GRIDS` for ``names``, with ``conf_grid`` as every confidence grid (if given) and
    without the further thresholds if ``conf_only`` (fewer passes over the tuning split)."""
    if conf_grid is not None:
        bad = [v for v in conf_grid if not 0.0 <= v <= 1.0]
        if not conf_grid or bad:
            raise ValueError(f"--conf-grid needs values in [0, 1], got {list(conf_grid)}")
    grids = {}
    for name in names:
        grid = list(SWEEP_GRIDS.get(name, ()))
        if grid and conf_grid is not None:
            grid[0] = (grid[0][0], tuple(conf_grid))
        grids[name] = grid[:1] if conf_only else grid
    return grids


Rows = Mapping[str, object]  # {row label: post-processor with the common signature}


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


def predict_with_postprocessors(model, batched_inputs: List[Dict], postprocessors: Dict,
                                num_mask_layers: Optional[int] = None) -> Dict[str, List[Dict]]:
    """Detectron2 outputs of ``model`` on ``batched_inputs`` with each post-processor, from ONE
    forward pass: ``forward_outputs`` once, then the meta-architecture's own ``inference`` (same
    resizing to the original size, same per-query predictions) once per post-processor.

    Args:
        model: a PanopticSegFormer in eval mode.
        batched_inputs: Detectron2 model inputs ("image" (3, H, W), optional "height"/"width").
        postprocessors: {name: post-processor with the common signature}.
        num_mask_layers: mask-decoder layers run at inference (Table 10); default the model's own.

    Returns:
        {name: [per-image output dict with "panoptic_seg" (and "instances"/"sem_seg" if enabled)]}.
    """
    results = OrderedDict()
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        outputs = model.forward_outputs(images, num_mask_layers=num_mask_layers or model.test_mask_decoder_layers)
        for name, postprocessor in postprocessors.items():
            results[name] = model.inference(outputs, batched_inputs, images, postprocessor=postprocessor)
    return results


def score_postprocessors(cfg, model, dataset_name: str, rows: Rows, max_images: Optional[int] = None,
                         num_mask_layers: Optional[int] = None, progress: bool = True
                         ) -> "OrderedDict[str, Dict[str, float]]":
    """Score the post-processors ``rows`` ({label: post-processor}) on ``dataset_name`` from one
    forward pass per image.

    Returns:
        {label: {"PQ", "SQ", "RQ", "PQ_th", "PQ_st" (percent), "merge_ms" (mean per image), "images"}}
        in the order of ``rows``.
    """
    if not model.panoptic_on:
        raise ValueError("MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON must be True")
    if max_images is not None:  # the evaluators score exactly the images seen
        dataset_name = first_images_dataset(dataset_name, max_images)
    timed = OrderedDict((label, TimedPostProcessor(pp)) for label, pp in rows.items())
    evaluators = OrderedDict((label, COCOPanopticEvaluator(dataset_name)) for label in rows)
    for evaluator in evaluators.values():
        evaluator.reset()
    loader = build_detection_test_loader(
        cfg, dataset_name, mapper=PanopticSegFormerDatasetMapper(cfg, is_train=False))
    count = 0
    with tqdm.tqdm(total=len(loader.dataset), desc=dataset_name, unit="img", disable=not progress) as bar:
        for inputs in loader:
            if max_images is not None and count >= max_images:
                break
            for label, results in predict_with_postprocessors(model, inputs, timed, num_mask_layers).items():
                evaluators[label].process(inputs, results)
            count += len(inputs)
            bar.update(len(inputs))
    if count == 0:
        raise ValueError(f"dataset {dataset_name!r} has no image")
    table = OrderedDict()
    for label, evaluator in evaluators.items():
        pq = evaluator.evaluate()["panoptic_seg"]
        row = {k: float(pq[k]) for k in METRICS}
        row["merge_ms"] = sum(timed[label].times_ms) / len(timed[label].times_ms)
        row["images"] = count
        table[label] = row
    return table


def base_kwargs(cfg, name: str) -> Dict:
    """Constructor arguments of ``name`` before tuning: the config's TEST.* merging keys for the model's
    own post-processor (TEST.POSTPROCESSOR), else {} (the constructor's defaults)."""
    if name != cfg.MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR:
        return {}
    probe = build_postprocessor_from_config(cfg)
    keys = ("alpha", "beta", "mask_threshold", "conf_threshold", "keep_threshold")
    return {k: getattr(probe, k) for k in keys if hasattr(probe, k)}


def _build(name: str, kwargs: Dict):
    return build_postprocessor(name, **kwargs)


def _label(name: str, kwargs: Dict) -> str:
    return name + "(" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"


def tune_thresholds(cfg, model, tune_dataset: str, names: Sequence[str], max_images: Optional[int] = None,
                    grids: Optional[Mapping[str, Sequence[Tuple[str, Sequence]]]] = None,
                    num_mask_layers: Optional[int] = None, progress: bool = True) -> Dict[str, Dict]:
    """Choose each post-processor's thresholds on ``tune_dataset`` by PQ (coordinate-wise sweep).

    Step k sweeps the k-th argument of every post-processor's grid (``grids``, default
    :data:`SWEEP_GRIDS`) with its earlier arguments at their chosen values and its later ones at their
    defaults; all candidates of a step share one forward pass per image. The best PQ wins; ties go to
    the earlier grid value. A name without a grid keeps its defaults.

    Returns:
        {name: {"chosen": {argument: value}, "tuned_PQ": PQ at the chosen values on ``tune_dataset``,
        "sweep": [{"argument", "value", "PQ", "PQ_th", "PQ_st"}, ...] (every candidate scored)}}.
    """
    grids = SWEEP_GRIDS if grids is None else grids
    for name in names:
        for arg, values in grids.get(name, ()):
            if not values:
                raise ValueError(f"empty sweep grid for {name}.{arg}")
    state = {n: {"chosen": {}, "tuned_PQ": None, "sweep": []} for n in names}
    steps = max((len(grids.get(n, ())) for n in names), default=0)
    for step in range(steps):
        rows, owners = OrderedDict(), {}
        for name in names:
            grid = grids.get(name, ())
            if step >= len(grid):
                continue
            arg, values = grid[step]
            for value in values:
                kwargs = {**base_kwargs(cfg, name), **state[name]["chosen"], arg: value}
                label = _label(name, kwargs)
                if label not in rows:
                    rows[label] = _build(name, kwargs)
                    owners[label] = (name, arg, value)
        table = score_postprocessors(cfg, model, tune_dataset, rows, max_images, num_mask_layers, progress)
        best = {}
        for label, row in table.items():
            name, arg, value = owners[label]
            state[name]["sweep"].append({"argument": arg, "value": value,
                                         **{k: row[k] for k in ("PQ", "PQ_th", "PQ_st")}})
            if name not in best or row["PQ"] > best[name][1]:
                best[name] = (value, row["PQ"], arg)
        for name, (value, pq, arg) in best.items():
            state[name]["chosen"][arg] = value
            state[name]["tuned_PQ"] = pq
        logger.info("threshold sweep step %d: %s", step + 1,
                    ", ".join(f"{n} {a}={v} (PQ {p:.1f})" for n, (v, p, a) in best.items()))
    return state


def shared_threshold(cfg) -> float:
    """The model's t_cnf (``TEST.CONF_THRESHOLD_THING``), the shared confidence threshold."""
    return float(cfg.MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING)


def fair_comparison(cfg, model, dataset_name: str, names: Sequence[str], tune_dataset: str,
                    max_images: Optional[int] = None, tune_images: Optional[int] = None,
                    grids=None, num_mask_layers: Optional[int] = None, progress: bool = True):
    """Tune on ``tune_dataset`` (:func:`tune_thresholds`), then score on ``dataset_name`` each
    post-processor at its chosen thresholds ("tuned" rows) and at the shared t_cnf ("shared" rows).

    Returns:
        (table, tuning): table = {label: row of :func:`score_postprocessors` + "postprocessor",
        "setting" ("tuned" / "shared"), "thresholds" {argument: value}}; tuning = :func:`tune_thresholds`'
        result.
    """
    grids = SWEEP_GRIDS if grids is None else grids
    tuning = tune_thresholds(cfg, model, tune_dataset, names, tune_images, grids, num_mask_layers, progress)
    t_cnf = shared_threshold(cfg)
    plan = OrderedDict()
    for name in names:
        plan[f"{name} (tuned)"] = (name, "tuned", dict(tuning[name]["chosen"]))
    for name in names:
        if name in SWEEP_GRIDS:  # the confidence threshold: the first argument of the built-in grid
            plan[f"{name} (shared t_cnf)"] = (name, "shared", {SWEEP_GRIDS[name][0][0]: t_cnf})
    rows = OrderedDict((label, tuned_rows(cfg, {n: kw})[n]) for label, (n, _, kw) in plan.items())
    table = score_postprocessors(cfg, model, dataset_name, rows, max_images, num_mask_layers, progress)
    for label, (name, setting, kwargs) in plan.items():
        table[label].update(postprocessor=name, setting=setting, thresholds=kwargs)
    return table, tuning


def original_paper_comparison(cfg, model, dataset_name: str, names: Sequence[str],
                              max_images: Optional[int] = None, num_mask_layers: Optional[int] = None,
                              progress: bool = True):
    """Each post-processor at its original paper's defaults (the model's own at the config's values)."""
    rows = original_paper_rows(cfg, model, names)
    table = score_postprocessors(cfg, model, dataset_name, rows, max_images, num_mask_layers, progress)
    for name in names:
        table[name].update(postprocessor=name, setting="original paper",
                           thresholds=confidence_threshold_of(name, rows[name]))
    return table


def original_paper_rows(cfg, model, names: Sequence[str]) -> "OrderedDict[str, object]":
    """{name: post-processor at its original paper's defaults}; the model's own (TEST.POSTPROCESSOR)
    is the model's post-processor, at the config's values."""
    own = cfg.MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR
    return OrderedDict((n, model.postprocessor if n == own else build_postprocessor(n)) for n in names)


def tuned_rows(cfg, chosen: Mapping[str, Mapping]) -> "OrderedDict[str, object]":
    """{name: post-processor at ``chosen[name]``} ({argument: value}, e.g. :func:`tune_thresholds`'
    "chosen"); arguments not chosen keep :func:`base_kwargs`."""
    return OrderedDict((n, _build(n, {**base_kwargs(cfg, n), **kw})) for n, kw in chosen.items())


def confidence_threshold_of(name: str, postprocessor) -> Dict:
    """{argument: value} of ``postprocessor``'s confidence threshold (the first argument of its
    :data:`SWEEP_GRIDS` entry); {} for a post-processor without one."""
    arg = SWEEP_GRIDS[name][0][0] if name in SWEEP_GRIDS else None
    value = getattr(postprocessor, arg, None) if arg else None
    return {arg: value} if value is not None else {}


def compare_postprocessors(cfg, model, dataset_name: str, names: Sequence[str],
                           max_images: Optional[int] = None) -> "OrderedDict[str, Dict[str, float]]":
    """Score the post-processors ``names`` at their original papers' defaults (the one named by
    ``cfg``'s TEST.POSTPROCESSOR at the model's own thresholds) from one forward pass per image.

    Returns:
        {name: {"PQ", "SQ", "RQ", "PQ_th", "PQ_st" (percent), "merge_ms" (mean per image),
        "images"}} in the order of ``names``.
    """
    return score_postprocessors(cfg, model, dataset_name, original_paper_rows(cfg, model, names), max_images)


def _format_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "/".join(_format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_thresholds(thresholds: Mapping) -> str:
    """``conf_threshold=0.2, keep_threshold=0.6`` (the values a row used)."""
    return ", ".join(f"{k}={_format_value(v)}" for k, v in thresholds.items()) or "defaults"


def format_table(table: Dict[str, Dict[str, float]], title: str = "") -> str:
    """Markdown table with one row per post-processor (Table 7 layout); rows that carry "thresholds"
    (the fair comparison) show them in their own column."""
    lines = [title] if title else []
    with_thresholds = any("thresholds" in row for row in table.values())
    lines.append("| post-processing | " + ("thresholds | " if with_thresholds else "")
                 + "PQ | SQ | RQ | PQ^th | PQ^st | merge (ms/img) |")
    lines.append("| --- | " + ("--- | " if with_thresholds else "") + "---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in table.items():
        lines.append(f"| {name} | " + (f"{format_thresholds(row.get('thresholds', {}))} | " if with_thresholds else "")
                     + " | ".join(f"{row[k]:.1f}" for k in METRICS) + f" | {row['merge_ms']:.1f} |")
    return "\n".join(lines)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None,
                        help="registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--postprocessors", nargs="+", default=None, metavar="NAME",
                        help=f"registered names (default: all: {' '.join(registered_postprocessors())})")
    parser.add_argument("--max-images", type=int, default=None)
    add_threshold_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model.pth")
    return parser


def add_threshold_arguments(parser, original_paper: bool = True) -> None:
    """The options of the threshold choice (shared by the benchmarks that compare post-processors):
    --tune-dataset, --tune-images, --conf-grid, --conf-only and, if ``original_paper``,
    --original-paper-thresholds."""
    parser.add_argument("--tune-dataset", default=None,
                        help="split the thresholds are chosen on (default: the held-out split of --dataset in "
                             f"{HELD_OUT_SPLITS}, else the first --tune-images images of DATASETS.TRAIN[0])")
    parser.add_argument("--tune-images", type=int, default=None,
                        help="first N images of the tuning split (default: all, or 100 of DATASETS.TRAIN[0])")
    parser.add_argument("--conf-grid", nargs="+", type=float, default=None, metavar="T",
                        help="confidence thresholds tried for every post-processor (default: "
                             f"{' '.join(map(str, CONF_GRID))})")
    parser.add_argument("--conf-only", action="store_true",
                        help="sweep only the confidence thresholds (the others stay at their defaults)")
    if original_paper:
        parser.add_argument("--original-paper-thresholds", action="store_true",
                            help="no tuning: DETR's 0.85, MaskFormer's 0.8, the heuristic's 0.5, the config's t_cnf")


def tuning_split(cfg, dataset: str, tune_dataset: Optional[str], tune_images: Optional[int]):
    """(tuning split, its image limit): explicit, the registered held-out split of ``dataset``, or the
    first ``tune_images`` (default 100) images of ``DATASETS.TRAIN[0]``."""
    if tune_dataset:
        return tune_dataset, tune_images
    if dataset in HELD_OUT_SPLITS:
        return HELD_OUT_SPLITS[dataset], tune_images
    if not cfg.DATASETS.TRAIN:
        raise ValueError(f"no split to choose thresholds on for {dataset!r}: give --tune-dataset "
                         "(or set DATASETS.TRAIN)")
    logger.info("choosing thresholds on the first %s images of the training split %s",
                tune_images or 100, cfg.DATASETS.TRAIN[0])
    return cfg.DATASETS.TRAIN[0], tune_images or 100


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
    unknown = [n for n in names if n not in POSTPROCESSOR_REGISTRY]
    if unknown:
        raise SystemExit(f"unknown post-processor(s) {unknown}; registered: {registered_postprocessors()}")
    cfg = comparison_cfg(args)
    model = load_model(cfg)
    dataset = cfg.DATASETS.TEST[0]
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "CPU"
    weights = cfg.MODEL.WEIGHTS or "random init"
    if args.original_paper_thresholds:
        table = original_paper_comparison(cfg, model, dataset, names, args.max_images)
        n = next(iter(table.values()))["images"]
        print(format_table(table, f"Post-processors on {dataset} ({n} images, {device}; weights: {weights}; "
                                  "original papers' thresholds)"))
        return table
    tune_dataset, tune_images = tuning_split(cfg, dataset, args.tune_dataset, args.tune_images)
    grids = make_grids(names, args.conf_grid, args.conf_only)
    table, _ = fair_comparison(cfg, model, dataset, names, tune_dataset, args.max_images, tune_images, grids)
    n = next(iter(table.values()))["images"]
    print(format_table(table, f"Post-processors on {dataset} ({n} images, {device}; weights: {weights}); "
                              f"thresholds chosen by PQ on {tune_dataset}"
                              + (f" (first {tune_images} images)" if tune_images else "")
                              + f"; shared t_cnf = {shared_threshold(cfg):g}"))
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    main()
    sys.exit(0)
