"""The PanopticSegFormer meta-architecture and its paper variants: a training step and inference for
each switch (query decoupling / joint matching, box-free, location-decoder depth, deep supervision,
query filtering, mask-decoder self-attention, first-K mask-decoder layers at inference)."""
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import EventStorage

from conftest import small_cfg
from panoptic_segformer import PanopticSegFormer, PanopticSegFormerDatasetMapper
from panoptic_segformer.postprocessing import binary_mask_stats, mean_mask_instance_scores
from panoptic_segformer.utils import ScratchBuffers, resize_masks_to_image, upsample_masks_to_image


@pytest.fixture(scope="module")
def batches():
    cfg = small_cfg()
    dicts = DatasetCatalog.get("shapes_panoptic_train_tiny")[:2]
    train = [PanopticSegFormerDatasetMapper(cfg, True)(d) for d in dicts]
    test = [PanopticSegFormerDatasetMapper(cfg, False)(d) for d in dicts]
    return train, test


def _tiny(*opts):
    return small_cfg("MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32", "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
                     "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", "12",
                     "MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.NUM_QUERIES", "8", *opts)


def _step_and_infer(cfg, batches):
    torch.manual_seed(0)
    model = build_model(cfg)
    train, test = batches
    model.train()
    with EventStorage():
        losses = model(train)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    # DistributedDataParallel (without find_unused_parameters) needs a gradient for every parameter.
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    model.eval()
    with torch.no_grad():
        outputs = model(test)
    for x, out in zip(test, outputs):
        pan, segments = out["panoptic_seg"]
        assert pan.shape == (x["height"], x["width"]) and pan.dtype == torch.int32
        assert sorted(set(pan.unique().tolist()) - {0}) == sorted(s["id"] for s in segments)
        assert out["instances"].image_size == (x["height"], x["width"])
        assert out["sem_seg"].shape == (model.num_classes, x["height"], x["width"])
    return model, losses


def test_registered_in_detectron2():
    assert META_ARCH_REGISTRY.get("PanopticSegFormer") is PanopticSegFormer


def test_default_small_model_losses_are_named_per_layer(batches):
    _, losses = _step_and_infer(_tiny(), batches)
    for layer in range(2):
        for name in ("det_cls", "det_bbox", "det_giou", "things_cls", "things_mask", "stuff_cls", "stuff_mask"):
            assert f"loss_{name}_{layer}" in losses


def test_query_filtering_feeds_fewer_thing_queries_to_the_mask_decoder(batches):
    cfg = _tiny()
    model = build_model(cfg)
    images = model.preprocess_image(batches[0])
    targets = model.prepare_targets(batches[0], images)
    model.train()
    out = model.forward_outputs(images, targets)
    assert out["thing_query_index"].shape == (2, 8)
    assert out["mask"][-1]["thing_logits"].shape[1] == 8
    cfg = _tiny("MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.ENABLED", "False")
    model = build_model(cfg)
    model.train()
    out = model.forward_outputs(images, targets)
    assert out["mask"][-1]["thing_logits"].shape[1] == 12


@pytest.mark.parametrize("opts", [
    ("MODEL.PANOPTIC_SEGFORMER.BOX_FREE", "True"),
    ("MODEL.PANOPTIC_SEGFORMER.QUERY_DECOUPLING", "False"),
    ("MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS", "0"),
    ("MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS", "1"),
    ("MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_SELF_ATTN", "True"),
    ("MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS", "1"),
    ("MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THING_QUERIES", "5"),
    ("MODEL.PANOPTIC_SEGFORMER.TEST.POSTPROCESSOR", "pixel_argmax"),
    ("MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "4"),
    ("MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder"),
])
def test_variant_trains_and_infers(opts, batches):
    model, losses = _step_and_infer(_tiny(*opts), batches)
    key, value = opts
    if key.endswith("BOX_FREE"):
        assert "loss_det_center_1" in losses and not any("giou" in k for k in losses)
    if key.endswith("QUERY_DECOUPLING"):
        assert model.stuff_query_embed is None and not any("stuff" in k for k in losses)
        assert model.mask_decoder.thing_class_embed[0].out_features == model.num_classes
    if key.endswith("LOCATION_DECODER_LAYERS"):
        assert sum(k.startswith("loss_det_cls") for k in losses) == int(value)
    if key.endswith("NUM_FEATURE_LEVELS"):  # extra level for the encoder, not the mask decoder
        assert model.encoder.level_embed.shape[0] == 4 and model.mask_decoder.n_levels == 3


def test_deep_supervision_off_supervises_only_the_last_layer(batches):
    _, losses = _step_and_infer(_tiny("MODEL.PANOPTIC_SEGFORMER.DEEP_SUPERVISION", "False"), batches)
    assert "loss_things_mask_1" in losses and "loss_things_mask_0" not in losses


def test_inference_with_first_k_mask_decoder_layers_uses_layer_k(batches):
    cfg = _tiny("MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS", "1")
    model = build_model(cfg).eval()
    images = model.preprocess_image(batches[1])
    with torch.no_grad():
        all_layers = model.forward_outputs(images, return_attention=True)["mask"]  # every layer's masks
        first = model.forward_outputs(images, num_mask_layers=1)["mask"]
    # the same layer-0 ops on the same tensors (same shapes): equal, allclose's defaults a formality
    assert len(first) == 1 and torch.allclose(first[0]["pred_masks"], all_layers[0]["pred_masks"])


def test_class_count_mismatch_is_a_clear_error():
    cfg = _tiny("MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80")
    with pytest.raises(ValueError, match=r"NUM_THING_CLASSES/NUM_STUFF_CLASSES = 80/3.*4 thing and 3 stuff"):
        build_model(cfg)


def test_masks_to_image_ignores_padding_and_batch_partners():
    """Upsampling uses only the image's own 1/8 cells: the result equals upsampling the unpadded
    map, whatever the padded/pinned cells around it hold."""
    torch.manual_seed(0)
    own = torch.randn(3, 5, 7)  # an image of 37x53 px: ceil(37/8) x ceil(53/8) cells at 1/8
    padded = torch.full((3, 9, 12), -1e4)
    padded[:, :5, :7] = own
    out = upsample_masks_to_image(padded, (37, 53), 8, (74, 106))
    ref = upsample_masks_to_image(own, (37, 53), 8, (74, 106))
    assert out.shape == (3, 74, 106)
    torch.testing.assert_close(out, ref)  # both upsample the same 5x7 cells: the same kernel (default tol)
    assert out.min() > -100  # no -1e4 padding value leaked into the border


def test_masks_to_image_at_the_image_size_skips_the_identity_resize():
    """Output size = image size: the crop of the upsampled map, bit-identical to Detectron2's
    sem_seg_postprocess (crop, then a bilinear resize by a factor of 1)."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    torch.manual_seed(0)
    maps = torch.randn(4, 7, 9) * 5
    up = torch.nn.functional.interpolate(maps[None], size=(56, 72), mode="bilinear", align_corners=False)[0]
    for image_size in ((50, 70), (56, 72), (49, 65)):
        ours = upsample_masks_to_image(maps, image_size, 8, image_size)
        assert torch.equal(ours, sem_seg_postprocess(up, image_size, *image_size))


def test_masks_to_image_into_reused_buffers_are_bit_identical():
    """With ScratchBuffers (reused across query chunks) both ways to the output size give the
    same bytes as without, chunk after chunk, larger and smaller, and Detectron2's way (upsample by the
    stride, then sem_seg_postprocess's crop + resize) gives them too; a later chunk overwrites the
    buffer, so the result is a view of it."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    torch.manual_seed(0)
    maps = torch.randn(7, 7, 9) * 5
    for to_image in (upsample_masks_to_image, resize_masks_to_image):
        for image_size, output_size in (((50, 70), (50, 70)), ((49, 65), (98, 131)), ((56, 72), (30, 41))):
            buffers = ScratchBuffers()
            for rows in (slice(0, 3), slice(3, 7), slice(5, 6)):
                ref = to_image(maps[rows], image_size, 8, output_size)
                out = to_image(maps[rows], image_size, 8, output_size, buffers=buffers)
                assert out.shape == ref.shape and torch.equal(out, ref), (to_image.__name__, image_size, rows)
                if to_image is upsample_masks_to_image:
                    cells = maps[rows][:, :-(-image_size[0] // 8), :-(-image_size[1] // 8)]
                    up = torch.nn.functional.interpolate(cells[None], scale_factor=8, mode="bilinear",
                                                         align_corners=False)[0]
                    assert torch.equal(out, sem_seg_postprocess(up, image_size, *output_size))
            first = to_image(maps[0:3], image_size, 8, output_size, buffers=buffers)
            snapshot = first.clone()
            to_image(maps[3:6], image_size, 8, output_size, buffers=buffers)
            assert not torch.equal(first, snapshot)  # reused (overwritten), not a fresh tensor


def test_masks_reach_images_that_are_not_a_multiple_of_8_at_stride_8():
    """SIZE_DIVISIBILITY 1 and a 45x21 image: the 1/8 map has ceil(45/8) x ceil(21/8) = 6x3 cells,
    cell j centred on pixel 8j + 3.5. A ramp of value 8j along x, bilinearly upsampled by the
    encoder's stride 8, is x - 3.5 at pixel x (clamped to the outer cell values) -- not the ramp of
    a stride 7 = 21 // 3 from dividing sizes."""
    model = build_model(_tiny("INPUT.SIZE_DIVISIBILITY", "1")).eval()
    assert model.mask_stride == 8 == model.backbone.output_shape()["res3"].stride
    image = torch.rand(3, 45, 21) * 255
    images = model.preprocess_image([{"image": image}])
    assert tuple(images.tensor.shape[-2:]) == (45, 21)
    with torch.no_grad():
        outputs = model.forward_outputs(images)
    last = outputs["mask"][-1]
    assert tuple(last["pred_masks"].shape[-2:]) == (6, 3)
    q = last["pred_masks"].shape[1]
    last["pred_masks"] = (8.0 * torch.arange(3.0)).expand(1, q, 6, 3).contiguous()
    seen = {}

    def capture(mask_probs, class_probs, labels, is_thing, mask_logits=None, class_distribution=None):
        seen["logits"] = mask_logits
        return torch.zeros(mask_probs.shape[1:], dtype=torch.int32), []

    with torch.no_grad():
        model.inference(outputs, [{"image": image}], images, postprocessor=capture)
    expected = (torch.arange(21.0) - 3.5).clamp(0, 16).expand(45, 21)
    assert seen["logits"].shape == (q, 45, 21)
    # scale 3 / 24 = 1/8: bilinear weights are multiples of 1/16, exact in float32 on values <= 16
    torch.testing.assert_close(seen["logits"][0], expected, rtol=0, atol=1e-5)


def test_bf16_autocast_inference_and_training_step_on_cpu(batches):
    """Mixed precision (the part that runs on a CPU): under bf16 autocast the forward is
    finite and close to fp32, and a training step gives finite float32 losses and gradients."""
    model = build_model(_tiny("MODEL.PANOPTIC_SEGFORMER.DROPOUT", "0.0")).eval()
    train, test = batches
    with torch.no_grad():
        ref = model(test)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(test)
    for r, o in zip(ref, out):
        assert torch.isfinite(o["sem_seg"]).all()
        # bf16 keeps 8 mantissa bits (~4e-3 relative a rounding), compounded through the layers; sem_seg
        # values are probabilities in [0, 1]: atol 2e-2
        torch.testing.assert_close(o["sem_seg"].float(), r["sem_seg"], atol=2e-2, rtol=0)
        assert o["panoptic_seg"][0].dtype == torch.int32
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(train)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _predictions_with_segments(seed=1):
    """A tiny model with spread class scores and smaller, distinct masks (a random init has near-uniform
    ones), and the per-query predictions of one 96 x 128 image."""
    torch.manual_seed(seed)
    model = build_model(_tiny("MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_THING", "0.2",
                              "MODEL.PANOPTIC_SEGFORMER.TEST.KEEP_THRESHOLD_STUFF", "0.2",
                              "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.02",
                              "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.02")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "class_embed" in name and name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 3.0)
            elif "cross_attn.q_proj" in name or "cross_attn.k_proj" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            if name.endswith("conv2.bias"):
                p.sub_(2.0)
        images = model.preprocess_image([{"image": torch.rand(3, 96, 128, generator=g) * 255}])
        outputs = model.forward_outputs(images, num_mask_layers=model.test_mask_decoder_layers)
    return model, images.image_sizes[0], model.per_query_predictions(outputs["mask"][-1], 0)


def test_full_resolution_outputs_do_not_depend_on_the_chunk_size():
    """Queries reach full resolution in chunks (bounded memory); one query per chunk gives the same outputs
    as all at once, up to float rounding.

    Not bit for bit: ATen's element-wise kernels compute the tail of each vectorised loop (and of each
    thread's share) with scalar code, whose sigmoid may differ from the vectorised one by 1 ulp, and the
    chunk length decides which elements are tails. So mask probabilities may differ by ~6e-8: binary
    masks and the panoptic map are equal except at pixels whose probability lies within 1e-6 of the
    threshold (counted: at most 1e-3 of the pixels), segments and instances keep their ids, classes and
    order, and scores agree within 1e-6 relative (means of probabilities that differ by <= 1 ulp)."""
    model, image_size, (dist, probs, labels, is_thing, maps) = _predictions_with_segments()
    with torch.no_grad():
        whole = model.full_resolution_outputs(model.postprocessor, maps, dist, probs, labels, is_thing,
                                              image_size, (150, 200))
        single = model.full_resolution_outputs(model.postprocessor, maps, dist, probs, labels, is_thing,
                                               image_size, (150, 200), chunk_elements=1)
    full_probs = model.mask_decoder.mask_probabilities(
        upsample_masks_to_image(maps, image_size, model.mask_stride, (150, 200)))
    at_threshold = ((full_probs - model.mask_threshold).abs() <= 1e-6).any(0)

    def differ_only_at_threshold(x, y):
        diff = x != y
        diff = diff.any(0) if diff.dim() == 3 else diff
        return bool(at_threshold[diff].all()) and int(diff.sum()) <= 1e-3 * diff.numel()

    pan, segments = whole["panoptic_seg"]
    assert len(segments) >= 2 and {s["isthing"] for s in segments} == {True, False}
    assert differ_only_at_threshold(pan, single["panoptic_seg"][0])
    other = single["panoptic_seg"][1]
    assert [{k: v for k, v in s.items() if k != "score"} for s in segments] == \
        [{k: v for k, v in s.items() if k != "score"} for s in other]
    torch.testing.assert_close(torch.tensor([s["score"] for s in segments]), torch.tensor([s["score"] for s in other]),
                               rtol=1e-6, atol=0)  # means of probabilities that differ by <= 1 ulp
    a, b = whole["instances"], single["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes) and differ_only_at_threshold(a.pred_masks, b.pred_masks)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)  # as the segment scores
    same_masks = (a.pred_masks == b.pred_masks).flatten(1).all(1)
    assert torch.equal(a.pred_boxes.tensor[same_masks], b.pred_boxes.tensor[same_masks])  # boxes of equal masks
    # sums of n query products >= 0 in two orders, of probabilities up to 1 ulp apart: within 2 gamma_n + 2u
    # of the value (u = 2^-24; the test below derives the bound)
    n, u = len(dist), 2.0 ** -24
    torch.testing.assert_close(whole["sem_seg"], single["sem_seg"], rtol=2 * n * u / (1 - n * u) + 2 * u, atol=0)
    # Instances: the top thing results by score, ties by query index, masks > mask threshold. `whole` brings
    # every query to full resolution in one chunk, as full_probs does: the same kernels on the same
    # tensors, so the same bits.
    things = is_thing.nonzero().squeeze(1)
    binary = full_probs[things] > model.mask_threshold
    areas, prob_sums, _, _ = binary_mask_stats(full_probs, model.mask_threshold, things.tolist())
    scores = mean_mask_instance_scores(probs[things], areas, prob_sums)
    order = torch.sort(scores, descending=True, stable=True).indices[:model.detections_per_image]
    assert torch.equal(a.scores, scores[order].float()) and torch.equal(a.pred_masks, binary[order])
    # ... which is the class probability times the mean probability inside the binary mask.
    plain = probs[things] * (full_probs[things] * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    # float32 sum of 30000 probabilities vs float32 row sums of 200 added in float64: ~1e-7 relative apart
    torch.testing.assert_close(a.scores, plain[order], rtol=1e-6, atol=0)


@pytest.mark.parametrize("decoupled", [True, False])
def test_sem_seg_equals_the_dense_semantic_inference(decoupled):
    """sem_seg is Detectron2's / Mask2Former's semantic inference, sum_q dist[q, k] * sigmoid(mask_q)
    at full resolution (their einsum, written independently here). With query decoupling the thing
    queries update only the thing planes and each stuff query writes its own plane: a stuff plane is then
    its query's probabilities times its class probability (one rounding of one product), and the whole
    map equals the dense product over the same chunks to float32 summation rounding."""
    from panoptic_segformer.panoptic_segformer import _SemanticMap

    model, image_size, (dist, probs, labels, is_thing, maps) = _predictions_with_segments()
    if not decoupled:
        model.query_decoupling = False
    assert model._semantic_blocks(dist) == (() if not decoupled else
                                            (len(dist) - len(model.stuff_ids), slice(0, 4), model.stuff_ids))
    full = model.mask_decoder.mask_probabilities(upsample_masks_to_image(maps, image_size, model.mask_stride,
                                                                         (150, 200)))
    with torch.no_grad():
        for chunk_elements in (1 << 25, 150 * 200 * 5):
            sem = model.full_resolution_outputs(model.postprocessor, maps, dist, probs, labels, is_thing,
                                                image_size, (150, 200), chunk_elements=chunk_elements)["sem_seg"]
            # Every value is a sum of n = len(dist) products of numbers in [0, 1], all >= 0: each float32
            # summation order is within gamma_n = n u / (1 - n u) (u = 2^-24) of the exact sum relative to
            # the value itself, so two orders differ by at most 2 gamma_n of it (no absolute term needed).
            # The probabilities themselves may differ by 1 ulp (2u relative) between the model's query chunks
            # and `full` (ATen computes the tails of vectorised loops with a scalar sigmoid): 2u more.
            n, u = len(dist), 2.0 ** -24
            rtol = 2 * n * u / (1 - n * u) + 2 * u
            torch.testing.assert_close(sem, torch.einsum("qc,qhw->chw", dist, full), rtol=rtol, atol=0)
            dense = _SemanticMap(dist, 150, 200)
            for rows in torch.arange(len(dist)).split(max(1, chunk_elements // (150 * 200))):
                dense.add(rows, full[rows])
            # The block product and the dense one sum the same non-zero terms (the dense one adds exact
            # zeros), with the BLAS choosing the order per matrix shape and ISA: the same bound.
            torch.testing.assert_close(sem, dense.sem, rtol=rtol, atol=0)
    if decoupled:
        stuff = (~is_thing).nonzero().squeeze(1)
        assert len(stuff) > 0
        for q in stuff.tolist():
            # one product of a probability (1 ulp apart at most, see above) and the class probability
            torch.testing.assert_close(sem[labels[q]], full[q] * dist[q, labels[q]], rtol=4 * 2.0 ** -24, atol=0)
    # Not the block structure (a thing query with a stuff class probability): the dense product.
    broken = dist.clone()
    broken[0, model.stuff_ids[0]] = 0.5
    assert model._semantic_blocks(broken) == ()


@pytest.mark.parametrize("chunk", [1, 3, 40])
def test_running_top_k_instances_equal_one_stable_sort(chunk):
    """The instances' running top-k over query chunks (each mask copied once when it enters,
    not the whole top-k per chunk) gives what one stable sort of all thing queries gives: scores
    descending, ties (many here) by query index, the binary masks and labels of those queries."""
    from panoptic_segformer.panoptic_segformer import _RunningTopK

    g = torch.Generator().manual_seed(0)
    q, k = 40, 7
    mask_probs = torch.rand(q, 6, 5, generator=g)
    class_probs = torch.randint(0, 4, (q,), generator=g).float() / 4  # 4 values: ties
    labels = torch.randint(0, 10, (q,), generator=g)
    top = _RunningTopK(k, lambda cls, areas, prob_sums: cls, mask_threshold=0.5)
    for rows in torch.arange(q).split(chunk):
        before = {int(i): m.data_ptr() for i, m in zip(top.index if top.index is not None else [], top.masks)}
        top.update(rows, mask_probs, rows.tolist(), class_probs[rows])
        assert len(top.masks) == min(k, int(rows[-1]) + 1)
        stayed = [(int(i), m.data_ptr()) for i, m in zip(top.index, top.masks) if int(i) in before]
        assert all(before[i] == ptr for i, ptr in stayed), "a kept mask was copied again"
    result = top.instances((6, 5), class_probs, labels)
    order = torch.sort(class_probs, descending=True, stable=True).indices[:k]
    assert torch.equal(result.scores, class_probs[order])
    assert torch.equal(result.pred_masks, mask_probs[order] > 0.5)
    assert torch.equal(result.pred_classes, labels[order])
    empty = _RunningTopK(k, lambda cls, areas, prob_sums: cls, 0.5).instances((6, 5), class_probs, labels)
    assert len(empty) == 0 and empty.pred_masks.shape == (0, 6, 5)


def test_panoptic_inference_brings_only_the_masks_it_reads_to_full_resolution():
    """Memory grows with the masks the post-processor reads, not with the number of queries: with only
    panoptic output on, exactly the read_queries masks are upsampled."""
    model, image_size, (dist, probs, labels, is_thing, maps) = _predictions_with_segments()
    upsampled = []

    class CountingMerge(type(model.postprocessor)):
        @staticmethod
        def masks_to_image(m, *args):
            upsampled.append(m.shape[0])
            return upsample_masks_to_image(m, *args)

    counting = CountingMerge(conf_threshold=0.05, keep_threshold=0.2)
    model.instance_on = model.semantic_on = False
    with torch.no_grad():
        out = model.full_resolution_outputs(counting, maps, dist, probs, labels, is_thing, image_size, (96, 128))
        plain = type(model.postprocessor)(conf_threshold=0.05, keep_threshold=0.2)
        ref = model.full_resolution_outputs(plain, maps, dist, probs, labels, is_thing, image_size, (96, 128))
    read = int(counting.read_queries(probs, labels, is_thing).sum())
    assert 0 < read < len(probs) and sum(upsampled) == read
    assert torch.equal(out["panoptic_seg"][0], ref["panoptic_seg"][0]) and len(out["panoptic_seg"][1]) > 0
