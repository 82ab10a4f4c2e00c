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
        all_layers = model.forward_outputs(images)["mask"]
        first = model.forward_outputs(images, num_mask_layers=1)["mask"]
    assert len(first) == 1 and torch.allclose(first[0]["pred_masks"], all_layers[0]["pred_masks"])


def test_class_count_mismatch_is_a_clear_error():
    cfg = _tiny("MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80")
    with pytest.raises(ValueError, match=r"NUM_THING_CLASSES/NUM_STUFF_CLASSES = 80/3.*4 thing and 3 stuff"):
        build_model(cfg)


def test_masks_to_image_ignores_padding_and_batch_partners():
    """Upsampling uses only the image's own 1/8 cells: the result equals upsampling the unpadded
    map, whatever the padded/pinned cells around it hold."""
    torch.manual_seed(0)
    own = torch.randn(3, 5, 7)  # an image of 40x56 px at 1/8
    padded = torch.full((3, 9, 12), -1e4)
    padded[:, :5, :7] = own
    out = PanopticSegFormer.masks_to_image(padded, (37, 53), (72, 96), (74, 106))
    ref = PanopticSegFormer.masks_to_image(own, (37, 53), (40, 56), (74, 106))
    assert out.shape == (3, 74, 106)
    torch.testing.assert_close(out, ref)
    assert out.min() > -100  # no -1e4 padding value leaked into the border


def test_bf16_autocast_inference_and_training_step_on_cpu(batches):
    """Mixed precision (issue 6, the part that runs on a CPU): under bf16 autocast the forward is
    finite and close to fp32, and a training step gives finite float32 losses and gradients."""
    model = build_model(_tiny("MODEL.PANOPTIC_SEGFORMER.DROPOUT", "0.0")).eval()
    train, test = batches
    with torch.no_grad():
        ref = model(test)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(test)
    for r, o in zip(ref, out):
        assert torch.isfinite(o["sem_seg"]).all()
        torch.testing.assert_close(o["sem_seg"].float(), r["sem_seg"], atol=2e-2, rtol=0)
        assert o["panoptic_seg"][0].dtype == torch.int32
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(train)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
