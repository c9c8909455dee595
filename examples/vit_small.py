"""Small ViT for 32x32 images (patch 4, dim 192, depth 6, heads 3), 1x3x32x32 input.
2,693,578 params, 182.85 M MACs (attention matmuls included)."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("vit_small")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("vit_small")
