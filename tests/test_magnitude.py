"""`magnitude`'s normalisations: per group (default), by a channel's FLOPs, none."""

import copy

import pytest
import torch
from torch import nn

from graphsearch.analysis import analyze
from graphsearch.load import UserError
from graphsearch.methods.base import SearchContext
from graphsearch.methods.magnitude import Magnitude, channel_flops
from graphsearch.target import Constraint

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
