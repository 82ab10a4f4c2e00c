"""projects.tools.visualize: the thresholds a drawn column gets (``--thresholds``) and its errors. The
pictures themselves are drawn by tests/test_docs.py (the documented commands, on tiny settings)."""
import os

import pytest

from projects.tools import visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["mask_wise", "pixel_argmax"]


def test_thresholds_parse_to_numbers_per_column():
    got = visualize.parse_thresholds(
        ["mask_wise:conf_threshold=0.15,keep_threshold=0.6", "pixel_argmax:threshold=0.4,area_threshold=64"], NAMES)
    assert got == {"mask_wise": {"conf_threshold": 0.15, "keep_threshold": 0.6},
                   "pixel_argmax": {"threshold": 0.4, "area_threshold": 64}}
    assert isinstance(got["pixel_argmax"]["area_threshold"], int)
    assert visualize.parse_thresholds([], NAMES) == {}


@pytest.mark.parametrize("item, says", [
    ("heuristic:thing_threshold=0.3", "NAME one of --postprocessors"),  # a column that is not drawn
    ("pixel_argmax", "expected NAME:ARG=VALUE"),
    ("pixel_argmax:threshold", "'threshold' is not ARG=NUMBER"),
    ("pixel_argmax:threshold=high", "'threshold=high' is not ARG=NUMBER"),
])
def test_malformed_thresholds_name_the_item(item, says):
    with pytest.raises(SystemExit, match=says):
        visualize.parse_thresholds([item], NAMES)


def test_columns_get_their_thresholds_and_unknown_arguments_are_named():
    from detectron2.modeling import build_model

    args = visualize.get_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs/shapes/panoptic_segformer_shapes.yaml"), "--output-dir", "x",
         "MODEL.DEVICE", "cpu"])
    cfg = visualize.visualize_cfg(args)
    model = build_model(cfg).eval()
    # Without --thresholds: the model's own post-processor (its config's t_cnf) and DETR's defaults.
    plain = visualize.build_columns(cfg, model, NAMES, {})
    assert plain["mask_wise"] is model.postprocessor
    assert plain["pixel_argmax"].threshold == 0.85
    chosen = visualize.build_columns(cfg, model, NAMES, visualize.parse_thresholds(
        ["mask_wise:conf_threshold=0.15", "pixel_argmax:threshold=0.4,area_threshold=64"], NAMES))
    assert chosen["mask_wise"].conf_threshold == (0.15, 0.15)  # (things, stuff)
    # the other merging keys of the model's own post-processor stay the config's
    assert chosen["mask_wise"].keep_threshold == model.postprocessor.keep_threshold
    assert (chosen["pixel_argmax"].threshold, chosen["pixel_argmax"].area_threshold) == (0.4, 64)
    with pytest.raises(SystemExit, match="pixel_argmax.*treshold"):
        visualize.build_columns(cfg, model, NAMES, {"pixel_argmax": {"treshold": 0.4}})
