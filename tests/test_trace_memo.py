"""The meta shape pass remembers an op's output metadata by the op and its arguments'
metadata (trace._MetaMemo): the shapes it records must be those of running every kernel."""

from __future__ import annotations


import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphsearch import trace as T
from graphsearch import zoo
from graphsearch.rules import default_rules
from graphsearch.rules.conv import _conv_meta
from graphsearch.rules.linear import _linear_meta
from graphsearch.rules.norm import _layer_norm_meta

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
    # the memo alone: no rule's `meta` (a conv's would answer every call before the memo)
    monkeypatch.setattr(T._Recorder, "_quick", lambda self, op, target, args, kwargs: None)
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


# ------------------------------------------------------------------ Rule.meta against kernels

def _without_rule_metas(traced, inputs, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(T._Recorder, "_quick", lambda self, op, target, args, kwargs: None)
        values = T.propagate_shapes(traced.module, inputs)
    return {k: _sig(v) for k, v in values.items()}


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "shufflenet_v2", "inception_v3"])
def test_rule_metas_record_the_kernels_shapes_on_the_zoo(name, monkeypatch):
    model, inputs = zoo.build(name), zoo.example_inputs(name)
    traced = T.trace(model, inputs)
    with_metas = {k: _sig(v) for k, v in T.propagate_shapes(traced.module, inputs).items()}
    assert with_metas == _without_rule_metas(traced, inputs, monkeypatch)


def _plain_parameters(m: nn.Module) -> nn.Module:
    """On meta, its parameters plain tensors, as the shape pass swaps them in."""
    m = m.to("meta")
    for name, p in list(m._parameters.items()):
        if p is not None:
            m._parameters[name] = torch.empty(p.shape, dtype=p.dtype, device="meta")
    return m


def _agrees_with_kernel(meta, m, x) -> bool:
    """The rule's output is the kernel's on meta copies of the parameters (shape, strides,
    dtype, offset, grad), or None, whether it is given the module with its real parameters
    (as the shape pass does) or with those copies; True if it gave one."""
    copies = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
              for k, v in m.state_dict(keep_vars=True).items()}
    try:
        out = torch.func.functional_call(m, copies, (x,))
        want = _sig(out), out.storage_offset(), out.requires_grad
    except Exception:  # noqa: BLE001 - the kernel refuses: so must the rule
        want = None
    given = 0
    for module in (m, _plain_parameters(copy.deepcopy(m))):
        got = meta(module, (x,), {})
        if got is not None:
            assert want == (_sig(got), got.storage_offset(), got.requires_grad), \
                (m, x.shape, x.stride())
            given += 1
    assert given in (0, 2)  # (the same answer either way)
    return bool(given)


def _inputs(shape, dtype=torch.float32):
    x = torch.empty(shape, dtype=dtype, device="meta")
    out = [x, torch.empty(shape, device="meta")]  # (float32: another dtype than a half model)
    if x.dim() > 1:
        out.append(x.transpose(-1, -2))
    if x.dim() == 4:
        out.append(x.contiguous(memory_format=torch.channels_last))
    return out


def test_conv_meta_is_the_kernels():
    given = 0
    for cls, k in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)):
        for cin, cout, groups in ((4, 6, 1), (4, 8, 2), (4, 4, 4), (1, 3, 1), (3, 1, 1)):
            for size, stride, padding, dilation, bias, mode in itertools.product(
                    (1, 3), (1, 2), (0, 1, "same", "valid"), (1, 2), (True, False),
                    ("zeros", "reflect")):
                if padding == "same" and stride != 1:
                    continue
                for dtype in (torch.float32, torch.float16):
                    m = cls(cin, cout, size, stride, padding, dilation, groups, bias,
                            mode).to(dtype)
                    for spatial in ((1,) * k, (5,) * k, tuple(range(2, 2 + k))):
                        for batch in (1, 2):
                            for x in _inputs((batch, cin) + spatial, dtype):
                                given += _agrees_with_kernel(_conv_meta, m, x)
    assert given > 1000


def test_linear_meta_is_the_kernels():
    given = 0
    for fin, fout, bias in ((4, 6, True), (4, 6, False), (1, 5, True), (5, 1, True)):
        for dtype in (torch.float32, torch.bfloat16):
            m = nn.Linear(fin, fout, bias=bias).to(dtype)
            for shape in ((fin,), (1, fin), (3, fin), (2, 1, fin), (2, 3, fin), (1, 1, fin),
                          (2, 3, 4, fin), (3, 5)):
                for x in _inputs(shape, dtype):
                    given += _agrees_with_kernel(_linear_meta, m, x)
    assert given > 50


class _SharedIntoALeaf(nn.Module):
    """A conv called on its own and again inside a module kept whole (whose kernel runs on
    the shape pass's meta parameters), a weight read as an attribute, a hooked linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.leaf = nn.Sequential(self.conv, nn.ReLU())
        self.other = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)
        self.fc.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        y = self.conv(x) + self.leaf(x)
        y = self.other(y) * self.other.weight.sum()
        return self.fc(y.mean((2, 3))), y.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "shufflenet_v2", "shared_into_leaf",
                                  "tiny_swin", "tiny_mobilevit", "text_classifier"])
def test_the_shape_pass_records_what_every_kernel_gives(name, monkeypatch):
    """Rules' metas, the memo and the parameters left off the meta swap (a module its rule
    answers): the shapes of running every kernel on a whole meta copy of the state."""
    torch.manual_seed(0)
    rules = None
    if name in zoo.MODELS:
        model, inputs = zoo.build(name), zoo.example_inputs(name)
    elif name == "shared_into_leaf":
        model, inputs = _SharedIntoALeaf(), (torch.randn(2, 3, 5, 5),)
        rules = default_rules().extend({nn.Sequential: lambda ctx, node: None})  # a leaf
    else:
        build, make = cm.MODELS[name]
        model, inputs = build(), make()
    traced = T.trace(model, inputs, rules)
    if name == "shared_into_leaf":  # the conv inside the leaf and the one read as an
        # attribute keep their state in the swap; the hooked linear leaves it (and its
        # kernel runs on meta copies of it)
        assert set(T._Recorder(traced.module, False, rules).deferred) == {"fc"}
    fast = {k: _sig(v) for k, v in T.propagate_shapes(traced.module, inputs, rules).items()}
    with monkeypatch.context() as m:  # memo off: every kernel runs, the whole state swapped
        m.setattr(T, "_global_hooks", lambda: True)
        assert T._Recorder(traced.module, False).deferred == {}
        every = {k: _sig(v) for k, v in T.propagate_shapes(traced.module, inputs, rules).items()}
    assert fast == every


def test_layer_norm_meta_is_the_kernels():
    given = 0
    for shape, dtype in itertools.product(((4,), (2, 3, 4), (1, 5, 5, 4), (2, 1, 3, 4)),
                                          (torch.float32, torch.bfloat16)):
        base = torch.empty(shape, dtype=dtype, device="meta")
        inputs = [base, base.float(), base.transpose(0, -1),
                  torch.empty(shape[-1], dtype=dtype, device="meta").expand(shape)]
        if base.dim() > 1:
            inputs.append(base.transpose(0, 1))
        if base.dim() == 4:  # ConvNeXt's LayerNorm2d: channels last by a permute
            inputs.append(torch.empty(shape[0], shape[3], *shape[1:3], dtype=dtype,
                                      device="meta").permute(0, 2, 3, 1))
        for x, k, affine, wrong in itertools.product(inputs, (1, 2), (True, False),
                                                     (False, True)):
            if x.dim() < k:
                continue
            norm = (7,) * k if wrong else tuple(x.shape[-k:])
            w = torch.empty(norm, dtype=dtype, device="meta") if affine else None
            for target, args, kwargs in (
                    (F.layer_norm, (x, norm, w, w, 1e-5), {}),
                    (F.layer_norm, (x, list(norm)), {"weight": w, "bias": None}),
                    (torch.layer_norm, (x, norm, None, w, 1e-5, True), {}),
                    (F.layer_norm, (x, norm), {"cudnn_enable": True})):
                try:
                    out = target(*args, **kwargs)
                    want = _sig(out), out.storage_offset(), out.requires_grad
                except Exception:  # noqa: BLE001 - the kernel refuses: so must the rule
                    want = None
                got = _layer_norm_meta(target, args, kwargs)
                if got is not None:
                    assert want == (_sig(got), got.storage_offset(), got.requires_grad), \
                        (target, x.shape, x.stride(), norm)
                    given += 1
    assert given > 100
