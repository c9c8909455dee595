"""Shared weight initialisation for the zoo models."""

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Apply a fixed initialisation scheme to every submodule.

    Kaiming-normal (fan_out, ReLU) for convolutions, unit/zero affine for
    norm layers and a small normal for linear layers. Combined with a seeded
    RNG (see :func:`graphsearch.zoo.build`) this makes models reproducible.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
