"""`--set max_ratio=...` for the penalty methods (MorphNet, variational dropout, group lasso):
no group loses more than that share of its channels, in the search phase and in the plan
(the target step's `least`). On CIFAR ResNet-32 at 1/3 FLOPs the three FLOP-weighted pulls
thinned the second stage's residual stream to 8 of 32 channels and ended at or under uniform
widths (cifar10_table.md, eighteenth session)."""

import copy

import numpy as np
import pytest

from graphsearch.analysis import analyze
from graphsearch.load import UserError
from graphsearch.methods.common import cost_weights, share_floor, share_floors, spare_under_floor
from graphsearch.methods.group_lasso import GroupLasso
from graphsearch.methods.morphnet import MorphNet
from graphsearch.methods.vardrop import VariationalDropout
from graphsearch.target import land_on_target, parse_constraint
from hand_models import X16, TwoConv, X8, ctx_for

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {"morphnet": MorphNet, "vardrop": VariationalDropout, "group-lasso": GroupLasso}


def search(method, trained, tmp_path, max_ratio):
    model, graph, data = trained
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path / str(max_ratio), data, flops="0.33",
                  settings={**method.defaults, "max_ratio": max_ratio}, epochs=3.0)
    ctx.example_inputs = X16
    proposal = method.search(ctx)
    assert graph.cost(proposal.plan.keep).flops <= ctx.constraints[0].limit
    assert graph.cost(proposal.plan.keep).flops >= 0.99 * ctx.constraints[0].limit
    return proposal


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_group_loses_more_than_max_ratio(name, trained_two_stage, tmp_path):
    _, graph, _ = trained_two_stage
    method = METHODS[name]()
    floor = {g.id: share_floor(g, 0.5, 1) for g in graph.prunable_groups}
    assert sorted(floor.values()) == [8, 8, 16, 16]

    def widths(proposal):
        return {g.id: proposal.plan.widths.get(g.id, g.size) for g in graph.prunable_groups}

    free = widths(search(method, trained_two_stage, tmp_path, 1.0))
    # the model exercises the cap: without it the method takes more than half of a group
    assert any(free[g] < floor[g] for g in floor), free
    capped_proposal = search(method, trained_two_stage, tmp_path, 0.5)
    capped = widths(capped_proposal)
    assert all(capped[g] >= floor[g] for g in floor), capped
    # the search phase keeps to the cap too: the channels it killed are at most half a group
    info = capped_proposal.info
    if name == "group-lasso":
        assert all(g.size - info["zeros_per_group"][g.id] >= floor[g.id]
                   for g in graph.prunable_groups), info["zeros_per_group"]
    if name == "morphnet":
        alive = info["rounds"][0]["alive_counts"]
        assert all(alive[g.id] >= floor[g.id] for g in graph.prunable_groups), alive


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_max_ratio_outside_0_1_is_a_clear_error(name, trained_two_stage, tmp_path):
    model, graph, data = trained_two_stage
    method = METHODS[name]()
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path, data, flops="0.33",
                  settings={**method.defaults, "max_ratio": 0}, epochs=1.0)
    with pytest.raises(UserError, match="max_ratio=0"):
        method.search(ctx)


def test_share_floor_rounds_up_to_the_plan_multiple():
    graph = analyze(TwoConv(), X8)
    g4, g5 = sorted(graph.prunable_groups, key=lambda g: g.size)
    assert share_floor(g5, 1.0, 1) == 0 and share_floors(graph, 1.0, 1) is None
    assert share_floor(g5, 0.5, 1) == 3  # ceil(2.5)
    assert share_floor(g5, 0.5, 2) == 4
    assert share_floor(g5, 0.5, 4) == 4
    assert share_floor(g4, 0.7, 1) == 2  # ceil(1.2)


def test_the_target_step_keeps_least_and_says_when_it_cannot(trained_two_stage):
    _, graph, _ = trained_two_stage
    # scores that would empty the first stage's stream: its channels rank last
    stream = min((g for g in graph.prunable_groups if g.min_width > 0), key=lambda g: g.size)
    scores = {g.id: np.full(g.size, -1.0 if g.id == stream.id else 1.0) - np.arange(g.size) * 1e-3
              for g in graph.prunable_groups}
    cons = [parse_constraint("flops", "0.33", graph.baseline.flops)]
    free = land_on_target(graph, scores, cons)
    assert free.widths[stream.id] < 8
    least = share_floors(graph, 0.5, 1)
    capped = land_on_target(graph, scores, cons, least=least)
    assert all(capped.widths.get(g.id, g.size) >= least[g.id] for g in graph.prunable_groups)
    assert capped.achieved["flops"] >= 0.99 * cons[0].limit
    # kept within the group by the scores: the stream keeps its best channels
    assert capped.keep[stream.id] == list(range(capped.widths[stream.id]))
    with pytest.raises(UserError, match="max_ratio"):
        land_on_target(graph, scores, [parse_constraint("flops", "0.1", graph.baseline.flops)],
                       least=least)


def test_spare_under_floor_holds_a_removable_group_at_its_share():
    graph = analyze(TwoConv(), X8)
    groups = graph.prunable_groups
    alive = {g.id: np.ones(g.size, dtype=bool) for g in groups}
    dying = {g.id: np.ones(g.size, dtype=bool) for g in groups}
    urgency = {g.id: np.arange(g.size, dtype=float) for g in groups}
    kept = spare_under_floor(graph, alive, dying, urgency, 1, max_ratio=0.5)
    for g in groups:  # the most urgent die, the rest are spared down to half the group
        assert int(np.count_nonzero(~kept[g.id])) == share_floor(g, 0.5, 1)
        assert np.flatnonzero(kept[g.id]).tolist() == list(range(g.size - share_floor(g, 0.5, 1)))


@pytest.mark.parametrize("name", ["group-lasso", "vardrop"])
def test_cost_per_slice_sets_the_weights_the_penalty_uses(name, trained_two_stage, tmp_path):
    # `--set cost_per=slice` (test_group_lasso: the weights by hand): the method's penalty
    # weights each group by its cost per tied weight tensor, not per channel
    model, graph, data = trained_two_stage
    method = METHODS[name]()
    pays = {}
    for per in ("channel", "slice"):
        ctx = ctx_for(copy.deepcopy(model), graph, tmp_path / per, data, flops="0.33",
                      settings={**method.defaults, "cost_per": per}, epochs=1.0)
        ctx.example_inputs = X16
        info = method.search(ctx).info
        assert info["cost_per"] == per
        expected = cost_weights(ctx, 1.0, per)
        assert info["cost_pay"] == {str(g): pytest.approx(v) for g, v in expected.items()}
        pays[per] = info["cost_pay"]
    assert pays["channel"] != pays["slice"]
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path / "bad", data, flops="0.33",
                  settings={**method.defaults, "cost_per": "tensor"}, epochs=1.0)
    with pytest.raises(UserError,
                       match=f"cost_per='tensor': {name}'s cost_per takes one of slice"):
        method.search(ctx)
