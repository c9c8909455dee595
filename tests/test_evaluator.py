"""The candidate evaluator: deterministic scores whatever the backend and worker count, costs
from the graph, every finished evaluation cached by plan, and an interrupted batch resumed
without rerunning what had finished."""

import copy

import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.evaluator import (CandidateEvaluator, EvalSettings, GateResponses, plan_key,
                                   plan_seed, run_candidate)
from graphsearch.load import UserError
from graphsearch.passes.gates import gated
from graphsearch.passes.slim import slim, unslim_state
from graphsearch.train import train
from tiny_model import Tiny

X = (torch.zeros(1, 3, 16, 16),)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    data = load_dataset("synthetic:200:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = Tiny()
    train(model, data, epochs=1, lr=0.05, batch_size=50, progress=False)
    return model, analyze(model, X), data


def plans(graph):
    g = [g.id for g in graph.prunable_groups]
    return [{}, {g[0]: list(range(8))}, {g[-1]: list(range(0, 32, 2))},
            {g[0]: list(range(4)), g[-1]: list(range(16))}]


SETTINGS = EvalSettings(steps=3, lr=0.02, batch_size=50, seed=1)


def test_scores_and_costs_of_a_batch(setup, tmp_path):
    model, graph, data = setup
    ev = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    res = ev.evaluate(plans(graph), model.state_dict())
    assert ev.fresh == 4 and ev.cached == 0
    for p, r in zip(plans(graph), res):
        assert r.flops == graph.cost(p).flops and r.params == graph.cost(p).params
        assert 0.0 <= r.accuracy <= 1.0
        # the score is the plan's slim model trained with the plan's own seed
        small = slim(graph, p, model.state_dict())
        again = run_candidate(small, data, SETTINGS, plan_seed(p, SETTINGS))
        assert again["accuracy"] == r.accuracy
    # a second evaluator on the same folder reads every result back
    ev2 = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    res2 = ev2.evaluate(list(reversed(plans(graph))), model.state_dict())
    assert ev2.fresh == 0 and ev2.cached == 4
    assert [r.accuracy for r in res2] == [r.accuracy for r in reversed(res)]


def test_key_depends_on_plan_settings_and_weights():
    a = plan_key({1: [0, 1]}, SETTINGS, "w")
    assert a == plan_key({1: [1, 0]}, SETTINGS, "w")
    assert a != plan_key({1: [0, 2]}, SETTINGS, "w")
    assert a != plan_key({1: [0, 1]}, EvalSettings(steps=4, lr=0.02, batch_size=50, seed=1), "w")
    assert a != plan_key({1: [0, 1]}, SETTINGS, "v")
    # the training seed comes from the plan, not from where it runs
    assert plan_seed({1: [0, 1]}, SETTINGS) != plan_seed({1: [0, 2]}, SETTINGS)


def test_one_and_two_local_workers_give_identical_scores(setup):
    model, graph, data = setup
    ev1 = CandidateEvaluator(graph, data, SETTINGS, cache_dir=None, workers=1)
    one = [r.accuracy for r in ev1.evaluate(plans(graph), model.state_dict())]
    with CandidateEvaluator(graph, data, SETTINGS, cache_dir=None, workers=2) as ev2:
        two = [r.accuracy for r in ev2.evaluate(plans(graph), model.state_dict())]
        assert ev2.runs_on.pool is not None  # it really ran in worker processes
    assert one == two


def test_distillation_needs_and_uses_the_teacher(setup):
    model, graph, data = setup
    s = EvalSettings(steps=2, lr=1e-3, batch_size=50, optimizer="adam", distill=True)
    ev = CandidateEvaluator(graph, data, s, workers=1)
    with pytest.raises(ValueError):
        ev.evaluate(plans(graph)[:1], model.state_dict())
    r = ev.evaluate(plans(graph)[1:2], model.state_dict(), teacher_state=model.state_dict())
    assert 0.0 <= r[0].accuracy <= 1.0


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_batch_resumes_without_rerunning_finished_evaluations(
        setup, tmp_path, workers):
    model, graph, data = setup
    seen = []

    def stop_after_two(r):
        seen.append(r.key)
        if len(seen) == 2:
            raise Interrupt

    ev = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=workers,
                            on_result=stop_after_two)
    with pytest.raises(Interrupt):
        ev.evaluate(plans(graph), model.state_dict())
    ev.close()
    finished = {p.stem for p in tmp_path.glob("*.json")}
    assert finished == set(seen)
    ran = []
    ev2 = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=workers,
                             on_result=lambda r: ran.append(r.key))
    res = ev2.evaluate(plans(graph), model.state_dict())
    ev2.close()
    assert ev2.fresh == 2 and ev2.cached == 2
    assert not set(ran) & finished
    ref = CandidateEvaluator(graph, data, SETTINGS, workers=1).evaluate(plans(graph),
                                                                        model.state_dict())
    assert [r.accuracy for r in res] == [r.accuracy for r in ref]


def test_bad_worker_count_and_missing_ray_are_clear(setup, monkeypatch):
    model, graph, data = setup
    with pytest.raises(UserError, match="workers"):
        CandidateEvaluator(graph, data, SETTINGS, workers=0)
    import builtins
    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"graphsearch\[ray\]"):
        CandidateEvaluator(graph, data, SETTINGS, ray="auto")


def test_a_lost_local_worker_is_retried(setup, tmp_path, monkeypatch):
    model, graph, data = setup
    monkeypatch.setenv("GRAPHSEARCH_TEST_CRASH_DIR", str(tmp_path))  # inherited by workers
    (tmp_path / "crash-once").write_text("")
    logged = []
    with CandidateEvaluator(graph, data, SETTINGS, workers=2, log=logged.append) as ev:
        res = ev.evaluate(plans(graph), model.state_dict())
    assert list(tmp_path.glob("crashed-*")) and any("lost" in m for m in logged)
    ref = CandidateEvaluator(graph, data, SETTINGS, workers=1).evaluate(plans(graph),
                                                                        model.state_dict())
    assert [r.accuracy for r in res] == [r.accuracy for r in ref]


# --------------------------------------------------------------------------- weights and probes


def stimuli(data, n=2):
    x, y = zip(*[data.val[i] for i in range(12)])
    x, y = torch.stack(x), torch.tensor(y)
    return [(x[i::n], y[i::n]) for i in range(n)]


def gated_responses(graph, keep, stim):
    """The per-channel responses as gensynth measured them before the evaluator: on the full
    model with 0/1 gates of the plan requiring grad, mean over stimuli of |dL/dgate|."""
    gates = {g.id: torch.zeros(g.size).index_fill_(
        0, torch.tensor(keep.get(g.id, range(g.size))), 1.0).requires_grad_(True)
        for g in graph.prunable_groups}
    net = gated(graph, {gid: (lambda t=t: t) for gid, t in gates.items()})
    was = graph.module.training
    graph.module.eval()
    acc = {gid: torch.zeros_like(t) for gid, t in gates.items()}
    for x, y in stim:
        loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum") / len(y)
        for gid, g in zip(gates, torch.autograd.grad(loss, list(gates.values()))):
            acc[gid] += g.abs()
    graph.module.train(was)
    return {gid: (a / len(stim)).double().numpy() for gid, a in acc.items()}


def test_gate_responses_of_a_slim_model_equal_the_gated_full_models(setup):
    """At every kept channel the probe on the slim model gives the response the masked full
    model gives (the same forward pass, gates of ones there); 0 at dropped channels."""
    model, graph, data = setup
    stim = stimuli(data)
    for keep in plans(graph)[1:]:
        small = slim(graph, keep, model.state_dict())
        got = GateResponses(stim).bind(graph, keep)(small)
        want = gated_responses(graph, keep, stim)
        assert set(got) == {g.id for g in graph.prunable_groups}
        for g in graph.prunable_groups:
            live = torch.zeros(g.size, dtype=torch.bool)
            live[list(keep.get(g.id, range(g.size)))] = True
            assert got[g.id][live.numpy()] == pytest.approx(want[g.id][live.numpy()],
                                                            rel=1e-4, abs=1e-7)
            assert (got[g.id][~live.numpy()] == 0).all() and got[g.id][live.numpy()].max() > 0


def test_trained_weights_and_probe_results_come_back_cached(setup, tmp_path):
    model, graph, data = setup
    keeps = plans(graph)[1:3]
    probe = GateResponses(stimuli(data))
    ev = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    res = ev.evaluate(keeps, model.state_dict(), return_state=True, probe=probe)
    for keep, r in zip(keeps, res):
        # the weights are the trained slim model's, the probe ran on it
        small = slim(graph, keep, model.state_dict())
        ref = run_candidate(small, data, SETTINGS, plan_seed(keep, SETTINGS), return_state=True,
                            probe=probe.bind(graph, keep))
        assert ref["accuracy"] == r.accuracy
        assert set(r.state) == set(small.state_dict())
        for k, v in ref["state"].items():
            assert torch.equal(v, r.state[k]), k
        for gid, v in ref["probe"].items():
            assert (v == r.probe[gid]).all()
        # mapped back to the full architecture: zeros where dropped, the slim weights again
        full = unslim_state(graph, keep, r.state, model.state_dict())
        assert {k: v.shape for k, v in full.items()} == \
            {k: v.shape for k, v in model.state_dict().items()}
        gid, kept = next(iter(keep.items()))
        dropped = [c for c in range(graph.groups[gid].size) if c not in kept]
        assert (full["b1.weight" if gid == 1 else "b3.weight"][dropped] == 0).all()
        again = slim(graph, keep, full)
        for k, v in again.state_dict().items():
            assert torch.equal(v, r.state[k]), k
        net = copy.deepcopy(model).eval()
        net.load_state_dict(full)
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(net(x), again.eval()(x), atol=1e-5)
    # two local workers give back the same weights and responses
    with CandidateEvaluator(graph, data, SETTINGS, workers=2) as ev2:
        two = ev2.evaluate(keeps, model.state_dict(), return_state=True, probe=probe)
    for a, b in zip(res, two):
        assert a.accuracy == b.accuracy and all(torch.equal(v, b.state[k])
                                                for k, v in a.state.items())
        assert all((v == b.probe[g]).all() for g, v in a.probe.items())
    # read back from the cache with both
    ev3 = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    back = ev3.evaluate(keeps, model.state_dict(), return_state=True, probe=probe)
    assert ev3.fresh == 0 and all(r.cached for r in back)
    assert all(torch.equal(v, b.state[k]) for a, b in zip(res, back) for k, v in a.state.items())
    # the probe is in the key: a plain request is another evaluation, and vice versa
    plain = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    plain.evaluate(keeps[:1], model.state_dict())
    assert plain.fresh == 1
    # without their weights the entries still serve the scores and the probe ...
    ev3.discard_states(back)
    ev4 = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1)
    got = ev4.evaluate(keeps, model.state_dict(), probe=probe)
    assert ev4.fresh == 0 and all(r.state is None and r.probe is not None for r in got)
    # ... and a request for the weights runs the evaluation again, to the same result
    rerun = ev4.evaluate(keeps, model.state_dict(), return_state=True, probe=probe)
    assert ev4.fresh == 2 and [r.accuracy for r in rerun] == [r.accuracy for r in res]
    # a data tag (another training split) is in the key too
    tagged = CandidateEvaluator(graph, data, SETTINGS, cache_dir=tmp_path, workers=1,
                                data_tag="other split")
    tagged.evaluate(keeps[:1], model.state_dict(), probe=probe)
    assert tagged.fresh == 1


def test_key_extras():
    assert plan_key({1: [0]}, SETTINGS, "w", {}) == plan_key({1: [0]}, SETTINGS, "w")
    assert plan_key({1: [0]}, SETTINGS, "w", {"probe": "p"}) != plan_key({1: [0]}, SETTINGS, "w")
    assert plan_key({1: [0]}, SETTINGS, "w", {"probe": "p"}) != \
        plan_key({1: [0]}, SETTINGS, "w", {"probe": "q"})
