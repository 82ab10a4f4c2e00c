"""The "official" post-processor: the official code's inference (zhiqi-li/Panoptic-SegFormer,
``easymd/models/panformer/panformer_head.py``, ``PanformerHead.get_bboxes``), pinned on hand-built cases
whose expected outputs are derived by hand from the official formulas, and end to end in official mode
against a line-by-line port of the official loop."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from panoptic_segformer.postprocessing import (
    OfficialMerging,
    binary_mask_stats,
    build_postprocessor,
    mask_wise_merge,
    official_maps,
)
from panoptic_segformer.utils import resize_masks_to_image, upsample_masks_to_image

from conftest import small_cfg


# --------------------------------------------------------------------------------------------
# Resize: one bilinear step of the image's cells straight to the original size.
# --------------------------------------------------------------------------------------------
def test_official_resize_by_hand():
    # [0, 1] -> 4 columns: source x = (x + 0.5) * 2 / 4 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to
    # the end cells: 0, 0.25, 0.75, 1.
    out = resize_masks_to_image(torch.tensor([[[0.0, 1.0]]]), (8, 16), 8, (1, 4))
    # weights 0.25 / 0.75 on 0 and 1: exact in float32, bit-equal
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]), rtol=0, atol=0)


def test_official_resize_of_a_non_multiple_of_8_image_uses_only_its_cells():
    """A 13x21 input (not a multiple of 8) padded in a 24x32 batch has 2x3 of the 3x4 cells; its
    original size is 26x42. A ramp 8j over the cells, resized once: value 8 * clamp((x + 0.5) * 3 / 42
    - 0.5, 0, 2) at column x. The padded cells (1e4) never leak in."""
    masks = torch.full((1, 3, 4), 1e4)
    masks[0, :2, :3] = 8.0 * torch.arange(3.0)
    out = resize_masks_to_image(masks, (13, 21), 8, (26, 42))
    x = torch.arange(42.0)
    expected = 8 * ((x + 0.5) * 3 / 42 - 0.5).clamp(0, 2)
    assert out.shape == (1, 26, 42)
    # float32 weights from scale 3 / 42 (not dyadic) on values <= 16: ~2e-6, so atol 1e-5
    torch.testing.assert_close(out[0], expected.expand(26, 42), rtol=0, atol=1e-5)
    # The generic rule upsamples by 8, crops 21 of 24 columns and resizes: another geometry.
    generic = upsample_masks_to_image(masks, (13, 21), 8, (26, 42))
    assert (generic - out).abs().max() > 0.5


# --------------------------------------------------------------------------------------------
# Merging: score p * (sum / (area + 1))^2 on unclamped masks, thresholds, overlap rule, ties.
# --------------------------------------------------------------------------------------------
H, W = 6, 10


def _box(value, rows, cols):
    m = torch.zeros(H, W)
    m[rows[0]:rows[1], cols[0]:cols[1]] = value
    return m


def _hand_built_case():
    """Nine queries on a 6x10 image (masks at the output size; rows/cols half-open):

    q0 thing L0 p 0.2, 3.0 on [0:2, 0:2] (4 px)     s = 0.2 (12 / 5)^2 = 1.152  (above 1: unclamped)
    q1 thing L1 p 1.0, 0.9 on [0:3, 2:5] (9 px)     s = (8.1 / 10)^2  = 0.6561
    q2 thing L2 p 1.0, 1.0 at (1, 3)     (1 px)     s = (1 / 2)^2     = 0.25 = quality threshold: kept
                                                    by score, then overlap 1/1 > 0.4: skipped
    q3 thing L0 p 1.0, 0.75 on [1:3, 3:8] (10 px)   s = (7.5 / 11)^2  = 0.46488; overlap 4/10 = 0.4 =
                                                    the thing threshold: kept, paints [1:3, 5:8]
    q4 stuff L5 p 0.9, 0.8 on [2, 0:5] + [3, 0:10] (15 px)  s = 0.9 (12 / 16)^2 = 0.50625; overlap
                                                    3/15 = 0.2 = the stuff threshold: kept
    q5 stuff L6 p 0.95, 0.6 on [4:6, :] (20 px)     s = 0.95 (12 / 21)^2 = 0.31020
    q6 thing L3 p 0.3, exactly 0.5 on [4:6, :]      empty binary mask (strict > 0.5): s = 0
    q7 thing L4 p 1.0, 1.0 on [0, 8:10] (2 px)      s = (2 / 3)^2 = 0.44444
    q8 thing L7 p 1.0, 1.0 on [0, 8:10]             same score as q7 (a tie): query order, q7 first,
                                                    then overlap 1 > 0.4: skipped
    Order: q0, q1, q4, q3, q7, q8, q5, q2, q6.
    """
    masks = torch.stack([
        _box(3.0, (0, 2), (0, 2)),
        _box(0.9, (0, 3), (2, 5)),
        _box(1.0, (1, 2), (3, 4)),
        _box(0.75, (1, 3), (3, 8)),
        _box(0.8, (2, 3), (0, 5)) + _box(0.8, (3, 4), (0, 10)),
        _box(0.6, (4, 6), (0, 10)),
        _box(0.5, (4, 6), (0, 10)),
        _box(1.0, (0, 1), (8, 10)),
        _box(1.0, (0, 1), (8, 10)),
    ])
    class_probs = torch.tensor([0.2, 1.0, 1.0, 1.0, 0.9, 0.95, 0.3, 1.0, 1.0])
    labels = torch.tensor([0, 1, 2, 0, 5, 6, 3, 4, 7])
    is_thing = torch.tensor([True, True, True, True, False, False, True, True, True])
    return masks, class_probs, labels, is_thing


def test_official_merge_hand_built_case():
    masks, class_probs, labels, is_thing = _hand_built_case()
    pan, segments = build_postprocessor("official")(masks, class_probs, labels, is_thing)
    # Painting order q0, q1, q4, q3, q7, q5 -> segment ids 1..6.
    expected = torch.zeros(H, W, dtype=torch.int32)
    expected[0:2, 0:2] = 1
    expected[0:3, 2:5] = 2
    expected[2, 0:2] = 3
    expected[3, :] = 3
    expected[1:3, 5:8] = 4
    expected[0, 8:10] = 5
    expected[4:6, :] = 6
    assert torch.equal(pan, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [
        (1, 0, True), (2, 1, True), (3, 5, False), (4, 0, True), (5, 4, True), (6, 6, False)]
    scores = [0.2 * (12 / 5) ** 2, 0.81 ** 2, 0.9 * 0.75 ** 2, (7.5 / 11) ** 2, (2 / 3) ** 2,
              0.95 * (12 / 21) ** 2]
    # float32 mask values (0.9, 0.95, ...) in float64 scores vs the decimal formulas: ~1e-7 relative
    assert [s["score"] for s in segments] == pytest.approx(scores, rel=1e-6)
    # The official (2, H, W) output: categories (contiguous id + 1) and thing instance ids.
    maps = official_maps(pan, segments)
    assert torch.equal(maps[0][0:2, 0:2], torch.full((2, 2), 1))
    assert torch.equal(maps[1][expected == 4], torch.full((6,), 3))  # q3 is the third thing
    assert int(maps[1][0, 8]) == 4 and int(maps[1][3, 0]) == 0 and int(maps[0][0, 5]) == 0
    # Not what mask-wise merging (Eq. 6, clamped masks) gives on the same predictions: q2 (mean 1)
    # would go first and q0 (clamped mean 1, s = 0.2) would be dropped.
    eq6, _ = mask_wise_merge(masks.clamp(max=1.0), class_probs, labels, is_thing,
                             keep_threshold=(0.6, 0.8))
    assert not torch.equal(eq6 > 0, pan > 0)


def test_official_merge_thresholds_are_the_official_ones_and_inputs_are_checked():
    pp = OfficialMerging()
    assert pp.conf_threshold == (0.25, 0.25) and pp.keep_threshold == (0.6, 0.8)
    assert pp.max_mask_value == float("inf") and pp.masks_to_image is resize_masks_to_image
    masks, class_probs, labels, is_thing = _hand_built_case()
    # A stricter thing quality threshold drops q2's tie and more; the stuff one is separate.
    pan, segments = OfficialMerging(conf_threshold=(0.5, 0.25))(masks, class_probs, labels, is_thing)
    assert [s["category_id"] for s in segments] == [0, 1, 5, 6]
    for bad, pattern in [(masks - 1, r"mask_probs.*\[0, inf\]"),
                         (masks.masked_fill(masks > 2, float("inf")), "finite")]:
        with pytest.raises(ValueError, match=pattern):
            pp(bad, class_probs, labels, is_thing)


def test_official_instance_scores_rank_things_by_the_panoptic_score():
    masks, class_probs, labels, is_thing = _hand_built_case()
    areas, prob_sums, _, _ = binary_mask_stats(masks, 0.5)
    scores = OfficialMerging().instance_scores(class_probs, areas, prob_sums)
    # float64 scores of float32 inputs, cast to float32: within an ulp or two (default float32 tolerance)
    torch.testing.assert_close(scores[[0, 1, 2, 6]].float(),
                               torch.tensor([0.2 * 2.4 ** 2, 0.81 ** 2, 0.25, 0.0]))


# --------------------------------------------------------------------------------------------
# End to end in official mode, against a port of the official ``get_bboxes`` loop.
# --------------------------------------------------------------------------------------------
OFFICIAL = ("MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE", "official",
            "MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "4",
            "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS", "2",
            "MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder",
            "MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR", "official",
            "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_STUFF", "0.8",
            "MODEL.PANOPTIC_SEGFORMER.TEST.DETECTIONS_PER_IMAGE", "12",
            "INPUT.SIZE_DIVISIBILITY", "1")


def official_get_bboxes(cls_score, bbox_pred, mask_pred_1_8, stuff_logits, img_shape, ori_shape,
                        num_things, max_per_img, quality=(0.25, 0.25), overlap=(0.4, 0.2)):
    """``PanformerHead._get_bboxes_single`` + ``get_bboxes`` for one image, ported line by line
    (the network outputs are inputs; labels are the official ones: thing 0..K_th-1, stuff K_th + j).
    Returns (results (2, H, W): label + 1 and instance id; bbox_th (100, 5); labels_th; seg_th)."""
    cls_score = cls_score.sigmoid()
    scores, indexes = cls_score.view(-1).topk(max_per_img)
    det_labels = indexes % num_things
    bbox_index = torch.div(indexes, num_things, rounding_mode="floor")
    bbox_pred = bbox_pred[bbox_index]
    det_bboxes = torch.cat([bbox_pred[:, :2] - bbox_pred[:, 2:] / 2, bbox_pred[:, :2] + bbox_pred[:, 2:] / 2], 1)
    det_bboxes[:, 0::2] = det_bboxes[:, 0::2] * img_shape[1]
    det_bboxes[:, 1::2] = det_bboxes[:, 1::2] * img_shape[0]
    det_bboxes[:, 0::2].clamp_(min=0, max=img_shape[1])
    det_bboxes[:, 1::2].clamp_(min=0, max=img_shape[0])
    scale_factor = torch.tensor([img_shape[1] / ori_shape[1], img_shape[0] / ori_shape[0]] * 2)
    det_bboxes /= scale_factor
    bbox = torch.cat((det_bboxes, scores.unsqueeze(1)), -1)
    labels = det_labels

    num_stuff = stuff_logits.shape[0]
    scores_stuff = stuff_logits.sigmoid()
    mask_pred = F.interpolate(mask_pred_1_8.unsqueeze(0), size=ori_shape, mode="bilinear").squeeze(0)
    masks_all = mask_pred
    seg_all = masks_all > 0.5
    sum_seg_all = seg_all.sum((1, 2)).float() + 1
    scores_all = torch.cat([bbox[:, -1], scores_stuff], 0)
    bboxes_all = torch.cat([bbox, torch.zeros([num_stuff, 5])], 0)
    labels_all = torch.cat([labels, torch.arange(num_things, num_things + num_stuff)], 0)
    seg_scores = (masks_all * seg_all.float()).sum((1, 2)) / sum_seg_all
    scores_all *= seg_scores ** 2
    scores_all, index = torch.sort(scores_all, descending=True)
    masks_all = masks_all[index]
    labels_all = labels_all[index]
    bboxes_all = bboxes_all[index]
    seg_all = seg_all[index]
    bboxes_all[:, -1] = scores_all
    things_selected = labels_all < num_things
    bbox_th = bboxes_all[things_selected][:100]
    labels_th = labels_all[things_selected][:100]
    seg_th = seg_all[things_selected][:100]
    results = torch.zeros((2, *mask_pred.shape[-2:])).to(torch.long)
    id_unique = 1
    for i, s in enumerate(scores_all):
        if labels_all[i] < num_things and s < quality[0]:
            continue
        elif labels_all[i] >= num_things and s < quality[1]:
            continue
        _mask = masks_all[i] > 0.5
        mask_area = _mask.sum().item()
        intersect = _mask & (results[0] > 0)
        intersect_area = intersect.sum().item()
        if labels_all[i] < num_things:
            if mask_area == 0 or (intersect_area * 1.0 / mask_area) > overlap[0]:
                continue
        else:
            if mask_area == 0 or (intersect_area * 1.0 / mask_area) > overlap[1]:
                continue
        if intersect_area > 0:
            _mask = _mask & (results[0] == 0)
        results[0, _mask] = labels_all[i] + 1
        if labels_all[i] < num_things:
            results[1, _mask] = id_unique
            id_unique += 1
    return results, bbox_th, labels_th, seg_th


def test_official_mode_equals_the_ported_official_inference_on_a_non_multiple_of_8_image():
    torch.manual_seed(0)
    model = build_model(small_cfg(*OFFICIAL)).eval()
    assert isinstance(model.postprocessor, OfficialMerging)
    assert model.postprocessor.keep_threshold == (0.6, 0.8)
    with torch.no_grad():  # spread the class scores around the quality thresholds
        model.location_decoder.class_embed[-1].bias.normal_(0.0, 2.0)
        model.mask_decoder.stuff_class_embed[-1].bias.normal_(0.0, 2.0)
    image = torch.rand(3, 45, 59) * 255  # 45x59: not a multiple of 8, no padding
    inputs = [{"image": image, "height": 101, "width": 131}]
    images = model.preprocess_image(inputs)
    with torch.no_grad():
        outputs = model.forward_outputs(images)
    last = outputs["mask"][-1]
    assert tuple(last["pred_masks"].shape[-2:]) == (6, 8)
    # Bumps of height 0.6-1.6 at 1/8 (values above 1 included; things narrow, stuff wide) instead of
    # the random-init ReLU maps, so that segments of both kinds survive the thresholds.
    g = torch.Generator().manual_seed(0)
    q = last["pred_masks"].shape[1]
    ys, xs = torch.arange(6.0).view(1, 6, 1), torch.arange(8.0).view(1, 1, 8)
    cy, cx = torch.rand(q, 1, 1, generator=g) * 6, torch.rand(q, 1, 1, generator=g) * 8
    height = 0.6 + torch.rand(q, 1, 1, generator=g)
    radius = torch.full((q, 1, 1), 1.5)
    radius[12:] = 3.0
    last["pred_masks"] = (height * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / radius ** 2))[None]
    assert last["pred_masks"].max() > 1
    with torch.no_grad():
        result = model.inference(outputs, inputs, images)[0]
    pan, segments = result["panoptic_seg"]

    ref, bbox_th, labels_th, seg_th = official_get_bboxes(
        outputs["location"]["pred_logits"][-1][0], outputs["location"]["pred_boxes"][-1][0],
        last["pred_masks"][0], last["stuff_logits"][0], (45, 59), (101, 131),
        num_things=len(model.thing_ids), max_per_img=12)
    # Official labels -> contiguous ids + 1, as official_maps writes them.
    contiguous = torch.tensor(model.thing_ids + model.stuff_ids)
    ref[0] = torch.where(ref[0] > 0, contiguous[(ref[0] - 1).clamp(min=0)] + 1, ref[0])
    ours = official_maps(pan, segments)
    assert {s["isthing"] for s in segments} == {True, False} and len(segments) >= 4  # not vacuous
    assert torch.equal(ours, ref)

    inst = result["instances"]
    order = inst.scores.argsort(descending=True)
    assert len(inst) == len(labels_th) == 12
    assert torch.equal(contiguous[labels_th], inst.pred_classes[order])
    assert torch.equal(seg_th, inst.pred_masks[order])
    # scores: float32 sums of 13231 mask values vs row sums added in float64 (~1e-7 relative): rtol 1e-5;
    # boxes: the same float32 corners scaled to <= 131 px in another order (ulp ~8e-6): atol 1e-4
    torch.testing.assert_close(inst.scores[order], bbox_th[:, 4], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inst.pred_boxes.tensor[order], bbox_th[:, :4], rtol=1e-5, atol=1e-4)
