"""The official training step, frozen: this project's official mode (CRITERION "official",
configs/coco/official/) against the authors' code, run once on the CPU (projects/parity/official_train_parity.py
--stage official) at reduced width on the 2 COCO sample images; tests/data/official_train_step.npz holds
their weights, inputs, targets, loss terms, matchings, per-tensor gradient norms + 64 random projections
(per image, and per optimizer step before clipping), per-step losses and per-tensor update norms +
projections. One thread, dropout off."""
import numpy as np
import pytest
import torch

from official_train_helpers import (FIXTURE, STEP_IMAGES, build_our_model, fixture_inputs, loss_name_map,
                                    sketch_rel_diff)

# Tolerances and their reasons.
LOSS_RTOL = 1e-4  # float32 sums in another order (measured worst 3.7e-6)
GRAD_RTOL = 1e-3  # on |ours - theirs| / |theirs| per tensor (measured worst 1.7e-4 exact); the
#                   64-projection estimate of the fixture is within x0.72..x1.27 of the true value at 99.9%
STEP_RTOL = 1e-4  # per-step total loss and gradient norm (measured worst 3.3e-6)
UPDATE_RTOL = 1e-3  # on each tensor's total update after 3 steps
# The 3-step updates: at step 0 both sides have the same weights and every gradient agrees within GRAD_RTOL.
# At step 1 one ReLU decides differently: the output of res4 block 2 (official layer3.2) at channel 19, row 0,
# column 9 is 0 in theirs and 2.2e-8 in ours (float32; 3.1e-8 in float64), i.e. its pre-activation is within
# float32 rounding of 0; its gradient (5.0e-3) passes our ReLU only, so the gradients of res4 blocks 0-2 and
# res3 differ by up to 1.1e-2 -- also when our model is given their weights after step 0, float32 and
# float64 alike (docs/BENCHMARKS.md). From then on the weights differ and the later gradients of backbone,
# neck and encoder follow (sampling_offsets near bilinear kinks too); given their weights after step 1, our
# step-2 gradient agrees with theirs within 1.2e-4. So: step gradients above GRAD_RTOL only in backbone, neck
# and encoder tensors, each within STEP_GRAD_DIVERGED_MAX (measured worst 1.1e-2; x1.27 sketch factor and
# margin); the updates of the other tensors (location decoder, mask decoders, queries, branches) within
# UPDATE_RTOL, those of backbone, neck and encoder reported per tensor and within UPDATE_DIVERGED_MAX
# (measured worst 1.5e-2). Sketch estimates overestimate by up to x1.27 at 99.9% (64 projections), hence
# SKETCH_HI on the estimated update differences.
STEP_GRAD_DIVERGED_MAX = 3e-2
UPDATE_DIVERGED_MAX = 3e-2
SKETCH_HI = 1.27
DIVERGED_PREFIXES = ("backbone.", "neck.", "bbox_head.transformer.encoder.")


@pytest.fixture(scope="module")
def run():
    torch.set_num_threads(1)
    fixture = np.load(FIXTURE)
    cfg, model, name_map = build_our_model(fixture)
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
    fixture = run["fixture"]
    for i, r in enumerate(run["images"]):
        rows = sketch_rel_diff(fixture, "img%d/grad_" % i, "img%d/grad_names" % i, r["grads"], run["name_map"])
        for name, norm, ours_norm, est in rows:
            if ours_norm is None:  # only reg_branches2 (dropped by the converter): zero gradient in theirs
                assert name.startswith("bbox_head.reg_branches2.") and norm == 0, name
            elif norm == 0:
                assert ours_norm == 0, name  # zero where theirs is zero
            else:
                assert abs(ours_norm - norm) <= GRAD_RTOL * norm, (i, name, ours_norm, norm)
                assert est <= GRAD_RTOL, (i, name, est)
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
    # Each step's gradient (before clipping) against theirs: equal weights at step 0, so every tensor within
    # GRAD_RTOL there; later steps start from weights that moved with the earlier steps' gradients.
    diverged = {}
    for s_, (_, _, grads) in enumerate(run["steps"]):
        for name, norm, ours_norm, est in sketch_rel_diff(fixture, "step%d/grad_" % s_, "step%d/grad_names" % s_,
                                                          grads, run["name_map"]):
            if ours_norm is None or norm == 0:
                continue
            if s_ == 0:
                assert est <= GRAD_RTOL, (s_, name, est)
            elif not name.startswith(DIVERGED_PREFIXES):  # measured worst 8.7e-4 (level_embeds, step 1)
                assert est <= GRAD_RTOL * SKETCH_HI, (s_, name, est)
            elif est > GRAD_RTOL:
                assert est <= STEP_GRAD_DIVERGED_MAX, (s_, name, est)
                diverged.setdefault(name, []).append((s_, est))
    rows = sketch_rel_diff(fixture, "update_", "update_names", run["updates"], run["name_map"])
    checked, above, report = 0, [], []
    for name, norm, ours_norm, est in rows:
        if ours_norm is None:  # reg_branches2 (dropped) and the frozen BatchNorms (buffers in our FrozenBN)
            frozen_bn = name.startswith("backbone.") and (".bn" in name or ".downsample.1." in name)
            assert (name.startswith("bbox_head.reg_branches2.") or frozen_bn) and norm == 0, name
        elif norm == 0:
            assert ours_norm == 0, name
        elif name.startswith(DIVERGED_PREFIXES):
            assert est <= UPDATE_DIVERGED_MAX, (name, est)
            if est > UPDATE_RTOL:
                report.append("%s: update %.1e, step gradients %s" % (name, est, ", ".join(
                    "%d: %.1e" % d for d in diverged.get(name, [])) or "within %.0e" % GRAD_RTOL))
        else:
            checked += 1
            if est > UPDATE_RTOL * SKETCH_HI:
                above.append((name, est))
    print("\n3-step updates: %d head tensors within %.0e; %d backbone/neck/encoder tensors above it (reported):\n  %s"
          % (checked, UPDATE_RTOL, len(report), "\n  ".join(report)))
    assert not above, above
