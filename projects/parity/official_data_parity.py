#!/usr/bin/env python
"""One-off check: the official-mode data pipeline (``INPUT.AUGMENTATION "official"``) gives the
authors' training inputs and targets, and their test-time resize.

NOT part of the test suite or CI, and never imported by them: it needs the authors' code
(zhiqi-li/Panoptic-SegFormer, commit cdb9b68) and its environment (Python 3.8, mmcv-full 1.3.4 without
compiled ops, mmdet 2.12.0, opencv-python 4.5.1.48), built by hand outside the repository -- the recipe is
in docs/OFFICIAL_TRAINING_SPEC.md, section 0. Run from the repository root with this
project's venv::

    python -m projects.parity.official_data_parity --official-python /work/venvs/official/bin/python \\
        --official-src /path/to/Panoptic-SegFormer --work-dir /tmp/official_data_parity \\
        [--fixture tests/data/official_data_pipeline.npz]

``--stage official`` (run by the script itself under ``--official-python``; this part is Python 3.8):
their ``CocoDataset_panoptic`` with the ``train_pipeline`` of their config
(``configs/panformer/panformer_r50_24e_coco_panoptic.py`` -> ``base.py:117-163``, used as it is), on the
COCO sample shipped in ``panoptic_segformer/data/coco_panoptic_sample`` (annotations converted as their
``tools/converter.py`` does), for each case of :data:`CASES`: the draws of ``numpy.random.choice`` /
``numpy.random.randint`` are replaced by the case's fixed values (each checked against the range the
pipeline asks for, and the ranges recorded). Dumps the uint8 image that reaches ``Normalize`` (converted to
RGB), the normalised tensor, ``gt_bboxes``, ``gt_labels``, ``gt_masks``. Then, with the real RNG seeded
0..``--seeds``-1, the draws of the whole pipeline on each image (which function, its range, its result);
their ``test_pipeline`` on both images; ``mmcv.imnormalize`` of every uint8 value; and the pipeline
configs (the sets of choices).

``--stage ours`` (this project's venv): the dataset mapper of ``configs/coco/official/official_r50_2x.yaml``
on the same cases with the same fixed draws, the model's normalisation
(``PanopticSegFormer.preprocess_image``), the seeded draws, and the official test mapper; prints the
comparison. ``--fixture``: the reduced copy that tests/test_official_data_pipeline.py checks
(:func:`write_fixture`).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

__all__ = ["main", "CASES"]

OFFICIAL_CONFIG = os.path.join("configs", "panformer", "panformer_r50_24e_coco_panoptic.py")
OUR_CONFIG = os.path.join("configs", "coco", "official", "official_r50_2x.yaml")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO_ROOT, "panoptic_segformer", "data", "coco_panoptic_sample")
DUMP_NAME = "official_data_dump.npz"

# Fixed draws, in the order the pipeline makes them: RandomFlip's choice index (0 = flip, 1 = no flip),
# AutoAugment's policy index (0 = multi-scale resize, 1 = resize -> crop -> resize), then
#   policy 0: the scale index in (480, ..., 800);
#   policy 1: the pre-crop scale index in (400, 500, 600), crop_h, crop_w, offset_h, offset_w, the scale index.
CASES = [
    ("000000142238.jpg", [0, 0, 10]),                           # flip, resize to (800, 1333)
    ("000000142238.jpg", [1, 1, 1, 450, 520, 30, 200, 4]),      # 500 -> crop 450x520 at (30, 200) -> 608
    ("000000142238.jpg", [0, 1, 0, 390, 420, 5, 150, 2]),       # flip, 400 -> crop 390x420 -> 544
    ("000000439180.jpg", [1, 0, 0]),                            # resize to (480, 1333)
    ("000000439180.jpg", [0, 1, 0, 385, 588, 7, 109, 10]),      # flip; a thing kept with an empty mask
    ("000000439180.jpg", [0, 1, 2, 560, 400, 20, 600, 7]),      # flip, 600 -> crop 560x400 -> 704
]


class ScriptedRandom(object):
    """Stand-in for ``numpy.random.choice`` / ``randint``: returns the queued values (for ``choice(a)``
    the element ``a[index]``), checking each against the range asked, and records ``(name, low, high, p,
    value)``. ``passthrough=True`` draws with numpy instead (seeded runs) and records the same."""

    def __init__(self, values=(), passthrough=False):
        self.values = list(values)
        self.passthrough = passthrough
        self.calls = []
        self._choice, self._randint = np.random.choice, np.random.randint

    def choice(self, a, size=None, replace=True, p=None):
        assert size is None and replace
        n = a if isinstance(a, int) else len(a)
        if self.passthrough:  # their call as it is; the index of the element it returned
            r = self._choice(a, p=p)
            index = int(r) if isinstance(a, int) else [
                i for i, x in enumerate(a) if x is r or (x is not None and r is not None and
                                                         isinstance(x, str) and x == r)][0]
        else:
            index = self._pop(0, n)
        self.calls.append(("choice", 0, int(n), None if p is None else [float(v) for v in p], index))
        return index if isinstance(a, int) else a[index]

    def randint(self, low, high=None, size=None, dtype=int):
        assert size is None
        if high is None:
            low, high = 0, low
        value = int(self._randint(low, high)) if self.passthrough else self._pop(low, high)
        self.calls.append(("randint", int(low), int(high), None, value))
        return value

    def _pop(self, low, high):
        if not self.values:
            raise RuntimeError("unexpected draw in [%d, %d)" % (low, high))
        v = self.values.pop(0)
        if not low <= v < high:
            raise ValueError("fixed draw %d outside [%d, %d)" % (v, low, high))
        return v

    def __enter__(self):
        np.random.choice, np.random.randint = self.choice, self.randint
        return self

    def __exit__(self, *exc):
        np.random.choice, np.random.randint = self._choice, self._randint
        if exc[0] is None and self.values:
            raise RuntimeError("fixed draws not consumed: %r" % self.values)
        return False


# ------------------------------------------------------------------------------------------------
# Stage "official" (their Python 3.8 venv; keep this part Python 3.8 syntax).
# ------------------------------------------------------------------------------------------------
def official_stage(args):
    sys.path.insert(0, REPO_ROOT)
    from projects.parity.official_parity import _install_mmcv_shims
    from projects.parity.official_train_parity import write_detection_json

    _install_mmcv_shims()
    import easymd  # noqa: F401  (registers CocoDataset_panoptic)
    import mmcv
    from easymd.datasets.coco_panoptic import CocoDataset_panoptic
    from mmcv import Config
    from mmdet.datasets.pipelines import Compose

    cfg = Config.fromfile(os.path.join(args.official_src, OFFICIAL_CONFIG))
    os.makedirs(args.work_dir, exist_ok=True)
    det_json = write_detection_json(args.coco_sample, os.path.join(args.work_dir, "detection_sample.json"))
    images = os.path.join(args.coco_sample, "images") + "/"
    ds = CocoDataset_panoptic(ann_file=det_json, pipeline=cfg.data.train.pipeline, img_prefix=images,
                              filter_empty_gt=cfg.data.train.get("filter_empty_gt", True))
    names = [info["file_name"] for info in ds.data_infos]
    seen = []
    # Compose calls t(data): a wrapped instance attribute __call__ is not used by Python's t(...), so
    # replace the Normalize object in the list by a function.
    from mmdet.datasets.pipelines import Normalize
    for i, t in enumerate(ds.pipeline.transforms):
        if isinstance(t, Normalize):
            ds.pipeline.transforms[i] = (lambda results, t=t: (seen.append(results["img"].copy()), t(results))[1])
    out = {}
    for k, (name, draws) in enumerate(CASES):
        seen[:] = []
        with ScriptedRandom(draws) as rng:
            data = ds.prepare_train_img(names.index(name))
        meta = data["img_metas"].data
        img_u8 = seen[0][..., ::-1]  # BGR -> RGB (exact)
        p = "case%d/" % k
        out[p + "img_u8"] = np.ascontiguousarray(img_u8)
        out[p + "img"] = data["img"].data.numpy()
        out[p + "gt_bboxes"] = data["gt_bboxes"].data.numpy()
        out[p + "gt_labels"] = data["gt_labels"].data.numpy()
        out[p + "gt_masks"] = np.asarray(data["gt_masks"].data.masks, dtype=np.uint8)
        out[p + "calls"] = np.array(json.dumps(rng.calls))
        out[p + "meta"] = np.array(json.dumps({"name": name, "draws": draws, "flip": bool(meta["flip"]),
                                               "img_shape": list(meta["img_shape"]),
                                               "ori_shape": list(meta["ori_shape"])}))
        print("official: case %d %s draws %s -> %s, %d gts, ranges %s" % (
            k, name, draws, tuple(img_u8.shape), len(out[p + "gt_labels"]),
            [c[1:3] for c in rng.calls]), flush=True)
    # Seeded draws of the whole pipeline.
    seeded = {}
    for name in sorted(set(names)):
        logs = []
        for seed in range(args.seeds):
            np.random.seed(seed)
            with ScriptedRandom(passthrough=True) as rng:
                ds.prepare_train_img(names.index(name))
            logs.append(rng.calls)
        seeded[name] = logs
    out["seeded_calls"] = np.array(json.dumps(seeded))
    # Test pipeline.
    test_pipe = Compose(cfg.data.test.pipeline)
    msfa = test_pipe.transforms[1]
    for i, t in enumerate(msfa.transforms.transforms):
        if isinstance(t, Normalize):
            msfa.transforms.transforms[i] = (
                lambda results, t=t: (seen.append(results["img"].copy()), t(results))[1])
    for name in sorted(set(names)):
        seen[:] = []
        data = test_pipe(dict(img_info=dict(filename=name), img_prefix=images))
        p = "test/%s/" % name
        out[p + "img_u8"] = np.ascontiguousarray(seen[0][..., ::-1])
        out[p + "img"] = data["img"][0].numpy()
        print("official: test %s -> %s" % (name, tuple(seen[0].shape)), flush=True)
    # mmcv.imnormalize of every uint8 value (BGR ramp: channel c of row v holds v).
    norm = cfg.img_norm_cfg
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
    out["norm_table"] = mmcv.imnormalize(ramp, np.array(norm.mean, np.float32), np.array(norm.std, np.float32),
                                         norm.to_rgb)[:, 0, :]
    out["config"] = np.array(json.dumps({"train_pipeline": cfg.data.train.pipeline, "img_norm_cfg": norm,
                                         "test_pipeline": cfg.data.test.pipeline,
                                         "filter_empty_gt": cfg.data.train.get("filter_empty_gt")},
                                        default=list))
    np.savez(os.path.join(args.work_dir, DUMP_NAME), **out)
    print("official: wrote %s" % os.path.join(args.work_dir, DUMP_NAME))


# ------------------------------------------------------------------------------------------------
# Fixture (either venv).
# ------------------------------------------------------------------------------------------------
def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def mask_label_map(masks):
    """(N, H, W) disjoint binary masks -> (H, W) uint8 map of mask index + 1 (0 = none)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[0] > 254:
        raise ValueError("too many masks for a uint8 label map")
    if masks.shape[0] and masks.sum(0).max() > 1:
        raise ValueError("masks overlap: a label map cannot hold them")
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i, m in enumerate(masks):
        out[m] = i + 1
    return out


SUBSAMPLE = 8  # stride of the pixel subsample kept for diagnostics


def write_fixture(dump_path, out_path):
    """The subset tests/test_official_data_pipeline.py needs: per case the draws, the ranges asked, the
    sha256 of their uint8 image (RGB, HWC) and of their normalised float32 tensor (CHW), a 1/8 pixel
    subsample of the uint8 image, the masks as one uint8 label map (they are disjoint) with each mask's
    pixel count, the boxes (float32) and labels; the test images' sha256s, shapes and subsample; the
    normalisation table; the seeded draws; their pipeline configs (JSON)."""
    dump = np.load(dump_path)
    out = {}
    for key in dump.files:
        if key.startswith("case"):
            p, field = key.split("/", 1)
            v = dump[key]
            if field == "img_u8":
                out[p + "/img_u8_sha256"] = np.array(sha256(v))
                out[p + "/img_u8_sub"] = v[::SUBSAMPLE, ::SUBSAMPLE]
                out[p + "/img_shape"] = np.array(v.shape)
            elif field == "img":
                out[p + "/img_sha256"] = np.array(sha256(v.astype(np.float32)))
            elif field == "gt_masks":
                out[p + "/mask_map"] = mask_label_map(v)
                out[p + "/mask_area"] = v.reshape(len(v), -1).sum(1).astype(np.int64)
            else:
                out[key] = v
        elif key.startswith("test/"):
            p, field = key.rsplit("/", 1)
            v = dump[key]
            if field == "img_u8":
                out[p + "/img_u8_sha256"] = np.array(sha256(v))
                out[p + "/img_u8_sub"] = v[::SUBSAMPLE, ::SUBSAMPLE]
                out[p + "/img_shape"] = np.array(v.shape)
            else:
                out[p + "/img_sha256"] = np.array(sha256(v.astype(np.float32)))
        else:
            out[key] = dump[key]
    np.savez_compressed(out_path, **out)
    return out_path


# ------------------------------------------------------------------------------------------------
# Stage "ours" (this project's venv).
# ------------------------------------------------------------------------------------------------
def build_our_mappers(config=OUR_CONFIG):
    from panoptic_segformer import PanopticSegFormerDatasetMapper
    from panoptic_segformer.config import setup_cfg

    cfg = setup_cfg(os.path.join(REPO_ROOT, config), ["DATASETS.TRAIN", "('coco_panoptic_sample',)",
                                                       "DATASETS.TEST", "('coco_panoptic_sample',)"])
    return cfg, PanopticSegFormerDatasetMapper(cfg, is_train=True), PanopticSegFormerDatasetMapper(cfg, is_train=False)


def our_normalisation(cfg, image):
    """The model's own normalisation (``PanopticSegFormer.preprocess_image``) of one uint8 CHW image."""
    import types

    import torch

    from panoptic_segformer.panoptic_segformer import PanopticSegFormer

    model = types.SimpleNamespace(
        pixel_mean=torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), device=torch.device("cpu"),
        size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY, check_input_image=lambda x, i: x)
    return PanopticSegFormer.preprocess_image(model, [{"image": image}]).tensor[0]


def our_stage(args):
    import torch
    from detectron2.data import DatasetCatalog

    cfg, train_mapper, test_mapper = build_our_mappers()
    dicts = {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get("coco_panoptic_sample")}
    dump = np.load(os.path.join(args.work_dir, DUMP_NAME))
    ok = True
    totals = dict(pixels=0, px_diff=0, floats=0, float_diff=0, boxes=0, box_diff=0, masks=0, mask_px=0,
                  mask_diff=0, labels=0, label_diff=0)
    print("| case | image | draws | size | flip/policy | pixels differing (uint8) | tensor values differing | "
          "gts (things/stuff) | boxes differing | mask pixels differing | ranges asked equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, (name, draws) in enumerate(CASES):
        p = "case%d/" % k
        with ScriptedRandom(draws) as rng:
            out = train_mapper(dicts[name])
        ranges_equal = [list(c) for c in rng.calls] == json.loads(str(dump[p + "calls"]))
        theirs_u8 = dump[p + "img_u8"]
        ours_u8 = out["image"].permute(1, 2, 0).numpy()
        same_shape = ours_u8.shape == theirs_u8.shape
        px_diff = int((ours_u8 != theirs_u8).sum()) if same_shape else -1
        ours_t = our_normalisation(cfg, out["image"]).numpy()
        theirs_t = dump[p + "img"]
        t_diff = int((ours_t != theirs_t).sum()) if ours_t.shape == theirs_t.shape else -1
        labels = dump[p + "gt_labels"]
        thing = labels < 80
        their_boxes, their_masks = dump[p + "gt_bboxes"], dump[p + "gt_masks"].astype(bool)
        inst, stuff = out["instances"], out["stuff"]
        our_labels = np.concatenate([inst.gt_classes.numpy(), stuff.gt_classes.numpy()])
        our_boxes = np.concatenate([inst.gt_boxes.tensor.numpy(), stuff.gt_boxes.tensor.numpy()])
        our_masks = np.concatenate([inst.gt_masks.tensor.numpy(), stuff.gt_masks.tensor.numpy()])
        order = np.concatenate([np.nonzero(thing)[0], np.nonzero(~thing)[0]])
        n_same = len(our_labels) == len(labels)
        label_diff = int((our_labels != labels[order]).sum()) if n_same else -1
        box_diff = int((our_boxes != their_boxes[order]).any(1).sum()) if n_same else -1
        mask_diff = int((our_masks != their_masks[order]).sum()) if n_same and same_shape else -1
        totals["pixels"] += theirs_u8.size
        totals["floats"] += theirs_t.size
        totals["boxes"] += len(labels)
        totals["labels"] += len(labels)
        totals["masks"] += len(labels)
        totals["mask_px"] += their_masks.size
        for key, v in (("px_diff", px_diff), ("float_diff", t_diff), ("box_diff", box_diff),
                       ("mask_diff", mask_diff), ("label_diff", label_diff)):
            totals[key] += max(v, 0)
        case_ok = ranges_equal and min(px_diff, t_diff, label_diff, box_diff, mask_diff) == 0 and max(
            px_diff, t_diff, label_diff, box_diff, mask_diff) == 0
        ok &= case_ok
        meta = json.loads(str(dump[p + "meta"]))
        empty = int((their_masks.reshape(len(labels), -1).sum(1) == 0).sum())
        print("| %d | %s | %s | %dx%d | %s/%s | %d of %d | %d of %d | %d (%d/%d, %d empty) | %d | %d of %d | %s |" % (
            k, name, draws, theirs_u8.shape[0], theirs_u8.shape[1], "flip" if meta["flip"] else "-",
            "crop" if draws[1] else "resize", px_diff, theirs_u8.size, t_diff, theirs_t.size, len(labels),
            int(thing.sum()), int((~thing).sum()), empty, box_diff, mask_diff, their_masks.size, ranges_equal))
    print()
    print("totals: %s" % totals)
    # Seeded draws.
    seeded = json.loads(str(dump["seeded_calls"]))
    n_equal = n_runs = 0
    for name, logs in sorted(seeded.items()):
        for seed, theirs in enumerate(logs):
            np.random.seed(seed)
            with ScriptedRandom(passthrough=True) as rng:
                train_mapper(dicts[name])
            n_runs += 1
            n_equal += [list(c) for c in rng.calls] == [list(c) for c in theirs]
    print("seeded draws (flip, policy, scales, crop): %d of %d runs equal theirs" % (n_equal, n_runs))
    ok &= n_equal == n_runs
    # Test pipeline.
    for name in sorted(dicts):
        p = "test/%s/" % name
        out = test_mapper(dicts[name])
        ours_u8 = out["image"].permute(1, 2, 0).numpy()
        theirs_u8 = dump[p + "img_u8"]
        same = ours_u8.shape == theirs_u8.shape
        d = int((ours_u8 != theirs_u8).sum()) if same else -1
        ours_t = our_normalisation(cfg, out["image"]).numpy()
        dt = int((ours_t != dump[p + "img"]).sum()) if ours_t.shape == dump[p + "img"].shape else -1
        print("test %s: %s vs theirs %s, %d of %d uint8 values differ, %d of %d tensor values" % (
            name, ours_u8.shape, theirs_u8.shape, d, theirs_u8.size, dt, dump[p + "img"].size))
        ok &= d == 0 and dt == 0
    # Normalisation of every uint8 value.
    ramp = torch.arange(256, dtype=torch.uint8)[None, :, None].expand(3, 256, 1).contiguous()
    table = our_normalisation(cfg, ramp)[:, :, 0].T.numpy()
    nd = int((table != dump["norm_table"]).sum())
    print("normalisation: %d of %d (value, channel) pairs differ from mmcv.imnormalize" % (nd, table.size))
    ok &= nd == 0
    print("ALL EQUAL" if ok else "DIFFERENCES FOUND")
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "official", "fixture", "ours"], default="all",
                        help="'official' is run by the script itself under --official-python")
    parser.add_argument("--official-python", default="/work/venvs/official/bin/python")
    parser.add_argument("--official-src", default="", help="checkout of zhiqi-li/Panoptic-SegFormer")
    parser.add_argument("--coco-sample", default=SAMPLE, help="COCO panoptic sample folder")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--fixture", default="", help="also write the test fixture (.npz) here")
    parser.add_argument("--seeds", type=int, default=100, help="seeded pipeline runs per image")
    args = parser.parse_args(argv)
    if args.stage == "official":
        official_stage(args)
        return 0
    if args.stage == "all":
        if not args.official_src:
            parser.error("--official-src is required for stage 'all'")
        cmd = [args.official_python, "-m", "projects.parity.official_data_parity", "--stage", "official",
               "--official-src", args.official_src, "--coco-sample", args.coco_sample,
               "--work-dir", args.work_dir, "--seeds", str(args.seeds)]
        path = os.pathsep.join(p for p in (args.official_src, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, env=env)
    if args.fixture and args.stage in ("all", "fixture"):
        write_fixture(os.path.join(args.work_dir, DUMP_NAME), args.fixture)
        print("fixture: %s (%.0f KB)" % (args.fixture, os.path.getsize(args.fixture) / 1024))
    if args.stage in ("all", "ours"):
        return 0 if our_stage(args) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
