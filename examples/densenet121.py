"""DenseNet-121 (growth 32, blocks 6/12/24/16), 1x3x224x224 input.
7,978,856 params, 2.834 G MACs."""

import torch
from torch import nn

from graphsearch.zoo import build, example_inputs as _zoo_inputs


def build_model() -> nn.Module:
    return build("densenet121")


def example_inputs() -> tuple[torch.Tensor, ...]:
    return _zoo_inputs("densenet121")
