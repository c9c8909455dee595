"""The traced module (trace._graph_module) is the module `fx.GraphModule(root, graph)` builds:
the same hierarchy of fresh containers and original modules, parameters and buffers, flags
and attributes; only its code is generated later and its submodules copied faster."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from graphsearch import trace as T
from graphsearch import zoo
from graphsearch.rules import default_rules

import coverage_models as cm


def _modules(gm: nn.Module, originals: dict[int, str]) -> list:
    """Every module of `gm`: its name, class, which original it is (None: a fresh container),
    flags, attribute names in order and the objects it holds."""
    out = []
    for name, m in gm.named_modules(remove_duplicate=False):
        cls = type(m).__mro__[1] if m is gm else type(m)  # (fx makes a class per module)
        out.append((name, cls, originals.get(id(m)), m.training, list(vars(m)),
                    [(k, originals.get(id(v), type(v))) for k, v in m._modules.items()],
                    [(k, id(v)) for k, v in m._parameters.items()],
                    [(k, id(v)) for k, v in m._buffers.items()],
                    sorted(m._non_persistent_buffers_set)))
    return out


def _same_module(ours: fx.GraphModule, fxs: fx.GraphModule, root: nn.Module) -> None:
    originals = {id(m): name for name, m in root.named_modules(remove_duplicate=False)}
    assert _modules(ours, originals) == _modules(fxs, originals)
    for attr in ("_tracer_cls", "_tracer_extras", "meta", "training"):
        assert getattr(ours, attr) == getattr(fxs, attr), attr
    assert list(ours.state_dict(keep_vars=True)) == list(fxs.state_dict(keep_vars=True))
    assert ours.code == fxs.code


class _Nested(nn.Module):
    """Targets under targets: a conv of a block called on its own before the block (kept
    whole) replaces the container made for it; its weight read afterwards is not copied
    again. A buffer and a tensor constant read as attributes, a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.head = nn.ModuleList([nn.Conv2d(3, 4, 1)])
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        y = self.block[0](x) * self.scale + self.shift
        y = self.block(y) + self.block[0].weight.sum()
        return self.head[0](y) + torch.tensor([1.0])


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "shufflenet_v2", "inception_v3",
                                  "tiny_swin", "tiny_levit", "text_classifier", "nested"])
def test_the_traced_module_is_fxs(name):
    torch.manual_seed(0)
    rules = None
    if name in zoo.MODELS:
        model = zoo.build(name)
    elif name == "nested":
        model = _Nested()
        rules = default_rules().extend({nn.Sequential: lambda ctx, node: None})  # leaves
    else:
        model = cm.MODELS[name][0]()
    model.eval() if name == "resnet20" else model.train()
    tracer = T._LeafFallbackTracer(rules)
    graph = tracer.trace(model)
    ours = T._graph_module(tracer.root, graph, type(model).__name__)
    assert ours.graph is graph and graph.owning_module is ours
    built_by = type(ours).__mro__[1]  # fx's lazy module (or GraphModule), as fx builds it
    fxs = built_by(tracer.root, graph, type(model).__name__)  # (now the graph's owner)
    _same_module(ours, fxs, model)
    if name == "nested":
        assert ours.block is model.block and ours.head is not model.head
