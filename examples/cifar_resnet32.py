"""CIFAR-10 ResNet-32 (option B shortcuts), 1x3x32x32 input.
466,906 params, 69.12 M MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("resnet32")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("resnet32")
