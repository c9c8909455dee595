"""CIFAR-10 ResNet-20 (option B shortcuts), 1x3x32x32 input.
272,474 params, 40.81 M MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("resnet20")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("resnet20")
