"""Model zoo: reference architectures written in plain torch, all fx-traceable.

Every entry of :data:`MODELS` records its builder, example input shape, class
count and the parameter / MAC counts it was verified against (MACs count conv
and linear multiply-accumulates plus attention matmuls, batch 1; see
``examples/_count_macs.py``).

All models trace with ``torch.fx.symbolic_trace``. Activations are not
in-place and every module is called from exactly one place, so each graph node
maps to its own module and a graph rewrite may reuse any intermediate value.

>>> model = build("resnet20")
>>> out = model(*example_inputs("resnet20"))
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .cifar_resnet import resnet20, resnet32, resnet50_cifar, resnet56
from .densenet import densenet121
from .inception import inception_v3
from .mobilenet import mobilenet_v2
from .resnet import resnet50
from .shufflenet import shufflenet_v2
from .vit import vit_small, vit_tiny

__all__ = ["ZooEntry", "MODELS", "build", "example_inputs"]


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model and the figures it was verified against.

    ``params`` and ``macs`` are exact counts for this implementation at
    ``input_shape``; they agree with the published figures except where
    ``note`` says otherwise.
    """

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    params: int
    macs: int
    note: str = ""


_CIFAR = (1, 3, 32, 32)
_IMAGENET = (1, 3, 224, 224)

MODELS: dict[str, ZooEntry] = {
    "resnet20": ZooEntry(resnet20, _CIFAR, 10, 272_474, 40_813_184),
    "resnet32": ZooEntry(
        resnet32, _CIFAR, 10, 466_906, 69_124_736,
        note="study reports 487,754 params / 144.37 MFLOPs (72.19 M MACs); not reproduced",
    ),
    "resnet56": ZooEntry(resnet56, _CIFAR, 10, 855_770, 125_747_840),
    "resnet50_cifar": ZooEntry(
        resnet50_cifar, _CIFAR, 100, 764_404, 111_597_824,
        note="study reports 769,476 params / 223.95 MFLOPs (111.98 M MACs); closest definition, not exact",
    ),
    "resnet50": ZooEntry(resnet50, _IMAGENET, 1000, 25_557_032, 4_089_184_256),
    "inception_v3": ZooEntry(inception_v3, (1, 3, 299, 299), 1000, 23_834_568, 5_713_216_096),
    "mobilenet_v2": ZooEntry(mobilenet_v2, _IMAGENET, 1000, 3_504_872, 300_774_272),
    "densenet121": ZooEntry(densenet121, _IMAGENET, 1000, 7_978_856, 2_834_161_664),
    "shufflenet_v2": ZooEntry(shufflenet_v2, _IMAGENET, 1000, 2_278_604, 144_907_992),
    "vit_small": ZooEntry(vit_small, _CIFAR, 10, 2_693_578, 182_849_664),
    "vit_tiny": ZooEntry(vit_tiny, _CIFAR, 10, 62_650, 4_553_376),
}


def _entry(name: str) -> ZooEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; available: {', '.join(MODELS)}") from None


def build(name: str, seed: int | None = 0, **kwargs) -> nn.Module:
    """Build zoo model ``name`` in eval mode; ``kwargs`` go to its builder.

    With an integer ``seed`` the weights are reproducible; the global RNG
    state is left untouched. ``seed=None`` draws from the global RNG.
    """
    builder = _entry(name).builder
    if seed is None:
        return builder(**kwargs).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(**kwargs).eval()


def example_inputs(name: str, batch_size: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic random example inputs for zoo model ``name``."""
    shape = (batch_size, *_entry(name).input_shape[1:])
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator),)
