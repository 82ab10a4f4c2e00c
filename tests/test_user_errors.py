"""A user's own mistakes give clear errors through the paths users take: checkpoints of
another dataset or that are no checkpoint at all (train_net.py, the predictor, the torchvision
converter), image arrays of other layouts or with NaN/inf (DefaultPredictor and
PanopticSegFormerPredictor), and a negative merging threshold in the config.

Models are the small CPU `shapes` model at random initialisation."""
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.modeling import build_model

import train_net
from conftest import REPO_ROOT, small_cfg
from panoptic_segformer import PanopticSegFormerPredictor
from panoptic_segformer.engine import Trainer
from projects.convert import convert_torchvision_to_d2 as convert

SHAPES_YAML = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
TINY = ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)",
        "INPUT.MIN_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0"]


def _eval_only(tmp_path, *opts):
    """`train_net.py --eval-only` in this process, on the tiny shapes split."""
    args = default_argument_parser().parse_args(
        ["--config-file", SHAPES_YAML, "--eval-only", *TINY, "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    return train_net.main(args)


@pytest.fixture(scope="module")
def text_weights(tmp_path_factory):
    """What users pass by mistake: OUTPUT_DIR/last_checkpoint, a text file naming the checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "last_checkpoint"
    path.write_text("model_final.pth")
    return str(path)


@pytest.fixture(scope="module")
def coco_weights(tmp_path_factory):
    """Weights of the small model trained on COCO's classes (80 things, 53 stuff)."""
    torch.manual_seed(0)
    model = build_model(small_cfg("MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80",
                                  "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "53",
                                  train=(), test=("coco_panoptic_sample",)))
    path = tmp_path_factory.mktemp("weights") / "coco_model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
CLASS_HEAD_MISMATCH = (r"location_decoder\.class_embed\.0\.weight: \(80, 64\) in the checkpoint, \(4, 64\) in "
                       r"the model.*stuff_query_embed\.weight: \(53, 128\) in the checkpoint, \(3, 128\) in the "
                       r"model.*SKIP_MISMATCHED_CLASS_HEADS True")


def test_eval_only_with_weights_of_other_classes_is_an_error(tmp_path, coco_weights):
    with pytest.raises(ValueError, match=CLASS_HEAD_MISMATCH):
        _eval_only(tmp_path, "MODEL.WEIGHTS", coco_weights)
    with pytest.raises(ValueError, match=CLASS_HEAD_MISMATCH):
        PanopticSegFormerPredictor(small_cfg("MODEL.WEIGHTS", coco_weights))


def test_fine_tuning_from_other_classes_is_an_explicit_option(tmp_path, coco_weights):
    cfg = small_cfg("MODEL.WEIGHTS", coco_weights, "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=CLASS_HEAD_MISMATCH):
        Trainer(cfg).resume_or_load(resume=False)
    cfg.MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS = True
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    saved = torch.load(coco_weights, weights_only=True)["model"]
    loaded = trainer.model.state_dict()
    assert torch.equal(loaded["encoder.layers.0.linear1.weight"], saved["encoder.layers.0.linear1.weight"])
    assert loaded["mask_decoder.thing_class_embed.1.weight"].shape == (4, 64)
    assert loaded["stuff_query_embed.weight"].shape == (3, 128)


def test_text_file_as_weights_names_the_file(tmp_path, text_weights):
    expected = rf"{text_weights}: not a checkpoint that can be loaded .*; it is a text file"
    with pytest.raises(ValueError, match=expected):
        _eval_only(tmp_path, "MODEL.WEIGHTS", text_weights)
    cfg = small_cfg("MODEL.WEIGHTS", text_weights, "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=expected):
        Trainer(cfg).resume_or_load(resume=False)


def test_torchvision_converter_names_a_text_file(tmp_path, text_weights):
    with pytest.raises(ValueError, match=rf"{text_weights}: not a torchvision ResNet checkpoint that can be "
                                         r"loaded .*; it is a text file"):
        convert.main([text_weights, str(tmp_path / "R-50.pkl")])
    assert not (tmp_path / "R-50.pkl").exists()


# ---------------------------------------------------------------------------------------------
# Image arrays given to the predictor
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return PanopticSegFormerPredictor(small_cfg("MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
                                                "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0",
                                                "INPUT.MIN_SIZE_TEST", "64"))


@pytest.fixture(scope="module")
def bgr():
    return cv2.imread(DatasetCatalog.get("shapes_panoptic_val_tiny")[0]["file_name"])


def _same(a, b):
    assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0]) and a["panoptic_seg"][1] == b["panoptic_seg"][1]
    assert torch.equal(a["sem_seg"], b["sem_seg"])


def test_predictor_converts_grayscale_and_bgra(predictor, bgr):
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    as_color = predictor(np.repeat(gray[:, :, None], 3, axis=2))
    assert len(as_color["panoptic_seg"][1]) > 0
    _same(predictor(gray), as_color)
    _same(predictor(gray[:, :, None]), as_color)
    bgra = np.dstack([bgr, np.full(bgr.shape[:2], 128, np.uint8)])
    _same(predictor(bgra), predictor(bgr))
    # Detectron2's DefaultPredictor itself: the model rejects the 4 channels it passes on
    plain = DefaultPredictor(predictor.cfg)
    with pytest.raises(ValueError, match=r"input 0: 'image' has shape \(4, 64, 64\): expected a \(C, H, W\) "
                                         r"tensor with C = 3 channels"):
        plain(bgra)


@pytest.mark.parametrize("shape", [(3, 128, 128), (128, 128, 2), (0, 0, 3), (4, 128, 128, 3)])
def test_predictor_rejects_other_layouts_naming_the_shape(predictor, shape):
    hint = r" \(channels-first\? use image.transpose\(1, 2, 0\)\)" if shape[0] == 3 else ""
    what = "is empty: expected" if 0 in shape else ": expected"
    with pytest.raises(ValueError, match=rf"image array of shape \({', '.join(map(str, shape))}\) ?{what} an "
                                         rf"\(H, W, 3\) BGR array.*converted{hint}$"):
        predictor(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("panoptic_on", [True, False])
def test_non_finite_pixels_are_rejected_up_front(bgr, panoptic_on):
    cfg = small_cfg("MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON", str(panoptic_on))
    for predictor in (DefaultPredictor(cfg), PanopticSegFormerPredictor(cfg)):
        for bad in (float("nan"), float("inf"), float("-inf")):
            image = bgr.astype(np.float32)
            image[5, 7, 1] = bad
            with pytest.raises(ValueError, match=r"input 0: 'image' of shape \(3, 128, 128\) has non-finite "
                                                 r"values \(NaN or inf\)"):
                predictor(image)


def test_negative_threshold_names_the_config_key():
    cfg = small_cfg("MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "-0.1")
    with pytest.raises(ValueError, match=r"^MODEL\.PANOPTIC_SEGFORMER\.TEST\.CONF_THRESHOLD_THING must lie in "
                                         r"\[0, 1\], got -0\.1$"):
        PanopticSegFormerPredictor(cfg)
