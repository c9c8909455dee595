"""ShuffleNetV2 1.0x, 1x3x224x224 input.
2,278,604 params, 144.91 M MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("shufflenet_v2")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("shufflenet_v2")
