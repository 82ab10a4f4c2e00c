"""projects/convert/convert_torchvision_to_d2.py: torchvision ImageNet ResNets -> Detectron2 checkpoints."""
import os
import pickle

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone
from torch import nn

from conftest import REPO_ROOT
from panoptic_segformer import add_panoptic_segformer_config
from projects.convert.convert_torchvision_to_d2 import main, torchvision_resnet_key_to_d2


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random BN affine parameters and running statistics, so a wrong mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean = 0.2 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)


class _Wrapper(nn.Module):
    """Holds the backbone under ``backbone.``, as in the full model ``MODEL.WEIGHTS`` is loaded into."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_torchvision_resnet_loads_into_d2_resnet_and_matches(depth, tmp_path):
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    _randomize_bn(tv, seed=depth)
    tv.eval()
    src, dst = tmp_path / "tv.pth", tmp_path / "d2.pkl"
    torch.save(tv.state_dict(), src)
    main([str(src), str(dst)])

    with open(dst, "rb") as f:
        ckpt = pickle.load(f)
    assert ckpt["__author__"] == "torchvision" and ckpt["matching_heuristics"] is True
    assert "stem.conv1.weight" in ckpt["model"] and "res5.0.shortcut.norm.running_var" in ckpt["model"]

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/coco/Base-PanopticSegFormer.yaml"))
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False  # torchvision puts the stride in the 3x3 conv
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    d2 = _Wrapper(build_resnet_backbone(cfg, ShapeSpec(channels=3))).eval()
    incompatible = DetectionCheckpointer(d2)._load_model(DetectionCheckpointer(d2)._load_file(str(dst)))
    assert not incompatible.missing_keys
    # Only torchvision's classifier and BN step counters have no place in a D2 backbone.
    leftovers = [k for k in incompatible.unexpected_keys
                 if not (k.startswith("stem.fc.") or k.endswith("num_batches_tracked"))]
    assert not leftovers

    x = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        out = d2.backbone(x)["res5"]
    assert out.shape == ref.shape
    # D2's FrozenBatchNorm (x * scale + shift) vs torchvision's BN, other conv kernels: float32 rounding
    # compounded over 18-50 layers (~1e-5), not bit-identical
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_key_mapping_matches_detectron2_names():
    assert torchvision_resnet_key_to_d2("conv1.weight") == "stem.conv1.weight"
    assert torchvision_resnet_key_to_d2("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert torchvision_resnet_key_to_d2("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert torchvision_resnet_key_to_d2("layer4.2.conv2.weight") == "res5.2.conv2.weight"
    assert torchvision_resnet_key_to_d2("layer3.0.downsample.0.weight") == "res4.0.shortcut.weight"
    assert torchvision_resnet_key_to_d2("layer2.0.downsample.1.running_var") == "res3.0.shortcut.norm.running_var"
    assert torchvision_resnet_key_to_d2("fc.weight") == "stem.fc.weight"


def test_unexpected_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="backbone.conv1.weight"):
        torchvision_resnet_key_to_d2("backbone.conv1.weight")
    src = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer5.0.conv1.weight": torch.zeros(1)}, src)
    with pytest.raises(ValueError, match=r"bad\.pth.*layer5\.0\.conv1\.weight"):
        main([str(src), str(tmp_path / "out.pkl")])
    assert not (tmp_path / "out.pkl").exists()
