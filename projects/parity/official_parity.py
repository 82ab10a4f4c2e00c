#!/usr/bin/env python
"""One-off check: the "official" mode reproduces the authors' panoptic output pixel for pixel.

NOT part of the test suite or CI, and never imported by them: it needs the authors' code
(zhiqi-li/Panoptic-SegFormer) and its environment (Python 3.8, torch 1.8.1, mmcv-full 1.3.4 without
compiled ops, mmdet 2.12.0), built by hand outside the repository -- the recipe is in
docs/OFFICIAL_TRAINING_SPEC.md, section 0. Run from the repository root with this
project's venv::

    python -m projects.parity.official_parity --official-python /work/venvs/official/bin/python \\
        --official-src /path/to/Panoptic-SegFormer --images /path/to/coco_panoptic_sample/images \\
        --work-dir /tmp/official_parity

What it does:

1. ``--stage official`` (run by the script itself with ``--official-python``): builds the authors' R50 model
   from their config (``configs/panformer/panformer_r50_24e_coco_panoptic.py``) with a seeded random
   initialisation, perturbs its class biases (random init scores every class ~0.01, which no quality
   threshold keeps), saves the ``state_dict`` as an official checkpoint, and runs their inference
   (``extract_feat`` -> ``bbox_head`` -> ``get_bboxes(rescale=True)``) on each image, prepared by their
   test pipeline (``mmcv.imrescale`` to (1333, 800), ``mmcv.imnormalize`` with to_rgb, no padding).
   Random-init masks are one map for every query, so the mask tails are made query-specific first
   (``_diversify_mask_tails``; weights only, read from one calibration pass on the first image). It
   saves the input tensor, the panoptic output (category and instance maps), the ``segm`` results
   (boxes, scores, labels, masks) and the 1/8 masks fed to their resize.
   Two shims, no official file changed: a stub ``mmcv._ext`` (mmcv built with ``MMCV_WITH_OPS=0``), and
   mmcv 1.3.4's CPU fallback of multi-scale deformable attention is called with 6 arguments but takes 4.
2. Converts the checkpoint with ``projects/convert/convert_official.py --config-file
   configs/coco/official/official_r50_2x.yaml``, builds this project's model from that config
   (``MODEL.PIXEL_MEAN`` 0 and ``PIXEL_STD`` 1, so that it receives the very same normalised tensor) and
   runs ``model(batched_inputs)``.
3. Compares the final category and instance maps (``official_maps``) pixel by pixel, and the instance
   results. A differing pixel is "at the threshold" when a mask of a painted query lies within
   ``--tolerance`` (1e-5) of 0.5 there, in either model. Prints a markdown report.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

__all__ = ["main"]

OFFICIAL_CONFIG = os.path.join("configs", "panformer", "panformer_r50_24e_coco_panoptic.py")
OUR_CONFIG = os.path.join("configs", "coco", "official", "official_r50_2x.yaml")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Threshold variants compared: file tag -> (official overlap_threshold_things/stuff, our KEEP_THRESHOLD_*
# = 1 - overlap). The second lets masks that overlap earlier segments in, for more segments.
VARIANTS = {"": ((0.4, 0.2), (0.6, 0.8)), "__overlap08": ((0.8, 0.8), (0.2, 0.2))}


# ------------------------------------------------------------------------------------------------
# Stage 1: the authors' code (runs under their Python 3.8 venv; keep this part Python 3.8 syntax).
# ------------------------------------------------------------------------------------------------
def _install_mmcv_shims():
    """A stub ``mmcv._ext`` (no compiled ops) and the 6-argument call of mmcv 1.3.4's CPU fallback."""
    import types

    stub = types.ModuleType("mmcv._ext")
    stub.__file__ = "<stub mmcv._ext: mmcv built with MMCV_WITH_OPS=0>"

    def _missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError("mmcv._ext.%s: compiled ops are not built" % name)
        return op

    stub.__getattr__ = _missing
    sys.modules["mmcv._ext"] = stub
    import mmcv.cnn.bricks.transformer as transformer

    fallback = transformer.multi_scale_deformable_attn_pytorch

    def msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             im2col_step=None):
        return fallback(value, spatial_shapes, sampling_locations, attention_weights)

    transformer.multi_scale_deformable_attn_pytorch = msda


def _perturb_class_biases(model, seed):
    """Spread the class scores: location-decoder thing logits N(0, 1.5) per class; the stuff FC bias
    (one output shared by the stuff queries) +2. Done before saving, so both models get it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head = model.bbox_head
    with torch.no_grad():
        fc = head.cls_branches[-1]
        fc.bias.copy_(torch.randn(fc.bias.shape, generator=g) * 1.5)
        head.cls_stuff_branches[-1].bias.fill_(2.0)


def _diversify_mask_tails(head, tail_inputs):
    """Random-init masks are almost the same map for every query (the thing queries fed to the tail
    have cosine ~0.995 to their mean), so one mask covers the image and no other segment survives the
    overlap rule. For each branch's tail (the ``AttentionTail`` that makes the final masks): remove the
    mean query direction from ``q`` and the mean memory direction from ``k`` (rescaled to the same
    norms), zero the biases of its mask MLP, make its last layer's weights zero-mean, and double the
    stuff tail's last layer. ``tail_inputs``: {branch: (query (1, N, C), key (1, S, C))} from one
    forward pass. Weights only: the converted checkpoint carries the same change."""
    import torch

    def without_mean_direction(x):
        c = x.mean(0)
        c = c / c.norm()
        proj = torch.eye(x.shape[1]) - torch.outer(c, c)
        return proj * float(x.norm(dim=1).mean() / (x @ proj).norm(dim=1).mean())

    with torch.no_grad():
        for branch in (head.things_mask_head, head.stuff_mask_head):
            tail = branch.attnen
            query, key = tail_inputs[branch]
            tail.q.weight.copy_(tail.q.weight @ without_mean_direction(query[0]))
            tail.k.weight.copy_(tail.k.weight @ without_mean_direction(key[0]))
            for layer in (tail.linear_l1[0], tail.linear_l2[0], tail.linear_l3[0], tail.linear[0]):
                layer.bias.zero_()
            tail.linear[0].weight.sub_(tail.linear[0].weight.mean())
            if branch is head.stuff_mask_head:
                tail.linear[0].weight.mul_(2.0)


def _official_inputs(path, norm):
    """The official test pipeline on one image: (tensor (1, 3, h, w), img_metas, original image)."""
    import mmcv
    import torch

    img = mmcv.imread(path)  # BGR uint8, as LoadImageFromFile
    resized, _ = mmcv.imrescale(img, (1333, 800), return_scale=True)  # Resize, keep_ratio
    h, w = resized.shape[:2]
    scale = np.array([w / img.shape[1], h / img.shape[0]] * 2, dtype=np.float32)
    x = mmcv.imnormalize(resized, np.array(norm.mean, np.float32), np.array(norm.std, np.float32),
                         norm.to_rgb)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    metas = [dict(filename=path, ori_shape=img.shape, img_shape=resized.shape, pad_shape=resized.shape,
                  scale_factor=scale, flip=False, batch_input_shape=(h, w))]
    return tensor, metas


def official_stage(args):
    _install_mmcv_shims()
    import torch

    try:  # the authors' package, on PYTHONPATH (main() runs this stage with --official-src there)
        import easymd  # noqa: F401  (registers the official modules)
    except ImportError as e:
        raise SystemExit(f"official_parity --stage official: cannot import the authors' package easymd ({e}); "
                         f"put --official-src ({args.official_src}) on PYTHONPATH") from e
    from mmcv import Config
    from mmdet.models import build_detector

    cfg = Config.fromfile(os.path.join(args.official_src, OFFICIAL_CONFIG))
    cfg.model.pretrained = None
    torch.manual_seed(args.seed)
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    _perturb_class_biases(model, args.seed + 1)
    model.eval()
    head = model.bbox_head
    names = sorted(os.listdir(args.images))
    # One calibration pass (first image) to read the inputs of the two mask tails.
    tail_inputs = {}
    hooks = [branch.attnen.register_forward_hook(
        lambda module, inputs, output, branch=branch: tail_inputs.__setitem__(branch, inputs[:2]))
        for branch in (head.things_mask_head, head.stuff_mask_head)]
    tensor, metas = _official_inputs(os.path.join(args.images, names[0]), cfg.img_norm_cfg)
    with torch.no_grad():
        head.get_bboxes(*head(model.extract_feat(tensor), metas), metas, rescale=True)
    for hook in hooks:
        hook.remove()
    _diversify_mask_tails(head, tail_inputs)
    os.makedirs(args.work_dir, exist_ok=True)
    ckpt = os.path.join(args.work_dir, "official_r50_random.pth")
    torch.save({"meta": {"note": "random init (seed %d), perturbed class biases and mask tails" % args.seed},
                "state_dict": model.state_dict()}, ckpt)
    for name in names:
        path = os.path.join(args.images, name)
        tensor, metas = _official_inputs(path, cfg.img_norm_cfg)
        ori_shape = metas[0]["ori_shape"]
        captured = {}
        interpolate = torch.nn.functional.interpolate

        def spy(input, size=None, *a, **k):  # the head's resize of the 1/8 masks to ori_shape
            if size is not None and tuple(size) == tuple(ori_shape[:2]):
                captured["masks"] = input[0].clone()
            return interpolate(input, size, *a, **k)

        with torch.no_grad():
            outs = head(model.extract_feat(tensor), metas)
        for tag, (overlap, _) in VARIANTS.items():
            head.overlap_threshold_things, head.overlap_threshold_stuff = overlap
            with torch.no_grad():
                torch.nn.functional.interpolate = spy
                try:
                    res = head.get_bboxes(*outs, metas, rescale=True)
                finally:
                    torch.nn.functional.interpolate = interpolate
            panoptic = res["panoptic"][0][0]  # (H, W, 2): category id, instance id
            np.savez_compressed(
                os.path.join(args.work_dir, "official_%s%s.npz" % (os.path.splitext(name)[0], tag)),
                input=tensor[0].numpy(), ori_shape=np.array(ori_shape[:2]), overlap=np.array(overlap),
                category=panoptic[..., 0].astype(np.int64), instance=panoptic[..., 1].astype(np.int64),
                bbox=res["bbox"][0].numpy(), labels=res["labels"][0].numpy(),
                segm=np.packbits(res["segm"][0].numpy(), axis=-1), masks=captured["masks"].numpy(),
                cls_scores=outs[0][-1][0].sigmoid().numpy())
        print("official: %s %dx%d -> input %dx%d" % (name, ori_shape[0], ori_shape[1], tensor.shape[2],
                                                    tensor.shape[3]), flush=True)
    return ckpt


# ------------------------------------------------------------------------------------------------
# Stage 2: this project (its own venv).
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Wraps the post-processor: records its inputs and forwards its members."""

    def __init__(self, postprocessor):
        self.postprocessor = postprocessor
        self.calls = []

    def __getattr__(self, name):
        if "postprocessor" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["postprocessor"], name)

    def __call__(self, mask_probs, class_probs, labels, is_thing, **kwargs):
        out = self.postprocessor(mask_probs, class_probs, labels, is_thing, **kwargs)
        self.calls.append((mask_probs, class_probs, labels, is_thing, out))
        return out


def _build_our_model(converted):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, OUR_CONFIG))
    cfg.merge_from_list(["MODEL.WEIGHTS", converted, "MODEL.DEVICE", "cpu",
                         "MODEL.PIXEL_MEAN", "[0.0, 0.0, 0.0]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(converted)
    return cfg, model


def compare_image(model, npz, dataset_ids, tolerance, keep_threshold, cache):
    """Run our model on the official input tensor (network once per input, kept in ``cache``), with
    the official post-processor at ``keep_threshold``, and compare with the official outputs."""
    import torch
    import torch.nn.functional as F

    from panoptic_segformer.postprocessing import OfficialMerging, binary_mask_stats, official_maps
    from projects.demo.demo import trace_segment_queries

    d = np.load(npz)
    height, width = (int(v) for v in d["ori_shape"])
    inputs = [{"image": torch.from_numpy(d["input"]), "height": height, "width": width}]
    own = model.postprocessor
    postprocessor = OfficialMerging(own.alpha, own.beta, own.mask_threshold, own.conf_threshold, keep_threshold)
    recorder = _Recorder(postprocessor)
    key = d["input"].tobytes()
    with torch.no_grad():
        if key not in cache:
            cache.clear()
            images = model.preprocess_image(inputs)
            cache[key] = images, model.forward_outputs(images, num_mask_layers=model.test_mask_decoder_layers)
        images, outputs = cache[key]
        result = model.inference(outputs, inputs, images, postprocessor=recorder)[0]
    mask_probs, class_probs, labels, is_thing, (pan, segments) = recorder.calls[0]
    ours = official_maps(pan, segments, dataset_ids)
    theirs = torch.stack([torch.from_numpy(d["category"]), torch.from_numpy(d["instance"])])
    # Masks at 1/8: ours vs the official ones (same query order: top-100 pairs, then stuff).
    our_small = outputs["mask"][-1]["pred_masks"][0]
    their_small = torch.from_numpy(d["masks"])
    mask_diff = float((our_small - their_small).abs().max())
    their_masks = F.interpolate(their_small[None], size=(height, width), mode="bilinear",
                                align_corners=False)[0]
    # Queries painted by our model (the same as the official ones when the segment lists agree).
    traced = trace_segment_queries(postprocessor, pan, segments, mask_probs, class_probs, labels, is_thing)
    painted = sorted({q for qs in traced.values() for q in qs})
    differ = (ours != theirs).any(0)
    masks_above_1 = float((their_small > 1).float().mean())
    near = torch.zeros_like(differ)
    for q in painted:
        for m in (mask_probs[q], their_masks[q]):
            near |= differ & ((m - 0.5).abs() <= tolerance)

    def segment_list(maps):
        pairs = torch.unique(maps.flatten(1).T, dim=0).tolist()
        return sorted((c, i) for c, i in pairs if c > 0)

    ours_segments, their_segments = segment_list(ours), segment_list(theirs)
    report = {
        "pixels": height * width,
        "differing": int(differ.sum()),
        "differing_at_threshold": int(near.sum()),
        "segments_official": len(their_segments),
        "segments_ours": len(ours_segments),
        "segments_equal": ours_segments == their_segments,
        "thing_segments": sum(1 for _, i in their_segments if i > 0),
        "stuff_segments": sum(1 for _, i in their_segments if i == 0),
        "max_abs_mask_diff_1_8": mask_diff,
        "fraction_of_1_8_mask_values_above_1": masks_above_1,
        "pixels_with_a_painted_mask_within_tol": int(sum(
            ((mask_probs[q] - 0.5).abs() <= tolerance).sum() for q in painted)),
    }
    # Instances: the official segm results (all 100 things by descending score).
    inst = result["instances"]
    order = inst.scores.argsort(descending=True, stable=True)
    thing_index = {c: k for k, c in enumerate(model.thing_ids)}
    our_labels = [thing_index[int(c)] for c in inst.pred_classes[order]]
    their_bbox = torch.from_numpy(d["bbox"])
    their_segm = torch.from_numpy(np.unpackbits(d["segm"], axis=-1)[..., :width].astype(bool))
    seg_differ = inst.pred_masks[order] != their_segm
    # The thing query of each instance, in the same order (instances are the top thing scores).
    things = is_thing.nonzero().squeeze(1)
    areas, prob_sums, _, _ = binary_mask_stats(mask_probs, postprocessor.mask_threshold, things.tolist())
    thing_scores = postprocessor.instance_scores(class_probs[things], areas, prob_sums)
    queries = things[thing_scores.argsort(descending=True, stable=True)][:len(inst)]
    seg_near, seg_farthest = torch.zeros((), dtype=torch.long), 0.0
    for k, q in enumerate(queries.tolist()):
        if seg_differ[k].any():
            distance = torch.minimum((mask_probs[q] - 0.5).abs(), (their_masks[q] - 0.5).abs())
            seg_near += (seg_differ[k] & (distance <= tolerance)).sum()
            seg_farthest = max(seg_farthest, float(distance[seg_differ[k]].max()))
    report.update({
        "instances": len(inst),
        "instance_labels_equal": our_labels == d["labels"].tolist(),
        "instance_score_max_rel_diff": float(((inst.scores[order] - their_bbox[:, 4]).abs()
                                              / their_bbox[:, 4].abs().clamp(min=1e-12)).max()),
        "instance_box_max_abs_diff_px": float((inst.pred_boxes.tensor[order] - their_bbox[:, :4]).abs().max()),
        "instance_mask_pixels_differing": int(seg_differ.sum()),
        "instance_mask_pixels_differing_at_threshold": int(seg_near),
        "instance_mask_differing_max_distance_to_0.5": seg_farthest,
    })
    return report


def compare_stage(args, ckpt):
    import torch
    from detectron2.data import MetadataCatalog

    from projects.convert.convert_official import main as convert

    converted = os.path.join(args.work_dir, "converted_r50_random.pth")
    convert([ckpt, converted, "--config-file", os.path.join(REPO_ROOT, OUR_CONFIG)])
    cfg, model = _build_our_model(converted)
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    dataset_ids = {v: k for m in (meta.thing_dataset_id_to_contiguous_id, meta.stuff_dataset_id_to_contiguous_id)
                   for k, v in m.items()}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reports, cache = {}, {}
    for name in sorted(os.listdir(args.work_dir)):
        if name.startswith("official_") and name.endswith(".npz"):
            stem = name[len("official_"):-4]
            tag = next((t for t in VARIANTS if t and stem.endswith(t)), "")
            reports[stem] = compare_image(model, os.path.join(args.work_dir, name), dataset_ids,
                                          args.tolerance, VARIANTS[tag][1], cache)
            print(stem, json.dumps(reports[stem]), flush=True)
    return reports


def format_report(reports, tolerance):
    lines = ["| image | pixels | differing | of which within %g of 0.5 | segments (things + stuff) | "
             "segment lists equal | max abs diff of the 1/8 masks | instances: labels equal, max rel "
             "score diff, max box diff (px), mask pixels differing (of which at the threshold) |" % tolerance,
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in reports.items():
        lines.append(
            "| %s | %d | %d (%.4f%%) | %d | %d (%d + %d) | %s | %.2e | %s, %.1e, %.1e, %d (%d) |" % (
                name, r["pixels"], r["differing"], 100.0 * r["differing"] / r["pixels"],
                r["differing_at_threshold"], r["segments_official"], r["thing_segments"],
                r["stuff_segments"], r["segments_equal"], r["max_abs_mask_diff_1_8"],
                r["instance_labels_equal"], r["instance_score_max_rel_diff"],
                r["instance_box_max_abs_diff_px"], r["instance_mask_pixels_differing"],
                r["instance_mask_pixels_differing_at_threshold"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "official"], default="all",
                        help="'official' is run by the script itself under --official-python")
    parser.add_argument("--official-python", default="/work/venvs/official/bin/python",
                        help="Python of the authors' environment (docs/OFFICIAL_TRAINING_SPEC.md, section 0)")
    parser.add_argument("--official-src", required=True, help="checkout of zhiqi-li/Panoptic-SegFormer")
    parser.add_argument("--images", required=True, help="folder of images (e.g. the COCO panoptic sample)")
    parser.add_argument("--work-dir", required=True, help="where checkpoints and outputs are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-official", action="store_true",
                        help="skip stage 1 and reuse the official outputs already in --work-dir")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="a differing pixel is explained when a painted mask is this close to 0.5")
    args = parser.parse_args(argv)
    if args.stage == "official":
        official_stage(args)
        return 0
    cmd = [args.official_python, "-m", "projects.parity.official_parity", "--stage", "official",
           "--official-src", args.official_src, "--images", args.images, "--work-dir", args.work_dir,
           "--seed", str(args.seed)]
    if not args.reuse_official:
        # The authors' package `easymd` comes from --official-src (after this repository, the cwd).
        path = os.pathsep.join(p for p in (args.official_src, os.environ.get("PYTHONPATH")) if p)
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, env=dict(os.environ, PYTHONPATH=path))
    reports = compare_stage(args, os.path.join(args.work_dir, "official_r50_random.pth"))
    print(json.dumps(reports, indent=1))
    print(format_report(reports, args.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
