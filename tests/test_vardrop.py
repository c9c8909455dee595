"""Variational dropout: the mathematics on hand-sized numbers, weight folding, and the method
end to end on a tiny model and tiny data."""

import math

import pytest
import torch
from torch import nn

from graphsearch.methods.vardrop import (K1, K2, K3, VariationalDropout, VDGates,
                                         clip_log_alpha, dropped_mask, fold_gates, kl, kl_beta,
                                         log_alpha_of)
from graphsearch.errors import UserError
from graphsearch.methods import vardrop as vardrop_module
from graphsearch.methods.common import alive_cost, cost_weights, method_evidence
from graphsearch.passes.slim import slim
from hand_models import check_plan, make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- VD mathematics


def hand_kl(la):
    neg = K1 / (1 + math.exp(-(K2 + K3 * la))) - 0.5 * math.log(1 + math.exp(-la)) - K1
    return -neg


def test_constants():
    assert (K1, K2, K3) == (0.63576, 1.87320, 1.48695)


@pytest.mark.parametrize("la, expected", [(-8.0, 4.635899), (0.0, 0.431239), (3.0, 0.025420),
                                          (8.0, 0.000168)])
def test_kl_at_known_log_alphas(la, expected):
    got = float(kl(torch.tensor(la, dtype=torch.float64)))
    assert got == pytest.approx(hand_kl(la), abs=1e-9)
    assert got == pytest.approx(expected, abs=1e-6)


def test_kl_decreases_with_log_alpha():
    la = torch.linspace(-8, 8, 101, dtype=torch.float64)
    v = kl(la)
    assert bool((v[1:] < v[:-1]).all()) and bool((v > 0).all())


def test_log_alpha_clipping_and_straight_through():
    theta = torch.tensor([1.0, 1.0, 1.0, 0.01])
    ls2 = torch.tensor([-10.0, 0.0, 20.0, -4.0], requires_grad=True)
    la = log_alpha_of(theta, ls2).detach()
    assert la.tolist() == pytest.approx([-8.0, 0.0, 8.0, -4.0 - 2 * math.log(0.01)],
                                        abs=1e-5)
    assert float(la.max()) <= 8 and float(la.min()) >= -8
    # a hard clamp has no gradient at the initial log alpha = -10; straight-through has
    (g_hard,) = torch.autograd.grad(kl(clip_log_alpha(ls2[:1] - 0.0)).sum(), ls2)
    assert float(g_hard[0]) == 0.0
    st = clip_log_alpha(ls2[:1] - 0.0, straight_through=True)
    assert float(st.detach()) == -8.0
    (g_st,) = torch.autograd.grad(kl(st).sum(), ls2)
    assert float(g_st[0]) < 0  # the KL pushes log sigma^2 (so alpha) up
    # the gates start at log alpha -10 -> clipped to -8
    gates = VDGates({0: 3})
    assert gates.log_alpha(0).tolist() == [-8.0, -8.0, -8.0]
    assert gates.log_alpha(0, clip=False).tolist() == [-10.0, -10.0, -10.0]


def test_drop_rule():
    la = torch.tensor([-8.0, 2.99, 3.0, 5.0, 12.0])
    assert dropped_mask(la).tolist() == [False, False, True, True, True]
    assert dropped_mask(la, threshold=6.0).tolist() == [False, False, False, False, True]


def test_kl_warmup():
    assert kl_beta(0, 100) == 0.0
    assert kl_beta(15, 100) == 0.0
    assert kl_beta(60, 100) == 1.0
    assert kl_beta(100, 100) == 1.0
    assert kl_beta(75, 200) == pytest.approx(0.5)  # halfway between 30 and 120


def test_gates_sample_in_training_and_use_means_in_eval():
    gates = VDGates({0: 4}, log_sigma2_init=0.0)
    gates.theta["0"].data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    gates.eval()
    assert gates.sample(0).tolist() == [1.0, 2.0, 3.0, 4.0]
    gates.train()
    torch.manual_seed(0)
    assert gates.sample(0).tolist() != [1.0, 2.0, 3.0, 4.0]


def test_folding_reproduces_the_gated_model(trained_tiny_hidden, tmp_path):
    ctx = make_ctx(trained_tiny_hidden, tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial norm statistics
        for m in ctx.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    groups = ctx.graph.prunable_groups
    assert {g.id for g in groups} == {1, 2, 3}
    theta = {g.id: torch.rand(g.size) * 2 - 0.5 for g in groups}  # some negative
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        gated = ctx.gated({gid: (lambda t=t: t) for gid, t in theta.items()}).eval()
        want = gated(x)
        plain = ctx.model.eval()(x)
    assert not torch.allclose(plain, want, atol=1e-3)
    assert fold_gates(ctx, theta) == []  # every gate point had parameters
    with torch.no_grad():
        got = ctx.model.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # zero gates fold to removal: the slim model equals the gated model
    ctx2 = make_ctx(trained_tiny_hidden, tmp_path)
    keep = {1: [0, 2, 3, 7, 9, 15], 2: list(range(0, 32, 3)), 3: [1, 4, 5, 20]}
    mask = {g: torch.zeros(ctx2.graph.groups[g].size).index_fill_(0, torch.tensor(v), 1.0)
            * theta[g] for g, v in keep.items()}
    with torch.no_grad():
        want = ctx2.gated({g: (lambda t=t: t) for g, t in mask.items()}).eval()(x)
    fold_gates(ctx2, mask)
    small = slim(ctx2.graph, keep, ctx2.model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)


def test_vardrop_end_to_end(trained_tiny_hidden, tmp_path):
    ctx = make_ctx(trained_tiny_hidden, tmp_path, epochs=1.0)
    method = VariationalDropout()
    ctx.settings = dict(method.defaults)
    proposal = method.search(ctx)
    check_plan(ctx, proposal, 1)
    info = proposal.info
    assert set(info["dropped_per_group"]) == {"1", "2", "3"}
    assert sum(info["log_alpha_histogram"]["counts"]) == info["channels_total"] == 72
    assert info["unfolded_gate_points"] == []
    # the returned weights are the gated model's at the means: the plain model runs them
    full = slim(ctx.graph, {}, proposal.state_dict).eval()
    with torch.no_grad():
        assert bool(torch.isfinite(full(torch.randn(2, 3, 16, 16))).all())


def test_the_kl_weights_a_channel_by_its_cost_so_a_flops_target_keeps_the_cheap_ones(
        trained_tiny_hidden, tmp_path):
    # The paper's KL treats every channel alike, so a FLOPs target took the cheap channels
    # (low resolution, rich in parameters) as readily as the expensive ones: on CIFAR
    # ResNet-20 the plan kept 52k parameters at 1/3 FLOPs (uniform widths: 108k) and ended
    # below uniform after fine-tuning. Weighted by cost, the 16x16 residual group's channels
    # (10x the FLOPs of an 8x8 one here) need more evidence to stay.
    kept, weights = {}, {}
    for power in (0.0, 1.0):
        ctx = make_ctx(trained_tiny_hidden, tmp_path / str(power), epochs=1.0)
        method = VariationalDropout()
        # the paper's fixed KL strength: the weighting alone decides what the drops cost
        ctx.settings = {**method.defaults, "cost_weight": power, "schedule": "fixed"}
        proposal = method.search(ctx)
        check_plan(ctx, proposal, 1)
        kept[power] = proposal.plan.achieved["params"]
        weights[power] = cost_weights(ctx, power)
    g16 = [g.id for g in ctx.graph.prunable_groups if g.size == 16][0]
    assert weights[0.0][g16] == 1.0 and weights[1.0][g16] > 2
    assert kept[1.0] > 1.2 * kept[0.0]


def test_the_growing_strength_makes_the_drops_meet_the_target(trained_tiny_hidden, tmp_path):
    # The paper's KL (sum KL / N) is made for hundreds of epochs: in the pipeline's budget no
    # gate crossed the drop threshold (CIFAR ResNet-20: 0 of 448 at log alpha >= 3), so the
    # plan was landed on noise below the clip. The growing strength raises the KL while the
    # cost of the channels not dropped lags a path to the target, so the drops decide it.
    costs = {}
    for schedule in ("fixed", "growing"):
        ctx = make_ctx(trained_tiny_hidden, tmp_path / schedule, epochs=3.0)
        method = VariationalDropout()
        ctx.settings = {**method.defaults, "schedule": schedule}
        proposal = method.search(ctx)
        check_plan(ctx, proposal, 1)
        info = proposal.info
        costs[schedule] = info["drop_rule_cost"]["flops"] / ctx.constraints[0].limit
        if schedule == "growing":
            assert info["strength_final"] > 1.0
            assert "the KL's strength grown to x" in method_evidence("vardrop", info)
            assert info["strength_trace"][-1]["kept_cost_ratio"] == pytest.approx(costs[schedule])
            assert sum(info["dropped_per_group"].values()) > 0
        else:
            assert info["strength_final"] == 1.0
    # With the paper's strength the channels the drop rule keeps cost twice the target or more
    # (2.0-2.5 over 3-8 epochs); the growing strength takes them to about the target or below
    # (here 0.96; 1.16 with channels-last weights, whose rounding tips this 3-epoch
    # trajectory; 0.14-1.16 over 3-8 epochs in either layout: it can overshoot). Whether the
    # plan then keeps every channel the rule keeps is the target step's to decide where
    # landing within 1% needs a trade (graphsearch/target.py, its third stage).
    assert costs["fixed"] > 1.5
    assert costs["growing"] <= 1.2


def test_a_schedule_it_does_not_know_is_a_clear_error(trained_tiny_hidden, tmp_path):
    ctx = make_ctx(trained_tiny_hidden, tmp_path, epochs=1.0)
    method = VariationalDropout()
    ctx.settings = {**method.defaults, "schedule": "steady"}
    with pytest.raises(UserError,
                       match="schedule='steady': vardrop's schedule takes one of growing"):
        method.search(ctx)


def test_refit_restarts_the_plan_from_the_baseline_weights(trained_tiny_hidden, tmp_path):
    # With the growing strength most gates end far above the drop threshold and the network
    # the gates trained is a noisy one (CIFAR ResNet-20: 73.4% after the full fine-tune from
    # those weights); the plan's channels restart from the baseline's (the default).
    model = trained_tiny_hidden[0]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {}
    for refit in (True, False):
        ctx = make_ctx(trained_tiny_hidden, tmp_path / str(refit), epochs=1.0)
        method = VariationalDropout()
        ctx.settings = {**method.defaults, "refit": refit}
        proposal = method.search(ctx)
        check_plan(ctx, proposal, 1)
        assert proposal.info["refit"] is refit
        states[refit] = proposal.state_dict
    for k, v in base.items():
        torch.testing.assert_close(states[True][k], v)
    assert any(not torch.equal(states[False][k], v) for k, v in base.items()
               if v.is_floating_point())


def test_plan_widths_makes_the_path_count_the_kept_channels_at_the_plans_multiple(
        trained_tiny_hidden, tmp_path, monkeypatch):
    # The path's cost decides how the strength moves. With widths in multiples of 8, 11 kept
    # channels of a group are 16 in the plan: `plan_widths` counts them so (the rounding
    # itself: test_group_lasso's test of `alive_cost`), off counts 11.
    seen = []

    def recording(graph, alive, ev, round_to=1):
        seen.append(round_to)
        return alive_cost(graph, alive, ev, round_to)

    monkeypatch.setattr(vardrop_module, "alive_cost", recording)
    for on in (False, True):
        seen.clear()
        ctx = make_ctx(trained_tiny_hidden, tmp_path / str(on), round_to=8, epochs=1.0)
        method = VariationalDropout()
        ctx.settings = {**method.defaults, "plan_widths": on}
        proposal = method.search(ctx)
        # (multiples of 8 are too coarse here to land within 1% of the target)
        assert ctx.graph.cost(proposal.plan.keep).flops <= ctx.constraints[0].limit
        assert seen and set(seen) == {8 if on else 1}
        assert proposal.info["path_round_to"] == (8 if on else 1)
