"""The official (released) architecture trains with train_net.py: configs/coco/official/ build for training
with the authors' objective and recipe, official_r50_2x.yaml starts training on the COCO sample and on shapes
(dataset overridden), and configs/shapes/official_shapes.yaml trains. Reduced widths and 128 px images, one
or two iterations: these check that training runs, the parity test (test_official_training_parity.py)
checks what it computes."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import REPO_ROOT
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.engine import build_optimizer
from panoptic_segformer.modeling.official_criterion import OfficialCriterion

OFFICIAL = sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "configs", "coco", "official", "*.yaml"))
                  if not os.path.basename(p).startswith("Base-"))
R50_2X = os.path.join(REPO_ROOT, "configs", "coco", "official", "official_r50_2x.yaml")
# Reduced width (their parity fixture's: R50 base width 4, 32-d transformer) and tiny inputs.
TINY = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "4", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
        "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32",
        "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64", "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", "20",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.CROP.ENABLED", "False",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", ""]  # the configs start from ImageNet backbones, which cannot be downloaded here


@pytest.mark.parametrize("path", OFFICIAL, ids=[os.path.basename(p)[:-5] for p in OFFICIAL])
def test_official_config_builds_for_training(path):
    """The official objective, optimizer (LR x0.1 on backbone, sampling_offsets, reference_points) and step
    schedule: N epochs of COCO train2017 (118287 images) at batch 8, the LR / 10 after epoch 8 of 12 or 18
    of 24 (their panformer_r50_12e / base.py lr_config)."""
    cfg = setup_cfg(path, ["MODEL.WEIGHTS", "", "MODEL.TIMM.PRETRAINED_WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    epochs, decay = (12, 8) if path.endswith("_1x.yaml") else (24, 18)
    per_epoch = -(-118287 // cfg.SOLVER.IMS_PER_BATCH)
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.MAX_ITER == epochs * per_epoch
    assert tuple(cfg.SOLVER.STEPS) == (decay * per_epoch,)
    model = build_model(cfg)
    assert isinstance(model.criterion, OfficialCriterion)
    optimizer = build_optimizer(cfg, model)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        slow = name.startswith("backbone.") or "sampling_offsets" in name or "reference_points" in name
        assert lr[id(p)] == pytest.approx(base * (0.1 if slow else 1.0), rel=1e-12), name


def _train_net(config, opts, tmp_path):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", config] + opts + [
        "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert os.path.isfile(tmp_path / "model_final.pth"), log[-4000:]
    return log


def test_train_net_official_r50_on_coco_sample(tmp_path):
    """2 iterations of 2 images (the padded batch > 1 path) on the 2 COCO sample images."""
    log = _train_net(R50_2X, TINY + ["DATASETS.TRAIN", "('coco_panoptic_sample',)"], tmp_path)
    assert "loss_stuff_cls_0" in log and "loss_things_mask_4" in log  # the official loss terms were trained


def _train_net_main(config, opts, tmp_path):
    """train_net.py's main in this process (its command-line parser, setup and Trainer; no interpreter
    start-up): for the runs whose command line the subprocess test above already covers."""
    import train_net
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(["--config-file", config] + opts + ["OUTPUT_DIR", str(tmp_path)])
    train_net.main(args)
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_train_net_official_r50_on_shapes(tmp_path):
    _train_net_main(R50_2X, TINY + ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)",
                                    "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "4",
                                    "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "3"], tmp_path)


def test_train_net_official_shapes_config(tmp_path):
    config = os.path.join(REPO_ROOT, "configs", "shapes", "official_shapes.yaml")
    _train_net_main(config, ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "INPUT.MIN_SIZE_TRAIN", "(128,)",
                             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
                             "DATASETS.TEST", "()"], tmp_path)

def _image(seed, things, stuff, size=128):  # 2 x 2 at stride 64 (GroupNorm needs > 1 value)
    """A random image with `things` square thing segments (classes 0..3) and `stuff` horizontal stuff bands
    (classes 4..6, K_th + stuff index), in the dataset mapper's training format."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    masks, boxes = torch.zeros(things, size, size, dtype=torch.bool), []
    for k in range(things):
        x0, y0 = 4 + 14 * k, 6 + 5 * k
        masks[k, y0:y0 + 12, x0:x0 + 10] = True
        boxes.append([x0, y0, x0 + 10, y0 + 12])
    inst = Instances((size, size))
    inst.gt_classes = torch.arange(things) % 4
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_masks = BitMasks(masks)
    bands = torch.zeros(stuff, size, size, dtype=torch.bool)
    for s in range(stuff):
        bands[s, s * size // stuff:(s + 1) * size // stuff] = True
    st = Instances((size, size))
    st.gt_classes = 4 + torch.arange(stuff)
    st.gt_masks = BitMasks(bands)
    return {"image": image, "instances": inst, "stuff": st, "height": size, "width": size}


def test_official_losses_of_a_batch_are_the_per_image_sums_with_batch_ratios():
    """The official objective is per image up to its batch-level normalisers: every term is a sum over
    images / n (n_th = the filtered thing queries, min(M_th, Q) per image, or n_st = the stuff ground truths,
    summed over the batch) x r (r_th = n_th / (n_th + n_st), r_st = n_st / (n_th + n_st) of the batch). So a
    batch of 2 images with 1 and 3 things (the padded Q' axis, thing_query_valid) gives, term by term,
    (T_a n_a / r_a + T_b n_b / r_b) r / n from the losses of the images alone. FrozenBN: BatchNorm would
    couple the images."""
    cfg = setup_cfg(os.path.join(REPO_ROOT, "configs", "shapes", "official_shapes.yaml"),
                    ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32",
                     "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64", "MODEL.PANOPTIC_SEGFORMER.NHEADS", "2"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    a, b = _image(0, things=1, stuff=1), _image(1, things=3, stuff=2)
    with torch.no_grad():
        alone = [{k: float(v) for k, v in model([x]).items()} for x in (a, b)]
        valid = []
        hook = model.criterion.register_forward_pre_hook(lambda m, args: valid.append(args[0]["thing_query_valid"]))
        batch = {k: float(v) for k, v in model([a, b]).items()}
        hook.remove()
    assert valid[0].sum(1).tolist() == [1, 3]  # one filtered query per thing: padding in the Q' axis
    n_th, n_st = [1.0, 3.0], [1.0, 2.0]
    ratio = lambda th, st: (th / (th + st), st / (th + st))  # noqa: E731
    for name, value in batch.items():
        stuff = name.startswith("loss_stuff_")
        n = n_st if stuff else n_th
        r = [ratio(n_th[i], n_st[i])[1 if stuff else 0] for i in range(2)]
        r_batch = ratio(sum(n_th), sum(n_st))[1 if stuff else 0]
        expected = sum(alone[i][name] * n[i] / r[i] for i in range(2)) * r_batch / sum(n)
        # float32 sums over other groupings (the batch's vs each image's): 1e-5 relative
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-7), (name, value, expected)


def test_unreachable_weights_url_is_a_clear_error(tmp_path):
    """MODEL.WEIGHTS at a URL that cannot be fetched (no network here; .invalid never resolves) names the key."""
    from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer

    cfg = setup_cfg(R50_2X, TINY)
    model = build_model(cfg)
    url = "https://weights.invalid/R-50.pkl"
    with pytest.raises(OSError, match=r"MODEL.WEIGHTS https://weights.invalid/R-50.pkl: cannot be downloaded"):
        PanopticSegFormerCheckpointer(model, str(tmp_path)).load(url)
