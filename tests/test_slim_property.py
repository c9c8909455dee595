"""Property tests: random small architectures, random keep plans, slim == mask.

Hypothesis draws an architecture spec (a sequence of blocks over a (B, C, 8, 8) map with C in
2..8: conv+BN+ReLU, residual blocks with or without projection, concats of 2-3 branches and
concats of concats, splits / chunks after concats, depthwise convs, SE gates, channel
shuffles, channel slices and pads, pooling; then a global-pool or a flatten-into-linear
head), builds it as an fx-traceable module, analyses it, draws a keep plan that respects
every group's min_width (and sometimes empties removable groups), and checks:

* the slim model equals the mask reference (relative 1e-5) on a batch-2 input;
* its parameter count is `g.cost(keep).params`, and re-analysing it gives `.macs`;
* slim leaves the original model and the analysed graph module untouched.

Plans that `g.check` rejects are discarded (`assume`). The default of 150 examples keeps the
file fast; `GRAPHSEARCH_HYPOTHESIS_EXAMPLES=3000` runs more, e.g.

    GRAPHSEARCH_HYPOTHESIS_EXAMPLES=3000 .venv/bin/python -m pytest tests/test_slim_property.py \
        --hypothesis-show-statistics
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import graphsearch
from graphsearch import PlanError
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.slim import GatherChannels, ScatterChannels, slim

EXAMPLES = int(os.environ.get("GRAPHSEARCH_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)

HW = 8

# --------------------------------------------------------------------------- specs
#
# A block spec is a plain tuple, so that a failure prints (and shrinks to) a readable model:
#   ("conv", out, k, bn)                   conv k x k (+ BN) + ReLU
#   ("dw", bn)                             depthwise 3x3 (+ BN) + ReLU
#   ("res", inner, proj)                   x (or a 1x1 projection of x to `proj`) + conv-conv
#   ("cat", branches)                      concat of branches: ("conv", out, k, bn),
#                                          ("id",) (the input itself) or ("cat", branches)
#   ("split", widths, cut, how, side)      concat of convs of `widths` (or the input itself
#                                          when empty), cut in two (chunk / split at `cut`), a
#                                          conv of width `side[1]` on piece `side[0]`, concat
#   ("se", hidden)                         x * sigmoid(fc2(relu(fc1(mean(x)))))
#   ("shuffle", width, n, how)             concat of n convs of `width`, channel shuffle
#   ("slice", start, stop)                 x[:, start:stop]
#   ("pad", lo, hi)                        F.pad on channels with zeros
#   ("pool", kind)                         2x2 max / avg pool
# The head is ("gap", classes) or ("flat", classes): global pool, or flatten(1) into linear.

widths = st.integers(1, 6)


def conv_spec():
    return st.tuples(st.just("conv"), widths, st.sampled_from([1, 3]), st.booleans())


branch = st.deferred(lambda: st.one_of(
    conv_spec(), st.just(("id",)),
    st.tuples(st.just("cat"), st.lists(conv_spec(), min_size=2, max_size=3).map(tuple)),
))


@st.composite
def block_spec(draw, channels: int, spatial: int):
    kinds = ["conv", "dw", "res", "cat", "split", "se", "shuffle", "slice", "pad"]
    if spatial >= 2:
        kinds.append("pool")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return draw(conv_spec())
    if kind == "dw":
        return ("dw", draw(st.booleans()))
    if kind == "res":
        return ("res", draw(widths), draw(st.one_of(st.none(), widths)))
    if kind == "cat":
        return ("cat", tuple(draw(st.lists(branch, min_size=2, max_size=3))))
    if kind == "split":
        ws = tuple(draw(st.lists(widths, min_size=0, max_size=3).filter(lambda w: len(w) != 1)))
        total = sum(ws) if ws else channels
        if total < 2:
            ws, total = (1, 1), 2
        how = draw(st.sampled_from(["chunk", "split", "split_method"]))
        cut = -(-total // 2) if how == "chunk" else draw(st.integers(1, total - 1))
        return ("split", ws, cut, how, (draw(st.integers(0, 1)), draw(widths)))
    if kind == "se":
        return ("se", draw(st.integers(1, 4)))
    if kind == "shuffle":
        return ("shuffle", draw(st.integers(1, 4)), draw(st.integers(2, 3)),
                draw(st.sampled_from(["channel_shuffle", "unflatten", "view"])))
    if kind == "slice":
        start = draw(st.integers(0, channels - 1))
        return ("slice", start, draw(st.integers(start + 1, channels)))
    if kind == "pad":
        return ("pad", draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    return ("pool", draw(st.sampled_from(["max", "avg"])))


@st.composite
def architectures(draw):
    """(input channels, blocks, head). Usually the first block is a stem conv to a map of
    2..8 channels: blocks straight on the model input only see unprunable channels."""
    channels = draw(st.integers(2, 8))
    spatial = HW
    blocks = []
    c = channels
    if draw(st.sampled_from([True, True, True, False])):
        blocks.append(("conv", draw(st.integers(2, 8)), draw(st.sampled_from([1, 3])),
                       draw(st.booleans())))
        c = blocks[0][1]
    for _ in range(draw(st.integers(1, 4))):
        spec = draw(block_spec(c, spatial))
        blocks.append(spec)
        c = out_channels(spec, c)
        if spec[0] == "pool":
            spatial //= 2
    head = (draw(st.sampled_from(["gap", "flat"])), draw(st.integers(1, 4)))
    return channels, tuple(blocks), head


def out_channels(spec, c: int) -> int:
    kind = spec[0]
    if kind == "conv":
        return spec[1]
    if kind in ("dw", "se", "pool"):
        return c
    if kind == "res":
        return spec[2] if spec[2] is not None else c
    if kind == "cat":
        return sum(out_channels(b, c) for b in spec[1])
    if kind == "id":
        return c
    if kind == "split":
        _, ws, cut, _, (side, w) = spec
        total = sum(ws) if ws else c
        return w + (total - cut if side == 0 else cut)
    if kind == "shuffle":
        return spec[1] * spec[2]
    if kind == "slice":
        return spec[2] - spec[1]
    if kind == "pad":
        return c + spec[1] + spec[2]
    raise ValueError(spec)


# --------------------------------------------------------------------------- modules


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, k=3, bn=True, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Identity(nn.Module):
    def forward(self, x):
        return x


class Cat(nn.Module):
    def __init__(self, cin, branches):
        super().__init__()
        self.branches = nn.ModuleList(make_block(b, cin) for b in branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class Residual(nn.Module):
    def __init__(self, cin, inner, proj):
        super().__init__()
        cout = proj if proj is not None else cin
        self.conv1 = ConvBNReLU(cin, inner, 3)
        self.conv2 = nn.Conv2d(inner, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1) if proj is not None else None

    def forward(self, x):
        short = self.proj(x) if self.proj is not None else x
        return F.relu(short + self.bn2(self.conv2(self.conv1(x))))


class Split(nn.Module):
    def __init__(self, cin, ws, cut, how, side):
        super().__init__()
        self.pre = Cat(cin, [("conv", w, 1, False) for w in ws]) if ws else Identity()
        total = sum(ws) if ws else cin
        self.sizes = [cut, total - cut]
        self.how, self.side = how, side[0]
        self.conv = ConvBNReLU(self.sizes[self.side], side[1], 1)

    def forward(self, x):
        y = self.pre(x)
        if self.how == "chunk":
            u, v = y.chunk(2, 1)
        elif self.how == "split":
            u, v = torch.split(y, self.sizes, dim=1)
        else:
            u, v = y.split(self.sizes[0], 1) if self.sizes[0] >= self.sizes[1] else \
                y.split(self.sizes, 1)
        if self.side == 0:
            return torch.cat([self.conv(u), v], 1)
        return torch.cat([u, self.conv(v)], 1)


class SE(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Shuffle(nn.Module):
    def __init__(self, cin, width, n, how):
        super().__init__()
        self.pre = Cat(cin, [("conv", width, 1, True)] * n)
        self.width, self.n, self.how = width, n, how

    def forward(self, x):
        y = self.pre(x)
        if self.how == "channel_shuffle":
            return torch.channel_shuffle(y, self.n)
        if self.how == "unflatten":
            return y.unflatten(1, (self.n, self.width)).transpose(1, 2).flatten(1, 2)
        b, _, h, w = y.shape
        return y.view(b, self.n, self.width, h, w).transpose(1, 2).reshape(b, -1, h, w)


class Slice(nn.Module):
    def __init__(self, start, stop):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return x[:, self.start:self.stop]


class Pad(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, self.lo, self.hi))


class Pool(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)


def make_block(spec, cin: int) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        return ConvBNReLU(cin, spec[1], spec[2], spec[3])
    if kind == "dw":
        return ConvBNReLU(cin, cin, 3, spec[1], groups=cin)
    if kind == "res":
        return Residual(cin, spec[1], spec[2])
    if kind == "cat":
        return Cat(cin, spec[1])
    if kind == "id":
        return Identity()
    if kind == "split":
        return Split(cin, *spec[1:])
    if kind == "se":
        return SE(cin, spec[1])
    if kind == "shuffle":
        return Shuffle(cin, *spec[1:])
    if kind == "slice":
        return Slice(spec[1], spec[2])
    if kind == "pad":
        return Pad(spec[1], spec[2])
    if kind == "pool":
        return Pool(spec[1])
    raise ValueError(spec)


class Net(nn.Module):
    def __init__(self, channels, blocks, head):
        super().__init__()
        layers, c, spatial = [], channels, HW
        for spec in blocks:
            layers.append(make_block(spec, c))
            c = out_channels(spec, c)
            spatial = spatial // 2 if spec[0] == "pool" else spatial
        self.blocks = nn.ModuleList(layers)
        self.flat = head[0] == "flat"
        self.fc = nn.Linear(c * (spatial * spatial if self.flat else 1), head[1])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if not self.flat:
            x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def build(arch, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Net(*arch)
        for m in model.modules():  # BN with non-trivial statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    return model.eval()


# --------------------------------------------------------------------------- plans


@st.composite
def keep_plans(draw, g):
    """Per prunable group: a proper random subset (the most likely), all, or (removable
    groups only) nothing."""
    keep = {}
    for grp in g.prunable_groups:
        mode = draw(st.sampled_from(["subset", "subset", "subset", "all", "empty"]))
        if mode == "all" or (mode == "subset" and grp.size == 1):
            continue
        if mode == "empty":
            if grp.removable:
                keep[grp.id] = []
            continue
        n = draw(st.integers(max(1, grp.min_width), grp.size - 1))
        kept = draw(st.lists(st.integers(0, grp.size - 1), min_size=n, max_size=n, unique=True))
        keep[grp.id] = sorted(kept)
    return keep


def state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@SETTINGS
@given(arch=architectures(), data=st.data())
def test_slim_equals_mask(arch, data):
    model = build(arch)
    channels = arch[0]
    x1 = torch.randn(1, channels, HW, HW, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(2, channels, HW, HW, generator=torch.Generator().manual_seed(2))
    g = graphsearch.analyze(model, (x1,))
    keep = data.draw(keep_plans(g), label="keep")
    try:
        g.check(keep)
    except PlanError:
        assume(False)
    before, before_gm, code = state(model), state(g.module), g.module.code
    note(f"groups: {[(grp.id, grp.size, grp.removable, grp.members) for grp in g.groups]}")
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (x2,))
    assert v.ok, v.message
    cost = g.cost(keep)
    assert sum(p.numel() for p in s.parameters()) == cost.params
    assert graphsearch.analyze(s, (x1,)).cost().macs == cost.macs
    assert same_state(before, state(model)), "slim modified the original model"
    assert same_state(before_gm, state(g.module)), "slim modified the analysed graph module"
    assert g.module.code == code
    # What the example exercised (shown by --hypothesis-show-statistics).
    event("prunable groups", str(min(len(g.prunable_groups), 5)))
    event("plan", "changes nothing" if not any(len(k) < g.groups[i].size for i, k in keep.items())
          else "removes nodes" if g.removal(keep).dead else "narrows only")
    if any(isinstance(m, (GatherChannels, ScatterChannels))
           for m in s.modules()):
        event("full layout (scatter/gather)")


@settings(SETTINGS, max_examples=max(10, EXAMPLES // 5))
@given(arch=architectures())
def test_identity_plan_is_exact(arch):
    model = build(arch)
    x = torch.randn(2, arch[0], HW, HW, generator=torch.Generator().manual_seed(3))
    g = graphsearch.analyze(model, (x[:1],))
    with torch.no_grad():
        assert torch.equal(slim(g, {})(x), model(x))
