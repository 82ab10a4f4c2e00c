"""Config: every paper hyper-parameter is declared, YAML files round-trip, unknown keys are errors."""
import glob
import os

import pytest
from detectron2.config import get_cfg

from panoptic_segformer import add_panoptic_segformer_config
from conftest import REPO_ROOT


def _plain(node):
    """CfgNode -> nested dicts/lists (YAML turns tuples into lists)."""
    if hasattr(node, "items"):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _cfg():
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    return cfg


def test_paper_defaults():
    psf = _cfg().MODEL.PANOPTIC_SEGFORMER
    assert (psf.NUM_THING_QUERIES, psf.ENC_LAYERS, psf.LOCATION_DECODER_LAYERS, psf.MASK_DECODER_LAYERS) == (300, 6, 6, 6)
    assert (psf.NHEADS, psf.ENC_N_POINTS, psf.DEC_N_POINTS, len(psf.IN_FEATURES)) == (8, 4, 4, 3)
    assert (psf.CLASS_WEIGHT, psf.MASK_WEIGHT, psf.DET_WEIGHT) == (2.0, 1.0, 1.0)
    t = psf.TEST
    assert (t.ALPHA, t.BETA, t.MASK_THRESHOLD, t.CONF_THRESHOLD_THING, t.KEEP_THRESHOLD_THING) == (1.0, 2.0, 0.5, 0.25, 0.6)
    assert psf.QUERY_DECOUPLING and psf.DEEP_SUPERVISION and psf.QUERY_FILTER.ENABLED and not psf.BOX_FREE


def test_add_config_is_idempotent():
    cfg = _cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES = 7
    add_panoptic_segformer_config(cfg)
    assert cfg.MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES == 7


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True)))
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = _cfg()
    cfg.merge_from_file(path)
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(cfg.dump())
    again = _cfg()
    again.merge_from_file(str(dumped))
    assert _plain(again) == _plain(cfg)


def test_r50_24ep_schedule():
    cfg = _cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/coco/panoptic_segformer_R50_24ep.yaml"))
    iters_per_epoch = 118287 / cfg.SOLVER.IMS_PER_BATCH
    assert cfg.SOLVER.BASE_LR == 1.4e-4 and cfg.SOLVER.IMS_PER_BATCH == 8
    assert round(cfg.SOLVER.MAX_ITER / iters_per_epoch) == 24
    assert round(cfg.SOLVER.STEPS[0] / iters_per_epoch) == 18
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 480 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 800
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.INPUT.CROP.ENABLED and cfg.INPUT.DETR_CROP_PROB == 0.5


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  PANOPTIC_SEGFORMER:\n    NUM_THING_QUERYS: 100\n")
    with pytest.raises(KeyError, match="NUM_THING_QUERYS"):
        _cfg().merge_from_file(str(bad))
    with pytest.raises((KeyError, AssertionError), match="NOPE"):  # yacs raises AssertionError here
        _cfg().merge_from_list(["MODEL.PANOPTIC_SEGFORMER.NOPE", "1"])


def test_every_declared_key_is_read_by_the_code():
    """Configs never silently ignore a key: each key this project adds appears in the code that reads it."""
    base = get_cfg()
    cfg = _cfg()
    sources = ""
    for path in glob.glob(os.path.join(REPO_ROOT, "panoptic_segformer", "**", "*.py"), recursive=True) + [
        os.path.join(REPO_ROOT, "train_net.py")
    ]:
        if not path.endswith("config.py"):
            sources += open(path).read()

    def leaves(node, prefix=""):
        for k, v in node.items():
            if hasattr(v, "items"):
                yield from leaves(v, prefix + k + ".")
            else:
                yield prefix + k

    added = set(leaves(cfg)) - set(leaves(base))
    assert added, "add_panoptic_segformer_config added nothing"
    unread = [key for key in sorted(added) if "." + key.split(".")[-1] not in sources]
    assert not unread, f"config keys never read by the code: {unread}"


def test_ade20k_config_matches_the_paper_and_its_dataset():
    cfg = _cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/ade20k/panoptic_segformer_R50_100ep.yaml"))
    iters_per_epoch = 20210 / cfg.SOLVER.IMS_PER_BATCH
    assert round(cfg.SOLVER.MAX_ITER / iters_per_epoch) == 100 and round(cfg.SOLVER.STEPS[0] / iters_per_epoch) == 80
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (512, 2048) and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    from panoptic_segformer.panoptic_segformer import dataset_class_ids

    things, stuff = dataset_class_ids(cfg.DATASETS.TRAIN)
    assert (len(things), len(stuff)) == (cfg.MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES,
                                         cfg.MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES) == (100, 50)


def test_query_filtering_keeps_the_mask_decoder_under_100_queries():
    """Appendix B.2: with filtering, the mask decoder handles fewer than 100 thing + stuff queries."""
    cfg = _cfg()
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/coco/panoptic_segformer_R50_24ep.yaml"))
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    assert psf.QUERY_FILTER.ENABLED and psf.QUERY_FILTER.NUM_QUERIES + psf.NUM_STUFF_CLASSES < 100
