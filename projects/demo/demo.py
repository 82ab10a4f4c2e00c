#!/usr/bin/env python
"""Panoptic SegFormer demo: panoptic predictions drawn on images or a video, and optionally the mask
decoder's attention maps of each detected segment (paper Sec. 3.3.3, Fig. 6 and Fig. B.6).

    python -m projects.demo.demo --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \
        --input images/*.jpg --output out/ --opts MODEL.WEIGHTS model.pth
    python -m projects.demo.demo --config-file ... --input a.jpg --output a_pan.png --show-attention
    python -m projects.demo.demo --config-file ... --video-input clip.mp4 --output out/

Images are read with the package's ``read_image_rgb`` (grayscale, palette, RGBA, CMYK and 16-bit
files are converted; missing, unreadable, truncated or too small files raise a ``DatasetError``
naming the file), fed to ``PanopticSegFormerPredictor`` (Detectron2's ``DefaultPredictor``, which
resizes to ``INPUT.MIN/MAX_SIZE_TEST`` and converts to ``INPUT.FORMAT``, plus clear errors for bad
arrays and mismatched weights), and drawn with
``Visualizer.draw_panoptic_seg`` using the metadata of ``DATASETS.TEST[0]``. A file that cannot be
read is logged with its path and skipped; the exit status is 1 if any input failed.

``--show-attention`` runs the model a second time on the predictor's pre-processed input with
``forward_outputs(..., return_attention=True)``, finds which query produced each segment
(:func:`trace_segment_queries`), and saves for each segment (the ``--attention-segments`` highest
scoring) a grid of its level-1 (1/8 scale) attention maps A: one row per mask-decoder layer, one
column per head. The maps are the pre-softmax scaled dot products that Eq. (1) turns into masks.
"""
import argparse
import glob
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from panoptic_segformer import PanopticSegFormerPredictor
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.data.dataset_mapper import DatasetError, read_image_rgb

__all__ = [
    "get_parser",
    "demo_cfg",
    "expand_inputs",
    "predictor_inputs",
    "trace_segment_queries",
    "QueryTracer",
    "predict_with_attention",
    "query_attention_maps",
    "save_attention_grid",
    "draw_panoptic",
    "main",
]

# Not under "panoptic_segformer": train_net's setup_logger stops propagation there, and this logger
# must reach whatever handlers the caller installed.
logger = logging.getLogger("panoptic_segformer_demo")

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    parser = argparse.ArgumentParser(description="Panoptic SegFormer demo (Detectron2)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--input", nargs="+", default=[],
                        help="image files, glob patterns (quote them) or folders")
    parser.add_argument("--video-input", metavar="FILE", help="a video file; writes an mp4")
    parser.add_argument("--output", required=True,
                        help="output folder, or output file for a single image / the video")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="t_cnf of mask-wise merging (Sec. 3.5) for things and stuff; "
                             "default: the config's TEST.CONF_THRESHOLD_THING/STUFF")
    parser.add_argument("--show-attention", action="store_true",
                        help="also save the mask decoder's attention maps of each segment")
    parser.add_argument("--attention-segments", type=int, default=8, metavar="N",
                        help="with --show-attention: at most N segments per image (highest score first)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def demo_cfg(args):
    """Frozen config from ``--config-file``, ``--opts`` and ``--confidence-threshold``."""
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if args.confidence_threshold is not None:
        t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
        t.CONF_THRESHOLD_THING = t.CONF_THRESHOLD_STUFF = args.confidence_threshold
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the demo takes class names and colours from "
                         "the metadata of DATASETS.TEST[0]")
    cfg.freeze()
    return cfg


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by ``patterns``: a folder gives its image files (sorted), a glob pattern its
    matches (sorted); anything else is kept as given, so that a missing file is reported by name."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files += sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                            if f.lower().endswith(_IMAGE_EXTENSIONS))
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            files += matches or [pattern]  # no match: reported as a missing file
        else:
            files.append(pattern)
    return files


def _output_file(output: str, input_path: str, many: bool, ext: str, taken: set) -> str:
    """``output`` itself when it names a file (single input, not an existing folder), else
    ``output/<input stem><ext>`` (with a numeric suffix if two inputs share a stem)."""
    if not many and not os.path.isdir(output) and os.path.splitext(output)[1]:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(input_path))[0]
    path, k = os.path.join(output, stem + ext), 1
    while path in taken:
        path, k = os.path.join(output, f"{stem}_{k}{ext}"), k + 1
    taken.add(path)
    return path


# ---------------------------------------------------------------------------------------------
# Attention maps of the mask decoder
# ---------------------------------------------------------------------------------------------
def predictor_inputs(predictor: DefaultPredictor, bgr_image: np.ndarray) -> Dict:
    """The model input that ``predictor(bgr_image)`` builds: the image in ``INPUT.FORMAT``, resized
    by ``predictor.aug``, as a (3, H', W') float32 tensor, with the original "height"/"width"."""
    image = bgr_image[:, :, ::-1] if predictor.input_format == "RGB" else bgr_image
    height, width = image.shape[:2]
    image = predictor.aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


def trace_segment_queries(postprocessor, panoptic_seg, segments_info, mask_probs, class_probs, labels,
                          is_thing, mask_logits=None, class_distribution=None) -> Dict[int, List[int]]:
    """Which query produced each segment of ``(panoptic_seg, segments_info) = postprocessor(...)``.

    Post-processors only use labels to name segments and to merge the stuff predictions of one
    class (Sec. 3.5), never to merge things. So the post-processor is run again with every thing
    query relabelled by a class id of its own (``max(labels) + 1 + q``): its output is unchanged
    (checked) and each thing segment's category now names its query. A stuff segment belongs to
    the stuff queries of its class -- exactly one with query decoupling (one stuff query per class,
    Sec. 3.3.1); with joint matching several queries may share the segment and are listed by
    descending ``class_probs x`` mean mask probability over the segment.

    Args:
        postprocessor: the post-processor that produced the output (common signature).
        panoptic_seg: (H, W) int32, segments_info: its output for these inputs.
        mask_probs (Q, H, W), class_probs (Q,), labels (Q,), is_thing (Q,), mask_logits (Q, H, W) or
            None, class_distribution (Q, K) or None: the post-processor's inputs.

    Returns:
        {segment id: [query index, ...]} (query indices into the Q inputs, best first).

    Raises:
        RuntimeError: the relabelled run gives another segmentation (a post-processor whose
            result depends on thing class ids), so segments cannot be traced this way.
    """
    q = labels.shape[0]
    offset = int(labels.max()) + 1 if q else 0
    probe_labels = torch.where(is_thing, offset + torch.arange(q, device=labels.device), labels)
    probe_seg, probe_info = postprocessor(mask_probs, class_probs, probe_labels, is_thing,
                                          mask_logits=mask_logits, class_distribution=class_distribution)
    signature = [(s["id"], bool(s["isthing"])) for s in segments_info]
    if (not torch.equal(probe_seg, panoptic_seg)
            or [(s["id"], bool(s["isthing"])) for s in probe_info] != signature):
        raise RuntimeError(f"{postprocessor!r} gives another segmentation when thing queries are "
                           "relabelled; cannot trace segments to queries")
    result = {}
    for seg, probe in zip(segments_info, probe_info):
        if seg["isthing"]:
            result[seg["id"]] = [int(probe["category_id"]) - offset]
            continue
        members = ((labels == seg["category_id"]) & ~is_thing).nonzero().flatten()
        if len(members) > 1:
            inside = panoptic_seg == seg["id"]
            rank = class_probs[members] * mask_probs[members][:, inside].mean(dim=1)
            members = members[rank.argsort(descending=True)]
        result[seg["id"]] = members.tolist()
    return result


class QueryTracer:
    """Wraps a post-processor (common signature): returns its output unchanged and appends, per
    call (one per image), ``{segment id: [query, ...]}`` from :func:`trace_segment_queries`."""

    def __init__(self, postprocessor):
        self.postprocessor = postprocessor
        self.segment_queries: List[Dict[int, List[int]]] = []
        self._read: List[List[int]] = []  # per call: the query index of each input (read_queries)

    def __getattr__(self, name):  # the wrapped post-processor's members (masks_to_image, ...)
        if "postprocessor" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["postprocessor"], name)

    def read_queries(self, class_probs, labels, is_thing):
        """The wrapped post-processor's queries (the model then passes only those); remembered so that
        traced segments name the model's query indices."""
        read = getattr(self.postprocessor, "read_queries", None)
        mask = read(class_probs, labels, is_thing) if read else torch.ones_like(is_thing)
        self._read.append(mask.nonzero().flatten().tolist())
        return mask

    def __call__(self, mask_probs, class_probs, labels, is_thing, mask_logits=None, class_distribution=None):
        out = self.postprocessor(mask_probs, class_probs, labels, is_thing, mask_logits=mask_logits,
                                 class_distribution=class_distribution)
        traced = trace_segment_queries(
            self.postprocessor, out[0], out[1], mask_probs, class_probs, labels, is_thing,
            mask_logits=mask_logits, class_distribution=class_distribution)
        index = self._read.pop(0) if self._read else list(range(labels.shape[0]))
        self.segment_queries.append({seg: [index[q] for q in queries] for seg, queries in traced.items()})
        return out


def predict_with_attention(predictor: DefaultPredictor, bgr_image: np.ndarray):
    """Run ``predictor.model`` on ``predictor``'s pre-processing of ``bgr_image``, keeping the mask
    decoder's attention maps and which query produced each panoptic segment.

    Returns a dict with
        "inputs": the model input (:func:`predictor_inputs`),
        "images": the model's padded, normalised ImageList,
        "outputs": ``forward_outputs(..., return_attention=True)`` (per layer "attention"
            (1, heads, Q, S) and "pred_masks" (1, Q, h1, w1)),
        "predictions": the model's output for the image (as ``predictor(bgr_image)``),
        "segment_queries": {segment id: [query index, ...]} (:func:`trace_segment_queries`).
    """
    model = predictor.model
    if not model.panoptic_on:
        raise ValueError("--show-attention needs MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON True")
    inputs = [predictor_inputs(predictor, bgr_image)]
    tracer = QueryTracer(model.postprocessor)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.forward_outputs(images, num_mask_layers=model.test_mask_decoder_layers,
                                        return_attention=True)
        predictions = model.inference(outputs, inputs, images, postprocessor=tracer)[0]
    return {"inputs": inputs[0], "images": images, "outputs": outputs, "predictions": predictions,
            "segment_queries": tracer.segment_queries[0]}


def query_attention_maps(outputs: Dict, images, query: int, image_index: int = 0) -> np.ndarray:
    """Level-1 attention maps of one query: (layers, heads, h, w) float32.

    Each layer's "attention" (N, heads, Q, S) is over the S = sum_l H_l W_l flattened tokens of F;
    level 1 (stride 8) comes first; its shape (H_1, W_1) is ``outputs["levels"].sizes[0]``
    (Eq. 1). Its first H_1 W_1 tokens are reshaped to (H_1, W_1) and cropped to the part covering
    the image (the rest is padding).
    """
    maps = []
    hp, wp = images.tensor.shape[-2:]
    h, w = images.image_sizes[image_index]
    for layer in outputs["mask"]:
        if "attention" not in layer:
            raise ValueError("outputs have no 'attention': run forward_outputs(..., return_attention=True)")
        if not 0 <= query < layer["attention"].shape[2]:
            raise ValueError(f"query {query} out of range: attention has shape "
                             f"{tuple(layer['attention'].shape)} (N, heads, Q, S)")
        attn = layer["attention"][image_index, :, query]  # (heads, S)
        h1, w1 = outputs["levels"].sizes[0]
        if attn.shape[-1] < h1 * w1:
            raise ValueError(f"attention has S={attn.shape[-1]} tokens, fewer than the level-1 map "
                             f"{h1}x{w1}")
        level1 = attn[:, : h1 * w1].reshape(-1, h1, w1)
        valid_h, valid_w = -(-h * h1 // hp), -(-w * w1 // wp)  # ceil: rows/cols covering the image
        maps.append(level1[:, :valid_h, :valid_w].float().cpu().numpy())
    return np.stack(maps)


def save_attention_grid(maps: np.ndarray, path: str, title: str = "", image_rgb: Optional[np.ndarray] = None):
    """Save (layers, heads, h, w) maps as a grid image: row i = mask-decoder layer i + 1, column j =
    head j + 1 (each panel normalised to its own range), optionally over ``image_rgb``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, heads = maps.shape[:2]
    fig = Figure(figsize=(2.0 * heads, 2.0 * layers * maps.shape[2] / max(maps.shape[3], 1) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(layers, heads, squeeze=False)
    extent = None
    if image_rgb is not None:
        extent = (0, image_rgb.shape[1], image_rgb.shape[0], 0)
    for i in range(layers):
        for j in range(heads):
            ax = axes[i, j]
            if image_rgb is not None:
                ax.imshow(image_rgb, extent=extent)
            ax.imshow(maps[i, j], cmap="viridis", interpolation="bilinear", extent=extent,
                      alpha=0.75 if image_rgb is not None else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {j + 1}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"layer {i + 1}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _segment_name(metadata, seg) -> str:
    names = metadata.get("thing_classes" if seg["isthing"] else "stuff_classes", None)
    name = names[seg["category_id"]] if names and seg["category_id"] < len(names) else str(seg["category_id"])
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def save_segment_attention(predictor, bgr_image, out_dir: str, max_segments: int, metadata) -> List[str]:
    """Attention grids of the ``max_segments`` highest-scoring segments of ``bgr_image`` under
    ``out_dir`` (``segment<id>_<class>_query<q>.png``); returns the written paths."""
    run = predict_with_attention(predictor, bgr_image)
    outputs, images = run["outputs"], run["images"]
    _, segments_info = run["predictions"]["panoptic_seg"]
    segments = sorted(segments_info, key=lambda s: -s.get("score", 0.0))[:max_segments]
    if segments:
        os.makedirs(out_dir, exist_ok=True)
    resized_rgb = run["inputs"]["image"].permute(1, 2, 0).numpy().astype(np.uint8)
    if predictor.input_format == "BGR":
        resized_rgb = resized_rgb[:, :, ::-1]
    thing_index = outputs["thing_query_index"][0].tolist()
    written = []
    for seg in segments:
        query = run["segment_queries"][seg["id"]][0]
        name = _segment_name(metadata, seg)
        where = (f"location query {thing_index[query]}" if query < len(thing_index)
                 else f"stuff query {query - len(thing_index)}")
        path = os.path.join(out_dir, f"segment{seg['id']:03d}_{name}_query{query}.png")
        save_attention_grid(query_attention_maps(outputs, images, query), path,
                            title=f"segment {seg['id']}: {name} (score {seg.get('score', 0):.2f}, {where})",
                            image_rgb=resized_rgb)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
def draw_panoptic(rgb_image: np.ndarray, predictions: Dict, metadata) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the panoptic prediction drawn by Detectron2's Visualizer."""
    panoptic_seg, segments_info = predictions["panoptic_seg"]
    vis = Visualizer(rgb_image, metadata)
    return vis.draw_panoptic_seg(panoptic_seg.to("cpu"), segments_info).get_image()


def _run_images(args, cfg, predictor, metadata, files) -> Tuple[List[str], List[Tuple[str, str]]]:
    written, failures, taken = [], [], set()
    for path in tqdm.tqdm(files, desc="images", unit="img"):
        try:
            bgr = np.ascontiguousarray(read_image_rgb(path, "BGR", cfg.INPUT.MIN_IMAGE_SIZE))
        except DatasetError as e:  # its message names the file
            logger.error("Skipping input: %s", e if path in str(e) else f"{path}: {e}")
            failures.append((path, str(e)))
            continue
        predictions = predictor(bgr)
        out = _output_file(args.output, path, len(files) > 1, ".png", taken)
        drawn = draw_panoptic(bgr[:, :, ::-1], predictions, metadata)
        if not cv2.imwrite(out, drawn[:, :, ::-1]):
            raise OSError(f"{out}: cannot write the output image")
        written.append(out)
        n = len(predictions["panoptic_seg"][1])
        logger.info("%s: %d segments -> %s", path, n, out)
        if args.show_attention:
            att_dir = os.path.splitext(out)[0] + "_attention"
            grids = save_segment_attention(predictor, bgr, att_dir, args.attention_segments, metadata)
            written += grids
            logger.info("%s: attention maps of %d segments -> %s", path, len(grids), att_dir)
    return written, failures


def _run_video(args, predictor, metadata) -> List[str]:
    video = cv2.VideoCapture(args.video_input)
    if not video.isOpened():
        raise DatasetError(f"{args.video_input}: cannot open the video")
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(video.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    out = _output_file(args.output, args.video_input, False, ".mp4", set())
    if os.path.splitext(out)[1].lower() != ".mp4":
        out = os.path.splitext(out)[0] + ".mp4"
    writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        video.release()
        raise OSError(f"{out}: cannot open an mp4 writer")
    frames = 0
    try:
        with tqdm.tqdm(total=total, desc="frames", unit="frame") as bar:
            while True:
                ok, frame = video.read()
                if not ok:
                    break
                drawn = draw_panoptic(frame[:, :, ::-1], predictor(frame), metadata)
                writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
                frames += 1
                bar.update()
    finally:
        video.release()
        writer.release()
    if frames == 0:
        raise DatasetError(f"{args.video_input}: no frame could be decoded")
    logger.info("%s: %d frames -> %s", args.video_input, frames, out)
    return [out]


def main(argv=None) -> int:
    """Run the demo; returns the exit status (1 if any input could not be read)."""
    args = get_parser().parse_args(argv)
    files = expand_inputs(args.input)
    if not files and not args.video_input:
        raise SystemExit("give --input files or --video-input")
    cfg = demo_cfg(args)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    predictor = PanopticSegFormerPredictor(cfg)
    failures = []
    if files:
        _, failures = _run_images(args, cfg, predictor, metadata, files)
    if args.video_input:
        try:
            _run_video(args, predictor, metadata)
        except DatasetError as e:  # its message names the file
            logger.error("Skipping input: %s", e)
            failures.append((args.video_input, str(e)))
    if failures:
        logger.error("%d input(s) failed: %s", len(failures), ", ".join(p for p, _ in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
