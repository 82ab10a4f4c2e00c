"""Small building blocks shared by the decoders (no Detectron2 imports)."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "focal_prior_bias", "inverse_sigmoid"]


def focal_prior_bias(prior_prob: float = 0.01) -> float:
    """Bias making ``sigmoid(bias) == prior_prob`` (focal-loss prior, RetinaNet Sec. 4.1): -log((1-p)/p).

    Every class FC of the location and mask decoders starts from it (App. A.1: focal loss for classes).
    """
    return -math.log((1.0 - prior_prob) / prior_prob)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Inverse of the sigmoid, ``log(x / (1 - x))``, with ``x`` clamped to [0, 1] and both terms to >= eps."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class MLP(nn.Module):
    """DETR's feed-forward network: ``num_layers`` Linear layers with ReLU between them (the box head
    of the location decoder, Sec. 3.3.2).

    Args:
        input_dim, hidden_dim, output_dim: feature sizes.
        num_layers: number of Linear layers (>= 1).
    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x
