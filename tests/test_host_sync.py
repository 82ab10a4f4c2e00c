"""Host-device syncs of the forward passes (none that is not needed: each stops the host from queueing GPU work).

On a GPU, reading a tensor's value on the host (.item(), .tolist(), bool(t), int(t), .cpu()) or an op
whose output size depends on the data (nonzero, boolean-mask indexing, unique, bincount) waits for every
queued kernel. These tests run on the CPU and count such calls with ``projects/benchmarks/host_sync.py``,
a ``TorchFunctionMode`` that records them while every call runs unchanged (nothing is mocked): the
calls counted here are exactly those that would sync on a GPU.

Checked: building the level layout, the encoder, the location decoder and MSDeformAttn make none (the
level sizes travel as Python ints in one LevelLayout); the matcher needs one transfer per call whatever
the batch and number of matchings, the criterion two per step, query filtering one; mask-wise merging a
fixed number independent of the number of queries.
"""

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion, paired_giou_loss
from panoptic_segformer.modeling.encoder import DeformableTransformerEncoder, PositionEmbeddingSine
from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.location_decoder import LocationDecoder
from panoptic_segformer.modeling.matcher import HungarianMatcher, multi_round_match, select_thing_queries
from panoptic_segformer.modeling.ms_deform_attn import MSDeformAttn
from panoptic_segformer.postprocessing import build_postprocessor
from projects.benchmarks.host_sync import HostSyncCounter

C, HEADS, LEVELS = 32, 4, 3
SIZES = [(12, 16), (6, 8), (3, 4)]  # padded level sizes of the batch


def _multiscale(n=2, seed=0):
    """srcs, masks, pos of a padded batch of n images (image 1 smaller than image 0)."""
    g = torch.Generator().manual_seed(seed)
    srcs, masks = [], []
    for h, w in SIZES:
        srcs.append(torch.randn(n, C, h, w, generator=g))
        mask = torch.zeros(n, h, w, dtype=torch.bool)
        mask[1:, (3 * h) // 4:, :] = True
        mask[1:, :, (2 * w) // 3:] = True
        masks.append(mask)
    pe = PositionEmbeddingSine(C // 2)
    return srcs, masks, [pe(m) for m in masks]


def _encoder_output(seed=0):
    torch.manual_seed(seed)
    enc = DeformableTransformerEncoder(C, num_layers=2, n_heads=HEADS, n_levels=LEVELS, n_points=2, d_ffn=64).eval()
    with torch.no_grad():
        return enc(*_multiscale(seed=seed))


def _location_decoder(num_layers, seed=0):
    torch.manual_seed(seed)
    return LocationDecoder(5, C, num_layers=num_layers, num_queries=10, n_heads=HEADS, n_levels=LEVELS,
                           n_points=2, d_ffn=64).eval()


def test_counter_counts_what_syncs_and_nothing_else():
    t = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        (t * 2 + 1).softmax(0).topk(3)
        t[t > 2].sum()
        torch.where(t > 1, t, -t)
        t.view(2, 3)[:, 1]
    assert syncs.by_op() == {"__getitem__": 1}  # only the boolean-mask index
    with HostSyncCounter() as syncs:
        t.sum().item()
        t.tolist()
        bool(t[0] > 1)
        int(t.argmax())
        t.nonzero()
        t.cpu()
        torch.bincount(t.long())
    assert syncs.total == 7
    assert all("test_host_sync.py" in loc for loc in syncs.by_location())


def test_encoder_forward_makes_no_host_sync():
    torch.manual_seed(0)
    enc = DeformableTransformerEncoder(C, num_layers=3, n_heads=HEADS, n_levels=LEVELS, n_points=2, d_ffn=64).eval()
    inputs = _multiscale()
    with torch.no_grad(), HostSyncCounter() as syncs:
        out = enc(*inputs)
    assert syncs.total == 0, syncs.by_location()
    assert out.levels.sizes == tuple(SIZES)
    assert out.levels.spatial_shapes.tolist() == [list(s) for s in SIZES]


@pytest.mark.parametrize("num_layers", [1, 3])
def test_location_decoder_makes_no_host_sync(num_layers):
    enc = _encoder_output()
    dec = _location_decoder(num_layers)
    with torch.no_grad(), HostSyncCounter() as syncs:
        out = dec(enc.memory, enc.levels)
    assert syncs.total == 0, syncs.by_location()
    assert len(out["pred_boxes"]) == num_layers


def test_level_layout_is_built_and_validated_without_sync():
    _, masks, _ = _multiscale()
    with HostSyncCounter() as syncs:
        levels = LevelLayout.from_padding_masks(masks)
        first = levels.first(2)
    assert syncs.total == 0, syncs.by_location()
    assert levels.sizes == tuple(SIZES) and first.sizes == tuple(SIZES[:2])
    assert first.padding_mask.shape == (2, 12 * 16 + 6 * 8)
    with pytest.raises(ValueError, match="level sizes"):
        LevelLayout.from_sizes([(12, 16), (6, 8), (3.0, 4)], 2)
    with pytest.raises(ValueError, match="padding_mask"):  # sizes that do not sum to the padding mask's S
        LevelLayout([(12, 16), (6, 8), (3, 5)], levels.spatial_shapes, levels.level_start_index,
                    levels.padding_mask, levels.valid_ratios)
    with pytest.raises(ValueError, match="spatial_shapes"):
        LevelLayout(levels.sizes, levels.spatial_shapes.float(), levels.level_start_index,
                    levels.padding_mask, levels.valid_ratios)


def test_ms_deform_attn_makes_no_host_sync():
    g = torch.Generator().manual_seed(3)
    attn = MSDeformAttn(C, LEVELS, HEADS, n_points=2).eval()
    S = sum(h * w for h, w in SIZES)
    query, value = torch.randn(2, 7, C, generator=g), torch.randn(2, S, C, generator=g)
    levels = LevelLayout.from_sizes(SIZES, 2)
    for ref in (torch.rand(2, 7, LEVELS, 2, generator=g), torch.rand(2, 7, LEVELS, 4, generator=g)):
        with torch.no_grad(), HostSyncCounter() as syncs:
            out = attn(query, ref, value, levels)
        assert syncs.total == 0 and out.shape == (2, 7, C), syncs.by_location()
    with pytest.raises(ValueError, match="input_flatten"):
        attn(query, ref, value[:, :-1], levels)


# ----------------------------------------------------------------------------------- matching
def _targets(batch, num_gt, num_classes, g, size=(16, 24)):
    targets = []
    for _ in range(batch):
        xy = torch.rand(num_gt, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(num_gt, 2, generator=g) * 0.2 + 0.05
        masks = torch.rand(num_gt, *size, generator=g) > 0.6
        targets.append({"labels": torch.randint(0, num_classes, (num_gt,), generator=g),
                        "boxes": torch.cat([xy, wh], 1), "masks": masks, "image_size": size})
    return targets


def test_matcher_one_transfer_for_many_matchings_and_same_assignment():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(1)
    targets = _targets(3, 4, 5, g)
    outputs = [{"pred_logits": torch.randn(3, 9, 5, generator=g), "pred_boxes": torch.rand(3, 9, 4, generator=g),
                "pred_masks": torch.randn(3, 9, 8, 12, generator=g)} for _ in range(4)]
    matcher = HungarianMatcher()
    with HostSyncCounter() as syncs:
        results = matcher.match_many(outputs, targets)
    assert syncs.total == 1, syncs.by_location()
    for out, result in zip(outputs, results):
        for i, (target, (q, gt)) in enumerate(zip(targets, result)):
            cost = matcher.cost_matrix(target, out["pred_logits"][i], out["pred_boxes"][i], out["pred_masks"][i])
            rows, cols = linear_sum_assignment(cost.double().numpy())
            assert q.tolist() == rows.tolist() and gt.tolist() == cols.tolist()
    with HostSyncCounter() as syncs:
        matcher(outputs[0], targets)
    assert syncs.total == 1
    bad = [targets[0], dict(targets[1], labels=torch.tensor([0, 1, 5, 2]))]
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in \[0, 5\)"):
        matcher({k: v[:2] for k, v in outputs[0].items()}, bad)


def test_query_filtering_one_transfer_for_all_rounds_and_images():
    g = torch.Generator().manual_seed(2)
    targets = _targets(2, 3, 4, g)
    logits, boxes = torch.randn(2, 12, 4, generator=g), torch.rand(2, 12, 4, generator=g)
    with HostSyncCounter() as syncs:
        rounds = multi_round_match(logits, boxes, targets, num_rounds=3)
    assert syncs.total == 1, syncs.by_location()
    for q, gt, r in rounds:
        assert len(set(q.tolist())) == q.numel() == 9 and r.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    with HostSyncCounter() as syncs:
        select_thing_queries(logits, boxes, targets, num_rounds=3, num_queries=8)
    assert syncs.total == 1, syncs.by_location()


@pytest.mark.parametrize("batch,layers", [(1, 1), (3, 4)])
def test_criterion_two_syncs_per_step_whatever_batch_and_depth(batch, layers):
    g = torch.Generator().manual_seed(4)
    k_th, k_st, q_all, q_th, h, w = 5, 3, 10, 6, 8, 12
    targets = _targets(batch, 3, k_th, g, size=(4 * h, 4 * w))
    for t in targets:
        t["stuff_labels"] = torch.tensor([2, 0, 2])  # class 2 twice: merged into one segment
        t["stuff_masks"] = torch.rand(3, 4 * h, 4 * w, generator=g) > 0.5
    index = torch.stack([torch.randperm(q_all, generator=g)[:q_th] for _ in range(batch)])
    outputs = {
        "location": {"pred_logits": [torch.randn(batch, q_all, k_th, generator=g) for _ in range(layers)],
                     "pred_boxes": [torch.rand(batch, q_all, 4, generator=g) for _ in range(layers)]},
        "thing_query_index": index,
        "mask": [{"thing_logits": torch.randn(batch, q_th, k_th, generator=g),
                  "stuff_logits": torch.randn(batch, k_st, generator=g),
                  "pred_masks": torch.randn(batch, q_th + k_st, h, w, generator=g)} for _ in range(layers)],
    }
    crit = PanopticSegFormerCriterion(k_th, k_st, HungarianMatcher())
    with HostSyncCounter() as syncs:
        losses = crit(outputs, targets)
    assert syncs.total == 2, syncs.by_location()
    assert len(losses) == layers * 7 and all(torch.isfinite(v) for v in losses.values())
    bad = dict(outputs, thing_query_index=index.clone().fill_(q_all))
    with pytest.raises(ValueError, match="thing_query_index"):
        crit(bad, targets)


def test_paired_giou_loss_matches_torchvision():
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(64, 2, generator=g)
    boxes1 = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 0.5], 1)
    xy = torch.rand(64, 2, generator=g)
    boxes2 = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 0.5], 1)
    boxes2[:4] = boxes1[:4]  # identical
    boxes2[4] = torch.tensor([boxes1[4, 2], boxes1[4, 1], boxes1[4, 2] + 0.1, boxes1[4, 3]])  # touching
    boxes2[5] = boxes1[5] + 2.0  # disjoint
    a1, a2 = boxes1.clone().requires_grad_(), boxes1.clone().requires_grad_()
    ours, ref = paired_giou_loss(a1, boxes2), generalized_box_iou_loss(a2, boxes2, reduction="none")
    # the same elementwise float32 formula (clamp instead of a mask), values and gradients O(1): a few ulps at
    # most, inside the default float32 tolerance (both checks)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    with HostSyncCounter() as syncs:
        paired_giou_loss(boxes1, boxes2)
    assert syncs.total == 0


# ----------------------------------------------------------------------------------- merging
def _predictions(n, g, h=48, w=64):
    """n queries: the first 8 have confident, compact masks; the rest are weak."""
    logits = torch.randn(n, h, w, generator=g) - 2.0
    for q in range(8):
        y, x = (q // 4) * 24, (q % 4) * 16
        logits[q, y:y + 20, x:x + 14] += 6.0
    class_probs = torch.full((n,), 0.1)
    class_probs[:8] = torch.linspace(0.9, 0.5, 8)
    labels = torch.arange(n) % 7
    return logits.sigmoid(), class_probs, labels, labels < 4


@pytest.mark.parametrize("n", [20, 200])
def test_mask_wise_merging_syncs_do_not_grow_with_queries(n):
    g = torch.Generator().manual_seed(6)
    merge = build_postprocessor("mask_wise")
    inputs = _predictions(n, g)
    with HostSyncCounter() as syncs:
        pan, segments = merge(*inputs)
    assert len(segments) == 8
    # Class-probability filter, candidate table, segment table (+ bincount's size read on a GPU).
    assert syncs.total == 4, syncs.by_location()


@pytest.mark.parametrize("decoder", ["paper", "official"])
def test_model_forward_outputs_make_no_host_sync(decoder):
    """Backbone -> encoder -> location decoder -> mask decoder of the registered model (inference, a
    padded batch of 2) reads nothing on the host: the level sizes travel as Python ints."""
    from detectron2.modeling import build_model

    from conftest import small_cfg

    opts = () if decoder == "paper" else (
        "MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE", "official",
        "MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "4",
        "MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder")
    torch.manual_seed(0)
    model = build_model(small_cfg(*opts)).eval()
    images = model.preprocess_image([{"image": torch.rand(3, 96, 128) * 255},
                                     {"image": torch.rand(3, 64, 100) * 255}])
    with torch.no_grad(), HostSyncCounter() as syncs:
        out = model.forward_outputs(images)
    assert syncs.total == 0, syncs.by_location()
    assert out["mask"][-1]["pred_masks"].shape[:2][0] == 2
