"""MobileNetV2 1.0, 1x3x224x224 input.
3,504,872 params, 300.8 M MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("mobilenet_v2")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("mobilenet_v2")
