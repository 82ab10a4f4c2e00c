"""Regression fixture: the model's outputs on the 2 real COCO sample images (and 2 shapes images) stay
what they are, on any x86-64 CPU and at any thread count.

Three seeded models -- the paper's architecture, the official one (4 levels, official decoder, (query,
class) pairs, the "official" post-processor), both at the small `shapes` width with the COCO sample's 80
thing / 53 stuff classes, and the shapes config itself on 2 shapes images -- have their class biases and
attention projections perturbed (a random init gives near-uniform masks), so that the panoptic merge, the
instance ranking and the semantic map all have real work to do. ``tests/data/golden_outputs.npz`` holds
their outputs computed in **float64** (the same weights and input tensor; the exact answer up to float64
rounding, stored rounded to float32) and, for every float output, ``err32``: how far the float32
computation was from it when the fixture was written.

What a float32 run must meet, and why (the float32 results of PyTorch, oneDNN and MKL depend on the
instruction set and the thread count, which choose the order of every sum; the fixture was written on an
AMD EPYC with AVX2 and must hold on an Intel Xeon with AVX-512/AMX too):

- **Float outputs** (per-query class logits and 1/8 mask logits, the location decoder's logits, instance
  scores and boxes, segment scores, the semantic map at a grid of pixels and its class sums): within
  ``FLOAT_TOL_FACTOR * err32 + 4 ulp(max |value|)`` of the float64 value. A float32 run on another CPU
  rounds the same sums in another order: its error is bounded by the same ``gamma_n * sum |terms|`` as
  the fixture's run and is of the same size in practice (measured on the AMD EPYC that wrote the fixture:
  at most 1.25x err32 with AVX2 at 1 or 2 threads, at most 4.1x with ATen's generic kernels, oneDNN at
  SSE4.1 and MKL at SSE4.2 at 1 or 2 threads; docs/BENCHMARKS.md, "Test suite"), so a
  factor 8 leaves room without hiding a real change (a changed weight or formula moves these outputs by
  orders of magnitude more). The 4 ulp floor covers outputs that float32 happened to compute exactly, and the
  float32 rounding of the stored value.
- **Discrete outputs** decided by a threshold or a tie are equal to the float64 ones except at elements
  whose deciding value lies within ``eps`` of the threshold or tie; those are counted and bounded:
  - panoptic and instance mask pixels: some query's full-resolution mask probability is within
    ``eps_mask = 0.25 * tol(pred_masks)`` of the mask threshold at that pixel (the sigmoid's slope is at
    most 1/4, and bilinear upsampling is a convex combination, so a pixel's probability moves by at most
    a quarter of the 1/8 logits' tolerance; for the official model's unclamped masks, the factor is 1);
    at most ``MAX_FLIPPED_FRACTION`` of the pixels;
  - sem_seg argmax pixels: the two largest class values are within ``2 * tol(sem_seg)`` of each other;
    at most ``MAX_FLIPPED_FRACTION`` of the pixels;
  - segments and instances are matched by class and score (within the score tolerance), so two
    near-tied segments or instances may come out in either order (their ids / ranks swap);
  - the official model's selected (query, class) pairs: the top-k of its location logits. The fixture's
    smallest gap between two of the k + 1 largest logits is asserted to exceed twice their tolerance, so
    no pair can change or move within float32 rounding: they are compared exactly.
- Integer outputs computed without floats (segment ids and classes after matching) are compared exactly.

``tests/test_portability.py`` runs this module again with the generic (non-vectorised) ATen kernels,
oneDNN limited to SSE4.1, MKL limited to SSE4.2, on 1 thread; here it runs at the process's thread count.

Rewrite the fixture (``python -m tests.test_golden_outputs --write`` from the repository root) only for a
change meant to alter outputs, and say why in the commit.
"""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO_ROOT, "tests", "data", "golden_outputs.npz")
SHAPES_YAML = os.path.join(REPO_ROOT, "configs", "shapes", "panoptic_segformer_shapes.yaml")
COMMON = [
    "DATASETS.TRAIN", "('coco_panoptic_sample',)", "DATASETS.TEST", "('coco_panoptic_sample',)",
    "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80", "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "53",
    "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "400", "MODEL.DEVICE", "cpu",
    "MODEL.PANOPTIC_SEGFORMER.TEST.DETECTIONS_PER_IMAGE", "12",
]
MODELS = {
    "paper": COMMON + [
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.2",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.2",
        "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_THING", "0.3",
        "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_STUFF", "0.3"],
    "official": COMMON + [
        "MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE", "official",
        "MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "4",
        "MODEL.PANOPTIC_SEGFORMER.POSITION_ENCODING_OFFSET", "-0.5",
        "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS", "2",
        "MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder",
        "MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR", "official",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.1",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.1",
        "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_THING", "0.3",
        "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_STUFF", "0.3"],
}


# The `shapes` model is the shapes config as it is (its own 3 thing / 6 stuff classes) on 2 shapes images.
MODELS["shapes"] = ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)",
                    "MODEL.DEVICE", "cpu", "MODEL.PANOPTIC_SEGFORMER.TEST.DETECTIONS_PER_IMAGE", "12",
                    "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.2",
                    "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.2",
                    "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_THING", "0.3",
                    "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_STUFF", "0.05"]
MASK_BIAS_SHIFT = {"paper": 8.0, "official": 30.0, "shapes": 8.0}
STUFF_BIAS_SHIFT = {"shapes": 6.0}  # its 3 stuff queries: from the focal prior up to where some are kept

FLOAT_TOL_FACTOR = 8.0  # x err32, see the module docstring
MAX_FLIPPED_FRACTION = 1e-3  # of an image's pixels, each of them at a threshold or tie
SEM_GRID = 16  # sem_seg values are stored at every 16th pixel in each direction (all 133 classes)


def _perturbed_model(name, opts=(), attention_noise=0.5, mask_bias_shift=None):
    """Config and seeded, perturbed model ``name``; ``opts`` (KEY VALUE ...), the noise on the attention
    projections and the mask-bias shift (default: MASK_BIAS_SHIFT[name]) change it for other tests
    (test_onnx_export: milder logits)."""
    from detectron2.modeling import build_model

    from panoptic_segformer.config import setup_cfg

    shift = MASK_BIAS_SHIFT[name] if mask_bias_shift is None else mask_bias_shift
    cfg = setup_cfg(SHAPES_YAML, MODELS[name] + list(opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "class_embed" in pname and pname.endswith("bias"):
                p.add_(noise * 2.0)  # class probabilities spread over (0, 1)
                if "stuff_class_embed" in pname:
                    p.add_(STUFF_BIAS_SHIFT.get(name, 0.0))
            elif "cross_attn.q_proj" in pname or "cross_attn.k_proj" in pname:
                p.add_(noise * attention_noise)  # spatially structured attention maps, hence masks
            elif "mask_head" in pname:
                p.add_(noise * 0.3)
            if pname.endswith("mask_heads.1.conv2.bias") or pname.endswith("tail.mask_head.fc.bias"):
                p.sub_(shift)  # smaller, more distinct masks
    return cfg, model


def _inputs(cfg):
    from detectron2.data import DatasetCatalog

    from panoptic_segformer import PanopticSegFormerDatasetMapper

    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:2]]


class Run:
    """One model's outputs on the 2 images, in float32 or float64: ``values`` {key: np.ndarray} of the
    fixture's keys, and what the discrete comparisons need (the per-query 1/8 masks, the full semantic
    maps)."""

    def __init__(self, name, dtype=torch.float32):
        self.name = name
        cfg, self.model = _perturbed_model(name)
        self.model.to(dtype)
        inputs = _inputs(cfg)
        with torch.no_grad():
            self.images = self.model.preprocess_image(inputs)
            self.images.tensor = self.images.tensor.to(dtype)  # the same normalised float32 input, exactly
            outputs = self.model.forward_outputs(self.images, num_mask_layers=self.model.test_mask_decoder_layers)
            results = self.model.inference(outputs, inputs, self.images)
        self.output_sizes = [(x["height"], x["width"]) for x in inputs]
        self.masks = outputs["mask"][-1]["pred_masks"]
        self.sem = [r["sem_seg"] for r in results]
        v, last = {}, outputs["mask"][-1]
        for key in ("thing_logits", "stuff_logits", "pred_masks"):
            v[f"{name}/{key}"] = last[key]
        v[f"{name}/location_logits"] = outputs["location"]["pred_logits"][-1]
        v[f"{name}/thing_query_index"] = outputs["thing_query_index"]
        for i, r in enumerate(results):
            p = f"{name}/{i}"
            pan, segments = r["panoptic_seg"]
            v[f"{p}/panoptic_seg"] = pan
            v[f"{p}/segments"] = np.array(json.dumps([[s["id"], s["category_id"], bool(s["isthing"])]
                                                      for s in segments]))
            v[f"{p}/segments.score"] = torch.tensor([s["score"] for s in segments], dtype=torch.float64)
            inst = r["instances"]
            v[f"{p}/instances.scores"] = inst.scores
            v[f"{p}/instances.pred_classes"] = inst.pred_classes
            v[f"{p}/instances.pred_boxes"] = inst.pred_boxes.tensor
            v[f"{p}/instances.pred_masks"] = inst.pred_masks
            sem = r["sem_seg"]
            v[f"{p}/sem_seg.grid"] = sem[:, ::SEM_GRID, ::SEM_GRID]
            v[f"{p}/sem_seg.argmax"] = sem.argmax(0).to(torch.int16)
            v[f"{p}/sem_seg.class_sums"] = sem.double().sum((1, 2))
        self.values = {k: t if isinstance(t, np.ndarray) else t.detach().cpu().numpy() for k, t in v.items()}

    def mask_margin(self, i):
        """(H, W) float64 of image i at the output size: the smallest distance of any query's mask
        probability to the mask threshold (the model's own way to the output size)."""
        model = self.model
        post = model.postprocessor
        to_image = getattr(post, "masks_to_image", None)
        if to_image is None:
            from panoptic_segformer.utils import upsample_masks_to_image as to_image
        max_value = getattr(post, "max_mask_value", 1.0)
        margin = None
        with torch.no_grad():
            for rows in torch.arange(self.masks.shape[1]).split(32):
                up = to_image(self.masks[i, rows], self.images.image_sizes[i], model.mask_stride, self.output_sizes[i])
                probs = model.mask_decoder.mask_probabilities(up, max_value=max_value)
                m = (probs.double() - model.mask_threshold).abs().amin(0)
                margin = m if margin is None else torch.minimum(margin, m)
        return margin.numpy()

    def sem_margin(self, i):
        """(H, W) of image i: the gap between the two largest class values of sem_seg (its argmax's tie)."""
        top = self.sem[i].double().topk(2, dim=0).values
        return (top[0] - top[1]).numpy()


def _float_keys(values):
    return sorted(k for k, a in values.items() if a.dtype.kind == "f")


def _tolerance(expected, key):
    """FLOAT_TOL_FACTOR x err32 + 4 ulp of the largest finite value (module docstring)."""
    ref = expected[key]
    finite = np.abs(ref[np.isfinite(ref)])
    scale = float(finite.max()) if finite.size else 0.0
    return FLOAT_TOL_FACTOR * float(expected[key + ".err32"]) + 4 * float(np.spacing(np.float32(scale)))


def max_abs_error(got, ref):
    """max |got - ref| over the finite elements of ``ref``; inf where the non-finite elements differ
    (the official thing logits are -inf for the classes a (query, class) pair does not hold), nan where
    ``got`` is nan."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(got[~finite], ref[~finite]):
        return float("inf")
    return float(np.abs(got[finite] - ref[finite]).max()) if finite.any() else 0.0


def _match(ref_classes, ref_scores, got_classes, got_scores, tols):
    """Pairs (i, j) matching reference item i to item j of this run: the same class and scores within
    ``tols[i]``, nearest score first; None when some item has no partner."""
    pairs, used = [], set()
    for i, (c, s) in enumerate(zip(ref_classes, ref_scores)):
        options = [j for j, (c2, s2) in enumerate(zip(got_classes, got_scores))
                   if j not in used and c2 == c and abs(s2 - s) <= tols[i]]
        if not options:
            return None
        j = min(options, key=lambda j: (abs(got_scores[j] - s), abs(j - i)))
        used.add(j)
        pairs.append((i, j))
    return pairs if len(used) == len(got_classes) else None


MATCHED_FIRST = ("segments.score", "instances.scores", "instances.pred_boxes")


def _pair_ratio(expected, got, key, pairs):
    """max |got - float64| / err32 over matched (reference, this run) pairs."""
    diff = max((abs(float(got[key][j]) - float(expected[key][i])) for i, j in pairs), default=0.0)
    return diff / max(float(expected[key + ".err32"]), 1e-300)


def compare(expected, run):
    """List of failures (empty when ``run`` meets the fixture ``expected``, module docstring); also
    returns the measured ratio |run - float64| / err32 of every float output."""
    name, got = run.name, run.values
    failures, ratios = [], {}
    keys = sorted(k for k in expected.files if k.startswith(name + "/") and not k.endswith(".err32"))
    if keys != sorted(got):
        return [f"output keys changed: {sorted(set(keys) ^ set(got))}"], ratios
    tol = {k: _tolerance(expected, k) for k in _float_keys({k: expected[k] for k in keys})}
    for k, t in tol.items():
        if k.endswith(MATCHED_FIRST):
            continue  # per segment / instance: compared once items are matched (a near-tie may swap two)
        if expected[k].shape != got[k].shape:
            failures.append(f"{k}: shape {got[k].shape} != {expected[k].shape}")
            continue
        diff = max_abs_error(got[k], expected[k])
        ratios[k] = diff / max(float(expected[k + ".err32"]), 1e-300)
        if not diff <= t:  # also fails on NaN
            failures.append(f"{k}: max |float32 - float64| = {diff:.3g} > tolerance {t:.3g}")
    if failures:
        return failures, ratios

    # The official model's (query, class) pairs: top-k of the location logits, far from any tie.
    index = expected[f"{name}/thing_query_index"]
    if not np.array_equal(index, got[f"{name}/thing_query_index"]):
        failures.append(f"{name}/thing_query_index differs")
    if model_selects_pairs(run.model):
        k = index.shape[1]
        top = np.sort(expected[f"{name}/location_logits"].reshape(len(index), -1), axis=1)[:, ::-1][:, :k + 1]
        gap = float(np.diff(top, axis=1).__abs__().min())
        if not gap > 2 * tol[f"{name}/location_logits"]:
            failures.append(f"fixture: location logits tie within tolerance (gap {gap:.3g}); choose other seeds")

    from panoptic_segformer.utils import masks_to_boxes

    mask_boxes = not model_selects_pairs(run.model)  # else the location decoder's boxes of the pairs
    eps_mask = (1.0 if getattr(run.model.postprocessor, "max_mask_value", 1.0) == float("inf") else 0.25) \
        * tol[f"{name}/pred_masks"]
    for i in range(len(run.output_sizes)):
        p = f"{name}/{i}"
        pixels = int(np.prod(run.output_sizes[i]))
        margins = []  # run.mask_margin(i), computed once when needed

        def margin():
            if not margins:
                margins.append(run.mask_margin(i))
            return margins[0]

        def at_threshold(diff, what):
            if not diff.any():
                return
            n, worst = int(diff.sum()), float(margin()[diff].max())
            if worst > eps_mask or n > MAX_FLIPPED_FRACTION * pixels:
                failures.append(f"{what}: {n} pixels differ, up to {worst:.3g} from the mask threshold "
                                f"(allowed: {eps_mask:.3g}, at most {MAX_FLIPPED_FRACTION * pixels:.0f} pixels)")

        def match(ref_items, got_items, key, areas):
            """Pairs by class and score. A score is a function of its binary mask's mean probability:
            if no pair is found within the float tolerance, the k pixels of the image that lie within
            eps_mask of the threshold may have flipped in or out of the mask (area A). Each moves the
            mean of a mask whose mean is >= 0.25 by at most 1/(A - k) of it, and a score is at most the
            mean squared (Eq. 6; beta = 2): the score moves by at most 2k / (A - k) of itself, doubled
            for second-order terms."""
            ref_scores, got_scores = expected[key], got[key]
            pairs = _match(ref_items, ref_scores, got_items, got_scores, np.full(len(ref_items), tol[key]))
            if pairs is None and len(ref_items):
                k = int((margin() <= eps_mask).sum())
                flips = 4.0 * np.abs(ref_scores) * k / np.maximum(np.asarray(areas, dtype=np.float64) - k, 1.0)
                pairs = _match(ref_items, ref_scores, got_items, got_scores, tol[key] + flips)
            if pairs is None:
                failures.append(f"{key}: {got_items} scored {got_scores} do not match {ref_items} scored "
                                f"{ref_scores} (by class and score)")
            else:
                ratios[key] = _pair_ratio(expected, got, key, pairs)
            return pairs

        # Panoptic: segments matched by class and score; the map compared after renumbering.
        ref_seg, got_seg = json.loads(str(expected[f"{p}/segments"])), json.loads(str(got[f"{p}/segments"]))
        ref_pan = expected[f"{p}/panoptic_seg"]
        pairs = match([(c, t) for _, c, t in ref_seg], [(c, t) for _, c, t in got_seg], f"{p}/segments.score",
                      [int((ref_pan == s[0]).sum()) for s in ref_seg])  # the kept area: <= the mask's
        if pairs is not None:
            renumber = np.zeros(max([s[0] for s in got_seg], default=0) + 1, dtype=np.int64)
            for i_ref, j in pairs:
                renumber[got_seg[j][0]] = ref_seg[i_ref][0]
            at_threshold(renumber[got[f"{p}/panoptic_seg"]] != ref_pan, f"{p}/panoptic_seg")
        # Instances: matched by class and score; each pair's masks equal except at the threshold.
        ref_masks, got_masks = expected[f"{p}/instances.pred_masks"], got[f"{p}/instances.pred_masks"]
        pairs = match(expected[f"{p}/instances.pred_classes"].tolist(), got[f"{p}/instances.pred_classes"].tolist(),
                      f"{p}/instances.scores", ref_masks.reshape(len(ref_masks), -1).sum(1))
        if pairs is not None:
            ref_boxes, got_boxes = expected[f"{p}/instances.pred_boxes"], got[f"{p}/instances.pred_boxes"]
            diff = np.zeros(ref_masks.shape[1:], dtype=bool)
            for i_ref, j in pairs:
                changed = ref_masks[i_ref] != got_masks[j]
                diff |= changed
                if mask_boxes and changed.any():
                    # A box drawn around the binary mask moves with a flipped border pixel: it must be the
                    # box of this run's mask (the flipped pixels themselves are checked just below).
                    box = masks_to_boxes(torch.from_numpy(got_masks[j][None]))[0].numpy()
                    ok = np.array_equal(box, got_boxes[j])
                else:
                    ok = np.abs(got_boxes[j].astype(np.float64) - ref_boxes[i_ref]).max() <= tol[f"{p}/instances.pred_boxes"]
                if not ok:
                    failures.append(f"{p}/instances.pred_boxes: {got_boxes[j]} != {ref_boxes[i_ref]} (instance {i_ref})")
            at_threshold(diff, f"{p}/instances.pred_masks")
        # sem_seg argmax: equal except at near-ties of the two largest class values.
        diff = expected[f"{p}/sem_seg.argmax"] != got[f"{p}/sem_seg.argmax"]
        if diff.any():
            n, worst, eps = int(diff.sum()), float(run.sem_margin(i)[diff].max()), 2 * tol[f"{p}/sem_seg.grid"]
            if worst > eps or n > MAX_FLIPPED_FRACTION * pixels:
                failures.append(f"{p}/sem_seg.argmax: {n} pixels differ, top-2 gap up to {worst:.3g} "
                                f"(allowed: {eps:.3g}, at most {MAX_FLIPPED_FRACTION * pixels:.0f} pixels)")
    return failures, ratios


def model_selects_pairs(model):
    """Whether the thing queries are the top-k (query, class) pairs of the location logits."""
    return bool(getattr(model.query_selection, "test_pairs", 0))


def _fixture_is_not_vacuous(expected, name):
    """Segments compete in each model's merge, things and stuff both appear (over the models), and there
    are instances."""
    segments = {m: [json.loads(str(expected[f"{m}/{i}/segments"])) for i in range(2)] for m in MODELS}
    assert sum(len(s) for s in segments[name]) >= 4
    assert {t for m in MODELS for ss in segments[m] for _, _, t in ss} == {True, False}
    assert all(expected[f"{name}/{i}/instances.scores"].size for i in range(2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_meet_the_float64_fixture(name):
    if not os.path.isfile(FIXTURE):
        pytest.fail(f"{FIXTURE} is missing: write it with `python -m tests.test_golden_outputs --write`")
    expected = np.load(FIXTURE)
    _fixture_is_not_vacuous(expected, name)
    failures, ratios = compare(expected, Run(name))
    floats = [r for k, r in ratios.items() if not k.endswith(MATCHED_FIRST)]
    scores = [r for k, r in ratios.items() if k.endswith(MATCHED_FIRST)]
    print(name, "threads", torch.get_num_threads(), "ISA", torch.backends.cpu.get_cpu_capability(),
          f"largest |float32 - float64| / err32: {max(floats):.2f} (float outputs), "
          f"{max(scores, default=0.0):.2f} (mask-derived scores, with their flipped pixels)")
    assert not failures, "\n".join(failures)


def test_a_changed_output_fails():
    """The comparison is not vacuous: one mask logit moved by 1 (far below the mask logits' scale of 1e4
    on the perturbed model) or one panoptic pixel changed away from any threshold is reported."""
    expected = dict(np.load(FIXTURE))
    run = Run("shapes")
    assert compare(_Fixture(expected), run)[0] == []
    changed = dict(expected)
    changed["shapes/pred_masks"] = expected["shapes/pred_masks"].copy()
    changed["shapes/pred_masks"][0, 0, 0, 0] += 1.0
    assert any("shapes/pred_masks" in f for f in compare(_Fixture(changed), run)[0])
    changed = dict(expected)
    pan = expected["shapes/0/panoptic_seg"].copy()
    margin = run.mask_margin(0)
    y, x = np.unravel_index(np.argmax(margin), margin.shape)
    pan[y, x] = 0 if pan[y, x] else 1
    changed["shapes/0/panoptic_seg"] = pan
    assert any("shapes/0/panoptic_seg" in f for f in compare(_Fixture(changed), run)[0])


class _Fixture(dict):
    """A dict with ``np.load``'s ``files``."""

    @property
    def files(self):
        return list(self)


def write_fixture():
    arrays = {}
    for name in sorted(MODELS):
        run32, run64 = Run(name), Run(name, torch.float64)
        for k, a in run64.values.items():
            if a.dtype.kind == "f":
                arrays[k + ".err32"] = np.array(max_abs_error(run32.values[k], a))
                a = a.astype(np.float32) if k.endswith(("pred_masks", "sem_seg.grid", "location_logits")) else a
            arrays[k] = a
        failures, _ = compare(_Fixture(arrays), run32)
        assert not failures, "the float32 run does not meet its own fixture:\n" + "\n".join(failures)
        counts = [len(json.loads(str(arrays[f"{name}/{i}/segments"]))) for i in range(2)]
        print(name, "segments per image:", counts)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with open(FIXTURE, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {FIXTURE} ({len(buf.getvalue()) / 2**20:.2f} MiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden_outputs --write   (rewrites the fixture)")
    import panoptic_segformer  # noqa: F401  (registers the datasets)

    torch.set_num_threads(1)
    write_fixture()
