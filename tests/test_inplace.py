"""In-place pruning (`graphsearch.prune`): the user's own module edited to a plan.

Every case checks the contract against the slim pass and the mask reference on a fresh
batch-2 input (not the inputs `prune` checked itself on): same class, same outputs, as many
parameters as `graph.cost(keep)` says, and the graph still describing the original model
(its mask reference still runs). Plans the module edits cannot express are refused with an
`InPlaceError` naming the groups, and leave the model bit for bit as it was.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphsearch
from graphsearch import zoo
from graphsearch.inplace import InPlaceError, RemovedBranch, prune
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.slim import slim
from test_slim import assert_same_state, gid, nparams, random_keep, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# (zoo name, build kwargs, analysed input shape): the big ones on small inputs
ZOO = {
    "resnet20": ({}, (3, 32, 32)),
    "mobilenet_v2": ({}, (3, 64, 64)),
    "densenet121": ({}, (3, 64, 64)),
    "inception_v3": ({}, (3, 96, 96)),
    "vit_tiny": ({}, (3, 32, 32)),
    "vit_tiny_sdpa": ({"attention": "sdpa"}, (3, 32, 32)),
}


def pruned_against_references(model: nn.Module, shape: tuple, keep_of, seed: int = 0):
    """Analyse `model`, prune it in place with `keep_of(graph)`, and check it against slim
    and mask on a fresh batch-2 input. Returns (graph, keep, PruneResult)."""
    model = model.eval()
    cls = type(model)
    g = graphsearch.analyze(model, (torch.randn(1, *shape),))
    keep = keep_of(g)
    s = slim(g, keep).eval()
    result = prune(model, g, keep)
    x = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed)),)
    assert type(model) is cls
    v = verify(model, s, x)
    assert v.ok, v.message
    v = verify(model, mask(g, keep), x, rtol=1e-4)  # the graph still holds the original
    assert v.ok, v.message
    assert nparams(model) == g.cost(keep).params == result.params
    assert result.params < g.baseline.params
    return g, keep, result


@pytest.mark.parametrize("plan", ["random", "zero"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_random_plan_in_place(name, plan):
    kwargs, shape = ZOO[name]
    model = zoo.build(name.replace("_sdpa", ""), **kwargs)
    seed = sum(map(ord, name)) + (plan == "zero")

    def keep_of(g):
        return random_keep(g, random.Random(seed), zero_removable=plan == "zero")

    g, keep, result = pruned_against_references(model, shape, keep_of)
    if plan == "zero":  # whole branches went: modules without parameters stand in for them
        assert result.replaced
        removed = [m for m in model.modules() if isinstance(m, RemovedBranch)]
        assert removed and all(nparams(m) == 0 for m in removed)
    if name == "vit_tiny" and plan == "random":  # nn.MultiheadAttention keeps fewer heads
        assert any(v == "PrunedMultiheadAttention" for v in result.replaced.values())
    if name == "vit_tiny_sdpa" and plan == "random":  # its own code reads self.num_heads
        heads = [b.attn.num_heads for b in model.blocks]
        assert heads != [3, 3] and result.attributes


def test_standard_layers_tell_their_new_widths():
    model = zoo.build("resnet20")
    g, keep, _ = pruned_against_references(
        model, (3, 32, 32), lambda g: {gid(g, "layer1.0.conv1.weight[out]"): [0, 3, 5],
                                       gid(g, "conv1.weight[out]"): list(range(0, 16, 2))})
    c = model.layer1[0].conv1
    assert (c.out_channels, c.in_channels, tuple(c.weight.shape[:2])) == (3, 8, (3, 8))
    bn = model.layer1[0].bn1
    assert bn.num_features == 3 and bn.running_mean.shape == (3,) and bn.weight.shape == (3,)
    assert model.conv1.out_channels == 8 and model.bn1.running_var.shape == (8,)


class Net(nn.Module):
    """A user's model: a depthwise conv, a GroupNorm, a LayerNorm, an embedding-like
    linear, a custom method and a forward hook."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def features(self, x):  # a method the user calls besides forward
        return F.relu(self.bn(self.pw(self.dw(F.relu(self.gn(self.stem(x)))))))

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.head(F.relu(self.ln(self.fc(x))))

    def widths(self):
        return self.stem.out_channels, self.pw.out_channels, self.fc.out_features


def test_user_model_keeps_class_methods_and_hooks():
    model = Net()
    model.bn.running_mean.uniform_(-1, 1)  # statistics that must be sliced, not reset
    seen = []
    model.pw.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    mean = model.bn.running_mean.clone()

    def keep_of(g):
        return {gid(g, "stem.weight[out] x2"): [0, 2], gid(g, "pw.weight[out]"): [1, 2, 7],
                gid(g, "fc.weight[out]"): [0, 2, 3, 5]}

    g, keep, result = pruned_against_references(model, (3, 8, 8), keep_of)
    assert model.widths() == (4, 3, 4)
    assert model.dw.groups == 4 and model.dw.in_channels == model.dw.out_channels == 4
    assert (model.gn.num_groups, model.gn.num_channels) == (2, 4)
    assert model.ln.normalized_shape == (4,) and model.head.in_features == 4
    assert torch.equal(model.bn.running_mean, mean[[1, 2, 7]])
    seen.clear()
    out = model.features(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and seen == [(2, 3, 8, 8)]
    model(torch.randn(1, 3, 8, 8))
    assert seen[1:] == ["pre", (1, 3, 8, 8)]
    assert set(result.resized) >= {"stem", "gn", "dw", "pw", "bn", "fc", "ln", "head"}
    # the pruned model trains as it is (its parameters are the pruned tensors)
    loss = model.train()(torch.randn(4, 3, 8, 8)).sum()
    loss.backward()
    assert model.pw.weight.grad.shape == (3, 4, 1, 1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.branch(x))
        return self.head(x.mean((2, 3)))


def test_removed_branch_costs_nothing():
    model = Residual()
    hook_outputs = []
    model.branch.register_forward_hook(lambda m, i, o: hook_outputs.append(o))
    g, keep, result = pruned_against_references(
        model, (3, 8, 8), lambda g: {gid(g, "branch.0.weight[out]"): [],
                                     gid(g, "stem.weight[out]"): [0, 2, 3]})
    assert isinstance(model.branch, RemovedBranch)
    assert list(result.replaced) == ["branch"]
    assert nparams(model) == g.cost(keep).params == (3 * 3 * 9 + 3) + (3 * 3 + 3)
    model(torch.randn(5, 3, 8, 8))  # the hook moved with the branch's place: it sees zeros
    assert hook_outputs[-1].shape == (5, 3, 8, 8) and not hook_outputs[-1].any()
    out = model.double()(torch.randn(2, 3, 8, 8, dtype=torch.float64))  # zeros follow the cast
    assert out.dtype == torch.float64 and hook_outputs[-1].dtype == torch.float64


class LiteralFlatten(nn.Module):
    """A size written in the forward: in-place pruning cannot change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(x.view(-1, 128))


def test_literal_size_in_forward_is_refused_and_model_untouched():
    model = LiteralFlatten().eval()
    g = graphsearch.analyze(model, (torch.randn(1, 3, 8, 8),))
    group_id = gid(g, "conv.weight[out]")
    before = snapshot(model)
    with pytest.raises(InPlaceError, match=r"'view'.*\(-1, 128\) become \(-1, 64\)") as err:
        prune(model, g, {group_id: [0, 1, 2, 3]})
    assert err.value.groups == [group_id]
    assert_same_state(before, model)
    assert model.conv.out_channels == 8
    # the slim pass rewrites the literal: that module is the way for such a model
    assert verify(slim(g, {group_id: [0, 1, 2, 3]}), mask(g, {group_id: [0, 1, 2, 3]}),
                  (torch.randn(2, 3, 8, 8),)).ok


def test_channel_shuffle_refused_then_pruned_without_those_groups():
    """ShuffleNetV2: unequal counts across a channel shuffle need the slim pass's scatter and
    gather; refused with the groups named, and the rest of the plan is pruned in place."""
    model = zoo.build("shufflenet_v2").eval()
    g = graphsearch.analyze(model, (torch.randn(1, 3, 64, 64),))
    keep = random_keep(g, random.Random(5))
    before = snapshot(model)
    refused = set()
    for _ in range(len(keep)):
        try:
            prune(model, g, keep)
            break
        except InPlaceError as exc:
            assert exc.groups and "no regular layout" in str(exc)
            assert_same_state(before, model)
            refused |= set(exc.groups)
            keep = {k: v for k, v in keep.items() if k not in exc.groups}
    else:
        pytest.fail("never accepted")
    assert refused and keep
    x = (torch.randn(2, 3, 64, 64),)
    assert verify(model, mask(g, keep), x, rtol=1e-4).ok
    assert nparams(model) == g.cost(keep).params < g.baseline.params


def test_another_models_graph_is_refused():
    g = graphsearch.analyze(Net().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(graphsearch.load.UserError, match="no 'gn'|analysed from"):
        prune(Residual(), g, {})
