"""The tests' tiny user model: conv-bn, a residual conv-bn, a strided conv-bn, a linear head.

It follows the `model.py` convention, so the CLI tests copy this file as a user's model.py,
and the method tests import `Tiny`
(and `TinyHidden`, with a hidden linear layer) from it.
"""

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


class TinyHidden(nn.Module):
    """conv-bn (a residual group), a strided conv-bn, and a hidden linear without a norm (its
    gate sits right after the producer)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 24)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.relu(self.fc1(x.mean((2, 3)))))


def build_model():
    torch.manual_seed(0)
    return Tiny()


def example_inputs():
    return (torch.zeros(1, 3, 32, 32),)
