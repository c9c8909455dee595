"""The Ray backend on a local Ray cluster started by the test (`ray.init(num_cpus=2)`): the
same scores as in-process evaluation, the same plan from a whole search, and a worker killed
in the middle of an evaluation is retried, not fatal. Needs the `ray` extra (installed by
`make install`); skipped without it."""

import copy
import os

import pytest
import torch

ray = pytest.importorskip("ray")

from graphsearch.analysis import analyze  # noqa: E402
from graphsearch.data import load_dataset  # noqa: E402
from graphsearch.evaluator import CandidateEvaluator, EvalSettings  # noqa: E402
from graphsearch.methods.autoshrink import AutoShrink  # noqa: E402
from graphsearch.methods.base import SearchContext  # noqa: E402
from graphsearch.target import parse_constraint  # noqa: E402
from graphsearch.train import train  # noqa: E402
from tiny_model import Tiny  # noqa: E402

X = (torch.zeros(1, 3, 16, 16),)
SETTINGS = EvalSettings(steps=2, lr=0.02, batch_size=50, seed=3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    crash_dir = tmp_path_factory.mktemp("crash")
    os.environ["GRAPHSEARCH_TEST_CRASH_DIR"] = str(crash_dir)  # inherited by Ray's workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield crash_dir
    ray.shutdown()
    os.environ.pop("GRAPHSEARCH_TEST_CRASH_DIR", None)


@pytest.fixture(scope="module")
def trained(cluster):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_dataset("synthetic:200:4", image_size=16, cache_dir=False)
    torch.manual_seed(0)
    model = Tiny()
    train(model, data, epochs=1, lr=0.05, batch_size=50, progress=False)
    yield model, analyze(model, X), data
    torch.set_num_threads(threads)


def plans(graph):
    g = [g.id for g in graph.prunable_groups]
    return [{}, {g[0]: list(range(8))}, {g[-1]: list(range(0, 32, 2))}]


def test_ray_scores_equal_in_process_scores(trained):
    model, graph, data = trained
    local = CandidateEvaluator(graph, data, SETTINGS, workers=1).evaluate(plans(graph),
                                                                          model.state_dict())
    ev = CandidateEvaluator(graph, data, SETTINGS, ray="auto")
    assert ev.parallelism == 2 and ev.backend == "ray(auto)"
    remote = ev.evaluate(plans(graph), model.state_dict())
    assert [r.accuracy for r in remote] == [r.accuracy for r in local]
    assert ev.fresh == 3


def test_a_search_on_ray_gives_the_local_plan(trained, tmp_path):
    model, graph, data = trained

    def ctx(folder, **kw):
        return SearchContext(
            graph=graph, model=copy.deepcopy(model), data=data,
            constraints=[parse_constraint("flops", "0.4", graph.baseline.flops)], round_to=1,
            settings={**AutoShrink.defaults, "candidate_steps": 2}, epochs=1.0, lr=0.02,
            batch_size=50, seed=0, state_dir=folder, progress=False, log=lambda s: None,
            example_inputs=X, **kw)

    local = AutoShrink().search(ctx(tmp_path / "local", workers=1))
    remote = AutoShrink().search(ctx(tmp_path / "ray", ray="auto"))
    assert remote.plan.keep == local.plan.keep
    assert [s["accuracy"] for s in remote.info["steps"]] == \
        [s["accuracy"] for s in local.info["steps"]]
    assert remote.info["evaluations_run"] == local.info["evaluations_run"] > 0


def test_gensynth_on_ray_gives_the_local_children_and_plan(trained, tmp_path):
    """The trained weights and probe responses come back from Ray workers unchanged."""
    from graphsearch.methods.gensynth import GenerativeSynthesis

    model, graph, data = trained

    def ctx(folder, **kw):
        return SearchContext(
            graph=graph, model=copy.deepcopy(model), data=data,
            constraints=[parse_constraint("flops", "0.5", graph.baseline.flops)], round_to=4,
            settings={**GenerativeSynthesis.defaults, "cycles": 2, "children": 2,
                      "cost_draws": 4, "probe_per_class": 4}, epochs=2.0, lr=0.02,
            batch_size=50, seed=0, state_dir=folder, progress=False, log=lambda s: None,
            example_inputs=X, **kw)

    local = GenerativeSynthesis().search(ctx(tmp_path / "local", workers=1))
    remote = GenerativeSynthesis().search(ctx(tmp_path / "ray", ray="auto"))
    assert remote.info["evaluator"] == "ray(auto)"
    assert remote.plan.keep == local.plan.keep
    assert remote.info["cycles"] == local.info["cycles"]
    for k, v in local.state_dict.items():
        assert torch.equal(v, remote.state_dict[k]), k


def test_a_lost_worker_is_retried(trained, cluster):
    model, graph, data = trained
    (cluster / "crash-once").write_text("")
    ev = CandidateEvaluator(graph, data, SETTINGS, ray="auto")
    res = ev.evaluate(plans(graph)[1:2], model.state_dict())
    assert list(cluster.glob("crashed-*")), "no worker was killed"
    ref = CandidateEvaluator(graph, data, SETTINGS, workers=1).evaluate(plans(graph)[1:2],
                                                                        model.state_dict())
    assert res[0].accuracy == ref[0].accuracy
