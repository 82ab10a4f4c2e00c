"""Helpers of tests/test_official_training_parity.py, copied from projects/parity/official_train_parity.py
(which the test suite must not import: it drives the authors' environment). Keep the two in step."""
import os
import zlib

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO_ROOT, "tests", "data", "official_train_step.npz")
OUR_CONFIG = os.path.join(REPO_ROOT, "configs", "coco", "official", "official_r50_2x.yaml")
REDUCED = dict(base_channels=4, embed_dims=32, feedforward_channels=128, num_query=50)
STEP_IMAGES = (0, 1, 0)


def our_overrides(reduced=REDUCED):
    b = reduced["base_channels"]
    return ["MODEL.RESNETS.STEM_OUT_CHANNELS", str(b), "MODEL.RESNETS.RES2_OUT_CHANNELS", str(4 * b),
            "MODEL.RESNETS.WIDTH_PER_GROUP", str(b),
            "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", str(reduced["embed_dims"]),
            "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", str(reduced["feedforward_channels"]),
            "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", str(reduced["num_query"]),
            "MODEL.PIXEL_MEAN", "[0.0, 0.0, 0.0]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]", "MODEL.DEVICE", "cpu"]


def fixture_inputs(fixture, index):
    from detectron2.structures import BitMasks, Boxes, Instances

    p = "in%d/" % index
    img = torch.from_numpy(fixture[p + "img"][0])
    shape = tuple(int(v) for v in fixture[p + "gt_masks_shape"])
    masks = np.unpackbits(fixture[p + "gt_masks"], axis=-1)[..., :shape[-1]].astype(bool)
    labels = torch.from_numpy(fixture[p + "gt_labels"]).long()
    boxes = torch.from_numpy(fixture[p + "gt_bboxes"]).float()
    thing = labels < 80
    size = tuple(img.shape[-2:])
    inst, stuff = Instances(size), Instances(size)
    inst.gt_classes, inst.gt_boxes = labels[thing], Boxes(boxes[thing])
    inst.gt_masks = BitMasks(torch.from_numpy(masks)[thing])
    stuff.gt_classes = labels[~thing]
    stuff.gt_masks = BitMasks(torch.from_numpy(masks)[~thing])
    return {"image": img, "instances": inst, "stuff": stuff, "height": size[0], "width": size[1]}


def sketch(name, tensor, k=64):
    """k seeded Gaussian projections (seed crc32 of the official name, legacy RandomState); the fixture
    stores k=64 per tensor (float32), so the estimate of |ours - theirs| is within x0.72..x1.27 at 99.9%."""
    flat = np.asarray(tensor, dtype=np.float64).reshape(-1)
    return np.random.RandomState(zlib.crc32(name.encode("utf8"))).standard_normal((k, flat.size)) @ flat


def loss_name_map(their_names, num_loc_layers=6, num_thing_blocks=4, num_stuff_blocks=6):
    last = num_loc_layers - 1
    det = {"loss_cls": "loss_det_cls_", "loss_bbox": "loss_det_bbox_", "loss_iou": "loss_det_giou_"}
    out = {}
    for n in their_names:
        prefix, _, term = n.rpartition(".")
        j = prefix[1:] if prefix else None
        if not prefix and term in det:
            ours = det[term] + str(last)
        elif term in det:
            ours = det[term] + j
        elif n == "loss_mask_things":
            ours = "loss_things_mask_%d" % num_thing_blocks
        elif n == "loss_mask_stuff":
            ours = "loss_stuff_mask_%d" % num_stuff_blocks
        elif term == "loss_mask_things_f":
            ours = "loss_things_mask_" + j
        elif term == "loss_mask_stuff_f":
            ours = "loss_stuff_mask_" + j
        elif term == "loss_cls_stuff_f":
            ours = "loss_stuff_cls_" + j
        elif term == "loss_cls_f":
            ours = "loss_things_cls_" + j
        else:
            ours = None
        out[n] = ours
    return out


def to_official_layout(official_name, tensor):
    t = tensor.detach().double().cpu()
    if official_name == "bbox_head.stuff_query.weight":
        c = t.shape[1] // 2
        t = torch.cat([t[:, c:], t[:, :c]], dim=1)
    return t


def build_our_model(fixture):
    from detectron2.modeling import build_model

    from panoptic_segformer.config import setup_cfg
    from projects.convert.convert_official import convert_official_state_dict

    cfg = setup_cfg(OUR_CONFIG, our_overrides())
    model = build_model(cfg)
    official = {k[2:]: torch.from_numpy(fixture[k]) for k in fixture.files if k.startswith("w/")}
    state, report = convert_official_state_dict(official, model, source=FIXTURE)
    model.load_state_dict(state, strict=True)
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, torch.nn.MultiheadAttention):
            mod.dropout = 0.0
    return cfg, model, {ours: off for off, ours in report.mapped}


def sketch_rel_diff(fixture, prefix, names_key, ours, name_map):
    """Per official tensor: (name, their norm, our norm or None, sketch estimate of |ours - theirs| /
    |theirs| (absolute when theirs is 0))."""
    inv = {off: o for o, off in name_map.items()}
    rows = []
    for k, off in enumerate(str(n) for n in fixture[names_key]):
        n = float(fixture[prefix + "norms"][k])
        g = ours.get(inv.get(off))
        if g is None:
            rows.append((off, n, None, None))
            continue
        t = to_official_layout(off, g)
        theirs = fixture[prefix + "sketch"][k].astype(np.float64)
        est = float(np.sqrt(np.mean((sketch(off, t.numpy(), k=theirs.size) - theirs) ** 2)))
        rows.append((off, n, float(t.norm()), est / n if n > 0 else est))
    return rows
