"""ImageNet ResNet-50 (v1.5, stride on the 3x3 conv), 1x3x224x224 input.
25,557,032 params, 4.089 G MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("resnet50")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("resnet50")
