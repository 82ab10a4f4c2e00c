#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet checkpoint into a Detectron2 checkpoint.

Usage::

    python -m projects.convert.convert_torchvision_to_d2 resnet50-0676ba61.pth R-50.pkl

The input is the plain state dict torchvision publishes (``resnet{18,34,50,101,152}-*.pth``). The
output is the ``.pkl`` Detectron2 reads with name-matching heuristics, ``{"model": {name: ndarray},
"__author__": "torchvision", "matching_heuristics": True}``, with the same names as Detectron2's
``tools/convert-torchvision-to-d2.py``: ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
``layer{i}`` -> ``res{i+1}``, ``bn{k}`` -> ``conv{k}.norm``, ``downsample.{0,1}`` ->
``shortcut``/``shortcut.norm`` (``fc`` becomes ``stem.fc`` and BatchNorm's ``num_batches_tracked``
counters are kept; Detectron2 ignores both when loading). Use it with torchvision's pre-processing
and stride in the 3x3 conv, as ``configs/coco/Base-PanopticSegFormer.yaml`` does::

    MODEL.WEIGHTS: R-50.pkl   MODEL.RESNETS.STRIDE_IN_1X1: False
    MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]   MODEL.PIXEL_STD: [58.395, 57.120, 57.375]
    INPUT.FORMAT: RGB
"""
import argparse
import pickle
import re
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from panoptic_segformer.checkpoint import checkpoint_load_error

__all__ = ["torchvision_resnet_key_to_d2", "convert_torchvision_resnet", "main"]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TORCHVISION_RESNET_KEY = re.compile(
    r"^(conv1\.weight"
    rf"|bn1\.{_BN}"
    r"|fc\.(weight|bias)"
    r"|layer[1-4]\.\d+\.conv[1-3]\.weight"
    rf"|layer[1-4]\.\d+\.bn[1-3]\.{_BN}"
    r"|layer[1-4]\.\d+\.downsample\.0\.weight"
    rf"|layer[1-4]\.\d+\.downsample\.1\.{_BN})$"
)


def torchvision_resnet_key_to_d2(key: str) -> str:
    """Name of a torchvision ResNet parameter in Detectron2's ResNet (no ``backbone.`` prefix).

    ``"layer1.0.bn2.weight"`` -> ``"res2.0.conv2.norm.weight"``, ``"conv1.weight"`` ->
    ``"stem.conv1.weight"``, ``"layer2.0.downsample.1.running_var"`` ->
    ``"res3.0.shortcut.norm.running_var"``. Same mapping as Detectron2's
    ``tools/convert-torchvision-to-d2.py``; the official Panoptic SegFormer (mmdet) checkpoints use
    these names under ``backbone.``.

    Raises:
        ValueError: ``key`` is not a parameter/buffer name of torchvision's ResNet.
    """
    if not _TORCHVISION_RESNET_KEY.match(key):
        raise ValueError(f"Unexpected key {key!r}: not a torchvision ResNet parameter name "
                         "(conv1, bn1, layer{1-4}.N.{conv,bn}{1-3}, layer{1-4}.N.downsample.{0,1}, fc)")
    if not key.startswith("layer"):
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> Dict:
    """torchvision ResNet state dict -> Detectron2 checkpoint dict (numpy arrays, matching heuristics)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{source}: expected a non-empty torchvision ResNet state dict, "
                         f"got {type(state_dict).__name__}")
    model = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise ValueError(f"{source}: value of key {key!r} is a {type(value).__name__}, not a tensor")
        try:
            new_key = torchvision_resnet_key_to_d2(key)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        model[new_key] = value.detach().cpu().numpy()
    return {"model": model, "__author__": "torchvision", "matching_heuristics": True}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth state dict)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl)")
    parser.add_argument("--verbose", action="store_true", help="print every renamed key")
    args = parser.parse_args(argv)

    try:
        state_dict = torch.load(args.input, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # the unpickler raises anything from KeyError to IndexError
        raise checkpoint_load_error(args.input, e, "torchvision ResNet checkpoint") from e
    converted = convert_torchvision_resnet(state_dict, source=args.input)
    if args.verbose:
        for old, new in zip(state_dict, converted["model"]):
            print(f"{old} -> {new}")
    with open(args.output, "wb") as f:
        pickle.dump(converted, f)
    n = sum(int(np.prod(v.shape)) for v in converted["model"].values())
    print(f"Wrote {len(converted['model'])} tensors ({n} values) to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
