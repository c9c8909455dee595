"""The meta shape pass remembers an op's output metadata by the op and its arguments'
metadata (trace._MetaMemo): the shapes it records must be those of running every kernel."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphsearch import trace as T
from graphsearch import zoo

import coverage_models as cm


def _sig(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.device.type)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_sig(x) for x in v))
    return ("V", type(v).__name__, repr(v))


def _shapes(traced, inputs, memo: bool, monkeypatch, counter=None):
    with monkeypatch.context() as m:
        if not memo:
            m.setattr(T._MetaMemo, "run",
                      lambda self, op, fn, target, args, kwargs: fn(target, args, kwargs))
        elif counter is not None:
            run = T._MetaMemo.run

            def counting(self, op, fn, target, args, kwargs):
                before = len(self.seen)
                out = run(self, op, fn, target, args, kwargs)
                counter["calls"] += 1
                counter["new"] += len(self.seen) - before
                return out

            m.setattr(T._MetaMemo, "run", counting)
        values = T.propagate_shapes(traced.module, inputs)
    return {k: _sig(v) for k, v in values.items()}


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "shufflenet_v2"])
def test_memo_records_the_kernels_shapes_on_the_zoo(name, monkeypatch):
    model, inputs = zoo.build(name), zoo.example_inputs(name)
    traced = T.trace(model, inputs)
    counter = {"calls": 0, "new": 0}
    with_memo = _shapes(traced, inputs, True, monkeypatch, counter)
    assert with_memo == _shapes(traced, inputs, False, monkeypatch)
    assert counter["calls"] > counter["new"] > 0  # repeated blocks hit the memo


@pytest.mark.parametrize("name", ["tiny_deit", "tiny_shufflenet", "tiny_swin", "tiny_levit",
                                  "text_classifier", "tiny_decoder", "tiny_mobilevit"])
def test_memo_records_the_kernels_shapes_on_library_styles(name, monkeypatch):
    build, inputs = cm.MODELS[name]
    torch.manual_seed(0)
    model, x = build(), inputs()
    traced = T.trace(model, x)
    assert _shapes(traced, x, True, monkeypatch) == _shapes(traced, x, False, monkeypatch)


class _Twins(nn.Module):
    """Ops that share their input but not their configuration: two convs with one weight
    shape and different strides, one pad function with different widths, two linears of one
    shape, each with a hook that counts its calls, in-place metadata changes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        p, q = F.pad(x, (1, 1)), F.pad(x, (2, 2))
        u, v = x.flatten(2).clone(), x.flatten(2).clone()
        u.unsqueeze_(0)  # the same in-place op twice: each changes its own operand
        v.unsqueeze_(0)
        h = self.fc1(x.mean((2, 3))) + self.fc2(x.mean((2, 3)))
        return self.a(x), self.b(x), self.c(x), p, q, u, v, h


def test_memo_keys_hold_configuration_arguments_and_hooks(monkeypatch):
    torch.manual_seed(0)
    model, x = _Twins(), torch.randn(2, 4, 6, 6)
    calls = []
    for fc in (model.fc1, model.fc2):
        fc.register_forward_hook(lambda m, i, o: calls.append(m))
    traced = T.trace(model, (x,))
    calls.clear()  # (tracing calls them too)
    with_memo = _shapes(traced, (x,), True, monkeypatch)
    assert len(calls) == 2  # a module with a hook runs, every time
    real = [_sig(t) for t in model(x)]
    out = with_memo["output"][1]
    assert [o[1] for o in out] == [r[1] for r in real]  # shapes as the real forward's
    assert with_memo["a"][1] == (2, 4, 6, 6) and with_memo["b"][1] == (2, 4, 3, 3)
    assert with_memo["c"] == with_memo["a"]
    assert with_memo == _shapes(traced, (x,), False, monkeypatch)


def test_memo_is_off_under_a_global_hook_or_a_mode():
    from torch.utils.flop_counter import FlopCounterMode

    assert not T._MetaMemo().off
    with FlopCounterMode(display=False):
        assert T._MetaMemo().off
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert T._MetaMemo().off
    finally:
        handle.remove()
    assert not T._MetaMemo().off
