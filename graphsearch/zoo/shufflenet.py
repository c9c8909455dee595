"""ShuffleNetV2 1.0x (Ma et al., 2018), stage channels 24/116/232/464/1024.

2,278,604 params, 144.91 M MACs at 1x3x224x224.
"""

import torch
from torch import Tensor, nn

from ._init import init_weights

__all__ = ["channel_shuffle", "InvertedResidual", "ShuffleNetV2", "shufflenet_v2"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels across ``groups`` so the two branches exchange information."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = x.transpose(1, 2).contiguous()
    return x.view(batch, -1, height, width)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit.

    Stride 1: split channels in half, transform one half, concatenate, shuffle.
    Stride 2: both branches see the full input and each yields half the output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_channels = out_channels // 2
        # Stride-1 units pass half the channels through untouched, so only
        # downsampling units own a branch1.
        if stride > 1:
            self.branch1 = nn.Sequential(
                *_conv_bn(in_channels, in_channels, 3, stride, groups=in_channels),
                *_conv_bn(in_channels, branch_channels, 1),
                nn.ReLU(),
            )
        branch2_in = in_channels if stride > 1 else branch_channels
        self.branch2 = nn.Sequential(
            *_conv_bn(branch2_in, branch_channels, 1),
            nn.ReLU(),
            *_conv_bn(branch_channels, branch_channels, 3, stride, groups=branch_channels),
            *_conv_bn(branch_channels, branch_channels, 1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        # self.stride is a Python int, so the branch is resolved at trace time.
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        stage_repeats: tuple[int, int, int] = (4, 8, 4),
        stage_channels: tuple[int, int, int, int, int] = (24, 116, 232, 464, 1024),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        in_channels = stage_channels[0]
        self.conv1 = nn.Sequential(*_conv_bn(3, in_channels, 3, 2), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for repeats, out_channels in zip(stage_repeats, stage_channels[1:4]):
            units = [InvertedResidual(in_channels, out_channels, 2)]
            units += [InvertedResidual(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = nn.Sequential(*_conv_bn(in_channels, stage_channels[4], 1), nn.ReLU())
        self.fc = nn.Linear(stage_channels[4], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean((2, 3))
        return self.fc(x)


def shufflenet_v2(num_classes: int = 1000) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x: 2,278,604 params, 144.91 M MACs at 1x3x224x224."""
    return ShuffleNetV2(num_classes=num_classes)
