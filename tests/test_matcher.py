"""Tests for the Hungarian matcher and query filtering (Sec. 3.4, App. B.2)."""

import itertools
import math

import numpy as np
import pytest
import torch

from panoptic_segformer.modeling.matcher import (
    HungarianMatcher,
    downsample_masks,
    focal_class_cost,
    mask_mass_centers,
    multi_round_match,
    pairwise_dice_cost,
    select_thing_queries,
)

H, W = 4, 5  # mask-prediction size; ground truth lives at 8x (padded input size)


def _rect_masks(m, gen, size=(8 * H, 8 * W)):
    """(m, Hp, Wp) bool masks, each a random rectangle of 8x8 cells (binary after area downsampling)."""
    masks = torch.zeros(m, *size, dtype=torch.bool)
    for j in range(m):
        y0 = int(torch.randint(0, H - 1, (1,), generator=gen))
        x0 = int(torch.randint(0, W - 1, (1,), generator=gen))
        y1 = y0 + 1 + int(torch.randint(0, H - y0, (1,), generator=gen))
        x1 = x0 + 1 + int(torch.randint(0, W - x0, (1,), generator=gen))
        masks[j, 8 * y0 : 8 * y1, 8 * x0 : 8 * x1] = True
    return masks


def _boxes(m, gen):
    cxcy = torch.rand(m, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(m, 2, generator=gen) * 0.2 + 0.1
    return torch.cat([cxcy, wh], -1)


def _target(m, num_classes, gen):
    return {
        "labels": torch.randperm(num_classes, generator=gen)[:m],
        "boxes": _boxes(m, gen),
        "masks": _rect_masks(m, gen),
        "image_size": (8 * H, 8 * W),
    }


def _as_dict(pred_idx, gt_idx):
    return dict(zip(pred_idx.tolist(), gt_idx.tolist()))


@pytest.mark.parametrize("parts", [("logits",), ("boxes",), ("masks",), ("logits", "boxes", "masks")])
def test_recovers_known_permutation(parts):
    gen = torch.Generator().manual_seed(1)
    num_queries, num_classes = 7, 6
    targets = [_target(4, num_classes, gen), _target(3, num_classes, gen), _target(0, num_classes, gen)]
    logits = torch.full((3, num_queries, num_classes), -6.0)
    boxes = _boxes(3 * num_queries, gen).view(3, num_queries, 4)
    masks = torch.randn(3, num_queries, H, W, generator=gen)
    expected = []
    for n, t in enumerate(targets):
        m = t["labels"].numel()
        perm = torch.randperm(num_queries, generator=gen)[:m]
        for j in range(m):
            q = int(perm[j])
            logits[n, q, t["labels"][j]] = 6.0 + 0.1 * float(torch.randn(1, generator=gen))
            boxes[n, q] = t["boxes"][j] + 0.005 * torch.randn(4, generator=gen)
            masks[n, q] = 8.0 * (
                2 * downsample_masks(t["masks"][j : j + 1], (H, W))[0] - 1
            ) + 0.3 * torch.randn(H, W, generator=gen)
        expected.append({int(perm[j]): j for j in range(m)})
    outputs = {}
    if "logits" in parts:
        outputs["pred_logits"] = logits
    if "boxes" in parts:
        outputs["pred_boxes"] = boxes
    if "masks" in parts:
        outputs["pred_masks"] = masks
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 3
    for (pred_idx, gt_idx), exp in zip(indices, expected):
        assert pred_idx.dtype == torch.long and gt_idx.dtype == torch.long
        assert _as_dict(pred_idx, gt_idx) == exp


@pytest.mark.parametrize("num_queries", [4, 5])
def test_assignment_is_optimal_vs_brute_force(num_queries):
    gen = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher()
    for trial in range(5):
        target = _target(4, 3 if trial % 2 else 5, gen)
        target["labels"] = torch.randint(0, 3, (4,), generator=gen)
        logits = torch.randn(num_queries, 3, generator=gen) * 2
        boxes = _boxes(num_queries, gen)
        masks = torch.randn(num_queries, H, W, generator=gen) * 2
        cost = matcher.cost_matrix(target, pred_logits=logits, pred_boxes=boxes, pred_masks=masks)
        ((pred_idx, gt_idx),) = matcher(
            {"pred_logits": logits[None], "pred_boxes": boxes[None], "pred_masks": masks[None]}, [target]
        )
        assert sorted(gt_idx.tolist()) == [0, 1, 2, 3]
        assert len(set(pred_idx.tolist())) == 4
        got = float(cost[pred_idx, gt_idx].sum())
        best = min(
            sum(float(cost[q, j]) for j, q in enumerate(rows))
            for rows in itertools.permutations(range(num_queries), 4)
        )
        # float32 sum of 4 costs (each |cost| < ~15) vs a float64 sum of the same entries: a few e-6 at most
        assert got == pytest.approx(best, abs=1e-5)


def _giou_reference(a, b):
    """GIoU of two cxcywh boxes, written out from the definition."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_cost_parts_match_independent_formulas():
    gen = torch.Generator().manual_seed(3)
    target = _target(3, 4, gen)
    logits = torch.randn(5, 4, generator=gen) * 3
    boxes = _boxes(5, gen)
    masks = torch.randn(5, H, W, generator=gen) * 2
    alpha, gamma = 0.25, 2.0
    soft = target["masks"].float().view(3, H, 8, W, 8).mean(dim=(2, 4))
    expected = torch.zeros(5, 3)
    for q in range(5):
        for j in range(3):
            p = float(torch.sigmoid(logits[q, target["labels"][j]]))
            focal = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p**gamma * -math.log(1 - p)
            l1 = float((boxes[q] - target["boxes"][j]).abs().sum())
            giou = _giou_reference(boxes[q].tolist(), target["boxes"][j].tolist())
            pm = torch.sigmoid(masks[q])
            dice = 1 - 2 * float((pm * soft[j]).sum()) / (
                float((pm**2).sum()) + float((soft[j] ** 2).sum()) + 1e-3
            )
            expected[q, j] = 2 * focal + 5 * l1 - 2 * giou + 1 * dice
    got = HungarianMatcher().cost_matrix(target, pred_logits=logits, pred_boxes=boxes, pred_masks=masks)
    # the reference's log(1 - p) of a float32 p errs by ~3e-8 / (1 - p) (~2e-5 at the largest logit, 6.6);
    # float32 GIoU and 20-cell dice sums: ~1e-6. So 1e-4
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the helpers agree with the pieces of the sum. The reference is computed in float64 (a float32 p would
    # lose ~3e-8 / (1 - p) in log(1 - p): 2.6e-5 at logit 6.6); the float32 helper is then within a few
    # float32 roundings of a cost of at most ~15: 1e-5
    p = torch.sigmoid(logits[:, target["labels"]].double())
    torch.testing.assert_close(
        focal_class_cost(logits, target["labels"]).double(),
        alpha * (1 - p) ** gamma * -p.log() - (1 - alpha) * p**gamma * -(1 - p).log(),
        atol=1e-5,
        rtol=1e-5,
    )
    assert pairwise_dice_cost(masks, soft).shape == (5, 3)


def test_cost_is_finite_for_extreme_and_degenerate_inputs():
    gen = torch.Generator().manual_seed(4)
    target = _target(2, 3, gen)
    target["boxes"][0, 2:] = 0.0  # degenerate ground-truth box
    logits = torch.tensor([[1e4, -1e4, 0.0]] * 3)
    boxes = torch.zeros(3, 4)  # degenerate predicted boxes
    masks = torch.full((3, H, W), -1e4)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(target, pred_logits=logits, pred_boxes=boxes, pred_masks=masks)
    assert torch.isfinite(cost).all()
    ((pred_idx, gt_idx),) = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]}, [target])
    assert pred_idx.numel() == 2


def test_box_free_matching_uses_mass_centres():
    gen = torch.Generator().manual_seed(5)
    target = _target(3, 4, gen)
    centres = mask_mass_centers(target["masks"], target["image_size"])
    perm = torch.tensor([4, 0, 2])
    pred = torch.rand(1, 5, 2, generator=gen)
    pred[0, perm] = centres + 0.001
    matcher = HungarianMatcher(box_free=True)
    ((pred_idx, gt_idx),) = matcher({"pred_boxes": pred}, [target])
    assert _as_dict(pred_idx, gt_idx) == {4: 0, 0: 1, 2: 2}
    with pytest.raises(ValueError, match="pred_boxes"):
        matcher({"pred_boxes": torch.rand(1, 5, 4)}, [target])


def test_mask_mass_centers():
    masks = torch.zeros(3, 16, 20, dtype=torch.bool)
    masks[0, 2:6, 4:10] = True  # rectangle: centre (7, 4) in pixels
    masks[1, 0, 0] = True
    masks[1, 3, 0:3] = True  # L-ish shape
    got = mask_mass_centers(masks, (12, 16))
    assert got.shape == (3, 2)
    # float32: exact sums of half-integers, then two divisions (1-2 roundings): default float32 tolerance
    torch.testing.assert_close(got[0], torch.tensor([7.0 / 16, 4.0 / 12]))
    ys, xs = np.nonzero(masks[1].numpy())
    torch.testing.assert_close(got[1], torch.tensor([(xs + 0.5).mean() / 16, (ys + 0.5).mean() / 12]).float())
    torch.testing.assert_close(got[2], torch.tensor([0.5, 0.5]))  # empty mask -> image centre


def test_downsample_masks_is_area_average():
    gen = torch.Generator().manual_seed(6)
    masks = torch.rand(20, 16, 24, generator=gen) > 0.5  # > one chunk of 16
    got = downsample_masks(masks, (2, 3))
    # means of 64 zeros and ones: exact integer sums / 64 on both paths
    torch.testing.assert_close(got, masks.float().view(20, 2, 8, 3, 8).mean(dim=(2, 4)))
    assert downsample_masks(masks[:0], (2, 3)).shape == (0, 2, 3)


def test_matcher_validates_inputs():
    gen = torch.Generator().manual_seed(7)
    target = _target(2, 3, gen)
    target["labels"] = torch.tensor([0, 2])
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="labels"):
        matcher.cost_matrix(target, pred_logits=torch.randn(4, 2))  # label 2 out of range for K=2
    with pytest.raises(ValueError, match="at least one"):
        matcher({}, [target])
    with pytest.raises(ValueError, match="targets"):
        matcher({"pred_logits": torch.randn(2, 4, 3)}, [target])
    with pytest.raises(ValueError, match="cost weights"):
        HungarianMatcher(0, 0, 0, 0)


# ----------------------------------------------------------------------------- query filtering (App. B.2)
def _location_batch(gen, num_queries=12, ms=(3, 0, 2)):
    targets = [_target(m, 4, gen) for m in ms]
    logits = torch.randn(len(ms), num_queries, 4, generator=gen)
    boxes = _boxes(len(ms) * num_queries, gen).view(len(ms), num_queries, 4)
    return logits, boxes, targets


def test_multi_round_match_rounds_are_disjoint_matchings():
    gen = torch.Generator().manual_seed(8)
    logits, boxes, targets = _location_batch(gen)
    matcher = HungarianMatcher()
    results = multi_round_match(logits, boxes, targets, num_rounds=3, matcher=matcher)
    first_round = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for n, ((q, g, r), t, (q1, g1)) in enumerate(zip(results, targets, first_round)):
        m = t["labels"].numel()
        assert q.numel() == g.numel() == r.numel() == 3 * m
        assert len(set(q.tolist())) == q.numel()  # rounds are disjoint
        for k in range(3):
            assert sorted(g[r == k].tolist()) == list(range(m))  # each round is a full matching
        assert _as_dict(q[r == 0], g[r == 0]) == _as_dict(q1, g1)  # round 1 = plain matching
        # round k is optimal among the queries left after rounds < k
        if m:
            cost = matcher.cost_matrix(t, pred_logits=logits[n], pred_boxes=boxes[n])
            left = torch.ones(cost.shape[0], dtype=torch.bool)
            left[q[r == 0]] = False
            best = min(
                sum(float(cost[row, j]) for j, row in enumerate(rows))
                for rows in itertools.permutations(left.nonzero()[:, 0].tolist(), m)
            )
            # float32 sum of <= 3 costs vs a float64 sum of the same entries: a few e-6 at most
            assert float(cost[q[r == 1], g[r == 1]].sum()) == pytest.approx(best, abs=1e-5)


def test_multi_round_match_stops_when_queries_run_out():
    gen = torch.Generator().manual_seed(9)
    logits, boxes, targets = _location_batch(gen, num_queries=5, ms=(3,))
    ((q, g, r),) = multi_round_match(logits, boxes, targets, num_rounds=4)
    assert sorted(q.tolist()) == [0, 1, 2, 3, 4]
    assert (r == 0).sum() == 3 and (r == 1).sum() == 2 and (r >= 2).sum() == 0


def test_select_thing_queries_matched_first_then_top_scores():
    gen = torch.Generator().manual_seed(10)
    logits, boxes, targets = _location_batch(gen)
    rounds = multi_round_match(logits, boxes, targets, num_rounds=2)
    scores = logits.sigmoid().amax(-1)
    for num_queries in (4, 8, 12):
        sel = select_thing_queries(logits, boxes, targets, num_rounds=2, num_queries=num_queries)
        assert sel.shape == (3, num_queries) and sel.dtype == torch.long
        for n, (q, _, r) in enumerate(rounds):
            row = sel[n].tolist()
            assert len(set(row)) == num_queries
            k = min(q.numel(), num_queries)
            assert row[:k] == q[:k].tolist()  # matched queries first, earlier rounds first
            if q.numel() <= num_queries:
                assert set(q.tolist()) <= set(row)  # all matched queries included
            rest = [i for i in range(12) if i not in q[:k].tolist()]
            top = sorted(rest, key=lambda i: -float(scores[n, i]))[: num_queries - k]
            assert row[k:] == top
    # 4 slots < 6 matched queries in image 0: round 1 complete, then the first round-2 query
    sel = select_thing_queries(logits, boxes, targets, num_rounds=2, num_queries=4)
    q0, _, r0 = rounds[0]
    assert set(q0[r0 == 0].tolist()) <= set(sel[0].tolist())


def test_select_thing_queries_without_targets_is_topk_and_validates():
    gen = torch.Generator().manual_seed(11)
    logits, boxes, _ = _location_batch(gen)
    sel = select_thing_queries(logits, boxes, None, num_rounds=3, num_queries=5)
    assert torch.equal(sel, logits.sigmoid().amax(-1).topk(5, dim=1).indices)
    with pytest.raises(ValueError, match="num_queries"):
        select_thing_queries(logits, boxes, None, num_rounds=1, num_queries=13)
    with pytest.raises(ValueError, match="pred_boxes"):
        select_thing_queries(logits, boxes[..., :3], None, num_rounds=1, num_queries=5)


def test_select_thing_queries_box_free():
    gen = torch.Generator().manual_seed(12)
    logits, _, targets = _location_batch(gen, ms=(2, 1, 0))
    centres = torch.rand(3, 12, 2, generator=gen)
    sel = select_thing_queries(logits, centres, targets, num_rounds=2, num_queries=6)
    assert sel.shape == (3, 6)
    for n, (q, _, _) in enumerate(multi_round_match(logits, centres, targets, 2)):
        assert sel[n, : q.numel()].tolist() == q.tolist()
