"""MorphNet: the FLOP regulariser of a two-conv net computed by hand, the max (or L2) over a
residual group, and the method end to end on a tiny model."""

import copy

import numpy as np
import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.load import UserError
from graphsearch.methods.morphnet import FlopRegulariser, MorphNet
from hand_models import X8, X16, Residual, TwoConv, ctx_for, end_to_end, hidden_group, randomise

pytestmark = pytest.mark.usefixtures("one_thread")


def test_morphnet_regulariser_of_a_two_conv_net_by_hand():
    model = randomise(TwoConv(), seed=1)
    with torch.no_grad():
        model.b1.weight.copy_(torch.tensor([0.5, -0.2, 0.005, 1.0]))  # channel 2 is dead
        model.b2.weight.copy_(torch.tensor([0.3, 0.0, -0.4, 0.1, 0.2]))  # channel 1 is dead
    graph = analyze(model, X8)
    reg = FlopRegulariser(graph, model, threshold=0.01)
    r1 = torch.tensor([0.5, 0.2, 0.005, 1.0]).double()
    r2 = torch.tensor([0.3, 0.0, 0.4, 0.1, 0.2]).double()
    a1, a2 = 3.0, 4.0  # alive counts
    hw = 8 * 8
    # FLOPs per unit of width = 2 * MACs per unit: conv1 3x3x3 in, conv2 1x1, linear
    c1 = 2 * hw * 9  # in = image (3 channels, always alive, r = 0), out = group 4
    c2 = 2 * hw * 1
    c3 = 2 * 1  # linear 5 -> 2: out = logits (2, always alive, r = 0)
    expected = (c1 * (3 * float(r1.sum()) + a1 * 0.0)
                + c2 * (a1 * float(r2.sum()) + a2 * float(r1.sum()))
                + c3 * (a2 * 0.0 + 2 * float(r2.sum())))
    value = float(reg(model).detach())
    assert value == pytest.approx(expected, rel=1e-9)
    # the FLOPs of the alive widths equal the cost model's FLOPs at those widths (convs and
    # linear; the linear's bias and BN are not MACs)
    alive = reg.alive(reg.r(model))
    g4, g5 = hidden_group(graph, 4), hidden_group(graph, 5)
    assert reg.flops(alive) == pytest.approx(graph.cost({g4: [0, 1, 3], g5: [0, 2, 3, 4]}).flops)
    # the gradient reaches the gammas with sign(gamma) * coefficient
    model.zero_grad()
    reg(model).backward()
    expected_grad_b1 = (c1 * 3 + c2 * a2) * torch.sign(model.b1.weight.detach())
    assert torch.allclose(model.b1.weight.grad.double(), expected_grad_b1.double(), rtol=1e-9)


def test_morphnet_residual_group_reads_the_max_gamma():
    model = randomise(Residual())
    with torch.no_grad():
        model.b1.weight.copy_(torch.tensor([0.1, -0.7, 0.0, 0.3]))
        model.b2.weight.copy_(torch.tensor([-0.4, 0.2, 0.0, 0.05]))
    graph = analyze(model, X8)
    reg = FlopRegulariser(graph, model)
    (gid,) = [g.id for g in graph.prunable_groups if g.size == 4]
    r = reg.per_group(reg.r(model))[gid]
    assert np.allclose(r, [0.4, 0.7, 0.0, 0.3])
    alive = reg.per_group(reg.alive(reg.r(model)))[gid]
    assert alive.tolist() == [1, 1, 0, 1]  # OR over the members


def test_morphnet_residual_group_with_combine_l2_reads_the_joint_norm():
    """`combine=l2`: a residual channel's r is the L2 norm of its gammas, and an unknown
    combine is a clear error."""
    model = randomise(Residual())
    with torch.no_grad():
        model.b1.weight.copy_(torch.tensor([0.3, -0.7, 0.0, 0.0]))
        model.b2.weight.copy_(torch.tensor([-0.4, 0.0, 0.0, 0.005]))
    graph = analyze(model, X8)
    reg = FlopRegulariser(graph, model, combine="l2")
    (gid,) = [g.id for g in graph.prunable_groups if g.size == 4]
    r = reg.per_group(reg.r(model))[gid]
    assert np.allclose(r, [0.5, 0.7, 0.0, 0.005])
    assert reg.per_group(reg.alive(reg.r(model)))[gid].tolist() == [1, 1, 0, 0]
    with pytest.raises(UserError, match="combine"):
        FlopRegulariser(graph, model, combine="sum")


def test_end_to_end_on_a_tiny_model(trained_tiny, tmp_path):
    method = MorphNet()
    model, graph, _ = trained_tiny
    reg = FlopRegulariser(graph, model)
    with torch.no_grad():
        reg_before = float(reg(model))
    proposal, _ = end_to_end(method, trained_tiny, tmp_path, dict(method.defaults))
    # the shrinking phase pulled the gammas down (this baseline's are all near 1, so none
    # reaches the 0.01 threshold in 24 steps: the widths come from the expansion)
    # (measured before the refit puts the baseline's weights back)
    assert proposal.info["rounds"][0]["regulariser"] < 0.8 * reg_before


def test_cost_weight_rescales_the_pull_by_a_power_of_each_channels_flops():
    model = randomise(TwoConv(), seed=1)
    graph = analyze(model, X8)
    paper = FlopRegulariser(graph, model, threshold=0.01)
    r = paper.r(model).detach()
    r_ = r.clone().requires_grad_(True)
    grad = torch.autograd.grad(paper.value(r_), r_)[0]
    assert torch.equal(paper.pull(r), grad)  # 1: the paper's pull, dR/dr
    has = paper.has_gamma
    # the two groups' channels cost different FLOPs per unit of r
    assert len(set(np.round(grad[has].numpy(), 6))) == 2
    flat = FlopRegulariser(graph, model, threshold=0.01, cost_weight=0.0).pull(r)
    assert torch.allclose(flat[has], grad[has].mean().expand(int(has.sum())))
    half = FlopRegulariser(graph, model, threshold=0.01, cost_weight=0.5).pull(r)
    assert half[has].mean().item() == pytest.approx(grad[has].mean().item())
    assert torch.allclose(half[has] / half[has].mean(),
                          grad[has].sqrt() / grad[has].sqrt().mean())
    assert float(flat[~has].abs().sum()) == 0.0
    with pytest.raises(UserError, match="cost_weight=-1"):
        FlopRegulariser(graph, model, cost_weight=-1.0)


def test_cost_weight_0_keeps_the_costliest_stream(trained_two_stage, tmp_path):
    # the first stage's stream is tied to four convolutions: at the paper's FLOP pull MorphNet
    # thins it to a channel or two (CIFAR ResNet-32: a stream went to a quarter); an equal pull
    # on every channel leaves it most of its channels
    model, graph, data = trained_two_stage
    stream = min((g for g in graph.prunable_groups if g.min_width > 0), key=lambda g: g.size)

    def plan(cost_weight):
        ctx = ctx_for(copy.deepcopy(model), graph, tmp_path / str(cost_weight), data,
                      flops="0.33", settings={**MorphNet.defaults, "cost_weight": cost_weight},
                      epochs=3.0)
        ctx.example_inputs = X16
        proposal = MorphNet().search(ctx)
        assert proposal.info["cost_weight"] == cost_weight
        assert graph.cost(proposal.plan.keep).flops <= ctx.constraints[0].limit
        return proposal.plan.widths.get(stream.id, stream.size)

    assert plan(1.0) < 4
    assert plan(0.0) >= 8
