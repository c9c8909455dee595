"""Group lasso: joint channel norms, the proximal step, dead channels staying dead, revived
channels, and the method end to end on a tiny model."""

import copy

import numpy as np
import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.load import UserError
from graphsearch.methods.common import (alive_cost, cost_weights, realisable, spare_under_floor,
                                        weight_ties)
from graphsearch.methods.group_lasso import GroupLasso, proximal_step, revive, zero_channels
from graphsearch.target import CostMeter, legal_zeros
from hand_models import (X8, X16, TwoConv, TwoStage, ctx_for, end_to_end, hidden_group,
                         randomise)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_joint_norm_gathers_producer_norm_and_consumer(tmp_path):
    model = randomise(TwoConv())
    graph = analyze(model, X8)
    ctx = ctx_for(model, graph, tmp_path)
    g4 = hidden_group(graph, 4)
    got = ctx.channel_norms()[g4].detach()
    for c in range(4):
        by_hand = (model.c1.weight[c].pow(2).sum() + model.b1.weight[c] ** 2
                   + model.b1.bias[c] ** 2 + model.c2.weight[:, c].pow(2).sum()).sqrt()
        assert float(got[c]) == pytest.approx(float(by_hand.detach()), rel=1e-6)


def test_proximal_step_shrinks_by_the_threshold_and_zeroes_small_channels(tmp_path):
    model = randomise(TwoConv())
    graph = analyze(model, X8)
    ctx = ctx_for(model, graph, tmp_path)
    g4, g5 = hidden_group(graph, 4), hidden_group(graph, 5)
    with torch.no_grad():
        before = {g: n.clone() for g, n in ctx.channel_norms().items()}
    w1, w2 = model.c1.weight.detach().clone(), model.c2.weight.detach().clone()
    gamma = model.b1.weight.detach().clone()
    # a threshold between the 2nd and 3rd smallest norms of the 4-group: two of them zeroed
    b4 = before[g4].sort().values
    t = float(b4[1] + b4[2]) / 2
    factors = proximal_step(ctx, model, t)
    for g in (g4, g5):  # factor = max(0, 1 - t / ||theta_c||), from the norms before the step
        expected = (1 - t / before[g].double()).clamp_min(0)
        assert torch.allclose(factors[g].double(), expected, atol=1e-6)
    f4, f5 = factors[g4], factors[g5]
    # every tied slice of a channel scaled by its factor; where two groups meet (conv2's
    # weight: rows of the 5-group, columns of the 4-group) by the product of both
    assert torch.allclose(model.c1.weight, w1 * f4.view(-1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(model.b1.weight, gamma * f4, atol=1e-6)
    assert torch.allclose(model.c2.weight, w2 * f5.view(-1, 1, 1, 1) * f4.view(1, -1, 1, 1),
                          atol=1e-6)
    with torch.no_grad():
        after = ctx.channel_norms()[g4]
    assert int((after == 0).sum()) == 2 and int((f4 == 0).sum()) == 2
    # a channel that was not zeroed lost at least the threshold from its own (unshared) part
    for c in np.flatnonzero(f4.numpy() > 0):
        assert float(after[c]) <= float(before[g4][c]) - t + 1e-5


def test_dead_channels_stay_dead_under_momentum(tmp_path):
    model = randomise(TwoConv())
    graph = analyze(model, X8)
    g4 = hidden_group(graph, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()  # momentum buffers now hold nonzero entries everywhere
    zero_channels(graph, model, {g4: np.array([1])}, opt)
    assert float(model.c1.weight.detach()[1].abs().sum()) == 0.0
    assert float(model.c2.weight.detach()[:, 1].abs().sum()) == 0.0
    assert float(opt.state[model.c1.weight]["momentum_buffer"][1].abs().sum()) == 0.0
    assert float(opt.state[model.c1.weight]["momentum_buffer"][0].abs().sum()) > 0.0


def test_revive_restarts_kept_zero_channels_at_the_survivors_scale(tmp_path):
    model = randomise(TwoConv())
    graph = analyze(model, X8)
    ctx = ctx_for(model, graph, tmp_path)
    g4 = hidden_group(graph, 4)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    norms0 = {k: v.detach().clone() for k, v in ctx.channel_norms().items()}
    with torch.no_grad():
        zero_channels(graph, model, {g4: np.array([0, 1])})
        for p in model.parameters():
            p.mul_(0.5)  # the survivors shrank to half
    with torch.no_grad():
        norms = ctx.channel_norms()
    n = revive(graph, model, initial, norms0, norms, {g4: [0, 2, 3]})  # channel 1 stays dropped
    assert n == 1
    # the scale: mean norm of the channels still alive over their mean initial norm (below
    # 0.5 here: zeroing the 4-group's channels also took conv2's columns from the 5-group)
    alive_now = torch.cat([v[v > 0] for v in norms.values()]).double()
    alive_then = torch.cat([norms0[g][v > 0] for g, v in norms.items()]).double()
    scale = float(alive_now.mean() / alive_then.mean())
    assert 0.3 < scale < 0.5
    assert torch.allclose(model.c1.weight[0], initial["c1.weight"][0] * scale, atol=1e-6)
    assert torch.allclose(model.c2.weight[:, 0], initial["c2.weight"][:, 0] * scale, atol=1e-6)
    assert float(model.c1.weight.detach()[1].abs().sum()) == 0.0


def test_legal_zeros_keeps_one_channel_where_a_group_cannot_vanish():
    model = TwoConv()
    graph = analyze(model, X8)
    g4 = hidden_group(graph, 4)
    # a chain's only path: width 0 would disconnect the output
    assert legal_zeros(graph, {g4: 0})[g4] == 1


def test_end_to_end_on_a_tiny_model(trained_tiny, tmp_path):
    # a strong shrink, so that the proximal steps reach exact zeros in 24 steps
    method = GroupLasso()
    proposal, _ = end_to_end(method, trained_tiny, tmp_path, {**method.defaults, "shrink": 1.0})
    assert proposal.info["zeros"] > 0  # exact zeros from the proximal steps


def test_group_lasso_refuses_an_unknown_normalisation(trained_tiny, tmp_path):
    model, graph, data = trained_tiny
    m = GroupLasso()
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path, data,
                  settings={**m.defaults, "normalise": "bogus"}, epochs=0.0)
    with pytest.raises(UserError, match="normalise"):
        m.search(ctx)


def test_the_penalty_weights_a_channel_by_its_cost_so_a_flops_target_kills_expensive_ones(
        trained_tiny, tmp_path):
    # Unweighted, the penalty gave a FLOPs target the cheap channels (low resolution, rich in
    # parameters) as readily as the expensive ones: on CIFAR ResNet-20 83k parameters kept at
    # 1/3 FLOPs (uniform widths: 108k), 1.3 points under uniform after fine-tuning. Weighted,
    # the exact zeros (the penalty's decisions) fall on the 16x16 residual group, whose
    # channels cost 10x the FLOPs of the 8x8 group's.
    model, graph, _ = trained_tiny
    cheap = hidden_group(graph, 32)
    method = GroupLasso()
    zeros, per_zero = {}, {}
    for power in (0.0, 1.0):
        proposal, _ = end_to_end(method, trained_tiny, tmp_path / str(power),
                                 {**method.defaults, "shrink": 1.0, "cost_weight": power})
        info = proposal.info
        zeros[power] = info["zeros_per_group"][cheap]
        per_zero[power] = info["zeros_flops"] / info["zeros"]
    assert zeros[0.0] >= 8 and zeros[1.0] <= zeros[0.0] // 4
    assert per_zero[1.0] > 1.5 * per_zero[0.0]


def test_cost_per_slice_charges_a_stream_channel_per_tied_convolution(tmp_path):
    # A residual stream's channel is a row or column of every convolution on the stream, so
    # per channel it is the costliest: the cost-weighted penalty emptied a ResNet-32 stream
    # (8 of 32 channels kept). Per tied weight tensor it pays what one convolution's channel
    # costs. TwoStage at 16x16: the first stream is in stem, a1, a2 and down (4 tensors),
    # its block's inner channels in a1 and a2 (2); the second stream in down, b1, b2 and fc.
    model = TwoStage()
    graph = analyze(model, X16)
    ctx = ctx_for(model, graph, tmp_path, flops="0.33")
    ctx.example_inputs = X16
    stream1, inner1, stream2, inner2 = sorted(
        graph.prunable_groups, key=lambda g: (g.size, -len(g.members)))
    ties = {stream1.id: 4, inner1.id: 2, stream2.id: 4, inner2.id: 2}
    assert weight_ties(graph, model) == ties
    # MACs per channel by hand: the first stream's 256 * 9 * (3 + 16 + 16) + 64 * 9 * 32, its
    # block's inner 2 * 256 * 9 * 16; the second stream's 64 * 9 * (16 + 32 + 32) + 4, its
    # block's inner 2 * 64 * 9 * 32
    macs = {stream1.id: 99072, inner1.id: 73728, stream2.id: 46084, inner2.id: 36864}
    per_channel, per_slice = cost_weights(ctx, 1.0), cost_weights(ctx, 1.0, "slice")
    for gid, m in macs.items():
        assert per_channel[gid] / per_channel[inner2.id] == pytest.approx(m / 36864, rel=0.02)
        assert per_slice[gid] / per_slice[inner2.id] == pytest.approx(
            m / ties[gid] / 18432, rel=0.02)
    # per channel the first stream pays more than its block's inner channels, per slice less
    assert per_channel[stream1.id] > per_channel[inner1.id]
    assert per_slice[stream1.id] < per_slice[inner1.id]
    half = cost_weights(ctx, 0.5, "slice")
    assert half[stream1.id] / half[inner2.id] == pytest.approx(
        (per_slice[stream1.id] / per_slice[inner2.id]) ** 0.5)
    with pytest.raises(UserError, match="group-lasso: cost_per='slices'"):
        cost_weights(ctx, 1.0, "slices", "group-lasso")


def test_a_strong_penalty_never_empties_what_the_model_needs(trained_tiny, tmp_path):
    # A cost-weighted penalty on ShuffleNet-V2 killed the stem's channels and then a whole
    # stage in one step: the signal was cut, the weights after them reached inf, and no plan
    # could be landed on the zeros (CI: test_methods_zoo, shufflenet_v2-group-lasso). At any
    # strength the survivors stay a plan the graph can realise, the weights stay finite and a
    # plan lands on the target.
    model, graph, data = trained_tiny
    method = GroupLasso()
    ctx = ctx_for(copy.deepcopy(model), graph, tmp_path, data, flops="0.4",
                  settings={**method.defaults, "lambda": 1e4, "refit": False, "revive": False},
                  epochs=1.0)
    ctx.example_inputs = X16
    proposal = method.search(ctx)
    norms = ctx.channel_norms(ctx.model)
    assert all(bool(torch.isfinite(n).all()) for n in norms.values())
    alive = {g: (n > 0).numpy() for g, n in norms.items()}
    assert proposal.info["zeros"] > 0 and realisable(graph, alive)
    assert graph.cost(proposal.plan.keep).flops <= ctx.constraints[0].limit


def test_a_stream_keeps_the_smallest_width_the_plan_can_keep(trained_tiny, tmp_path):
    # With widths in multiples of 8 the landing keeps 8 channels of a stream whatever died, so
    # deaths under 8 buy nothing and cut the signal the rest is still training on (CIFAR
    # ResNet-20, cost-weighted: 15 of the stem's 16 channels died and validation top-1 fell to
    # 18% while the penalty was still choosing). `floor` spares them; the zeros' cost counts
    # such a group at 8 channels, as the plan will.
    model, graph, data = trained_tiny
    stream = [g for g in graph.prunable_groups if g.size == 16 and g.min_width > 0]
    assert len(stream) == 1
    sid = stream[0].id
    method = GroupLasso()
    alive = {}
    for floor in (True, False, None):  # None: the default (on since the twenty-second session)
        ctx = ctx_for(copy.deepcopy(model), graph, tmp_path / str(floor), data, flops="0.4",
                      settings={"lambda": 1e4, "refit": False, "revive": False,
                                **({} if floor is None else {"floor": floor})}, epochs=1.0)
        ctx.round_to = 8
        ctx.example_inputs = X16
        proposal = method.search(ctx)
        alive[floor] = 16 - proposal.info["zeros_per_group"][sid]
        assert proposal.info["floor"] == (1 if floor is False else 8)
        assert graph.cost(proposal.plan.keep).flops <= ctx.constraints[0].limit
    assert alive[False] < 8 <= alive[True] == alive[None]


def test_alive_cost_counts_each_group_at_the_width_the_landing_keeps():
    # The zeros' cost is what the penalty chases: with widths in multiples of 8 the landing
    # keeps 11 alive channels of a 32-channel group as 16 and 3 of a 16-channel stream as 8.
    # Counted at 11 (CIFAR ResNet-20, `floor=true`) the zeros met the target while the plan
    # did not, and the landing took the difference from the survivors: a convolution that
    # had lost no channel went from 64 to 40 and, counted at the alive channels alone (no
    # floor), a residual stream with 20 alive channels to 8 of 32.
    graph = analyze(TwoStage(), X16)
    ev = CostMeter(graph, [])
    alive = {g.id: np.arange(g.size) % 3 == 0 for g in graph.prunable_groups}  # 6 of 16, 11 of 32
    counts = {g.id: int(alive[g.id].sum()) for g in graph.prunable_groups}
    assert sorted(counts.values()) == [6, 6, 11, 11]

    def cost_at(widths):
        return graph.cost({gid: list(range(w)) for gid, w in widths.items()}).flops

    assert alive_cost(graph, alive, ev)["flops"] == cost_at(counts)
    assert alive_cost(graph, alive, ev, 8)["flops"] == cost_at(
        {gid: 8 if n == 6 else 16 for gid, n in counts.items()})
    assert alive_cost(graph, alive, ev, 4)["flops"] == cost_at(
        {gid: 8 if n == 6 else 12 for gid, n in counts.items()})
    # a group whose alive channels round up to its whole size costs what the whole group does
    assert graph.groups[min(alive)].size == 16
    whole = {**alive, min(alive): np.arange(16) < 9}
    assert alive_cost(graph, whole, ev, 8)["flops"] == cost_at(
        {gid: 16 if gid == min(alive) else (8 if n == 6 else 16) for gid, n in counts.items()})


def test_spare_under_floor_spares_the_least_urgent_down_to_the_floor():
    graph = analyze(TwoConv(), X8)
    groups = graph.prunable_groups
    assert {g.size for g in groups} == {4, 5} and all(g.min_width > 0 for g in groups)
    alive = {g.id: np.ones(g.size, dtype=bool) for g in groups}
    dying = {g.id: np.ones(g.size, dtype=bool) for g in groups}  # every channel would die
    urgency = {g.id: np.arange(g.size, dtype=float) for g in groups}
    kept = spare_under_floor(graph, alive, dying, urgency, 4)
    for g in groups:
        # multiples of 4: the 4-group keeps 4, the 5-group 4 (or 5); the least urgent stay
        assert np.flatnonzero(~kept[g.id]).tolist() == list(range(g.size - 4, g.size))
    # a death that leaves the floor is allowed
    dying = {g.id: np.eye(g.size, dtype=bool)[0] for g in groups}
    kept = spare_under_floor(graph, alive, dying, urgency, 4)
    assert {g.size: bool(kept[g.id][0]) for g in groups} == {4: False, 5: True}
