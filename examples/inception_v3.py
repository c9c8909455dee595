"""Inception-v3 without the auxiliary head, 1x3x299x299 input.
23,834,568 params, 5.713 G MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("inception_v3")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("inception_v3")
