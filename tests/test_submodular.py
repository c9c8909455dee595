"""The submodular search: CELF selects what the plain greedy selects on a known submodular
function with fewer evaluations; the method follows its own F (a known F that rewards one
group makes that group grow first); end to end on a tiny model it lands within 1% below the
target, and a rerun on the same state folder replays from the cache without new evaluations."""

import copy
import itertools

import numpy as np
import pytest
import torch

from graphsearch import zoo
from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.evaluator import CandidateEvaluator, EvalResult
from graphsearch.methods.base import SearchContext
from graphsearch.methods.common import CANDIDATE_SCORING
from graphsearch.methods.submodular import (Counted, Submodular, lazy_backward, lazy_greedy,
                                            plain_backward, plain_greedy)
from graphsearch.target import parse_constraint

X = (torch.zeros(1, 3, 16, 16),)
pytestmark = pytest.mark.usefixtures("one_thread")


def coverage_problem(seed):
    """Weighted coverage (monotone submodular): element i covers a random subset of 30 items."""
    rng = np.random.default_rng(seed)
    n_items, n_el = 30, 14
    weights = rng.random(n_items)
    covers = [frozenset(np.flatnonzero(rng.random(n_items) < 0.25).tolist())
              for _ in range(n_el)]
    costs = rng.uniform(1, 3, n_el)

    def value(S):
        items = set().union(*(covers[e] for e in S)) if S else set()
        return float(sum(weights[i] for i in items))

    return list(range(n_el)), value, costs


@pytest.mark.parametrize("seed,with_cost", list(itertools.product([0, 1, 2], [False, True])))
def test_lazy_greedy_selects_what_plain_greedy_selects_with_fewer_evaluations(seed, with_cost):
    elements, value, costs = coverage_problem(seed)
    budget = 9.0
    fits = lambda S: sum(costs[e] for e in S) <= budget  # noqa: E731
    cost = (lambda e, S: costs[e]) if with_cost else None
    eligible = lambda e, S: True  # noqa: E731
    lazy_F = Counted(lambda sets: [value(s) for s in sets])
    plain_F = Counted(lambda sets: [value(s) for s in sets])
    lazy = lazy_greedy(elements, lazy_F, frozenset(), eligible, fits, cost)
    plain = plain_greedy(elements, plain_F, frozenset(), eligible, fits, cost)
    assert lazy == plain and len(lazy) >= 3
    assert lazy_F.calls < plain_F.calls
    # batched re-evaluation (parallel workers) selects the same set too
    batched = lazy_greedy(elements, Counted(lambda sets: [value(s) for s in sets]), frozenset(),
                          eligible, fits, cost, batch=4)
    assert batched == plain


def test_increments_wait_for_their_predecessor():
    # chain elements: (g, k) needs (g, k - 1); value rewards group 1 only
    elements = [(g, k) for g in (0, 1) for k in (2, 3, 4)]
    F = Counted(lambda sets: [sum(1.0 / k for g, k in s if g == 1) for s in sets])
    seed = frozenset({(0, 1), (1, 1)})
    added = lazy_greedy(elements, F, seed, lambda e, S: (e[0], e[1] - 1) in S,
                        lambda S: len(S) <= 5)
    assert added == [(1, 2), (1, 3), (1, 4)]


def make_ctx(trained, state_dir, flops="0.4", settings=None, **kw):
    model, graph, data = trained
    return SearchContext(
        graph=graph, model=copy.deepcopy(model), data=data,
        constraints=[parse_constraint("flops", flops, graph.baseline.flops)], round_to=1,
        settings={**Submodular.defaults, **(settings or {})}, epochs=1.0, lr=0.02,
        batch_size=50, seed=0, state_dir=state_dir, progress=False, log=lambda s: None,
        **{"example_inputs": X, **kw})


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_end_to_end_meets_the_target_and_resumes_from_the_cache(trained, tmp_path, direction):
    ctx = make_ctx(trained, tmp_path, settings={"direction": direction})
    p1 = Submodular().search(ctx)
    limit = ctx.constraints[0].limit
    assert 0.99 * limit <= p1.plan.achieved["flops"] <= limit
    assert p1.info["evaluations_run"] > 0
    p2 = Submodular().search(make_ctx(trained, tmp_path, settings={"direction": direction}))
    assert p2.info["evaluations_run"] == 0 and p2.info["evaluations_cached"] > 0
    assert p2.plan.keep == p1.plan.keep


def resnet20_problem():
    """ResNet-20 (4 classes), its example input, its graph and a tiny synthetic data set."""
    torch.manual_seed(0)
    model = zoo.MODELS["resnet20"].builder(num_classes=4)
    x = (torch.zeros(1, 3, 32, 32),)
    return model, x, analyze(model, x), load_dataset("synthetic:48:4", image_size=32,
                                                     cache_dir=False)


def rewards_width_of(group, base: float, span: float):
    """A known F for `CandidateEvaluator.evaluate`: `base + span * sqrt(kept share of
    group)`, flat in every other group."""
    def evaluate(self, keeps, state_dict, teacher_state=None, labels=None):
        out = []
        for keep in keeps:
            c = self.cost(keep)
            w = len(keep.get(group.id, range(group.size)))
            acc = base + span * np.sqrt(w / group.size)
            out.append(EvalResult("k", keep, float(acc), c["flops"], c["macs"], c["params"],
                                  0.0))
        return out
    return evaluate


def test_the_search_follows_F(tmp_path, monkeypatch):
    """A known F on ResNet-20 that rewards only the width of one stage-3 residual branch
    (group 11, off in the seed): every pass turns the branch on and grows it to full width
    before anything else, and the landed plan keeps it whole. CELF choosing in random order, or by weight magnitude, does not."""

    model, x, graph, data = resnet20_problem()
    target = graph.groups[11]
    assert target.removable

    monkeypatch.setattr(CandidateEvaluator, "evaluate", rewards_width_of(target, 0.3, 0.6))
    ctx = make_ctx((model, graph, data), tmp_path, flops="0.33", example_inputs=x,
                   settings={"direction": "forward"})
    ctx.example_inputs = x
    p = Submodular().search(ctx)
    for entry in p.info["passes"]:
        assert entry["added"][:4] == [[11, 1], [11, 2], [11, 3], [11, 4]], entry["pass"]
    frac = {g.id: p.plan.widths[g.id] / g.size for g in graph.prunable_groups}
    assert frac[11] == 1.0
    assert sum(f == 1.0 for f in frac.values()) < len(frac) / 2
    limit = ctx.constraints[0].limit
    assert 0.99 * limit <= p.plan.achieved["flops"] <= limit


def test_where_F_is_flat_the_groups_grow_alike(tmp_path, monkeypatch):
    """Bug (benchmarks/results/cifar10_table.md: 24,421 parameters kept at 1/3 FLOPs, 16 points
    under uniform): candidates scored on the sliced weights all read chance, so every gain was
    0 and CELF's ties decided the plan. They went to the earliest element, i.e. the graph's
    order: the first stage (the costliest channels per parameter) grew to full width first
    and the budget ran out before the last stage grew. Ties now go to the lowest increment
    (round robin over the groups). Here F rewards only the width of one stage-3 branch
    (group 11) and is flat in every other group: the plan must keep that branch whole (F
    decides: uniform widths or a magnitude order fail here) and grow the rest alike (the
    graph's order fails: stage 1 at full width, 31,158 parameters against uniform's 91,919)."""

    model, x, graph, data = resnet20_problem()
    branch = graph.groups[11]

    monkeypatch.setattr(CandidateEvaluator, "evaluate", rewards_width_of(branch, 0.25, 0.5))
    ctx = make_ctx((model, graph, data), tmp_path, flops="0.33", example_inputs=x,
                   settings={"direction": "forward"})
    p = Submodular().search(ctx)
    uniform = SearchContext(graph=graph, model=model, data=None, constraints=ctx.constraints,
                  round_to=1, settings={}, epochs=0.0, lr=0.0, batch_size=1, seed=0,
                  state_dir=tmp_path, progress=False).land_widths({})
    frac = {g.id: p.plan.widths[g.id] / g.size for g in graph.prunable_groups}
    assert frac[branch.id] == 1.0
    stage1 = [g.id for g in graph.prunable_groups if g.size == 16]
    stage3 = [g.id for g in graph.prunable_groups if g.size == 64 and g.id != branch.id]
    assert max(frac[g] for g in stage1) < 1.0
    assert min(frac[g] for g in stage3) >= 0.5 * max(frac[g] for g in stage1)
    assert p.plan.achieved["params"] >= 0.75 * uniform.achieved["params"]
    limit = ctx.constraints[0].limit
    assert 0.99 * limit <= p.plan.achieved["flops"] <= limit


@pytest.mark.parametrize("seed,with_cost", list(itertools.product([0, 1, 2], [False, True])))
def test_lazy_backward_removes_what_plain_backward_removes_with_fewer_evaluations(seed,
                                                                                with_cost):
    elements, value, costs = coverage_problem(seed)
    budget = 9.0
    fits = lambda S: sum(costs[e] for e in S) <= budget  # noqa: E731
    saving = (lambda e, S: costs[e]) if with_cost else None
    removable = lambda e, S: True  # noqa: E731
    start = frozenset(elements)
    lazy_F = Counted(lambda sets: [value(s) for s in sets])
    plain_F = Counted(lambda sets: [value(s) for s in sets])
    lazy = lazy_backward(elements, lazy_F, start, removable, fits, saving)
    plain = plain_backward(elements, plain_F, start, removable, fits, saving)
    assert lazy == plain and len(lazy) >= 3 and fits(start - frozenset(lazy))
    assert lazy_F.calls < plain_F.calls
    batched = lazy_backward(elements, Counted(lambda sets: [value(s) for s in sets]), start,
                            removable, fits, saving, batch=4)
    assert batched == plain


def test_backward_keeps_what_F_rewards_and_shrinks_the_rest_alike(tmp_path, monkeypatch):
    """Backward (from the full model, the increment that loses least F per FLOP saved goes
    first): F rewards only the width of one stage-3 residual branch (group 11), so the branch
    stays whole (uniform widths and a magnitude order cut it like the rest), and where F is
    flat the groups shrink alike (the first stage is not emptied to pay for the others)."""
    model, x, graph, data = resnet20_problem()
    branch = graph.groups[11]
    monkeypatch.setattr(CandidateEvaluator, "evaluate", rewards_width_of(branch, 0.25, 0.5))
    ctx = make_ctx((model, graph, data), tmp_path, flops="0.33", example_inputs=x,
                   settings={"direction": "backward"})
    p = Submodular().search(ctx)
    assert p.info["direction"] == "backward" and p.info["evaluations"] > 0
    assert all(g != branch.id for g, _ in p.info["passes"][0]["removed"])
    frac = {g.id: p.plan.widths[g.id] / g.size for g in graph.prunable_groups}
    assert frac[branch.id] == 1.0
    others = [f for gid, f in frac.items() if gid != branch.id]
    assert min(others) > 0 and max(others) < 1.0
    limit = ctx.constraints[0].limit
    assert 0.99 * limit <= p.plan.achieved["flops"] <= limit


def test_backward_end_to_end_on_real_scores(trained, tmp_path):
    ctx = make_ctx(trained, tmp_path, settings={"direction": "backward"})
    p = Submodular().search(ctx)
    limit = ctx.constraints[0].limit
    assert 0.99 * limit <= p.plan.achieved["flops"] <= limit
    assert p.info["candidate_steps"] == 0 and p.info["evaluations_run"] > 0
    # backward candidates are near neighbours: scored on the whole validation split (on CIFAR
    # ResNet-20, a fixed draw of 1,000 images gave 84.47% after the fine-tune, the whole
    # split 85.53%); forward keeps the cheap fixed draw
    assert p.info["candidate_val_samples"] == 0
    forward = Submodular().search(make_ctx(trained, tmp_path / "f",
                                           settings={"direction": "forward"}))
    assert forward.info["candidate_val_samples"] == CANDIDATE_SCORING["candidate_val_samples"]
    chosen = Submodular().search(make_ctx(trained, tmp_path / "c", settings={
        "direction": "backward", "candidate_val_samples": 30}))
    assert chosen.info["candidate_val_samples"] == 30
    with pytest.raises(Exception, match="direction"):
        Submodular().search(make_ctx(trained, tmp_path / "x", settings={"direction": "up"}))
