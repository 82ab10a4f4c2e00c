"""Tests of the panoptic post-processors (paper Sec. 3.5, Algorithm 1, Eq. 6, Table 7, App. B.1)."""

import numpy as np
import pytest
import torch

from panoptic_segformer.postprocessing import (
    POSTPROCESSOR_REGISTRY,
    HeuristicMerging,
    MaskWiseMerging,
    PanopticPostProcessor,
    PixelArgmax,
    PixelArgmaxProb,
    UnknownPostProcessorError,
    build_postprocessor,
    mask_wise_merge,
    paint_segments,
    register_postprocessor,
    registered_postprocessors,
)
from panoptic_segformer.postprocessing.common import running_argmax

BUILTIN = ["heuristic", "mask_wise", "official", "pixel_argmax", "pixel_argmax_prob"]


# --------------------------------------------------------------------------------------------
# Independent reference of mask-wise merging, written from the specification (numpy, loop).
# --------------------------------------------------------------------------------------------
def reference_mask_wise(m, p, labels, is_thing, alpha, beta, mask_thr, conf, keep, events=None):
    """m (N, H, W) float64, p (N,), labels (N,), is_thing (N,); conf/keep = (thing, stuff).

    ``events`` (a dict) counts which rules fired, to check the random cases cover them.
    """
    events = {} if events is None else events

    def count(key):
        events[key] = events.get(key, 0) + 1

    n, h, w = m.shape
    binary = m > mask_thr
    area = binary.reshape(n, -1).sum(1)
    s = np.zeros(n)
    for i in range(n):
        if area[i] > 0:
            mean = m[i][binary[i]].sum() / float(area[i])
            s[i] = p[i] ** alpha * mean ** beta
    order = sorted(range(n), key=lambda i: -s[i])  # Python's sort is stable
    if any(s[i] == s[j] and s[i] > 0 for i in range(n) for j in range(i)):
        count("score_tie")
    pan = np.zeros((h, w), dtype=np.int32)
    segments, stuff_segment = [], {}
    for i in order:
        t_cnf = conf[0] if is_thing[i] else conf[1]
        t_keep = keep[0] if is_thing[i] else keep[1]
        if area[i] == 0:
            count("empty_mask")
            continue
        if s[i] < t_cnf:
            count("below_conf_" + ("thing" if is_thing[i] else "stuff"))
            continue
        kept = binary[i] & (pan == 0)
        n_kept = int(kept.sum())
        # An empty kept part never makes a segment (only reachable with t_keep = 0).
        if n_kept == 0 or n_kept / float(area[i]) < t_keep:
            count("below_keep")
            continue
        if n_kept < area[i]:
            count("partly_covered")
        if not is_thing[i] and int(labels[i]) in stuff_segment:
            count("stuff_join")
            pan[kept] = stuff_segment[int(labels[i])]
            continue
        new_id = len(segments) + 1
        pan[kept] = new_id
        if not is_thing[i]:
            stuff_segment[int(labels[i])] = new_id
        segments.append({"id": new_id, "category_id": int(labels[i]), "isthing": bool(is_thing[i]),
                         "score": float(s[i])})
    return pan, segments


def random_case(seed):
    """Random quantized predictions with ties, empty masks, repeated stuff classes."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 13))
    h, w = int(rng.integers(5, 15)), int(rng.integers(5, 15))
    # Mask values are multiples of 1/16 so that sums are exact in any order (0.5 itself occurs).
    m = rng.integers(0, 9, size=(n, h, w)) / 16.0
    p = rng.random(n)
    if rng.random() < 0.5:  # few distinct class probabilities -> ties in s
        p = rng.choice([0.25, 0.5, 0.75, 1.0], size=n)
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            continue  # empty binary mask (all <= 0.5)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        if kind < 0.35:  # constant blob: equal means across masks -> exact ties
            m[i, y0:y1, x0:x1] = rng.choice([0.75, 1.0])
        else:
            m[i, y0:y1, x0:x1] = rng.integers(8, 17, size=(y1 - y0, x1 - x0)) / 16.0
    for i in range(1, n):  # exact duplicates of earlier queries
        if rng.random() < 0.15:
            j = int(rng.integers(0, i))
            m[i], p[i] = m[j], p[j]
    labels = rng.integers(0, 5, size=n)
    is_thing = labels < 2  # classes 2, 3, 4 are stuff: stuff repeats are frequent
    alpha, beta = [(1.0, 2.0), (1.0, 1.0), (1.0, 0.0), (2.0, 1.0), (0.0, 1.0), (2.0, 2.0)][seed % 6]
    conf = tuple(rng.choice([0.0, 0.1, 0.25, 0.3, 0.5], size=2).tolist())
    keep = tuple(rng.choice([0.0, 0.3, 0.5, 0.6, 0.8, 1.0], size=2).tolist())
    return m, p, labels, is_thing, alpha, beta, conf, keep


def _torch(m, p, labels, is_thing):
    return (torch.from_numpy(m), torch.from_numpy(np.asarray(p, dtype=np.float64)),
            torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(is_thing))


def assert_same_segments(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) == {"id", "category_id", "isthing", "score"}
        assert (g["id"], g["category_id"], g["isthing"]) == (e["id"], e["category_id"], e["isthing"])
        assert isinstance(g["id"], int) and isinstance(g["category_id"], int)
        assert isinstance(g["isthing"], bool)
        # float64, exact sums of k/16 values: one division and a power or two (~1e-16), so rel 1e-12
        assert g["score"] == pytest.approx(e["score"], rel=1e-12, abs=1e-15)


def test_mask_wise_matches_reference_on_random_cases():
    events, cases_with_segments = {}, 0
    for seed in range(80):
        m, p, labels, is_thing, alpha, beta, conf, keep = random_case(seed)
        pan_ref, seg_ref = reference_mask_wise(m, p, labels, is_thing, alpha, beta, 0.5, conf, keep, events)
        pan, seg = mask_wise_merge(*_torch(m, p, labels, is_thing), alpha=alpha, beta=beta,
                                   mask_threshold=0.5, conf_threshold=conf, keep_threshold=keep)
        assert pan.dtype == torch.int32 and pan.shape == pan_ref.shape
        np.testing.assert_array_equal(pan.numpy(), pan_ref, err_msg=f"seed {seed}")
        assert_same_segments(seg, seg_ref)
        cases_with_segments += bool(seg_ref)
    # The random cases really exercise every rule of the specification.
    assert cases_with_segments >= 50
    for key in ("score_tie", "empty_mask", "below_conf_thing", "below_conf_stuff", "below_keep",
                "partly_covered", "stuff_join"):
        assert events.get(key, 0) >= 3, (key, events)


def test_mask_wise_ties_keep_query_order():
    # Two identical thing masks: the first query wins, the second is fully covered and dropped.
    m = torch.zeros(2, 4, 4, dtype=torch.float64)
    m[:, 1:3, 1:3] = 0.75
    pan, seg = mask_wise_merge(m, torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1, 0]),
                               torch.tensor([True, True]))
    assert [s["category_id"] for s in seg] == [1]
    assert pan[1:3, 1:3].eq(1).all() and pan.sum() == 4


def test_mask_wise_thing_and_stuff_thresholds_and_stuff_join():
    h, w = 6, 6
    m = torch.zeros(4, h, w, dtype=torch.float64)
    m[0, :, :3] = 1.0  # stuff class 7, s = 0.9
    m[1, :, 2:] = 1.0  # stuff class 7 again, s = 0.8: overlaps col 2 (kept 12/18 >= 0.6) -> joins
    m[2, :2, :] = 1.0  # thing, s = 0.3
    m[3, 4:, :] = 1.0  # stuff class 8, s = 0.3
    p = torch.tensor([0.9, 0.8, 0.3, 0.3], dtype=torch.float64)
    labels = torch.tensor([7, 7, 1, 8])
    is_thing = torch.tensor([False, False, True, False])
    pan, seg = mask_wise_merge(m, p, labels, is_thing, conf_threshold=(0.25, 0.35), keep_threshold=0.6)
    # One segment for stuff class 7 (both queries), the thing passes t_cnf(thing)=0.25 but is
    # mostly covered (kept 0 pixels) -> dropped; stuff class 8 fails t_cnf(stuff) = 0.35.
    # mask mean exactly 1: s = p in float64, inside approx's default rel 1e-6
    assert seg == [{"id": 1, "category_id": 7, "isthing": False, "score": pytest.approx(0.9)}]
    assert pan.eq(1).all()
    # With t_keep = 0 for stuff, the covered stuff query still makes no empty segment.
    pan, seg = mask_wise_merge(m, p, labels, is_thing, conf_threshold=0.25, keep_threshold=(0.6, 0.0))
    assert [s["category_id"] for s in seg] == [7]


def test_mask_wise_never_reads_masks_that_cannot_pass_t_cnf():
    # s_i <= p_i^alpha (the mask average is <= 1), so a query with p_i^alpha < t_cnf is skipped
    # without reading its mask: an invalid mask there is not even seen ...
    m = torch.rand(3, 6, 6)
    m[2] = 7.0  # not a probability
    p = torch.tensor([0.9, 0.8, 0.2])
    labels, is_thing = torch.tensor([1, 2, 3]), torch.tensor([True, True, True])
    pan, seg = mask_wise_merge(m, p, labels, is_thing, conf_threshold=0.25)
    assert 3 not in {s["category_id"] for s in seg}
    # ... while a query that could pass has its mask read and checked.
    with pytest.raises(ValueError, match=r"mask_probs.*\[0, 1\]"):
        mask_wise_merge(m, p, labels, is_thing, conf_threshold=0.1)
    with pytest.raises(ValueError, match=r"mask_probs.*\[0, 1\]"):
        mask_wise_merge(m, p, labels, is_thing, alpha=0.0)  # p^0 = 1: every mask is read


def test_running_argmax_matches_torch_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 4, (7, 9, 11), generator=g).float() / 4  # many ties
    weights = torch.tensor([1.0, 0.5, 1.0, 0.25, 1.0, 0.5, 1.0])
    candidates = [5, 0, 3, 6, 2]
    winner, tracked = running_argmax(maps, candidates, weights=weights[candidates], track=maps)
    stacked = torch.stack([maps[q] * weights[q] for q in candidates])
    assert torch.equal(winner, stacked.argmax(dim=0))  # first index on ties, like torch.argmax
    assert torch.equal(tracked, maps[torch.tensor(candidates)[winner], torch.arange(9)[:, None],
                                     torch.arange(11)])


def test_mask_wise_class_equals_function_and_float32():
    m, p, labels, is_thing, *_ = random_case(3)
    args = _torch(m.astype(np.float32), p.astype(np.float32), labels, is_thing)
    pan_f, seg_f = mask_wise_merge(*args, conf_threshold=(0.2, 0.3), keep_threshold=(0.5, 0.7))
    merging = build_postprocessor("mask_wise", conf_threshold=(0.2, 0.3), keep_threshold=(0.5, 0.7))
    pan_c, seg_c = merging(*args)
    assert torch.equal(pan_f, pan_c) and seg_f == seg_c
    assert isinstance(build_postprocessor("mask_wise"), MaskWiseMerging)


# --------------------------------------------------------------------------------------------
# Paper Fig. 4: pixel-wise argmax lets a low-score mask with high logits take the overlap.
# --------------------------------------------------------------------------------------------
LAPTOP, KEYBOARD = 63, 66  # contiguous COCO ids


def laptop_keyboard_case():
    h, w = 24, 24
    m = torch.full((2, h, w), 0.02)
    m[0, 2:22, 2:22] = 0.95  # laptop: confident class, good mask ...
    m[0, 12:20, 5:19] = 0.8  # ... but only moderate probabilities over the keyboard
    m[1, 12:20, 5:19] = 0.9  # keyboard: higher mask probabilities there
    class_probs = torch.tensor([0.92, 0.79])  # Fig. 4: laptop 0.92, keyboard 0.79
    return m, class_probs, torch.tensor([LAPTOP, KEYBOARD]), torch.tensor([True, True])


def test_laptop_keyboard_fig4():
    m, p, labels, is_thing = laptop_keyboard_case()
    logits = torch.logit(m)
    # DETR keeps queries above 0.85; Fig. 4 keeps both, so use a threshold below 0.79.
    pan_p, seg_p = PixelArgmax(threshold=0.7)(m, p, labels, is_thing, mask_logits=logits)
    pan_m, seg_m = mask_wise_merge(m, p, labels, is_thing)
    overlap = (slice(12, 20), slice(5, 19))
    cats_p = {s["id"]: s["category_id"] for s in seg_p}
    cats_m = {s["id"]: s["category_id"] for s in seg_m}
    # Pixel-wise argmax: the keyboard (lower class score, higher logits) covers the laptop.
    assert {cats_p[int(i)] for i in pan_p[overlap].unique()} == {KEYBOARD}
    # Mask-wise merging: s_laptop = 0.92 * mean^2 > s_keyboard = 0.79 * 0.9^2, the laptop keeps
    # the overlap and the keyboard, left with no pixel, is dropped.
    assert {cats_m[int(i)] for i in pan_m[overlap].unique()} == {LAPTOP}
    assert [s["category_id"] for s in seg_m] == [LAPTOP]
    assert seg_m[0]["score"] > 0.79 * 0.9 ** 2
    # MaskFormer's p* weighs by class probability: 0.92 * 0.8 > 0.79 * 0.9 -> laptop too.
    pan_s, seg_s = PixelArgmaxProb(object_mask_threshold=0.7)(m, p, labels, is_thing)
    assert {seg_s[int(i) - 1]["category_id"] for i in pan_s[overlap].unique()} == {LAPTOP}


# --------------------------------------------------------------------------------------------
# Empty / unconfident inputs and the validity of every registered method.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN)
def test_empty_input(name):
    pp = build_postprocessor(name)
    pan, seg = pp(torch.zeros(0, 5, 7), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.bool))
    assert pan.shape == (5, 7) and pan.dtype == torch.int32 and not pan.any() and seg == []


def test_empty_input_function():
    pan, seg = mask_wise_merge(torch.zeros(0, 3, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                               torch.zeros(0, dtype=torch.bool))
    assert pan.shape == (3, 4) and not pan.any() and seg == []


@pytest.mark.parametrize("name", BUILTIN)
def test_no_confident_segment(name):
    g = torch.Generator().manual_seed(0)
    n = 6
    m = torch.rand(n, 10, 12, generator=g) * 0.5  # no pixel above the 0.5 mask threshold
    p = torch.full((n,), 0.01)
    labels = torch.arange(n)
    pan, seg = build_postprocessor(name)(m, p, labels, labels < 3, mask_logits=torch.logit(m))
    assert not pan.any() and seg == []


def random_predictions(seed, n=12, h=24, w=28):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, h // 4, w // 4, generator=g) * 4
    logits = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear",
                                             align_corners=False)[0]
    class_probs = 0.5 + 0.5 * torch.rand(n, generator=g)
    labels = torch.randint(0, 6, (n,), generator=g)
    return logits.sigmoid(), class_probs, labels, labels < 3, logits


@pytest.mark.parametrize("name", BUILTIN)
def test_registered_postprocessors_give_valid_panoptic_output(name):
    pp = build_postprocessor(name, **({"stuff_area_limit": 8} if name == "heuristic" else {}))
    total_segments = 0
    for seed in range(6):
        m, p, labels, is_thing, logits = random_predictions(seed)
        pan, seg = pp(m, p, labels, is_thing, mask_logits=logits,
                      class_distribution=torch.softmax(torch.randn(len(p), 7), -1))
        assert pan.shape == m.shape[1:] and pan.dtype == torch.int32 and pan.device == m.device
        ids = [s["id"] for s in seg]
        assert ids == list(range(1, len(seg) + 1))
        # Every listed segment has pixels and every non-void pixel belongs to a listed segment.
        assert set(pan.unique().tolist()) - {0} == set(ids)
        query_classes = {(int(l), bool(t)) for l, t in zip(labels, is_thing)}
        for s in seg:
            assert (s["category_id"], s["isthing"]) in query_classes
            assert 0.0 <= s["score"] <= 1.0
        stuff_classes = [s["category_id"] for s in seg if not s["isthing"]]
        assert len(stuff_classes) == len(set(stuff_classes))  # one segment per stuff class
        total_segments += len(seg)
    assert total_segments > 0


@pytest.mark.parametrize("name", BUILTIN)
def test_read_queries_subset_gives_the_same_output(name):
    """read_queries names every query whose mask the method may read: calling it with only those
    (in query order) gives the same panoptic output, so the model brings only them to full size."""
    pp = build_postprocessor(name)
    checked = 0
    for seed in range(8):
        m, p, labels, is_thing, logits = random_predictions(seed, n=16)
        p = p * (torch.arange(16) % 3 > 0) + 0.1 * (torch.arange(16) % 3 == 0)  # some unlikely queries
        if name == "official":
            m = m * 1.5  # masks above 1: every query may be read
        read = pp.read_queries(p, labels, is_thing)
        assert read.dtype == torch.bool and read.shape == (16,)
        full = pp(m, p, labels, is_thing, mask_logits=logits)
        r = read.nonzero().squeeze(1)
        part = pp(m[r], p[r], labels[r], is_thing[r], mask_logits=logits[r])
        assert torch.equal(full[0], part[0]) and full[1] == part[1]
        checked += int((~read).sum() > 0 and len(full[1]) > 0)
    assert checked > 0 or name == "official"  # the subset really left queries out


# --------------------------------------------------------------------------------------------
# Behaviour specific to each baseline.
# --------------------------------------------------------------------------------------------
def test_pixel_argmax_removes_tiny_segments_and_merges_stuff():
    h, w = 10, 10
    logits = torch.full((4, h, w), -5.0)
    logits[0, :, :5] = 5.0   # stuff 9
    logits[1, :, 5:] = 5.0   # stuff 9 again -> merged with query 0
    logits[2, 0, 0] = 9.0    # thing winning only 1 pixel -> removed, pixel re-assigned
    logits[3] = -9.0         # low class probability -> never kept
    logits[3, 5, 5] = 20.0
    p = torch.tensor([0.9, 0.95, 0.99, 0.5])
    pan, seg = PixelArgmax()(logits.sigmoid(), p, torch.tensor([9, 9, 1, 2]),
                             torch.tensor([False, False, True, True]), mask_logits=logits)
    # the score is the class probability, float32 0.9 (rel ~3e-8), inside approx's default rel 1e-6
    assert seg == [{"id": 1, "category_id": 9, "isthing": False, "score": pytest.approx(0.9)}]
    assert pan.eq(1).all()


def test_pixel_argmax_prob_overlap_threshold():
    m = torch.zeros(2, 8, 8)
    m[0, :, :4] = 0.9
    m[1, :, :6] = 0.8  # wins only cols 4-5 of its 48 pixels (16/48 < 0.8) -> dropped
    pan, seg = PixelArgmaxProb()(m, torch.tensor([0.9, 0.85]), torch.tensor([1, 2]),
                                 torch.tensor([True, True]))
    assert [s["category_id"] for s in seg] == [1]
    assert pan[:, :4].eq(1).all() and not pan[:, 4:].any()


def test_heuristic_prefers_things_and_removes_small_stuff():
    m = torch.zeros(3, 8, 8)
    m[0, 2:6, 2:6] = 0.7    # thing, class prob 0.6
    m[1, :, :] = 0.99       # stuff 5 covering everything, class prob 0.99
    m[2, 0, :3] = 1.0       # stuff 6 winning 3 pixels -> below the area limit
    p = torch.tensor([0.6, 0.99, 0.999])
    pan, seg = HeuristicMerging(stuff_area_limit=4)(m, p, torch.tensor([0, 5, 6]),
                                                    torch.tensor([True, False, False]))
    assert [(s["category_id"], s["isthing"]) for s in seg] == [(0, True), (5, False)]
    assert pan[2:6, 2:6].eq(1).all()      # the thing keeps its pixels despite the stuff score
    assert pan[0, :3].eq(0).all()          # small stuff region removed -> void
    assert pan.eq(2).sum() == 64 - 16 - 3


# --------------------------------------------------------------------------------------------
# Registry and input validation.
# --------------------------------------------------------------------------------------------
def test_builtin_names_registered():
    assert set(BUILTIN) <= set(registered_postprocessors())
    assert POSTPROCESSOR_REGISTRY.get("pixel_argmax") is PixelArgmax
    assert POSTPROCESSOR_REGISTRY.get("heuristic") is HeuristicMerging


def test_unknown_name_lists_registered_names():
    with pytest.raises(KeyError) as err:
        build_postprocessor("no_such_merge")
    assert isinstance(err.value, UnknownPostProcessorError)
    message = str(err.value)
    assert "no_such_merge" in message
    for name in BUILTIN:
        assert repr(name) in message


def test_user_can_register_and_build_a_postprocessor():
    class LargestMaskOnly(PanopticPostProcessor):
        """Keeps only the query with the largest binary mask."""

        def __init__(self, mask_threshold=0.5):
            self.mask_threshold = mask_threshold

        def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None, class_distribution=None):
            binary = mask_probs > self.mask_threshold
            best = int(binary.flatten(1).sum(1).argmax())
            return paint_segments(binary[best].int(), [best], labels, is_thing, class_probs)

    register_postprocessor("test_largest_mask_only")(LargestMaskOnly)
    POSTPROCESSOR_REGISTRY.register(LargestMaskOnly)  # Detectron2 style: under the class name
    try:
        assert "test_largest_mask_only" in registered_postprocessors()
        m = torch.zeros(2, 4, 4)
        m[0, :1] = 0.9
        m[1, 1:] = 0.7
        for name in ("test_largest_mask_only", "LargestMaskOnly"):
            pp = build_postprocessor(name, mask_threshold=0.6)
            pan, seg = pp(m, torch.tensor([0.9, 0.3]), torch.tensor([4, 8]), torch.tensor([True, False]))
            # the score is the class probability, float32 0.3, inside approx's default rel 1e-6
            assert seg == [{"id": 1, "category_id": 8, "isthing": False, "score": pytest.approx(0.3)}]
            assert pan[1:].eq(1).all() and not pan[0].any()
        with pytest.raises(ValueError, match="class_probs"):  # the base class validates inputs
            pp(m, torch.tensor([0.9]), torch.tensor([4, 8]), torch.tensor([True, False]))
        with pytest.raises(AssertionError):  # duplicate names are refused
            register_postprocessor("test_largest_mask_only")(LargestMaskOnly)
    finally:
        POSTPROCESSOR_REGISTRY._obj_map.pop("test_largest_mask_only", None)
        POSTPROCESSOR_REGISTRY._obj_map.pop("LargestMaskOnly", None)


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_inputs_raise_clear_errors(name):
    pp = build_postprocessor(name)
    m = torch.rand(3, 4, 5)
    # Confident queries: the argmax methods check the value ranges of the masks they read.
    p, labels, is_thing = torch.full((3,), 0.95), torch.tensor([0, 1, 2]), torch.tensor([True, False, True])
    cases = [
        ((torch.rand(4, 5), p, labels, is_thing), {}, "mask_probs"),
        ((m, torch.rand(2), labels, is_thing), {}, r"class_probs.*\(3,\).*\(2,\)"),
        ((m, p, labels.float(), is_thing), {}, "labels"),
        ((m, p, -labels, is_thing), {}, "labels"),
        ((m, p, labels, is_thing.long()), {}, "is_thing"),
        # "official" takes the official masks unclamped (>= 0, above 1 allowed).
        ((m - 3, p, labels, is_thing) if name == "official" else (m * 3, p, labels, is_thing), {},
         r"mask_probs.*\[0, inf\]" if name == "official" else r"mask_probs.*\[0, 1\]"),
        ((m, p + 1, labels, is_thing), {}, "class_probs"),
        ((m.long(), p, labels, is_thing), {}, "mask_probs"),
        ((m, p, labels, is_thing), {"mask_logits": torch.rand(3, 4, 4)}, "mask_logits"),
        ((m, p, labels, is_thing), {"class_distribution": torch.rand(2, 7)}, "class_distribution"),
    ]
    for args, kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            pp(*args, **kwargs)


def test_bad_thresholds_raise():
    with pytest.raises(ValueError, match="conf_threshold"):
        MaskWiseMerging(conf_threshold=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="keep_threshold"):
        MaskWiseMerging(keep_threshold=(0.6, 1.5))
    with pytest.raises(ValueError, match="beta"):
        mask_wise_merge(torch.rand(1, 2, 2), torch.rand(1), torch.tensor([0]), torch.tensor([True]), beta=-1)
    with pytest.raises(ValueError, match="threshold"):
        PixelArgmax(threshold=2.0)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    for name in BUILTIN:
        pp = build_postprocessor(name, **({"stuff_area_limit": 8} if name == "heuristic" else {}))
        m, p, labels, is_thing, logits = random_predictions(1)
        pan, seg = pp(m, p, labels, is_thing, mask_logits=logits)
        pan_c, seg_c = pp(m.cuda(), p.cuda(), labels.cuda(), is_thing.cuda(), mask_logits=logits.cuda())
        assert pan_c.device.type == "cuda" and torch.equal(pan_c.cpu(), pan)
        assert [(s["id"], s["category_id"]) for s in seg_c] == [(s["id"], s["category_id"]) for s in seg]
