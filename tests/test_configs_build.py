"""Every config under configs/ builds its model and runs one inference forward pass on CPU.

Backbones start from random initialisation (MODEL.WEIGHTS and MODEL.TIMM.PRETRAINED_WEIGHTS are
cleared: nothing is downloaded). Each model runs once, in eval mode, on a tiny random image, and its
panoptic output must have the input's size and segments consistent with the id map. The COCO
configs' schedules must match the epochs their file names (or the paper's 24-epoch default) state.
"""
import glob
import os
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO_ROOT
from panoptic_segformer import add_panoptic_segformer_config
from panoptic_segformer.panoptic_segformer import dataset_class_ids

CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")
OFFICIAL = os.path.join(CONFIG_ROOT, "coco", "official")  # converted checkpoints, tested by the lead

CONFIGS = sorted(
    p for p in glob.glob(os.path.join(CONFIG_ROOT, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-") and not p.startswith(OFFICIAL + os.sep)
)
IDS = [os.path.relpath(p, CONFIG_ROOT)[: -len(".yaml")] for p in CONFIGS]

COCO_IMAGES = 118287  # COCO train2017


def _load(path):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_the_expected_configs_exist():
    """The paper's variants (Tables 1, 6, 8, D.1; Fig. 5) and the ADE20K / shapes configs are all here."""
    expected = {
        "ade20k/panoptic_segformer_R50_100ep", "shapes/panoptic_segformer_shapes",
        "coco/panoptic_segformer_R50_12ep", "coco/panoptic_segformer_R50_24ep",
        "coco/panoptic_segformer_R101_24ep", "coco/panoptic_segformer_swin_L_24ep",
        "coco/panoptic_segformer_pvtv2_b0_24ep", "coco/panoptic_segformer_pvtv2_b2_24ep",
        "coco/panoptic_segformer_pvtv2_b5_24ep", "coco/panoptic_segformer_R50_box_free",
        "coco/panoptic_segformer_R50_joint_matching", "coco/panoptic_segformer_R50_no_deep_supervision",
        "coco/panoptic_segformer_R50_locdec0", "coco/panoptic_segformer_R50_locdec1",
        "coco/panoptic_segformer_R50_locdec2",
    }
    missing = expected - set(IDS)
    assert not missing, f"configs missing under {CONFIG_ROOT}: {sorted(missing)}"


@pytest.mark.parametrize("path", [p for p in CONFIGS if os.sep + "coco" + os.sep in p],
                         ids=[i for i, p in zip(IDS, CONFIGS) if os.sep + "coco" + os.sep in p])
def test_coco_schedule_matches_its_epochs(path):
    """N epochs of COCO train2017 at batch 8 (App. A.1); LR decay at 2/3 of 12 (official 1x) or at 18 of 24."""
    cfg = _load(path)
    m = re.search(r"_(\d+)ep\.yaml$", path)
    epochs = int(m.group(1)) if m else 24  # ablations: the paper's default schedule (Sec. 4.3)
    per_epoch = COCO_IMAGES / cfg.SOLVER.IMS_PER_BATCH
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == 1.4e-4
    assert round(cfg.SOLVER.MAX_ITER / per_epoch) == epochs
    assert [round(s / per_epoch) for s in cfg.SOLVER.STEPS] == [{12: 8, 24: 18}[epochs]]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_builds_and_runs_one_forward(path):
    cfg = _load(path)
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    things, stuff = dataset_class_ids(cfg.DATASETS.TRAIN)
    assert (len(things), len(stuff)) == (psf.NUM_THING_CLASSES, psf.NUM_STUFF_CLASSES)

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) > 0
    shapes = model.backbone.output_shape()  # C3-C5 at strides 8/16/32 (Sec. 3.1)
    assert [shapes[f].stride for f in psf.IN_FEATURES] == [8, 16, 32]
    assert model.num_classes == psf.NUM_THING_CLASSES + psf.NUM_STUFF_CLASSES
    # The switches of the YAML reach the model.
    assert model.query_decoupling == psf.QUERY_DECOUPLING
    assert model.location_decoder.num_layers == psf.LOCATION_DECODER_LAYERS
    assert model.criterion.deep_supervision == psf.DEEP_SUPERVISION
    assert model.location_decoder.box_free == model.criterion.box_free == psf.BOX_FREE
    assert bool(model.query_selection.filter_queries) == (psf.QUERY_DECOUPLING and psf.QUERY_FILTER.ENABLED
                                                         and psf.LOCATION_DECODER_LAYERS > 0)

    # A 64 x 96 random image, evaluated at 48 x 72 output size (Detectron2 rescales to height/width).
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 48, "width": 72}])
    pan, segments = out["panoptic_seg"]
    assert pan.shape == (48, 72)
    assert sorted(set(pan.unique().tolist()) - {0}) == sorted(s["id"] for s in segments)
    for s in segments:
        assert s["isthing"] == (s["category_id"] in things)
    assert out["sem_seg"].shape == (model.num_classes, 48, 72)
    assert torch.isfinite(out["sem_seg"]).all()
