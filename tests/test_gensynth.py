"""Generative synthesis: the mathematics on hand-sized numbers, Bernoulli synthesis, and the
method end to end on a tiny model and tiny data, with a resumed run reaching the same plan."""

import math

import numpy as np
import pytest
import torch

from graphsearch.load import UserError
from graphsearch.methods.gensynth import (GenerativeSynthesis, generator_update, netscore,
                                          netscore_terms, normalise, synthesize_group)
from graphsearch.target import allowed_widths
from hand_models import check_plan, make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_gensynth_end_to_end_and_resume(trained_tiny_hidden, tmp_path):
    method = GenerativeSynthesis()
    settings = {**method.defaults, "cycles": 3, "children": 3, "cost_draws": 8}
    ctx_a = make_ctx(trained_tiny_hidden, tmp_path / "a", flops="0.5", round_to=4, settings=settings)
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

    ctx_b = make_ctx(trained_tiny_hidden, tmp_path / "b", flops="0.5", round_to=4, settings=settings,
                     log=stop_after_first)
    with pytest.raises(Stop):
        method.search(ctx_b)
    ctx_c = make_ctx(trained_tiny_hidden, tmp_path / "b", flops="0.5", round_to=4, settings=settings)
    c = method.search(ctx_c)
    assert c.info["resumed_from_cycle"] == 1
    assert c.info["new_cycles"] == a.info["new_cycles"] - 1
    assert c.plan.keep == a.plan.keep and c.plan.widths == a.plan.widths
    for k, v in a.state_dict.items():
        assert torch.equal(v, c.state_dict[k]), k
    assert ctx_c.candidates == ctx_a.candidates
    # a finished search found again: nothing new to do, same plan
    again = method.search(make_ctx(trained_tiny_hidden, tmp_path / "b", flops="0.5", round_to=4,
                                   settings=settings))
    assert again.info["new_cycles"] == 0 and again.plan.keep == a.plan.keep
    # `refit`: the same loop (read back: refit is not part of the checkpoint's fingerprint),
    # the same plan, and the baseline's weights instead of the children's trained ones
    base = trained_tiny_hidden[0].state_dict()
    refit = method.search(make_ctx(trained_tiny_hidden, tmp_path / "b", flops="0.5", round_to=4,
                                   settings={**settings, "refit": True}))
    assert refit.info["new_cycles"] == 0 and refit.info["refit"] is True
    assert refit.plan.keep == a.plan.keep
    assert all(torch.equal(v, base[k]) for k, v in refit.state_dict.items())
    assert not all(torch.equal(v, base[k]) for k, v in a.state_dict.items())


def test_netscore_costs_targets_drops_the_cost_without_a_target():
    # the final cycle's children sit at the FLOPs target: the paper's NetScore prefers the
    # child with fewer parameters (CIFAR: 67.6% at 1x params over 71.1% at 1.32x), NetScore
    # over the target's cost alone prefers the more accurate one
    lean, rich = (67.6, 80_000, 13.6e6), (71.1, 105_600, 13.6e6)
    paper = netscore_terms("all", ["flops"])
    assert set(paper) == {"macs", "params"}
    assert netscore(*lean, paper) > netscore(*rich, paper)
    only = netscore_terms("targets", ["flops"])
    assert only == ("macs",)
    assert netscore(*rich, only) > netscore(*lean, only)
    assert set(netscore_terms("targets", ["params", "latency"])) == {"macs", "params"}
    with pytest.raises(UserError, match="netscore_costs"):
        netscore_terms("both", ["flops"])


def test_netscore_costs_reaches_the_search_loop(trained_tiny_hidden, tmp_path):
    # the setting must change the score the loop ranks children by, not just the pure function
    method = GenerativeSynthesis()
    settings = {**method.defaults, "cycles": 2, "children": 2, "cost_draws": 4,
                "netscore_costs": "targets"}
    ctx = make_ctx(trained_tiny_hidden, tmp_path, flops="0.5", round_to=4, settings=settings)
    children = [c for cycle in method.search(ctx).info["cycles"] for c in cycle["children"]]
    assert children
    for c in children:
        acc = 100.0 * c["accuracy"]
        assert c["netscore"] == pytest.approx(netscore(acc, c["params"], c["macs"], ("macs",)))
        assert c["netscore"] != pytest.approx(netscore(acc, c["params"], c["macs"]))
