"""DenseNet-121 (Huang et al., 2017): growth 32, blocks 6/12/24/16, BC variant.

Bottleneck width 4 x growth, transition compression 0.5.
7,978,856 params, 2.834 G MACs at 1x3x224x224.
"""

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ._init import init_weights

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet121"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``bn_size * growth`` then BN-ReLU-3x3 conv to ``growth``."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        inner = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, 1, 1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        # Concatenate every earlier feature map of the block; the list length is
        # fixed by the Python loop in DenseBlock, so torch.fx unrolls it.
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) and 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU()),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            layers.append((f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate, bn_size)))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_channels = int(channels * compression)
                layers.append((f"transition{i + 1}", Transition(channels, out_channels)))
                channels = out_channels
        layers += [("norm5", nn.BatchNorm2d(channels)), ("relu5", nn.ReLU())]
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121: 7,978,856 params, 2.834 G MACs at 1x3x224x224."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)
