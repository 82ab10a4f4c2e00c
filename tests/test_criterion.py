"""Tests for the Panoptic SegFormer losses (Sec. 3.4, Eq. 3-5, App. A.1)."""


import pytest
import torch
import torch.distributed as dist
from fvcore.nn import sigmoid_focal_loss

from panoptic_segformer.modeling.criterion import PanopticSegFormerCriterion, dice_loss
from panoptic_segformer.modeling.matcher import HungarianMatcher, mask_mass_centers

K_TH, K_ST = 3, 4
H, W = 4, 5  # mask-prediction size; ground truth is at 8x (padded input size)
Q_ALL, Q_TH = 8, 6
N_LOC, N_MASK = 2, 3


def _segments(num, gen):
    """``num`` disjoint non-empty bool masks (num, 8H, 8W) made of whole 8x8 cells, plus their boxes."""
    owner = torch.randint(0, num, (H * W,), generator=gen) if num else torch.zeros(0, dtype=torch.long)
    if num:
        owner[torch.randperm(H * W, generator=gen)[:num]] = torch.arange(num)  # each segment non-empty
    cells = (
        torch.stack([owner.view(H, W) == j for j in range(num)])
        if num
        else torch.zeros(0, H, W, dtype=torch.bool)
    )
    masks = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    boxes = []
    for m in masks:
        ys, xs = m.nonzero(as_tuple=True)
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()) + 1, float(ys.min()), float(ys.max()) + 1
        boxes.append(
            [(x0 + x1) / 2 / (8 * W), (y0 + y1) / 2 / (8 * H), (x1 - x0) / (8 * W), (y1 - y0) / (8 * H)]
        )
    return masks, torch.tensor(boxes).view(-1, 4)


def _target(things, stuff, gen):
    """``things``: list of thing labels; ``stuff``: list of stuff labels (one segment each)."""
    masks, boxes = _segments(len(things) + len(stuff), gen)
    nt = len(things)
    return {
        "labels": torch.tensor(things, dtype=torch.long),
        "boxes": boxes[:nt],
        "masks": masks[:nt],
        "stuff_labels": torch.tensor(stuff, dtype=torch.long),
        "stuff_masks": masks[nt:],
        "image_size": (8 * H, 8 * W),
    }


def _default_targets(gen):
    return [_target([0, 2], [1, 3], gen), _target([1, 1, 0], [0], gen)]


def _small(masks):
    return masks.float().view(masks.shape[0], H, 8, W, 8).mean(dim=(2, 4))


def _outputs(
    targets, gen, perfect=False, n_loc=N_LOC, n_mask=N_MASK, box_free=False, k_th=K_TH, k_st=K_ST, q_th=Q_TH
):
    """Model outputs (leaf tensors with requires_grad).

    ``perfect``: thing j of image n is predicted exactly by mask-decoder thing query j (= location query
    thing_query_index[n, j]); stuff is predicted exactly."""
    n = len(targets)
    loc_dim = 2 if box_free else 4
    index = torch.stack([torch.randperm(Q_ALL, generator=gen)[:q_th] for _ in range(n)])
    loc_logits = [torch.randn(n, Q_ALL, k_th, generator=gen) for _ in range(n_loc)]
    loc_boxes = [torch.rand(n, Q_ALL, loc_dim, generator=gen) * 0.5 + 0.25 for _ in range(n_loc)]
    layers = [
        {
            "thing_logits": torch.randn(n, q_th, k_th, generator=gen),
            "stuff_logits": torch.randn(n, k_st, generator=gen),
            "pred_masks": torch.randn(n, q_th + k_st, H, W, generator=gen),
        }
        for _ in range(n_mask)
    ]
    if perfect:
        for b, t in enumerate(targets):
            locs = mask_mass_centers(t["masks"], t["image_size"]) if box_free else t["boxes"]
            for lg in loc_logits:
                lg[b] = -12.0
            for layer in layers:
                layer["thing_logits"][b] = -12.0
                layer["stuff_logits"][b] = -12.0
                layer["pred_masks"][b] = -12.0
            for j, label in enumerate(t["labels"].tolist()):
                q = int(index[b, j])
                for lg, bx in zip(loc_logits, loc_boxes):
                    lg[b, q, label] = 12.0
                    bx[b, q] = locs[j]
                for layer in layers:
                    layer["thing_logits"][b, j, label] = 12.0
                    layer["pred_masks"][b, j] = 24.0 * (2 * _small(t["masks"][j : j + 1])[0] - 1)
            stuff = zip(
                t.get("stuff_labels", torch.zeros(0, dtype=torch.long)).tolist(), t.get("stuff_masks", [])
            )
            for k, m in stuff:
                for layer in layers:
                    layer["stuff_logits"][b, k] = 12.0
                    layer["pred_masks"][b, q_th + k] = 24.0 * (2 * _small(m[None])[0] - 1)
    for t in loc_logits + loc_boxes + [v for layer in layers for v in layer.values()]:
        t.requires_grad_(True)
    return {
        "location": {"pred_logits": loc_logits, "pred_boxes": loc_boxes},
        "thing_query_index": index,
        "mask": layers,
    }


def _criterion(box_free=False, k_th=K_TH, k_st=K_ST, **kw):
    return PanopticSegFormerCriterion(
        k_th, k_st, HungarianMatcher(box_free=box_free), box_free=box_free, **kw
    )


def _total(losses):
    return sum(losses.values())


def _val(t):
    return float(t.detach())


def _expected_names(loc_layers, mask_layers, box_free=False):
    names = set()
    for l in loc_layers:
        names |= {f"loss_det_cls_{l}"} | (
            {f"loss_det_center_{l}"} if box_free else {f"loss_det_bbox_{l}", f"loss_det_giou_{l}"}
        )
    for i in mask_layers:
        names |= {
            f"loss_things_cls_{i}",
            f"loss_things_mask_{i}",
            f"loss_stuff_cls_{i}",
            f"loss_stuff_mask_{i}",
        }
    return names


@pytest.mark.parametrize("box_free", [False, True])
def test_loss_names_per_layer(box_free):
    gen = torch.Generator().manual_seed(0)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen, box_free=box_free)
    losses = _criterion(box_free)(outputs, targets)
    assert set(losses) == _expected_names(range(N_LOC), range(N_MASK), box_free)
    for v in losses.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v)
    last_only = _criterion(box_free, deep_supervision=False)(outputs, targets)
    assert set(last_only) == _expected_names([N_LOC - 1], [N_MASK - 1], box_free)
    for k, v in last_only.items():  # the last layers' terms do not depend on deep supervision
        torch.testing.assert_close(v, losses[k])  # same per-layer ops, same tensors: default float32 tol


def test_no_location_layers():
    gen = torch.Generator().manual_seed(1)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen, n_loc=0)
    del outputs["thing_query_index"]
    losses = _criterion()(outputs, targets)
    assert set(losses) == _expected_names([], range(N_MASK))
    outputs["location"] = {"pred_logits": [], "pred_boxes": []}
    assert set(_criterion()(outputs, targets)) == set(losses)


@pytest.mark.parametrize("box_free", [False, True])
def test_perfect_predictions_give_much_lower_loss(box_free):
    gen = torch.Generator().manual_seed(2)
    targets = _default_targets(gen)
    crit = _criterion(box_free)
    perfect = crit(_outputs(targets, gen, perfect=True, box_free=box_free), targets)
    random = crit(_outputs(targets, gen, box_free=box_free), targets)
    assert _val(_total(perfect)) < 0.01 * _val(_total(random))
    for k in perfect:
        # logits +-12, mask logits +-24: focal ~1e-15, dice ~ eps 1e-3 / (2 x area) <= 5e-4, boxes exact
        assert _val(perfect[k]) < 1e-2, k
        if "cls" not in k:  # random logits can be accidentally good at classification, never at masks/boxes
            assert _val(random[k]) > 0.05, k


def test_perfect_predictions_are_matched_as_constructed():
    gen = torch.Generator().manual_seed(3)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen, perfect=True)
    for (q, g), t in zip(_criterion().match_things(outputs, targets), targets):
        assert dict(zip(q.tolist(), g.tolist())) == {j: j for j in range(t["labels"].numel())}


def test_things_stuff_weights_documented_formula():
    gen = torch.Generator().manual_seed(4)
    targets = [
        _target([0, 2], [1, 3], gen),  # 2 things, 2 stuff classes -> 0.5 / 0.5
        _target([1], [], gen),  # things only -> 1 / 0
        _target([], [], gen),  # nothing -> 1/2 / 1/2 (still trains queries to "no object")
        _target([], [1, 1, 3], gen),  # stuff only; class 1 has two segments -> one class -> 0 / 1
        _target([0, 1, 2], [2], gen),  # 3 / 1 -> 0.75 / 0.25
    ]
    lam_th, lam_st = _criterion().things_stuff_weights(targets)
    # float32 ratios of small counts, correctly rounded and exact here: the default tolerance is ample
    torch.testing.assert_close(lam_th, torch.tensor([0.5, 1.0, 0.5, 0.0, 0.75]))
    torch.testing.assert_close(lam_st, torch.tensor([0.5, 0.0, 0.5, 1.0, 0.25]))
    ones = _criterion(dynamic_things_stuff_weight=False).things_stuff_weights(targets)
    assert all(torch.equal(w, torch.ones(5)) for w in ones)


def test_dynamic_weights_scale_things_and_stuff_terms():
    gen = torch.Generator().manual_seed(5)
    target = _target([0, 1, 2], [2], gen)  # lambda_things = 0.75, lambda_stuff = 0.25
    outputs = _outputs([target], gen)
    dyn = _criterion()(outputs, [target])
    fixed = _criterion(dynamic_things_stuff_weight=False)(outputs, [target])
    for k in fixed:
        factor = 0.25 if k.startswith("loss_stuff") else 0.75
        # weight each term then sum (<= 24 positive float32 terms) vs scale the sum: a few ulps (rtol 1.3e-6)
        torch.testing.assert_close(dyn[k], factor * fixed[k])


def test_image_without_things_gets_no_thing_loss_under_dynamic_weights():
    gen = torch.Generator().manual_seed(6)
    targets = [_target([0, 2], [1], gen), _target([], [0, 3], gen)]
    outputs = _outputs(targets, gen)
    crit = _criterion()
    before = _total(crit(outputs, targets))
    with torch.no_grad():
        outputs["mask"][0]["thing_logits"][1] += 5.0
        outputs["location"]["pred_logits"][0][1] -= 3.0
    # the changed logits only enter terms weighted by lambda_things = 0: the same float32 sums (default tol)
    torch.testing.assert_close(_total(crit(outputs, targets)), before)
    fixed = _criterion(dynamic_things_stuff_weight=False)
    changed = _total(fixed(outputs, targets))
    with torch.no_grad():
        outputs["mask"][0]["thing_logits"][1] -= 5.0
    assert not torch.isclose(_total(fixed(outputs, targets)), changed)  # logits moved by 5: far beyond 1e-5


def test_absent_stuff_classes_get_classification_but_no_mask_loss():
    gen = torch.Generator().manual_seed(7)
    targets = _default_targets(gen)  # image 0: stuff {1, 3}; image 1: stuff {0}
    outputs = _outputs(targets, gen)
    crit = _criterion()
    base = crit(outputs, targets)
    with torch.no_grad():
        for layer in outputs["mask"]:
            layer["pred_masks"][0, Q_TH + 2] = (
                torch.randn(H, W, generator=gen) * 5
            )  # class 2 absent in image 0
            layer["pred_masks"][1, Q_TH + 3] = (
                torch.randn(H, W, generator=gen) * 5
            )  # class 3 absent in image 1
    after = crit(outputs, targets)
    for k in base:  # the changed masks are never read: the same float32 ops and values (default tolerance)
        torch.testing.assert_close(after[k], base[k])
    with torch.no_grad():
        outputs["mask"][1]["stuff_logits"][0, 2] += 3.0  # absent class: classification loss changes
    changed = crit(outputs, targets)
    assert _val(changed["loss_stuff_cls_1"]) > _val(base["loss_stuff_cls_1"])
    with torch.no_grad():
        outputs["mask"][1]["pred_masks"][0, Q_TH + 1] += 3.0  # present class: mask loss changes
    # mask logits +3 on a whole present-class mask moves its dice loss far beyond isclose's rtol 1e-5
    assert not torch.isclose(crit(outputs, targets)["loss_stuff_mask_1"], base["loss_stuff_mask_1"])


def test_unmatched_thing_queries_get_no_mask_loss():
    gen = torch.Generator().manual_seed(8)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen, perfect=True)
    crit = _criterion()
    matches = crit.match_things(outputs, targets)
    base = crit(outputs, targets)
    with torch.no_grad():
        for b, (q, _) in enumerate(matches):
            unmatched = [i for i in range(Q_TH) if i not in q.tolist()]
            assert unmatched
            for layer in outputs["mask"]:
                layer["pred_masks"][b, unmatched] = -12.0 + torch.rand(len(unmatched), H, W, generator=gen)
    new_matches = crit.match_things(outputs, targets)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(matches, new_matches))
    after = crit(outputs, targets)
    for k in base:  # same matches, unmatched masks never read: the same float32 ops (default tolerance)
        torch.testing.assert_close(after[k], base[k])


def test_gradients_reach_every_supervised_output():
    gen = torch.Generator().manual_seed(9)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen)
    crit = _criterion()
    matches = crit.match_things(outputs, targets)
    _total(crit(outputs, targets)).backward()
    for l in range(N_LOC):
        assert outputs["location"]["pred_logits"][l].grad.abs().sum() > 0
        assert outputs["location"]["pred_boxes"][l].grad.abs().sum() > 0
    for layer in outputs["mask"]:
        assert (layer["thing_logits"].grad.abs().sum(-1) > 0).all()  # every query: matched or background
        assert (layer["stuff_logits"].grad != 0).all()  # every stuff query: present or negative
        grad = layer["pred_masks"].grad.abs().flatten(2).sum(-1)
        for b, ((q, _), t) in enumerate(zip(matches, targets)):
            supervised = torch.zeros(Q_TH + K_ST, dtype=torch.bool)
            supervised[q] = True
            supervised[Q_TH + t["stuff_labels"]] = True
            assert (grad[b, supervised] > 0).all()
            assert (grad[b, ~supervised] == 0).all()


def test_image_without_segments_trains():
    gen = torch.Generator().manual_seed(10)
    for targets in ([_target([], [], gen)], [_target([], [], gen), _target([1], [2], gen)]):
        outputs = _outputs(targets, gen)
        for dynamic in (True, False):
            losses = _criterion(dynamic_things_stuff_weight=dynamic)(outputs, targets)
            total = _total(losses)
            assert torch.isfinite(total) and total.requires_grad
            for t in outputs["location"]["pred_logits"] + [l["thing_logits"] for l in outputs["mask"]]:
                t.grad = None
            total.backward()
            thing_grad = outputs["mask"][-1]["thing_logits"].grad[0]
            stuff_grad = outputs["mask"][-1]["stuff_logits"].grad[0]
            assert torch.isfinite(thing_grad).all()
            # lambda_things = lambda_stuff = 1/2 for an empty image (1 and 1 without dynamic weights):
            # all thing queries -> empty set, all stuff queries negative
            assert thing_grad.abs().sum() > 0 and (stuff_grad > 0).all()
            for layer in outputs["mask"]:
                layer["stuff_logits"].grad = None


def test_joint_matching_setup():
    """Table 8 baseline: one query set for all classes, stuff segments inside labels/boxes/masks."""
    gen = torch.Generator().manual_seed(11)
    k_all = K_TH + K_ST
    targets = [_target([0, 5], [], gen), _target([2, 4, 6], [], gen)]
    for t in targets:
        t.pop("stuff_labels")
        t.pop("stuff_masks")
    crit = _criterion(k_th=k_all, k_st=0)
    perfect = crit(_outputs(targets, gen, perfect=True, k_th=k_all, k_st=0), targets)
    outputs = _outputs(targets, gen, k_th=k_all, k_st=0)
    random = crit(outputs, targets)
    # no stuff queries -> no stuff terms at all
    assert set(random) == {k for k in _expected_names(range(N_LOC), range(N_MASK)) if "stuff" not in k}
    assert _val(_total(perfect)) < 0.01 * _val(_total(random))
    _total(random).backward()
    assert outputs["mask"][0]["pred_masks"].grad.abs().sum() > 0


def _focal_reference(x, t, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(x.double())
    return -alpha * t * (1 - p) ** gamma * torch.log(p) - (1 - alpha) * (1 - t) * p**gamma * torch.log(1 - p)


def _dice_reference(logits, target):
    p = torch.sigmoid(logits.double()).flatten()
    t = target.double().flatten()
    return 1 - 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 1e-3)


def test_stuff_losses_match_independent_formulas():
    gen = torch.Generator().manual_seed(12)
    target = _target([], [0, 2], gen)  # stuff only: lambda_stuff = 1
    outputs = _outputs([target], gen, n_loc=0, n_mask=1)
    del outputs["thing_query_index"]
    losses = _criterion()(outputs, [target])
    layer = outputs["mask"][0]
    present = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x = layer["stuff_logits"][0].detach()
    focal = _focal_reference(x, present).sum()
    # Below: float32 focal / dice (sums of 4 classes, 20 mask cells) vs float64 references: float32 rounding
    # (~1e-6 relative), so rel 1e-5; atol 1e-6 for focal terms near 0
    torch.testing.assert_close(
        float(sigmoid_focal_loss(x, present, 0.25, 2.0, "sum")), float(focal), rtol=1e-5, atol=1e-6
    )
    assert _val(losses["loss_stuff_cls_0"]) == pytest.approx(2.0 * float(focal) / 2, rel=1e-5)
    soft = _small(target["stuff_masks"])
    pm = layer["pred_masks"][0].detach()
    dice = _dice_reference(pm[Q_TH + 0], soft[0]) + _dice_reference(pm[Q_TH + 2], soft[1])
    assert _val(losses["loss_stuff_mask_0"]) == pytest.approx(float(dice) / 2, rel=1e-5)
    torch.testing.assert_close(
        dice_loss(pm[[Q_TH, Q_TH + 2]], soft).double().sum(), dice, rtol=1e-5, atol=1e-6
    )


def test_thing_and_detection_losses_match_independent_formulas():
    gen = torch.Generator().manual_seed(13)
    target = _target([1], [], gen)  # one thing, no stuff: lambda_things = 1; one query -> trivial matching
    outputs = _outputs([target], gen, q_th=1, n_loc=1, n_mask=1)
    losses = _criterion()(outputs, [target])
    onehot = torch.tensor([0.0, 1.0, 0.0])
    # Below: float32 losses (focal over 3 or 24 terms, dice over 20 cells, 4-term L1) vs float64 or same-input
    # float32 references: float32 rounding (~1e-6 relative), so rel 1e-5
    layer = outputs["mask"][0]
    x = layer["thing_logits"][0, 0].detach()
    assert _val(losses["loss_things_cls_0"]) == pytest.approx(
        2.0 * float(_focal_reference(x, onehot).sum()), rel=1e-5
    )
    dice = _dice_reference(layer["pred_masks"][0, 0].detach(), _small(target["masks"])[0])
    assert _val(losses["loss_things_mask_0"]) == pytest.approx(float(dice), rel=1e-5)
    # L_det: Deformable DETR, weights 2 / 5 / 2, normalized by one thing
    lg = outputs["location"]["pred_logits"][0][0].detach()
    bx = outputs["location"]["pred_boxes"][0][0].detach()
    # the location layer is matched on its own: recover its match (8 queries, 1 gt) by brute force
    matcher = HungarianMatcher()
    costs = matcher.cost_matrix(target, pred_logits=lg, pred_boxes=bx)[:, 0]
    q = int(costs.argmin())
    targets_cls = torch.zeros(Q_ALL, K_TH)
    targets_cls[q, 1] = 1.0
    assert _val(losses["loss_det_cls_0"]) == pytest.approx(
        2.0 * float(_focal_reference(lg, targets_cls).sum()), rel=1e-5
    )
    l1 = float((bx[q] - target["boxes"][0]).abs().sum())
    assert _val(losses["loss_det_bbox_0"]) == pytest.approx(5.0 * l1, rel=1e-5)
    a, b = bx[q].tolist(), target["boxes"][0].tolist()
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    # float32 corners and areas, eps 1e-7 in union and hull, then 1 - giou cancels: rel 1e-4
    assert _val(losses["loss_det_giou_0"]) == pytest.approx(2.0 * (1 - giou), rel=1e-4)


def test_box_free_center_loss_is_l1_on_mass_centres():
    gen = torch.Generator().manual_seed(14)
    target = _target([2], [], gen)
    outputs = _outputs([target], gen, q_th=1, n_loc=1, n_mask=1, box_free=True)
    losses = _criterion(box_free=True)(outputs, [target])
    centre = mask_mass_centers(target["masks"], target["image_size"])[0]
    lg = outputs["location"]["pred_logits"][0][0].detach()
    pts = outputs["location"]["pred_boxes"][0][0].detach()
    cost = HungarianMatcher(box_free=True).cost_matrix(
        {"labels": target["labels"], "centers": centre[None]}, pred_logits=lg, pred_boxes=pts
    )[:, 0]
    q = int(cost.argmin())
    # float32 2-term L1 from the same float32 points and centre, weighted by 5: rounding only, rel 1e-5
    assert _val(losses["loss_det_center_0"]) == pytest.approx(
        5.0 * float((pts[q] - centre).abs().sum()), rel=1e-5
    )
    with pytest.raises(ValueError, match="box_free"):
        PanopticSegFormerCriterion(K_TH, K_ST, HungarianMatcher(), box_free=True)


def test_normalizers_divide_by_batch_counts():
    """Two copies of one image: every term equals the single-image term (sums and counts both double)."""
    gen = torch.Generator().manual_seed(15)
    target = _target([0, 1], [2], gen)
    single = _outputs([target], gen)
    double = {
        "location": {k: [torch.cat([t, t]) for t in v] for k, v in single["location"].items()},
        "thing_query_index": torch.cat([single["thing_query_index"]] * 2),
        "mask": [{k: torch.cat([v, v]) for k, v in layer.items()} for layer in single["mask"]],
    }
    crit = _criterion()
    one, two = crit(single, [target]), crit(double, [target, target])
    for k in one:  # per-row sums unchanged; each pair sum twice over in another order: ~1 ulp (rtol 1.3e-6)
        torch.testing.assert_close(two[k], one[k])


def test_distributed_normalizers_single_process(tmp_path):
    gen = torch.Generator().manual_seed(16)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen)
    expected = _criterion()(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = _criterion()(outputs, targets)
    finally:
        dist.destroy_process_group()
    for k in expected:  # the same ops; normalizers averaged over 1 process (x / 1): default float32 tolerance
        torch.testing.assert_close(got[k], expected[k])


def test_float32_and_finite_under_autocast_and_extreme_logits():
    gen = torch.Generator().manual_seed(17)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen)
    with torch.no_grad():
        for layer in outputs["mask"]:
            layer["thing_logits"].mul_(1e3)
            layer["pred_masks"].mul_(1e3)
            layer["stuff_logits"].mul_(1e3)
    crit = _criterion()
    half = {
        "location": {
            k: [t.detach().bfloat16().requires_grad_() for t in v] for k, v in outputs["location"].items()
        },
        "thing_query_index": outputs["thing_query_index"],
        "mask": [
            {k: v.detach().bfloat16().requires_grad_() for k, v in layer.items()} for layer in outputs["mask"]
        ],
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(half, targets)
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    _total(losses).backward()
    for layer in half["mask"]:
        for v in layer.values():
            assert torch.isfinite(v.grad.float()).all()
    reference = crit(
        {
            "location": {k: [t.detach().float() for t in v] for k, v in half["location"].items()},
            "thing_query_index": half["thing_query_index"],
            "mask": [{k: v.detach().float() for k, v in layer.items()} for layer in half["mask"]],
        },
        targets,
    )
    # the criterion turns autocast off and casts to float32: the same float32 math on the same bf16 values,
    # so rounding level at most (1e-5)
    for k in losses:
        torch.testing.assert_close(losses[k].detach(), reference[k], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_error():
    gen = torch.Generator().manual_seed(18)
    targets = _default_targets(gen)
    outputs = _outputs(targets, gen)
    crit = _criterion()
    bad = dict(outputs, mask=[dict(outputs["mask"][0], stuff_logits=torch.randn(2, K_ST + 1))])
    with pytest.raises(ValueError, match="stuff_logits"):
        crit(bad, targets)
    bad = dict(outputs, thing_query_index=outputs["thing_query_index"].float())
    with pytest.raises(ValueError, match="thing_query_index"):
        crit(bad, targets)
    wrong = [dict(targets[0], labels=torch.tensor([0, K_TH])), targets[1]]
    with pytest.raises(ValueError, match="labels"):
        crit(outputs, wrong)
    wrong = [dict(targets[0], stuff_labels=torch.tensor([0, K_ST])), targets[1]]
    with pytest.raises(ValueError, match="stuff_labels"):
        crit(outputs, wrong)
    with pytest.raises(ValueError, match="mask"):
        crit(dict(outputs, mask=[]), targets)
    with pytest.raises(ValueError, match="pred_masks"):
        crit(dict(outputs, mask=[dict(outputs["mask"][0], pred_masks=torch.randn(2, Q_TH, H, W))]), targets)
