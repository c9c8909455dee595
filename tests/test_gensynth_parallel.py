"""Gensynth on the candidate evaluator: a cycle's children are one batch of evaluations, so
the same seed gives the same children scores, the same generator and the same plan with one
or two local workers; every child is cached in the run's `evals-gensynth` folder, and a
search interrupted after some children of a cycle finished resumes without training those
again and reaches the plan of an uninterrupted run."""

import copy
import json

import numpy as np
import pytest
import torch

from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.methods.base import SearchContext
from graphsearch.evaluator import STATS_FILE
from graphsearch.methods.gensynth import GenerativeSynthesis
from graphsearch.target import parse_constraint
from graphsearch.train import train
from tiny_model import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")
X = (torch.zeros(1, 3, 16, 16),)
# The resume and caching machinery is under test here, not the candidate score: the old
# score (no adaptive BN, the whole validation split) keeps the children these tests count
# (with the adaptive-BN default, cycle 2 of this tiny model draws one distinct child).
SETTINGS = {"cycles": 2, "children": 3, "cost_draws": 4, "probe_per_class": 4,
            "candidate_bn_images": 0, "candidate_val_samples": 0}


@pytest.fixture(scope="module")
def trained(one_thread):
    """The tiny model trained well enough (88% top-1 on validation) that its children's
    scores differ from one another."""
    data = load_dataset("synthetic:400:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = Tiny()
    train(model, data, epochs=2, lr=0.05, batch_size=50, progress=False)
    return model, analyze(model, X), data


def make_ctx(trained, state_dir, workers=1, on_result=None):
    model, graph, data = trained
    m = GenerativeSynthesis()
    return SearchContext(
        graph=graph, model=copy.deepcopy(model), data=data,
        constraints=[parse_constraint("flops", "0.5", graph.baseline.flops)], round_to=4,
        settings={**m.defaults, **SETTINGS}, epochs=2.0, lr=0.02, batch_size=50, seed=0,
        state_dir=state_dir, progress=False, log=lambda s: None, example_inputs=X,
        workers=workers, on_result=on_result)


def children(info):
    return [(c["label"], c["accuracy"], c["netscore"], c["widths"])
            for e in info["cycles"] for c in e["children"]]


def generator(state_dir):
    p = torch.load(state_dir / "gensynth.pt", weights_only=False)["p"]
    return {int(g): v.numpy() for g, v in p.items()}


@pytest.fixture(scope="module")
def one_worker(trained, tmp_path_factory):
    state = tmp_path_factory.mktemp("gs1")
    ran = []
    ctx = make_ctx(trained, state, on_result=lambda r: ran.append(r))
    return GenerativeSynthesis().search(ctx), ctx, state, ran


def test_one_and_two_workers_give_the_same_children_and_plan(trained, one_worker, tmp_path):
    a, ctx_a, state_a, _ = one_worker
    b = GenerativeSynthesis().search(make_ctx(trained, tmp_path, workers=2))
    assert b.info["evaluator"] == "2 local workers" and a.info["evaluator"] == "in-process"
    assert len(a.info["cycles"]) >= 2  # the second cycle inherits the first's trained child
    assert len({acc for _, acc, _, _ in children(a.info)}) >= 3  # the scores tell children apart
    assert children(b.info) == children(a.info)
    assert b.plan.keep == a.plan.keep and b.plan.widths == a.plan.widths
    for g, v in generator(state_a).items():
        assert np.array_equal(generator(tmp_path)[g], v)  # the same probe responses
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k


def test_children_are_cached_in_the_evaluator_folder(one_worker):
    a, ctx, state, ran = one_worker
    folder = state / "evals-gensynth"
    entries = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")
               if p.name != STATS_FILE}  # the evaluator's counts sit beside its entries
    assert set(entries) == {r.key for r in ran}  # every child evaluated is cached
    assert a.info["evaluations_run"] == len(entries) and a.info["evaluations_cached"] == 0
    # each entry is a child's score (children of one cycle with the same plan share one)
    logged = {c["label"]: c["accuracy"] for e in a.info["cycles"] for c in e["children"]}
    assert sum(len(e["children"]) for e in a.info["cycles"]) >= len(entries) >= 4
    for e in entries.values():
        assert logged[e["label"]] == e["accuracy"]
    # probe responses stay cached; the trained weights go once their cycle is saved
    for key in entries:
        extras = torch.load(folder / f"{key}.pt", weights_only=False)
        assert "probe" in extras and "state" not in extras
    assert not list(state.glob("gensynth_c*.ckpt"))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("workers, stop_after", [(1, 2), (1, 4), (2, 4)])
def test_an_interrupted_cycle_resumes_without_retraining_finished_children(
        trained, one_worker, tmp_path, workers, stop_after):
    """Stopped after two children of the first cycle finished (nothing checkpointed yet), or
    after the first child of the second cycle (the first cycle checkpointed): the rerun
    trains only the children that had not finished and ends where the uninterrupted search
    ended."""
    a, ctx_a, _, everything = one_worker
    cycle_one = [r.key for r in everything if r.label.startswith("gensynth c1.")]
    assert len(cycle_one) == 3 and len(everything) > 4  # three distinct children, then more
    finished = []

    def stop(r):
        finished.append(r.key)
        if len(finished) == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        GenerativeSynthesis().search(make_ctx(trained, tmp_path, workers, on_result=stop))
    keys = {r.key for r in everything}
    assert len(set(finished)) == stop_after and set(finished) <= keys
    ran = []
    ctx = make_ctx(trained, tmp_path, workers, on_result=lambda r: ran.append(r.key))
    b = GenerativeSynthesis().search(ctx)
    assert not set(ran) & set(finished)  # no finished child trained again
    assert sorted(ran) == sorted(keys - set(finished))  # and every other one once
    if stop_after < len(cycle_one):  # read back from the cache
        assert b.info["resumed_from_cycle"] is None
        assert b.info["evaluations_cached"] == stop_after
        assert [c["cached"] for c in b.info["cycles"][0]["children"]].count(True) == stop_after
    else:  # the first cycle from the checkpoint, the second's finished child from the cache
        assert b.info["resumed_from_cycle"] == 1
        assert b.info["evaluations_cached"] == stop_after - len(cycle_one) == 1
        assert [c["cached"] for c in b.info["cycles"][1]["children"]].count(True) >= 1
    assert children(b.info) == children(a.info)
    assert b.plan.keep == a.plan.keep
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    assert ctx.candidates == ctx_a.candidates
