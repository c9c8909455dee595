"""The slim pass against its mask reference.

Two halves:

* every zoo model under seeded random keep plans: the slim model equals the mask reference
  (relative 1e-5), has exactly `g.cost(keep).params` parameters, re-analysing it gives
  `g.cost(keep).macs`, and the identity plan reproduces the original bit for bit;
* one tiny model per pattern the pass rewrites (removed residual / concat branches, grouped
  convs, flatten into linear, shuffles, splits, slices, pads, gates, norms, attention,
  transposed and 1-d / 3-d convs), plus invalid plans.

Analysis runs on batch-1 inputs; the small models are verified on batch 2 so that nothing
the pass rewrites silently bakes in the batch size.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphsearch
from graphsearch import PlanError, zoo
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.slim import GatherChannels, ScatterChannels, slim

import coverage_models as cm

# --------------------------------------------------------------------------- helpers


def nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k


def group(g, member: str):
    """The single group that lists `member` (e.g. 'conv1.weight[out]')."""
    hits = [grp for grp in g.groups if member in grp.members]
    assert len(hits) == 1, (member, [grp.members for grp in g.groups])
    return hits[0]


def gid(g, member: str) -> int:
    return group(g, member).id


def reanalyzed_macs(module: nn.Module, inputs) -> int:
    return graphsearch.analyze(module, tuple(inputs)).cost().macs


def check_plan(model: nn.Module, shape: tuple, keep: dict, *, batch: int = 2, macs: bool = True):
    """Analyse `model` on a batch-1 input of `shape`, slim with `keep`, and check the
    contract: slim == mask on a batch-`batch` input, params and MACs equal the cost model,
    the original model and its graph module are untouched. Returns (graph, slim module)."""
    model = model.eval()
    x1 = torch.randn(1, *shape)
    g = graphsearch.analyze(model, (x1,))
    before, before_gm = snapshot(model), snapshot(g.module)
    s = slim(g, keep)
    x = torch.randn(batch, *shape)
    v = verify(s, mask(g, keep), (x,))
    assert v.ok, v.message
    cost = g.cost(keep)
    assert nparams(s) == cost.params
    if macs:
        assert reanalyzed_macs(s, (x1,)) == cost.macs
    assert_same_state(before, model)
    assert_same_state(before_gm, g.module)
    return g, s


def module_targets(gm: fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def random_keep(g, rng: random.Random, zero_removable: bool = False, tries: int = 50) -> dict:
    """A random subset of every prunable group (sizes in [max(1, min_width), size]); with
    `zero_removable`, some removable groups keep nothing. Redrawn until `g.check` accepts."""
    removable = [grp.id for grp in g.prunable_groups if grp.removable]
    for _ in range(tries):
        keep = {}
        for grp in g.prunable_groups:
            n = rng.randint(max(1, grp.min_width), grp.size)
            keep[grp.id] = sorted(rng.sample(range(grp.size), n))
        if zero_removable:
            for k in rng.sample(removable, max(1, len(removable) // 3)):
                keep[k] = []
        try:
            g.check(keep)
        except PlanError:
            continue
        return keep
    raise AssertionError(f"no valid random plan in {tries} tries")


# --------------------------------------------------------------------------- zoo

BIG = {name for name, e in zoo.MODELS.items() if e.input_shape[-1] > 64}
ZOO = list(zoo.MODELS)
PLANS = {name: ("random", "zero") if name in BIG else ("random", "random2", "zero")
         for name in ZOO}
CASES = [(name, plan) for name in ZOO for plan in PLANS[name]]
# Re-analysing a slim model with a pruned nn.MultiheadAttention: see test_reanalyze_pruned_mha.

@pytest.fixture(scope="module")
def zoo_cache():
    return {}


def zoo_entry(cache, name):
    """(model, graph, state before slim, analysis input, verification input), analysed once."""
    if name not in cache:
        model = zoo.build(name)
        x1 = zoo.example_inputs(name, batch_size=1)
        g = graphsearch.analyze(model, x1)
        xv = x1 if name in BIG else zoo.example_inputs(name, batch_size=2, seed=1)
        cache[name] = {"model": model, "graph": g, "state": snapshot(model), "x1": x1, "xv": xv,
                       "slim": {}}
    return cache[name]


def zoo_slim(cache, name, plan):
    e = zoo_entry(cache, name)
    if plan not in e["slim"]:
        seed = sum(map(ord, name)) * 10 + PLANS[name].index(plan)
        keep = random_keep(e["graph"], random.Random(seed), zero_removable=plan == "zero")
        e["slim"][plan] = (keep, slim(e["graph"], keep))
    return e, *e["slim"][plan]


@pytest.mark.parametrize("name,plan", CASES)
def test_zoo_random_plan(zoo_cache, name, plan):
    e, keep, s = zoo_slim(zoo_cache, name, plan)
    g = e["graph"]
    assert any(len(v) < g.groups[k].size for k, v in keep.items())
    if plan == "zero":
        assert any(len(v) == 0 for v in keep.values())
        assert g.removal(keep).dead
    v = verify(s, mask(g, keep), e["xv"])
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params
    assert_same_state(e["state"], e["model"])


@pytest.mark.parametrize("name,plan", CASES)
def test_zoo_reanalyzed_macs(zoo_cache, name, plan):
    e, keep, s = zoo_slim(zoo_cache, name, plan)
    assert reanalyzed_macs(s, e["x1"]) == e["graph"].cost(keep).macs


@pytest.mark.parametrize("name", ZOO)
def test_zoo_identity_plan(zoo_cache, name):
    e = zoo_entry(zoo_cache, name)
    s = slim(e["graph"], {})
    with torch.no_grad():
        want = e["model"](*e["x1"])
        got = s(*e["x1"])
    assert torch.equal(got, want)
    assert nparams(s) == nparams(e["model"]) == e["graph"].baseline.params
    assert_same_state(e["state"], e["model"])


# --------------------------------------------------------------------------- tiny models


def conv(cin, cout, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


class Head(nn.Module):
    def __init__(self, c, n=3):
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 6)
        self.bn = nn.BatchNorm2d(6)
        self.conv1 = conv(6, 4)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = conv(4, 6)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = Head(6)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(x + y))


def test_residual_branch_removed():
    g0 = graphsearch.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))
    inner = group(g0, "conv1.weight[out]")
    assert inner.removable
    g, s = check_plan(Residual(), (3, 8, 8), {inner.id: []})
    targets = module_targets(s)
    assert not {"conv1", "bn1", "conv2", "bn2"} & targets
    assert not any(n.op == "call_function" and n.target is torch.add for n in s.graph.nodes)
    assert not hasattr(s, "conv1")
    # The stem channels can still be pruned together with the emptied branch.
    check_plan(Residual(), (3, 8, 8), {inner.id: [], gid(g, "stem.weight[out]"): [1, 2, 5]})


def test_residual_branch_partially_pruned():
    g = graphsearch.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))
    _, s = check_plan(Residual(), (3, 8, 8),
                      {gid(g, "conv1.weight[out]"): [3], gid(g, "stem.weight[out]"): [0, 4]})
    assert s.conv1.out_channels == 1 and s.conv2.in_channels == 1
    assert s.stem.out_channels == 2 and s.conv2.out_channels == 2 and s.head.fc.in_features == 2


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 5)
        self.b1 = conv(5, 4, 1)
        self.b2a = conv(5, 3, 1)
        self.b2b = conv(3, 6)
        self.b3 = conv(5, 2, 1)
        self.post = conv(12, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b2b(F.relu(self.b2a(x))), F.max_pool2d(self.b3(x), 1)], 1)
        return self.head(self.post(F.relu(y)))


def test_concat_branch_removed():
    g0 = graphsearch.analyze(Inception().eval(), (torch.randn(1, 3, 8, 8),))
    first = group(g0, "b2a.weight[out]")
    assert first.removable
    g, s = check_plan(Inception(), (3, 8, 8), {first.id: []})
    assert not {"b2a", "b2b"} & module_targets(s)
    cat = next(n for n in s.graph.nodes if n.target is torch.cat)
    assert len(cat.args[0]) == 2
    assert s.post.in_channels == 6  # 4 from b1, 2 from b3
    # b2b's output group went with its branch.
    assert gid(g, "b2b.weight[out]") in g.removal({first.id: []}).zero_groups


def test_concat_branch_removed_and_others_pruned():
    g = graphsearch.analyze(Inception().eval(), (torch.randn(1, 3, 8, 8),))
    keep = {gid(g, "b3.weight[out]"): [], gid(g, "b2b.weight[out]"): [0, 5],
            gid(g, "b1.weight[out]"): [1, 2, 3], gid(g, "stem.weight[out]"): [0, 2, 4]}
    _, s = check_plan(Inception(), (3, 8, 8), keep)
    assert "b3" not in module_targets(s)
    assert s.post.in_channels == 5


class ConcatThenResidual(nn.Module):
    """Two concat branches whose concat is the stream of a residual block: the block's
    second conv also produces every concat channel, so removing branch b (b1 keeps
    nothing) leaves its channels in place, as zeros."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 4, 1)
        self.a = conv(4, 3, 1)
        self.b1 = conv(4, 2, 1)
        self.b2 = conv(2, 3, 1)
        self.r1 = conv(6, 2, 1)
        self.r2 = conv(2, 6, 1)
        self.head = Head(6)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b2(F.relu(self.b1(x)))], 1)
        return self.head(y + self.r2(F.relu(self.r1(y))))


def test_concat_branch_removed_under_a_residual_add():
    # Regression: slim dropped the removed operand from the concat, so the concat lost 3
    # channels that r1, r2, the add and the head still had (the model did not run, the
    # cost model accepted the plan). They stay, as zeros, exactly as in the mask reference.
    g = graphsearch.analyze(ConcatThenResidual().eval(), (torch.randn(1, 3, 8, 8),))
    b1, cat = group(g, "b1.weight[out]"), group(g, "a.weight[out]")
    assert b1.removable and not cat.removable
    _, s = check_plan(ConcatThenResidual(), (3, 8, 8), {b1.id: []})
    assert not {"b1", "b2"} & module_targets(s)
    assert s.r1.in_channels == 6 and s.r2.out_channels == 6 and s.head.fc.in_features == 6
    # ...together with pruning the concat's channels: the zeros keep only the kept ones
    # of the removed branch (concat channels 3, 4, 5 -> 4 kept).
    _, s = check_plan(ConcatThenResidual(), (3, 8, 8), {b1.id: [], cat.id: [0, 2, 4]})
    assert s.r1.in_channels == 3 and s.head.fc.in_features == 3
    zeros = [m for n, m in s.named_children() if n.startswith("slim_zeros")]
    assert [z.size for z in zeros] == [1]
    # ...and when the plan drops every channel of the removed branch, it leaves the concat.
    _, s = check_plan(ConcatThenResidual(), (3, 8, 8), {b1.id: [], cat.id: [0, 2]})
    assert not [n for n, _ in s.named_children() if n.startswith("slim_zeros")]
    assert s.r1.in_channels == 2


class BranchesThenMix(nn.Module):
    """Concat of a plain conv and a two-conv branch, then an op that ties the concat's
    channels to new ones: a depthwise conv, or an SE gate whose fc2 produces a channel for
    every concat channel. Removing the two-conv branch (its first conv keeps nothing)
    orphans the second conv's channels inside the merged group."""

    def __init__(self, after):
        super().__init__()
        self.after = after
        self.stem = conv(3, 4, 1)
        self.a = conv(4, 2, 1)
        self.b1 = conv(4, 2, 1)
        self.b2 = conv(2, 3, 1)
        self.dw = conv(5, 5, 3, groups=5)
        self.fc1 = nn.Conv2d(5, 1, 1)
        self.fc2 = nn.Conv2d(1, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b2(F.relu(self.b1(x)))], 1)
        if self.after == "dw":
            y = self.dw(y)
        else:
            y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.fc(y.mean((2, 3)))


def test_orphaned_channels_with_index_lists():
    g = graphsearch.analyze(BranchesThenMix("dw").eval(), (torch.randn(1, 3, 8, 8),))
    b1, stem = group(g, "b1.weight[out]"), group(g, "stem.weight[out]")
    # With another index list in the plan, the cost is exact: b2's 3 channels go with it.
    _, s = check_plan(BranchesThenMix("dw"), (3, 8, 8), {b1.id: [], stem.id: [0, 1, 2, 3]})
    assert s.dw.groups == 2 and s.fc.in_features == 2 and nparams(s) == 52


def test_orphaned_channels_with_only_empty_lists():
    # Regression (found by the hypothesis run): a plan of only empty lists was costed through
    # the counts path, which spreads the orphaned channels evenly: 46 params, not 52.
    g = graphsearch.analyze(BranchesThenMix("dw").eval(), (torch.randn(1, 3, 8, 8),))
    b1 = group(g, "b1.weight[out]")
    _, s = check_plan(BranchesThenMix("dw"), (3, 8, 8), {b1.id: []})
    assert nparams(s) == 52


def test_removed_branch_under_se_gate():
    # Regression (found by the hypothesis run): the gate's fc2 counted as a second producer
    # of the removed branch's channels, so they were not dropped; slim's concat lost them
    # but fc1/fc2/fc kept them and the slimmed model did not run.
    g = graphsearch.analyze(BranchesThenMix("se").eval(), (torch.randn(1, 3, 8, 8),))
    b1 = group(g, "b1.weight[out]")
    g.check({b1.id: []})
    _, s = check_plan(BranchesThenMix("se"), (3, 8, 8), {b1.id: []})
    assert s.fc1.in_channels == 2 and s.fc2.out_channels == 2 and nparams(s) == 39


class GatedUnit(nn.Module):
    """A gated linear unit beside a removable residual branch: both factors of the product
    are full-size producers, so neither is a gate that the orphan rule may ignore."""

    def __init__(self):
        super().__init__()
        self.a = conv(3, 4, 1)
        self.b = conv(3, 4, 1)
        self.r1 = conv(4, 3, 1)
        self.r2 = conv(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x) * torch.sigmoid(self.b(x))
        y = y + self.r2(F.relu(self.r1(y)))
        return self.fc(y.mean((2, 3)))


def test_gated_linear_unit_is_not_a_gate():
    g = graphsearch.analyze(GatedUnit().eval(), (torch.randn(1, 3, 8, 8),))
    from graphsearch.build import gate_producers

    assert gate_producers(g.nodes, g.values, [i.name for i in g.nodes]) == set()
    r1 = group(g, "r1.weight[out]")
    _, s = check_plan(GatedUnit(), (3, 8, 8), {r1.id: []})  # the residual branch goes
    assert s.a.out_channels == s.b.out_channels == 4 and s.fc.in_features == 4


class Grouped(nn.Module):
    def __init__(self, groups=None, cout=8):
        super().__init__()
        self.c1 = conv(3, 8, 1)
        self.dw = conv(8, 8, 3, groups=8)
        self.gc = conv(8, cout, 3, groups=groups) if groups else nn.Identity()
        self.c2 = conv(cout, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.gc(F.relu(self.dw(F.relu(self.c1(x))))))))


def test_depthwise_conv_groups_updated():
    g = graphsearch.analyze(Grouped().eval(), (torch.randn(1, 3, 8, 8),))
    a = group(g, "c1.weight[out]")
    assert "dw.weight[out]" in a.members and "c2.weight[in]" in a.members
    _, s = check_plan(Grouped(), (3, 8, 8), {a.id: [0, 2, 3, 7]})
    assert (s.dw.in_channels, s.dw.out_channels, s.dw.groups) == (4, 4, 4)
    assert s.dw.weight.shape == (4, 1, 3, 3) and s.c2.in_channels == 4


@pytest.mark.parametrize("groups,cout,keep,want", [
    (2, 8, [1], (4, 4, 1)),
    (4, 8, [0, 3], (4, 4, 2)),
    (4, 12, [1, 2, 3], (6, 9, 3)),
    (2, 4, [0], (4, 2, 1)),
])
def test_grouped_conv_whole_conv_groups(groups, cout, keep, want):
    """A grouped conv prunes whole conv groups: input block k and output block k together."""
    g = graphsearch.analyze(Grouped(groups, cout).eval(), (torch.randn(1, 3, 8, 8),))
    a = group(g, f"c1.weight[out] x{8 // groups}")
    assert a.size == groups and f"gc.weight[out] x{cout // groups}" in a.members
    _, s = check_plan(Grouped(groups, cout), (3, 8, 8), {a.id: keep})
    assert (s.gc.in_channels, s.gc.out_channels, s.gc.groups) == want
    assert s.dw.groups == want[0]


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv(3, 4)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 16, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(F.relu(self.c(x))), 1))))


def test_flatten_into_linear_columns_sliced():
    g = graphsearch.analyze(FlattenLinear().eval(), (torch.randn(1, 3, 8, 8),))
    c, h = group(g, "c.weight[out]"), group(g, "fc1.weight[out]")
    assert "fc1.weight[in] x16" in c.members
    model = FlattenLinear()
    _, s = check_plan(model, (3, 8, 8), {c.id: [0, 3], h.id: [1, 2, 5]})
    assert s.fc1.weight.shape == (3, 32) and s.fc1.in_features == 32
    cols = torch.cat([torch.arange(0, 16), torch.arange(48, 64)])
    assert torch.equal(s.fc1.weight, model.fc1.weight[[1, 2, 5]][:, cols])


class Shuffle(nn.Module):
    """ShuffleNet-style: two branches, concat, channel shuffle of two halves, then a conv."""

    def __init__(self, how="view"):
        super().__init__()
        self.how = how
        self.stem = conv(3, 4, 1)
        self.a = conv(4, 4, 1)
        self.b = conv(4, 4, 1)
        self.post = conv(8, 3, 1)
        self.head = Head(3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.how == "view":
            y = y.view(y.shape[0], 2, 4, 8, 8).transpose(1, 2).reshape(y.shape[0], 8, 8, 8)
        else:
            y = torch.channel_shuffle(y, 2)
        return self.head(self.post(F.relu(y)))


@pytest.mark.parametrize("how", ["view", "channel_shuffle"])
def test_channel_shuffle_unequal_halves(how):
    g = graphsearch.analyze(Shuffle(how).eval(), (torch.randn(1, 3, 8, 8),))
    a, b = group(g, "a.weight[out]"), group(g, "b.weight[out]")
    keep = {a.id: [0, 1, 3], b.id: [2]}
    _, s = check_plan(Shuffle(how), (3, 8, 8), keep)
    kinds = {type(m) for m in s.modules()}
    assert ScatterChannels in kinds and GatherChannels in kinds
    assert s.post.in_channels == 4
    # Equal halves need no full layout.
    _, s = check_plan(Shuffle(how), (3, 8, 8), {a.id: [0, 3], b.id: [1, 2]})
    assert s.post.in_channels == 4


class SplitAfterCat(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = conv(3, 4, 1)
        self.b = conv(3, 6, 1)
        self.p = conv(5, 2, 1)
        self.q = conv(5, 2, 1)
        self.head = Head(2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.how == "chunk":
            u, v = y.chunk(2, 1)
        elif self.how == "split":
            u, v = torch.split(y, [5, 5], dim=1)
        else:
            u, v = y.split(5, 1)
        return self.head(self.p(u) + self.q(v))


@pytest.mark.parametrize("how", ["chunk", "split", "split_method"])
def test_split_after_concat(how):
    g = graphsearch.analyze(SplitAfterCat(how).eval(), (torch.randn(1, 3, 8, 8),))
    a, b = group(g, "a.weight[out]"), group(g, "b.weight[out]")
    # The boundary at 5 falls inside b: piece one keeps a's 0, 2 and b's 0; piece two the rest.
    _, s = check_plan(SplitAfterCat(how), (3, 8, 8), {a.id: [0, 2], b.id: [0, 3, 5]})
    assert (s.p.in_channels, s.q.in_channels) == (3, 2)
    _, s = check_plan(SplitAfterCat(how), (3, 8, 8), {a.id: [1], b.id: [1, 2, 3, 4, 5]})
    assert (s.p.in_channels, s.q.in_channels) == (1, 5)


class Slice(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = conv(3, 8, 1)
        self.b = conv(4, 2, 1)
        self.c = conv(8, 2, 1)
        self.head = Head(2)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.how == "getitem":
            part = y[:, 2:6]
        elif self.how == "ellipsis":
            part = y[..., 2:6, :, :]
        else:
            part = y.narrow(1, 2, 4)
        return self.head(self.b(part) + self.c(y))


@pytest.mark.parametrize("how", ["getitem", "ellipsis", "narrow"])
def test_slice_on_channels(how):
    g = graphsearch.analyze(Slice(how).eval(), (torch.randn(1, 3, 8, 8),))
    a = group(g, "a.weight[out]")
    _, s = check_plan(Slice(how), (3, 8, 8), {a.id: [0, 3, 5, 7]})
    assert s.b.in_channels == 2 and s.c.in_channels == 4
    _, s = check_plan(Slice(how), (3, 8, 8), {a.id: [0, 1, 2, 6]})
    assert s.b.in_channels == 1 and s.c.in_channels == 4
    # The slice keeps nothing: it empties, and b goes with it (the add returns c's output).
    _, s = check_plan(Slice(how), (3, 8, 8), {a.id: [0, 1, 6]})
    assert "b" not in module_targets(s) and s.c.in_channels == 3


class ChannelPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4, 1)
        self.b = conv(7, 2, 1)
        self.head = Head(2)

    def forward(self, x):
        return self.head(self.b(F.pad(F.relu(self.a(x)), (1, 1, 0, 0, 1, 2))))


def test_pad_on_channels():
    g = graphsearch.analyze(ChannelPad().eval(), (torch.randn(1, 3, 8, 8),))
    a = group(g, "a.weight[out]")
    _, s = check_plan(ChannelPad(), (3, 8, 8), {a.id: [1, 3]})
    assert s.b.in_channels == 5


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv(3, 8)
        self.fc1 = nn.Conv2d(8, 3, 1)
        self.fc2 = nn.Conv2d(3, 8, 1)
        self.lin1 = nn.Linear(8, 4)
        self.lin2 = nn.Linear(4, 8)
        self.head = Head(8)

    def forward(self, x):
        x = F.relu(self.c(x))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        s = torch.sigmoid(self.lin2(F.relu(self.lin1(x.mean((2, 3))))))
        x = x * s.view(s.shape[0], 8, 1, 1)
        return self.head(x)


def test_se_gate():
    g = graphsearch.analyze(SE().eval(), (torch.randn(1, 3, 8, 8),))
    c, r1, r2 = group(g, "c.weight[out]"), group(g, "fc1.weight[out]"), \
        group(g, "lin1.weight[out]")
    assert "fc2.weight[out]" in c.members and "lin2.weight[out]" in c.members
    _, s = check_plan(SE(), (3, 8, 8), {c.id: [0, 1, 5], r1.id: [2], r2.id: [0, 3]})
    assert s.fc2.out_channels == 3 and s.lin2.out_features == 3 and s.fc1.out_channels == 1


class Tokens(nn.Module):
    """(B, N, C) tokens: linear, LayerNorm over C, residual MLP, LayerNorm without affine
    parameters, linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.norm2 = nn.LayerNorm(8, elementwise_affine=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(self.norm2(x).mean(1))


def test_layer_norm_over_pruned_dim():
    g = graphsearch.analyze(Tokens().eval(), (torch.randn(1, 5, 6),))
    e, h = group(g, "embed.weight[out]"), group(g, "fc1.weight[out]")
    keep = {e.id: [0, 2, 3, 6, 7], h.id: [1, 4, 5, 9]}
    model = Tokens().eval()
    g, s = check_plan(model, (5, 6), keep)
    assert s.norm.normalized_shape == (5,) and s.norm2.normalized_shape == (5,)
    # The reference normalises over the kept channels only: it is not the zero-masked
    # original (whose statistics would count the zeros).
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        t = model.embed(x) * torch.tensor([1., 0, 1, 1, 0, 0, 1, 1])
        naive = model.head(model.norm2(t + model.fc2(F.gelu(model.fc1(model.norm(t))))).mean(1))
        assert not torch.allclose(naive, mask(g, keep)(x), rtol=1e-3)


class FunctionalLayerNorm(nn.Module):
    def __init__(self, affine):
        super().__init__()
        self.affine = affine
        self.embed = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        x = F.layer_norm(x, (8,), self.w, self.b) if self.affine else F.layer_norm(x, (8,))
        return self.head(x)


@pytest.mark.parametrize("affine", [False, True])
def test_functional_layer_norm_over_pruned_dim(affine):
    # Regression: slim left F.layer_norm's literal normalized_shape at the old width.
    g = graphsearch.analyze(FunctionalLayerNorm(affine).eval(), (torch.randn(1, 5, 6),))
    e = group(g, "embed.weight[out]")
    check_plan(FunctionalLayerNorm(affine), (5, 6), {e.id: [0, 2, 5]})


class FunctionalGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = conv(3, 8, 1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8))
        self.head = Head(8)

    def forward(self, x):
        return self.head(F.relu(F.group_norm(self.c1(x), 4, self.w, self.b)))


def test_functional_group_norm_over_pruned_channels():
    # F.group_norm's literal num_groups follows the kept norm groups (4 groups of 2 -> 2).
    g = graphsearch.analyze(FunctionalGroupNorm().eval(), (torch.randn(1, 3, 8, 8),))
    (a,) = [grp for grp in g.prunable_groups if "c1.weight[out] x2" in grp.members]
    assert a.size == 4
    _, s = check_plan(FunctionalGroupNorm(), (3, 8, 8), {a.id: [1, 3]})
    assert s.c1.out_channels == 4


class MHA(nn.Module):
    def __init__(self, batch_first, dim=12, heads=3):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(5, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):  # x: (B, N, 5)
        t = self.embed(x)
        if not self.batch_first:
            t = t.transpose(0, 1)
        y = t + self.attn(t, t, t, need_weights=False)[0]
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_and_embed_pruned(batch_first):
    g = graphsearch.analyze(MHA(batch_first).eval(), (torch.randn(1, 6, 5),))
    e = group(g, "embed.weight[out]")
    heads = group(g, "attn.in_proj_weight[out] x12")
    assert heads.size == 3 and heads.removable
    _, s = check_plan(MHA(batch_first), (6, 5), {e.id: [0, 3, 4, 8, 11], heads.id: [0, 2]})
    assert s.attn.num_heads == 2 and s.attn.in_proj_weight.shape == (24, 5)
    # All heads gone: the attention goes, the residual add returns its other operand.
    _, s = check_plan(MHA(batch_first), (6, 5), {e.id: [1, 2, 7], heads.id: []})
    assert "attn" not in module_targets(s)


def test_multihead_attention_heads_only():
    # Regression: with only heads pruned (no width around the attention changing) slim left
    # nn.MultiheadAttention in place with a sliced in_proj_weight; the model did not run.
    g = graphsearch.analyze(MHA(True).eval(), (torch.randn(1, 6, 5),))
    heads = group(g, "attn.in_proj_weight[out] x12")
    check_plan(MHA(True), (6, 5), {heads.id: [0, 2]})


def test_reanalyze_pruned_mha():
    # Regression: PrunedMultiheadAttention had no rule, so re-analysing a slim ViT missed
    # every attention MAC and made the embedding unprunable.
    g = graphsearch.analyze(MHA(True).eval(), (torch.randn(1, 6, 5),))
    keep = {group(g, "embed.weight[out]").id: [0, 1, 2, 3],
            group(g, "attn.in_proj_weight[out] x12").id: [1, 2]}
    s = slim(g, keep)
    g2 = graphsearch.analyze(s, (torch.randn(1, 6, 5),))
    assert [n.name for n in g2.nodes if n.rule == "unsupported"] == []
    assert g2.cost().macs == g.cost(keep).macs


def test_sdpa_heads_pruned():
    from graphsearch.zoo.vit import SelfAttention

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 12)
            self.attn = SelfAttention(12, 3)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            t = self.embed(x)
            return self.head((t + self.attn(t)).mean(1))

    g = graphsearch.analyze(M().eval(), (torch.randn(1, 5, 4),))
    e = group(g, "embed.weight[out]")
    heads = [grp for grp in g.prunable_groups if grp.size == 3]
    assert len(heads) == 1
    _, s = check_plan(M(), (5, 4), {e.id: [0, 5, 6, 11], heads[0].id: [1]})
    assert s.attn.qkv.out_features == 12 and s.attn.proj.in_features == 4
    assert s.attn.proj.out_features == 4
    _, s = check_plan(M(), (5, 4), {heads[0].id: [0, 2]})
    assert s.attn.qkv.out_features == 24


class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv(3, 8)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = conv(8, 2)
        self.head = Head(2)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.gn(self.c(x)))))


def test_group_norm_whole_groups():
    g = graphsearch.analyze(GN().eval(), (torch.randn(1, 3, 8, 8),))
    c = group(g, "c.weight[out] x2")
    assert c.size == 4  # one channel class per norm group of two
    assert "gn.weight x2" in c.members
    _, s = check_plan(GN(), (3, 8, 8), {c.id: [0, 3]})
    assert s.gn.num_groups == 2 and s.gn.num_channels == 4 and s.c.out_channels == 4


class Transposed(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.c = conv(3, 6)
        self.up = nn.ConvTranspose2d(6, 8, 2, stride=2, groups=groups)
        self.c2 = conv(8, 2)
        self.head = Head(2)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.up(F.relu(self.c(x))))))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose(groups):
    g = graphsearch.analyze(Transposed(groups).eval(), (torch.randn(1, 3, 8, 8),))
    if groups == 1:
        c, u = group(g, "c.weight[out]"), group(g, "up.weight[out]")
        _, s = check_plan(Transposed(groups), (3, 8, 8), {c.id: [0, 4], u.id: [1, 2, 7]})
        assert (s.up.in_channels, s.up.out_channels, s.up.groups) == (2, 3, 1)
        assert s.c2.in_channels == 3
    else:  # conv groups: 3 inputs and 4 outputs go together
        c = group(g, "c.weight[out] x3")
        assert "up.weight[in] x3" in c.members and "c2.weight[in] x4" in c.members
        _, s = check_plan(Transposed(groups), (3, 8, 8), {c.id: [1]})
        assert (s.up.in_channels, s.up.out_channels, s.up.groups) == (3, 4, 1)
        assert s.c2.in_channels == 4


def test_grouped_conv_transpose_macs():
    # Regression: a grouped ConvTranspose counted in/groups per input channel, not out/groups.
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)).eval()
    g = graphsearch.analyze(m, (torch.randn(1, 4, 4, 4),))
    # 16 input positions x 4 inputs x 3 outputs per group x 4 kernel taps.
    assert g.baseline.macs == 16 * 4 * 3 * 4


class Conv1d3d(nn.Module):
    def __init__(self, nd):
        super().__init__()
        Conv, BN = (nn.Conv1d, nn.BatchNorm1d) if nd == 1 else (nn.Conv3d, nn.BatchNorm3d)
        self.nd = nd
        self.c1 = Conv(3, 6, 3, padding=1)
        self.bn = BN(6)
        self.dw = Conv(6, 6, 3, padding=1, groups=6)
        self.c2 = Conv(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.c2(F.relu(self.dw(F.relu(self.bn(self.c1(x))))))
        return self.fc(y.flatten(2).mean(-1))


@pytest.mark.parametrize("nd,shape", [(1, (3, 10)), (3, (3, 4, 4, 4))])
def test_conv1d_conv3d(nd, shape):
    g = graphsearch.analyze(Conv1d3d(nd).eval(), (torch.randn(1, *shape),))
    a, b = group(g, "c1.weight[out]"), group(g, "c2.weight[out]")
    _, s = check_plan(Conv1d3d(nd), shape, {a.id: [1, 2, 5], b.id: [3]})
    assert s.dw.groups == 3 and s.bn.num_features == 3 and s.fc.in_features == 1


def test_original_untouched_and_slim_independent():
    model = Inception().eval()
    g = graphsearch.analyze(model, (torch.randn(1, 3, 8, 8),))
    before = snapshot(model)
    code = g.module.code
    keep = {gid(g, "b1.weight[out]"): [0], gid(g, "b2a.weight[out]"): []}
    s = slim(g, keep)
    assert_same_state(before, model)
    assert g.module.code == code and hasattr(g.module, "b2a")
    # The slim model owns its tensors: training it leaves the original alone.
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    assert_same_state(before, model)
    # The same graph slims again to the same result.
    x = torch.randn(2, 3, 8, 8)
    assert verify(slim(g, keep), mask(g, keep), (x,)).ok


# --------------------------------------------------------------------------- invalid plans


@pytest.fixture
def residual_graph():
    return graphsearch.analyze(Residual().eval(), (torch.randn(1, 3, 8, 8),))


def test_plan_error_unprunable_group(residual_graph):
    g = residual_graph
    fixed = next(grp for grp in g.groups if not grp.prunable)
    with pytest.raises(PlanError, match=rf"group {fixed.id} is not prunable: .+"):
        slim(g, {fixed.id: [0]})


def test_plan_error_width_zero_not_removable(residual_graph):
    g = residual_graph
    stem = group(g, "stem.weight[out]")
    assert not stem.removable and stem.min_width == 1
    with pytest.raises(PlanError, match=rf"group {stem.id}: width 0 is outside 1\.\.6"):
        slim(g, {stem.id: []})


def test_plan_error_bad_indices(residual_graph):
    g = residual_graph
    stem = group(g, "stem.weight[out]")
    for bad in ([0, 6], [-1, 2], [1, 1, 2]):
        with pytest.raises(PlanError, match=rf"group {stem.id}: kept indices must be distinct, "
                                            r"in 0\.\.5"):
            slim(g, {stem.id: bad})
    with pytest.raises(PlanError, match=r"there is no group 99"):
        slim(g, {99: [0]})


def test_plan_error_cuts_output():
    class Cut(nn.Module):
        """The only path to the output runs through a removable-looking concat."""

        def __init__(self):
            super().__init__()
            self.a = conv(3, 2, 1)
            self.b = conv(3, 2, 1)
            self.head = Head(4)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    g = graphsearch.analyze(Cut().eval(), (torch.randn(1, 3, 8, 8),))
    a, b = group(g, "a.weight[out]"), group(g, "b.weight[out]")
    slim(g, {a.id: []})  # one branch may go
    with pytest.raises(PlanError, match="cannot go to width 0"):
        slim(g, {a.id: [], b.id: []})


class ReluAfterRemovedBranch(nn.Module):
    """The CIFAR ResNet block pattern: x is a ReLU's output, the block computes
    relu(x + branch(x)) in three spellings (F.relu, a shared nn.ReLU, Tensor.relu), the
    second block's shortcut an nn.Identity() module as in the zoo's ResNets."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 4, 3)
        self.act = nn.ReLU()
        self.b1, self.b2 = conv(4, 4, 3), conv(4, 4, 3)
        self.c1, self.c2 = conv(4, 4, 3), conv(4, 4, 3)
        self.shortcut = nn.Identity()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.act(x + self.b2(F.relu(self.b1(x))))
        x = (self.shortcut(x) + self.c2(self.act(self.c1(x)))).relu()
        return self.fc(x.mean((2, 3)))


def test_relu_of_a_relu_left_by_a_removed_branch_is_dropped():
    # relu(x + branch) with the branch removed is relu(x), x a ReLU's output: the second
    # ReLU is the identity and one more op for onnxruntime to run. slim == mask still holds.
    g = graphsearch.analyze(ReluAfterRemovedBranch().eval(), (torch.randn(1, 3, 8, 8),))
    b1, c1 = group(g, "b1.weight[out]"), group(g, "c1.weight[out]")

    def relus(s):
        return sum(getattr(n.target, "__name__", n.target) == "relu" or n.target == "act"
                   for n in s.graph.nodes if n.op.startswith("call_"))

    _, s = check_plan(ReluAfterRemovedBranch(), (3, 8, 8), {b1.id: [0]})
    assert relus(s) == 5
    _, s = check_plan(ReluAfterRemovedBranch(), (3, 8, 8), {b1.id: [], c1.id: []})
    assert relus(s) == 1  # the stem's: both blocks' ReLUs read a ReLU's output
    _, s = check_plan(ReluAfterRemovedBranch(), (3, 8, 8), {c1.id: []})
    assert relus(s) == 3  # the stem's, b1's and the first block's


def test_what_a_plan_removes_is_not_taken_from_another_plan_emptying_the_same_group():
    # The graph cached what a plan removes under the groups it empties alone, but with a
    # channel split (ShuffleNet-v2's chunk) the kept indices decide which other channels are
    # orphaned: after the first plan, the second one's removed branch was kept, fed a zero-
    # width half, and the slim model did not run (found by benchmarks/random_plans.py).
    model, x = cm.TinyShuffleNet().eval(), (torch.randn(2, 3, 8, 8),)
    g = graphsearch.analyze(model, x)
    stem, (a0, a1), (b0, b1) = group(g, "stem.0.weight[out]"), (
        group(g, f"units.{u}.branch.0.weight[out]").id for u in (0, 1)), (
        group(g, f"units.{u}.branch.5.weight[out]").id for u in (0, 1))
    first = {a0: [], a1: [2], b1: [0, 3]}
    second = {stem.id: [1, 4, 6, 7], a0: [], a1: [0, 2, 3], b0: [0, 2, 3], b1: [1]}
    for keep in (first, second):
        g.check(keep)
        s = slim(g, keep)
        assert verify(s, mask(g, keep), x)
        assert nparams(s) == g.cost(keep).params
    # and the answers agree with a fresh graph's
    fresh = graphsearch.analyze(cm.TinyShuffleNet().eval(), x)
    assert g.dead_nodes(second) == fresh.dead_nodes(second)
    assert g.zero_groups(second) == fresh.zero_groups(second)


class Scaled(nn.Module):
    def __init__(self, scale: float, offset: float = 0.0):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x):
        return x * self.scale + self.offset


def test_verify_is_relative_but_outputs_that_cancel_to_almost_nothing_pass():
    x = (torch.ones(2, 3),)
    # a difference of 1e-5 of the output's scale fails, at any scale above the floor
    assert not verify(Scaled(1.0, 2e-5), Scaled(1.0), x).ok
    assert not verify(Scaled(1e-6, 2e-11 + 1e-10), Scaled(1e-6), x).ok
    assert verify(Scaled(1.0, 5e-6), Scaled(1.0), x).ok
    # an output of scale 6e-10 read 2.5e-14 away (float32 rounding of O(1) terms that
    # cancel): not a mismatch (random_plans.md, zoo ShuffleNet-v2)
    assert verify(Scaled(6e-10, 2.5e-14), Scaled(6e-10), x).ok
