"""`magnitude`'s normalisations: per group (default), by a channel's FLOPs, none."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from graphsearch.analysis import analyze
from graphsearch.load import UserError
from graphsearch.methods.base import SearchContext
from graphsearch.methods.magnitude import Magnitude, channel_flops, removal_order
from graphsearch.target import Constraint, land_on_target

X = (torch.zeros(1, 3, 16, 16),)


class TwoScales(nn.Module):
    """Two groups of 16 channels with equal weights: one at 16x16 (expensive channels), one
    after a stride-4 conv at 4x4 (channels 16 times cheaper in FLOPs)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, stride=4, padding=1, bias=False)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight.fill_(0.1)
            self.fc.weight.fill_(0.1)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def context(normalise, tmp_path):
    model = TwoScales()
    graph = analyze(model, X)
    ctx = SearchContext(graph=graph, model=copy.deepcopy(model), data=None,
                        constraints=[Constraint("flops", 0.6 * graph.baseline.flops, "0.6")],
                        round_to=1, settings={"normalise": normalise}, epochs=0, lr=0.0,
                        batch_size=8, seed=0, state_dir=tmp_path, progress=False,
                        log=lambda s: None)
    return graph, ctx


def test_flops_normalisation_ranks_the_expensive_groups_channels_last(tmp_path):
    graph, ctx = context("flops", tmp_path)
    a, b = [g.id for g in graph.prunable_groups]  # a at 16x16, b at 4x4
    cost = channel_flops(graph)
    assert cost[a] > 3 * cost[b]
    scores, how = Magnitude().scores(ctx)
    assert how == "flops"
    assert scores[b].min() > scores[a].max()
    assert scores[b].min() / scores[a].max() == pytest.approx(cost[a] / cost[b])
    # per group only: equal weights score alike; raw: the wider fan-in scores higher
    mean, _ = Magnitude().scores(context("mean", tmp_path)[1])
    assert mean[a] == pytest.approx(mean[b])
    raw, _ = Magnitude().scores(context(False, tmp_path)[1])
    assert raw[a].min() > raw[b].max()  # a's channels tie 16x9 weights of b, b's 16x9 + 4


def test_bad_normalise_is_refused(tmp_path):
    with pytest.raises(UserError, match="normalise"):
        Magnitude().search(context("bogus", tmp_path)[1])


# ---- schedule=iterative: Torch-Pruning's iterative global pruning in the limit of small steps

class Twins(nn.Module):
    """Two groups of 16 channels that cost the same: convs a and b side by side, concatenated."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1).mean((2, 3)))


def widths_of(graph, plan):
    return [len(plan.keep.get(g.id, range(g.size))) for g in graph.prunable_groups]


def test_iterative_prunes_the_group_whose_weakest_channel_is_weakest():
    """Group a has one dead channel among equal ones, group b a weak half (normalised 0.5)
    and a strong half. One block of 8 has to go. One global cut keeps a (its dead channel
    alone does not empty a block) and takes b's weak half; the iterative schedule, like the
    peer's, takes the block of the group with the weakest channel: a."""
    graph = analyze(Twins(), X)
    a, b = [g.id for g in graph.prunable_groups]
    norm_a = torch.ones(16).double()
    norm_a[5] = 0.01
    norm_b = torch.tensor([0.5] * 8 + [1.5] * 8).double()
    scores = {a: (norm_a / norm_a.mean()).numpy(), b: (norm_b / norm_b.mean()).numpy()}
    target = [Constraint("flops", 0.75 * graph.baseline.flops, "0.75")]
    assert widths_of(graph, land_on_target(graph, scores, target, 8)) == [16, 8]
    order = removal_order(graph, scores, 8)
    plan = land_on_target(graph, order, target, 8)
    assert widths_of(graph, plan) == [8, 16]
    assert 5 not in plan.keep[a]  # the dead channel goes with a's weakest block


def test_removal_order_renormalises_a_group_over_what_it_has_left():
    """a: blocks of 8 at 0.2, 1.0, 1.8; b: 0.5, 0.95, 1.55 (both mean 1). a's weakest goes
    first, then b's; renormalised over its 16 channels left, a's next block scores
    1.0 / 1.4 = 0.71, under b's 0.95 / 1.25 = 0.76, so a goes again. Without the
    renormalisation b (0.95 < 1.0) would go third."""
    graph = SimpleNamespace(prunable_groups=[SimpleNamespace(id=i, size=24, min_width=0)
                                             for i in (0, 1)])
    a = np.repeat([0.2, 1.0, 1.8], 8)
    b = np.repeat([0.5, 0.95, 1.55], 8)

    def steps(renormalise):
        order = removal_order(graph, {0: a, 1: b}, 8, renormalise=renormalise)
        return [int(order[0][0]), int(order[1][0]), int(order[0][8]), int(order[1][8])]

    # removal step of a's first block, b's first block, a's second block, b's second block
    assert steps(True) == [1, 2, 3, 4]  # the floor (8) leaves a third block each
    assert steps(False) == [1, 2, 4, 3]
    full = removal_order(graph, {0: a, 1: b}, 8)
    # never under the smallest nonzero width: each group's last block is never removed
    assert (full[0][16:] > 4).all() and (full[1][16:] > 4).all()


def test_bad_schedule_is_refused(tmp_path):
    _, ctx = context("mean", tmp_path)
    ctx.settings["schedule"] = "sometimes"
    with pytest.raises(UserError, match="schedule"):
        Magnitude().search(ctx)
    ctx.settings["schedule"] = "iterative"
    ctx.settings["max_ratio"] = 1.5
    with pytest.raises(UserError, match="max_ratio"):
        Magnitude().search(ctx)


def test_max_ratio_stops_the_runaway_at_fine_multiples():
    """At a multiple of 1 the renormalisation runs away: a group that starts losing channels
    keeps losing them down to one (CIFAR ResNet-20 at --round-to 1: the first stage at 1-2
    channels, 4 points under the default multiple). `max_ratio` (Torch-Pruning's
    max_pruning_ratio) keeps at least (1 - max_ratio) of every group."""
    graph = SimpleNamespace(prunable_groups=[SimpleNamespace(id=i, size=16, min_width=0)
                                             for i in (0, 1)])
    a = np.linspace(0.2, 1.8, 16)
    b = np.linspace(0.6, 1.4, 16)

    def never_removed(order, gid):  # a channel never removed scores above every step
        return int((order[gid] >= order[gid].max() - 0.999).sum())

    free = removal_order(graph, {0: a, 1: b}, 1)
    assert never_removed(free, 0) == 1  # without a cap: down to a single channel
    capped = removal_order(graph, {0: a, 1: b}, 1, max_ratio=0.5)
    assert never_removed(capped, 0) == 8 and never_removed(capped, 1) == 8
