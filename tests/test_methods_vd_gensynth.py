"""Variational dropout and generative synthesis: the mathematics on hand-sized numbers, weight
folding, Bernoulli synthesis, and each method end to end on a tiny model and tiny data (with a
resumed gensynth run reaching the same plan)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.methods.base import SearchContext
from graphsearch.methods.gensynth import (GenerativeSynthesis, generator_update, netscore,
                                          normalise, synthesize_group)
from graphsearch.methods.vardrop import (K1, K2, K3, VariationalDropout, VDGates,
                                         clip_log_alpha, dropped_mask, fold_gates, kl, kl_beta,
                                         log_alpha_of)
from graphsearch.target import allowed_widths, parse_constraint
from graphsearch.train import train
from graphsearch.passes.slim import slim


class Tiny(nn.Module):
    """conv-bn (a residual group), a strided conv-bn, and a hidden linear without a norm (its
    gate sits right after the producer)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 24)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.relu(self.fc1(x.mean((2, 3)))))


X = (torch.zeros(1, 3, 16, 16),)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread):
    data = load_dataset("synthetic:400:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = Tiny()
    train(model, data, epochs=2, lr=0.05, batch_size=50, progress=False)
    return model, analyze(model, X), data


def make_ctx(trained, state_dir, *, flops="0.4", round_to=1, settings=None, epochs=1.0,
             log=lambda s: None):
    model, graph, data = trained
    return SearchContext(
        graph=graph, model=copy.deepcopy(model), data=data,
        constraints=[parse_constraint("flops", flops, graph.baseline.flops)],
        round_to=round_to, settings=dict(settings or {}), epochs=epochs, lr=0.02,
        batch_size=50, seed=0, state_dir=state_dir, progress=False, log=log,
        example_inputs=X)


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


def test_folding_reproduces_the_gated_model(trained, tmp_path):
    ctx = make_ctx(trained, tmp_path)
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
    ctx2 = make_ctx(trained, tmp_path)
    keep = {1: [0, 2, 3, 7, 9, 15], 2: list(range(0, 32, 3)), 3: [1, 4, 5, 20]}
    mask = {g: torch.zeros(ctx2.graph.groups[g].size).index_fill_(0, torch.tensor(v), 1.0)
            * theta[g] for g, v in keep.items()}
    with torch.no_grad():
        want = ctx2.gated({g: (lambda t=t: t) for g, t in mask.items()}).eval()(x)
    fold_gates(ctx2, mask)
    small = slim(ctx2.graph, keep, ctx2.model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- gensynth maths


def test_generator_update_by_hand():
    p = np.array([1.0, 0.5, 0.2, 0.8])
    s = np.array([1.0, 0.5, 0.0, 0.9])
    alive = np.array([True, True, True, False])
    got = generator_update(p, s, alive, eta=0.5)
    want = [0.5 * 1.0 + 0.5 * 1.0,
            0.5 * 0.5 + 0.5 * math.exp(-0.5),
            0.5 * 0.2 + 0.5 * math.exp(-1.0),
            0.5 * 0.8]  # not alive: decays
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got.tolist() == pytest.approx([1.0, 0.553265, 0.283940, 0.4], abs=1e-6)


def test_normalise_per_group():
    r = np.array([2.0, -4.0, 1.0, 100.0])
    alive = np.array([True, True, True, False])
    assert normalise(r, alive).tolist() == [0.5, 1.0, 0.25, 0.0]
    assert normalise(np.zeros(3), np.ones(3, bool)).tolist() == [0.0, 0.0, 0.0]


def test_netscore_by_hand():
    # the paper's ResNet-32 baseline: 91.6%, 487,754 params, 144.37 MFLOPs = 72.185 MMACs
    got = netscore(91.6, 487_754, 72.185e6)
    want = 20 * math.log10(91.6 ** 2 / (math.sqrt(0.487754) * math.sqrt(72.185)))
    assert got == pytest.approx(want, abs=1e-9)
    assert got == pytest.approx(63.0093, abs=1e-4)
    assert netscore(50.0, 1e6, 1e6) == pytest.approx(20 * math.log10(2500.0))
    assert netscore(0.0, 1e6, 1e6) == float("-inf")


@pytest.mark.parametrize("round_to", [1, 4, 8])
@pytest.mark.parametrize("min_width", [0, 1])
def test_synthesis_respects_min_width_and_round_to(round_to, min_width):
    rng = np.random.default_rng(0)
    size = 24
    p = np.linspace(0.05, 1.0, size)
    alive = np.arange(0, size, 1)
    allowed = set(allowed_widths(size, min_width, round_to).tolist())
    widths = []
    for F_ in (0.0, 0.1, 0.5, 1.0, 3.0):
        for _ in range(40):
            kept = synthesize_group(rng, p, alive, F_, size, min_width, round_to)
            assert set(kept.tolist()) <= set(alive.tolist())
            assert len(set(kept.tolist())) == len(kept)
            assert len(kept) in allowed
            if F_ == 0.0:
                assert len(kept) == min(a for a in allowed)
            if F_ >= 1 / p.min():
                assert len(kept) == size
            widths.append(len(kept))
    # stochastic rounding keeps the expected width: F p = 0.5 everywhere -> mean 12
    flat = np.full(size, 0.5)
    mean = np.mean([len(synthesize_group(rng, flat, alive, 1.0, size, min_width, round_to))
                    for _ in range(2000)])
    assert mean == pytest.approx(12.0, abs=0.6)


def test_synthesis_descends_from_the_parent():
    rng = np.random.default_rng(1)
    alive = np.array([1, 5, 6, 9, 12, 13, 20, 22])  # the parent's 8 channels of 24
    for _ in range(50):
        kept = synthesize_group(rng, np.ones(24), alive, 0.6, 24, 1, 8)
        assert len(kept) == 8 and kept.tolist() == alive.tolist()  # only 8 is allowed <= 8
        kept = synthesize_group(rng, np.ones(24), alive, 0.6, 24, 1, 1)
        assert set(kept.tolist()) <= set(alive.tolist()) and len(kept) >= 1


# --------------------------------------------------------------------------- end to end


def check_plan(ctx, proposal, round_to):
    graph = ctx.graph
    limit = ctx.constraints[0].limit
    flops = graph.cost(proposal.plan.keep).flops
    assert flops == proposal.plan.achieved["flops"]
    assert 0.99 * limit <= flops <= limit
    for gid, w in proposal.plan.widths.items():
        g = graph.groups[gid]
        assert w in allowed_widths(g.size, g.min_width, round_to)
    small = slim(graph, proposal.plan.keep, proposal.state_dict).eval()
    with torch.no_grad():
        out = small(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 4) and bool(torch.isfinite(out).all())
    assert sum(p.numel() for p in small.parameters()) == proposal.plan.achieved["params"]


def test_vardrop_end_to_end(trained, tmp_path):
    ctx = make_ctx(trained, tmp_path, epochs=1.0)
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


def test_gensynth_end_to_end_and_resume(trained, tmp_path):
    method = GenerativeSynthesis()
    settings = {**method.defaults, "cycles": 3, "children": 3, "cost_draws": 8}
    ctx_a = make_ctx(trained, tmp_path / "a", flops="0.5", round_to=4, settings=settings)
    a = method.search(ctx_a)
    check_plan(ctx_a, a, 4)
    cycles = a.info["cycles"]
    assert a.info["new_cycles"] == len(cycles) >= 2
    assert (tmp_path / "a" / "gensynth.pt").exists()
    assert not list((tmp_path / "a").glob("gensynth_c*.ckpt"))  # children's files cleaned
    assert len(ctx_a.candidates) == sum(len(c["children"]) for c in cycles)
    assert set(ctx_a.candidates[0]) == {"flops", "params", "accuracy", "label"}
    for c in cycles:
        assert c["goal_ratio"] <= c["parent_ratio"] * 0.8 + 1e-9 or c["goal_ratio"] == 1.0
    # interrupted right after cycle 1 is saved, then rerun with the same state directory
    class Stop(Exception):
        pass

    def stop_after_first(msg):
        if msg.startswith("gensynth: cycle 1/"):
            raise Stop

    ctx_b = make_ctx(trained, tmp_path / "b", flops="0.5", round_to=4, settings=settings,
                     log=stop_after_first)
    with pytest.raises(Stop):
        method.search(ctx_b)
    ctx_c = make_ctx(trained, tmp_path / "b", flops="0.5", round_to=4, settings=settings)
    c = method.search(ctx_c)
    assert c.info["resumed_from_cycle"] == 1
    assert c.info["new_cycles"] == a.info["new_cycles"] - 1
    assert c.plan.keep == a.plan.keep and c.plan.widths == a.plan.widths
    for k, v in a.state_dict.items():
        assert torch.equal(v, c.state_dict[k]), k
    assert ctx_c.candidates == ctx_a.candidates
    # a finished search found again: nothing new to do, same plan
    again = method.search(make_ctx(trained, tmp_path / "b", flops="0.5", round_to=4,
                                   settings=settings))
    assert again.info["new_cycles"] == 0 and again.plan.keep == a.plan.keep
