"""Tests that need a CUDA GPU (marker ``cuda``: skipped without one; ``pytest -m cuda tests`` runs every
such test, as projects/benchmarks/gpu_suite.sh does on a GPU machine).

* The Triton multi-scale deformable attention kernels (Deformable DETR [12]; the encoder, Sec. 3.2)
  against the PyTorch path at the encoder shape of an 800x1333 image -- levels (100,167), (50,84),
  (25,42), 21950 tokens, 8 heads, 32 channels, 4 points -- forward and backward, in fp32 and bf16.
* The whole model with the automatic choice (Triton on CUDA) against the same weights on the PyTorch
  path.
* Detectron2's AMP training (``SOLVER.AMP.ENABLED``, CUDA-only in v0.6) through the project's Trainer.
"""
import math

import pytest
import torch

from conftest import small_cfg
from panoptic_segformer.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn, resolve_ms_deform_attn_impl
from projects.benchmarks.ms_deform_attn_speed import ENCODER_LEVELS_800x1333, encoder_inputs

pytestmark = pytest.mark.cuda


def _rel(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _away_from_pixel_edges(loc, levels, margin=1e-3):
    """(N, Q, M, L, P) bool: both pixel coordinates (x = loc_x W - 0.5) at least ``margin`` px from an
    integer. Elsewhere the location gradient of bilinear sampling jumps, and rounding the coordinate
    in fp32 instead of fp64 may pick the other side, in either implementation."""
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float64, device=loc.device)  # (L, 2)
    pix = loc.double() * size[None, None, None, :, None, :] - 0.5
    dist = (pix - pix.round()).abs()
    return (dist >= margin).all(-1)


def _run(impl, value, layout, loc, weights, grad_out):
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], layout, leaves[1], leaves[2], impl=impl)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out] + list(grads)


# Relative L2 vs float64: fp32 rounding of a 16-point bilinear sum (~1e-7 a term, ~1e-6 in all); bf16 outputs
# and value gradients are stored with 8 mantissa bits (~4e-3 relative)
@pytest.mark.parametrize("dtype_name,tol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_triton_matches_pytorch_at_800x1333_encoder_shape(dtype_name, tol):
    """fp32: all of value, locations and weights in fp32. bf16: as under autocast (bf16 values, fp32
    locations and weights). The reference is the PyTorch path in float64 on the same (rounded) inputs;
    relative L2 errors of the output and of the three gradients."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    value, layout, loc, weights = encoder_inputs(ENCODER_LEVELS_800x1333, 1, 8, 32, 4, dtype, torch.device("cuda"),
                                                 seed=3)
    assert resolve_ms_deform_attn_impl(value, "auto") == "triton"  # what the model uses on CUDA
    s = value.shape[1]
    assert s == 21950 and layout.sizes == ENCODER_LEVELS_800x1333
    grad_out = torch.randn(1, s, 8 * 32, device="cuda", generator=torch.Generator("cuda").manual_seed(4)).to(dtype)

    triton = _run("triton", value, layout, loc, weights, grad_out)
    ref = _run("pytorch", value.double(), layout, loc.double(), weights.double(), grad_out.double())
    names = ("output", "d value", "d locations", "d weights")
    for name, t, r in zip(names, triton, ref):
        assert torch.isfinite(t).all(), name
        assert r.abs().max() > 0, f"{name}: the reference is all zeros, the test would prove nothing"
    assert triton[0].dtype == dtype and triton[1].dtype == dtype
    assert triton[2].dtype == torch.float32 and triton[3].dtype == torch.float32
    smooth = _away_from_pixel_edges(loc, ENCODER_LEVELS_800x1333)
    assert smooth.float().mean() > 0.99
    errors = {
        "output": _rel(triton[0], ref[0]),
        "d value": _rel(triton[1], ref[1]),
        "d locations": _rel(triton[2][smooth], ref[2][smooth]),
        "d weights": _rel(triton[3], ref[3]),
    }
    print(f"{dtype_name}: relative L2 error vs the float64 PyTorch path: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    # d locations: a difference of neighbouring pixels (cancellation), hence 10x
    for name, err in errors.items():
        assert err < (10 * tol if name == "d locations" else tol), (name, err, errors)
    # the fp32 PyTorch path lands as close (same maths, fp32 arithmetic): a sanity check of the reference
    if dtype_name == "fp32":
        pytorch = _run("pytorch", value, layout, loc, weights, grad_out)
        assert _rel(pytorch[0], ref[0]) < tol


def test_model_on_cuda_uses_triton_and_matches_the_pytorch_path():
    """Same weights, eval mode, one 192x256 image: Triton (automatic choice on CUDA) vs PyTorch path."""
    from detectron2.modeling import build_model

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    try:
        outputs = {}
        state = None
        for impl in ("auto", "pytorch"):
            torch.manual_seed(0)
            model = build_model(small_cfg("MODEL.DEVICE", "cuda", "MODEL.PANOPTIC_SEGFORMER.MSDA_IMPL", impl)).eval()
            if state is None:
                state = model.state_dict()
            model.load_state_dict(state)
            modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
            assert modules and all(m.impl == impl for m in modules)
            probe = torch.zeros(1, 1, 1, 1, device="cuda")
            assert resolve_ms_deform_attn_impl(probe, impl) == ("triton" if impl == "auto" else "pytorch")
            image = torch.randint(0, 256, (3, 192, 256), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
            with torch.no_grad():
                images = model.preprocess_image([{"image": image}])
                out = model.forward_outputs(images)
            outputs[impl] = out
        last_auto, last_pt = outputs["auto"]["mask"][-1], outputs["pytorch"]["mask"][-1]
        # two fp32 MSDA implementations (TF32 off): ~1e-6 rounding differences carried through the encoder and
        # decoder layers, so 1e-4 relative L2
        for key in ("pred_masks", "thing_logits", "stuff_logits"):
            err = _rel(last_auto[key], last_pt[key])
            assert math.isfinite(err) and err < 1e-4, (key, err)
        err = _rel(outputs["auto"]["location"]["pred_boxes"][-1], outputs["pytorch"]["location"]["pred_boxes"][-1])
        assert err < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_amp_training_on_cuda_with_detectron2_amp_trainer(tmp_path):
    """SOLVER.AMP.ENABLED: Detectron2's AMPTrainer (fp16 autocast + GradScaler; CUDA-only in v0.6)
    trains through the project's Trainer with the Triton kernels and finite losses, then evaluates. 20
    iterations: the GradScaler skips the steps whose fp16 gradients overflow while it lowers its
    initial scale (2^16), so the first few may leave the weights unchanged."""
    from detectron2.engine import AMPTrainer

    from panoptic_segformer.engine import Trainer

    cfg = small_cfg("MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "20",
                    "OUTPUT_DIR", str(tmp_path))
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    assert math.isfinite(latest["total_loss"][0])
    assert 0 < trainer._trainer.grad_scaler.get_scale() < float("inf")
    assert "panoptic_seg/PQ" in latest
    changed = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert changed > len(before) // 2
