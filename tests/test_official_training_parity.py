"""The official training step, frozen: this project's official mode (CRITERION "official",
configs/coco/official/) against the authors' code, run once on the CPU (projects/parity/official_train_parity.py
--stage official, its default seed) at reduced width on the 2 COCO sample images. tests/data/official_train_step.npz
holds their weights, inputs, targets, loss terms, matchings, per-tensor gradient norms + 64 random
projections (per image, and per optimizer step before clipping), per-step losses and gradient norms, and
every tensor's total update after the 3 AdamW steps in full. One thread, dropout off."""
import numpy as np
import pytest
import torch

from projects.parity.official_train_parity import (AMPLIFIED_STEP, GRAD_RTOL, REPO_ROOT, STEP_IMAGES, UPDATE_RTOL,
                                                   build_our_model, compare_tensors, fixture_inputs,
                                                   float_noise_gradients, loss_name_map, to_official_layout,
                                                   update_verdict)

FIXTURE = REPO_ROOT + "/tests/data/official_train_step.npz"

# Tolerances and their reasons (the rules themselves -- GRAD_RTOL, UPDATE_RTOL, FLOAT_NOISE, AMPLIFIED_STEP,
# NOISE_STEP -- are the comparison script's, documented there; measured values: docs/BENCHMARKS.md).
LOSS_RTOL = 1e-4  # float32 sums in another order (measured worst 1.3e-6)
# Gradients within GRAD_RTOL (measured worst exact 9.4e-4). The fixture holds 64 random projections of each
# gradient, not the gradient: their estimate of the difference is within x0.72..x1.27 of the true one at 99.9%
# (Johnson-Lindenstrauss), hence SKETCH_HI on estimates. Float noise: the key bias of stuff mask-decoder block
# 4 on image 0 (3.7e-9 of a whole gradient norm of 16.9), compared in absolute terms.
SKETCH_HI = 1.27
STEP_RTOL = 1e-4  # per-step total loss and gradient norm (measured worst 2.1e-6)
# Updates, stored in full: 2 tensors beyond UPDATE_RTOL, both within the rules: decoder layer 5
# output_proj.weight (1 element 0.13 lr apart, where their float32 update is 1.7e-3 from a float64 run and ours
# 3.3e-5; the rest 2.8e-5) and the float-noise key bias above (worst element 3.6e-3 lr).
MAX_AMPLIFIED = 8  # elements more than AMPLIFIED_STEP lr apart, of 646668 (measured 1)


@pytest.fixture(scope="module")
def run():
    torch.set_num_threads(1)
    fixture = np.load(FIXTURE)
    cfg, model, name_map = build_our_model(FIXTURE)
    images = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        losses = model([fixture_inputs(fixture, i)])
        total = sum(losses.values())
        total.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        images.append(dict(losses={k: float(v) for k, v in losses.items()}, total=float(total), grads=grads,
                           matches=model.criterion.last_matches))
    from panoptic_segformer.engine import build_optimizer

    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(cfg, model)
    lr = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    steps = []
    for i in STEP_IMAGES:
        optimizer.zero_grad(set_to_none=True)
        losses = model([fixture_inputs(fixture, i)])
        total = sum(losses.values())
        total.backward()
        norm = float(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()  # clips the gradients in place: the copies above are before clipping, as theirs
        steps.append((float(total), norm, grads))
    updates = {n: p.detach() - init[n] for n, p in model.named_parameters()}
    lrs = {n: lr[id(p)] for n, p in model.named_parameters() if id(p) in lr}
    return dict(fixture=fixture, name_map=name_map, images=images, steps=steps, updates=updates, lr=lrs)


def _check_gradients(fixture, prefix, grads, name_map, rtol, label):
    """Compares one forward's gradients with theirs; returns the official names of the tensors whose gradient
    is float noise in theirs (compared in absolute terms)."""
    noise, bound = float_noise_gradients(fixture, prefix)
    for name, norm, ours_norm, est, _, ours_name in compare_tensors(
            fixture, prefix + "grad_", prefix + "grad_names", grads, name_map):
        if ours_norm is None:  # only reg_branches2 (dropped by the converter): zero gradient in theirs
            assert name.startswith("bbox_head.reg_branches2.") and norm == 0, (label, name)
        elif norm == 0:
            assert ours_norm == 0, (label, name)  # zero where theirs is zero
        elif name in noise:
            assert ours_norm <= bound, (label, name, ours_norm, bound)
        else:
            assert abs(ours_norm - norm) <= GRAD_RTOL * norm, (label, name, ours_norm, norm)
            assert est <= rtol, (label, name, est)
    return noise


def test_matchings_and_loss_terms(run):
    fixture = run["fixture"]
    for i, r in enumerate(run["images"]):
        # The same (query, gt) pairs in every location-decoder layer and in the mask decoder.
        for l, per_image in enumerate(r["matches"]["location"]):
            q, g = per_image[0]
            t = fixture["img%d/match/location_%d" % (i, l)]
            assert sorted(zip(q.tolist(), g.tolist())) == sorted(zip(t[0].tolist(), t[1].tolist())), (i, l)
        for key in ("mask_decoder", "mask_decoder_query"):
            p, g = r["matches"][key][0]
            t = fixture["img%d/match/%s" % (i, key)]
            assert sorted(zip(p.tolist(), g.tolist())) == sorted(zip(t[0].tolist(), t[1].tolist())), (i, key)
        names = [str(n) for n in fixture["img%d/loss_names" % i]]
        theirs = dict(zip(names, fixture["img%d/loss_values" % i].tolist()))
        mapping = loss_name_map(names)
        mapped = {o for o in mapping.values() if o}
        assert set(r["losses"]) == mapped  # every term of ours has its counterpart
        for n, o in mapping.items():
            if o is None:  # d{j}.loss_{bbox,iou}_f: x 0 terms of reg_branches2, which we do not have
                assert theirs[n] == 0
                continue
            if theirs[n] == 0:
                assert r["losses"][o] == 0, (i, n)
            else:
                assert r["losses"][o] == pytest.approx(theirs[n], rel=LOSS_RTOL), (i, n, o)
        assert r["total"] == pytest.approx(float(fixture["img%d/total" % i]), rel=LOSS_RTOL)


def test_gradients(run):
    for i, r in enumerate(run["images"]):
        _check_gradients(run["fixture"], "img%d/" % i, r["grads"], run["name_map"], GRAD_RTOL * SKETCH_HI,
                         "image %d" % i)
        # Every gradient of ours has an official counterpart (no extra trainable tensor).
        assert set(r["grads"]) <= set(run["name_map"])


def test_three_optimizer_steps(run):
    fixture = run["fixture"]
    for s, (total, norm, _) in enumerate(run["steps"]):
        assert total == pytest.approx(float(fixture["step%d/total" % s]), rel=STEP_RTOL)
        assert norm == pytest.approx(float(fixture["step%d/grad_norm" % s]), rel=STEP_RTOL)
    inv = {off: o for o, off in run["name_map"].items()}
    names = [str(n) for n in fixture["update_names"]]
    for k, off in enumerate(names):  # the recipe: each moved tensor's (lr, weight decay) is theirs
        if fixture["update_norms"][k] > 0:
            lr, wd = run["lr"][inv[off]]
            assert lr == pytest.approx(float(fixture["update_lr"][k]), rel=1e-12), off
            assert wd == pytest.approx(float(fixture["update_weight_decay"][k]), rel=1e-12), off
    # Each step's gradient (before clipping): the same weights at step 0; later steps start from weights that
    # moved by updates within UPDATE_RTOL of theirs.
    noise_step = set()
    for s, (_, _, grads) in enumerate(run["steps"]):
        noise_step |= _check_gradients(fixture, "step%d/" % s, grads, run["name_map"], GRAD_RTOL * SKETCH_HI,
                                       "step %d" % s)
    # Every tensor's total update after the 3 steps, element by element.
    checked, amplified, report = 0, 0, []
    for name in names:
        theirs = torch.from_numpy(fixture["update/" + name]).double()
        ours_name = inv.get(name)
        if ours_name not in run["updates"]:  # reg_branches2 (dropped) and the frozen BatchNorms (our buffers)
            frozen_bn = name.startswith("backbone.") and (".bn" in name or ".downsample.1." in name)
            assert (name.startswith("bbox_head.reg_branches2.") or frozen_bn) and not theirs.any(), name
            continue
        ours = to_official_layout(name, run["updates"][ours_name])
        if not theirs.any():
            assert not ours.any(), name  # zero where theirs is zero
            continue
        checked += 1
        v = update_verdict(theirs, ours, run["lr"][ours_name][0], name in noise_step)
        assert v["ok"], (name, v)
        amplified += v["amplified"]
        if v["rel"] > UPDATE_RTOL:
            report.append("%s: %.2e; %d of %d elements > %.1f lr from theirs, the rest %.1e, worst element %.1e lr%s"
                          % (name, v["rel"], v["amplified"], theirs.numel(), AMPLIFIED_STEP, v["rest"], v["worst_lr"],
                             " (gradient float noise at a step)" if name in noise_step else ""))
    print("\n3-step updates: %d tensors, %d beyond %.0e relative:\n  %s"
          % (checked, len(report), UPDATE_RTOL, "\n  ".join(report)))
    assert checked > 500
    assert amplified <= MAX_AMPLIFIED, amplified
