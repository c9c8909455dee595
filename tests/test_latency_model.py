"""The runtime-aware latency path: `--round-to auto`, the per-layer latency model, and latency
targets (landing against measurements; refused up front with the reachable floor; never
missed silently). Tiny model, no timed assertions: real onnxruntime timings feed the model where
the test checks wiring; synthetic timings stand in where a test checks a decision, and each such
test says why."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch


import graphsearch.latency_model as lm  # noqa: E402
from graphsearch.analysis import analyze  # noqa: E402
from graphsearch.load import UserError  # noqa: E402
from graphsearch.methods.common import share_floors  # noqa: E402
from graphsearch.target import (Constraint, land_on_target, parse_constraint,  # noqa: E402
                                scores_from_widths)
from tiny_model import Tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return analyze(Tiny().eval(), (torch.zeros(1, 3, 32, 32),))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def blocked_timings(block: int) -> dict:
    """What a runtime that pads channels to `block` gives: time grows with the padded width
    (plus a fixed cost), so widths 33..40 all cost like 40 when block is 8."""
    return {name: {w: 0.01 + 0.002 * np.ceil(w / block) * block for w in range(32, 65)}
            for name in ("conv", "pw", "dw")}


# --------------------------------------------------------------------------- --round-to auto


@pytest.mark.parametrize("block", [4, 8, 16])
def test_pick_multiple_finds_the_runtime_block(block):
    # Synthetic timings: the decision rule must find the block a padding runtime has; real
    # timings on a loaded 2-core machine are too noisy to pin the answer in a unit test.
    m, gains, reason = lm.pick_multiple(blocked_timings(block))
    assert m == block, (gains, reason)
    assert gains[block] > gains[1] and f"multiples of {block}" in reason


def test_pick_multiple_leaves_widths_free_without_padding():
    linear = {"conv": {w: 0.01 + 0.002 * w for w in range(32, 65)}}
    m, _, reason = lm.pick_multiple(linear)
    assert m == 1 and "free" in reason


def test_round_to_auto_chooses_a_multiple_on_the_tiny_model(tmp_path, cache, monkeypatch):
    from graphsearch.optimize import OptimizeConfig, prepare

    calls = []

    def fake_probe(threads, **kw):
        # Mocked: the test checks that prepare() uses the measured choice, caches it per
        # machine and lands on its multiples; the timings themselves would be load-dependent.
        calls.append(threads)
        return blocked_timings(8)

    monkeypatch.setattr(lm, "probe_timings", fake_probe)
    logs = []
    cfg = OptimizeConfig(model="zoo:resnet20", data="synthetic:40:10", flops="0.5",
                         out=str(tmp_path / "run"), progress=False)
    assert cfg.round_to == "auto"  # the default
    run = prepare(cfg, False, logs.append)
    assert run.round_to == 8 and run.round_to_choice["multiple"] == 8
    assert any("--round-to auto: channels in multiples of 8" in m for m in logs)
    assert len(list(cache.glob("round_to_*.json"))) == 1
    plan = land_on_target(run.graph, scores_from_widths(run.graph, {}), run.constraints,
                          run.round_to)
    assert all(w % 8 == 0 or w == run.graph.groups[g].size for g, w in plan.widths.items())
    assert 0.99 * run.constraints[0].limit <= plan.achieved["flops"] <= run.constraints[0].limit
    # a second run on this machine reuses the cached choice, measuring nothing
    again = lm.choose_round_to(1)
    assert again.cached and again.multiple == 8 and len(calls) == 1


def test_round_to_auto_real_probe_returns_a_candidate(monkeypatch):
    # Real onnxruntime timings over a short width range (structure only: no timed assertion).
    t = lm.probe_timings(1, widths=range(30, 34), repeats=2)
    assert set(t) == {name for name, *_ in lm.PROBE_LAYERS}
    assert all(v > 0 for layer in t.values() for v in layer.values())
    assert lm.pick_multiple(t)[0] in lm.CANDIDATE_MULTIPLES


# --------------------------------------------------------------------------- the latency model


def fake_tables(model_layers, block):
    """Tables in which a layer costs (padded in) * (padded out) microseconds."""
    tables = {}
    for layer in model_layers:
        kind, k, s, dw, hw, cin, cout = layer.sig.split("|")
        cin, cout = int(cin), int(cout)
        t_in = [[w, 1e-3 * w * cout] for w in lm._grid(cin, block)]
        t_out = [[w, 1e-3 * cin * w] for w in lm._grid(cout, block)]
        tables[layer.sig] = {"in": t_in, "out": t_out if dw == "0" else t_in,
                             "full": 1e-3 * cin * cout}
    return tables


def test_latency_model_interpolates_padded_widths(graph):
    layers, others = lm._layers_of(graph)
    kinds = sorted(l.sig.split("|")[0] for l in layers)
    assert kinds == ["conv", "conv", "conv", "linear"]  # c1, c2, c3, fc of the tiny model
    model = lm.LatencyModel(graph, 8, fake_tables(layers, 8), layers, others, (0.0, 1.0, 0.0))
    full = model.predict({})
    assert full == pytest.approx(1e-3 * (3 * 16 + 16 * 16 + 16 * 32 + 32 * 4))
    g32 = next(g.id for g in graph.prunable_groups if g.size == 32)  # c3 out = fc in
    at = {w: model.predict({g32: list(range(w))}) for w in (8, 9, 12, 16, 20, 24, 32)}
    assert at[9] == at[12] == at[16] > at[8]  # 9..16 channels run padded to 16
    assert at[20] == at[24] < at[32]
    # on the grid the tables are exact; between grid points (16 .. 32 here: grid 8,16,24,32),
    # linear: c3 is 16 x w, fc is w x 4
    assert at[24] == pytest.approx(full - 1e-3 * (16 * 8 + 8 * 4))


def test_latency_model_tables_measured_and_fit_on_held_out_plans(graph, tmp_path):
    # Real single-layer timings in onnxruntime; the whole-model measurement is a stand-in
    # (a known affine function of the tables), so the fit must recover it on held-out plans.
    layers, others = lm._layers_of(graph)
    tables = lm.measure_tables(layers, 8)
    assert set(tables) == {l.sig for l in layers}
    assert all(t["full"] > 0 and all(ms > 0 for _, ms in t["in"]) for t in tables.values())
    truth = lm.LatencyModel(graph, 8, tables, layers, others, (0.02, 1.5, 0.0))
    model = lm.build_latency_model(graph, truth.predict, 8, state=tmp_path, tables=tables)
    assert model.coef[0] == pytest.approx(0.02, rel=1e-3)
    assert model.coef[1] == pytest.approx(1.5, rel=1e-3)
    assert all(abs(c["error"]) < 1e-3 for c in model.fit["held_out"])
    saved = json.loads((tmp_path / "latency_model.json").read_text())
    assert saved["machine"] == lm.machine_key(1) and saved["tables"]
    # cached per machine: the second build measures nothing
    again = lm.build_latency_model(graph, lambda keep: pytest.fail("measured again"), 8,
                                   state=tmp_path)
    assert again.coef == model.coef


# --------------------------------------------------------------------------- latency targets


class Runtime:
    """A stand-in for onnxruntime whose latency is the model's prediction times `error`: the
    bug of `--latency 0.5ms --params 0.5` was a model 31% off the runtime, landed and never
    measured. Deterministic, so the test does not depend on the machine's load."""

    def __init__(self, model, error):
        self.model, self.error, self.calls = model, error, 0

    def __call__(self, keep):
        self.calls += 1
        return self.model.predict(keep) * self.error


def tiny_model_with_runtime(graph, error):
    layers, others = lm._layers_of(graph)
    model = lm.LatencyModel(graph, 1, fake_tables(layers, 1), layers, others, (0.05, 1.0, 0.0))
    model.measure_plan = Runtime(model, error)
    return model


def test_latency_target_with_params_lands_on_the_measurement(graph):
    model = tiny_model_with_runtime(graph, error=1.31)
    base = model.measure_plan({})
    lat = parse_constraint("latency", f"{0.5 * base}ms", base)
    params = parse_constraint("params", "0.9", graph.baseline.params)
    plan = land_on_target(graph, scores_from_widths(graph, {}), [lat, params], 1, model)
    measured = model.measure_plan(plan.keep)
    assert measured == pytest.approx(plan.achieved["latency"])
    assert 0.97 * lat.limit <= measured <= lat.limit, plan.achieved["latency_rounds"]
    assert plan.achieved["latency_met"] and len(plan.achieved["latency_rounds"]) >= 2
    # the model alone (the old path) misses: that is what the rounds corrected
    first = plan.achieved["latency_rounds"][0]
    assert first["measured_ms"] > lat.limit


class NoisyRuntime(Runtime):
    """Readings alternately 2% above and below the runtime's true latency: the size of the
    run-to-run spread measured on sub-millisecond models (benchmarks/results/
    latency_targets.md). Deterministic, so the test does not depend on the machine."""

    def __call__(self, keep):
        self.calls += 1
        return self.model.predict(keep) * self.error * (1.02 if self.calls % 2 else 0.98)


class OffsetRuntime(NoisyRuntime):
    """The runtime costs a fixed 40% of the full model more than the model predicts (per-op
    overheads a per-layer table misses): the model's error ratio grows as plans shrink, so a
    correction by the error of plans far from the target misleads (a mean ratio did: ResNet-20
    at 0.33 read 11-33% above the request in every round)."""

    def truth(self, keep):
        return self.model.predict(keep) + 0.4 * self.model.predict({})

    def __call__(self, keep):
        self.calls += 1
        return self.truth(keep) * (1.02 if self.calls % 2 else 0.98)


@pytest.mark.parametrize("error", [0.8, 1.0, 1.31, "offset"])
def test_latency_target_lands_with_a_margin_that_a_fresh_reading_keeps(graph, error):
    # The bug: plans accepted on one reading just under the target read up to 1.8% above it
    # when measured again. Accepted plans now sit 1-3% below on the mean of two readings.
    model = tiny_model_with_runtime(graph, 1.0)
    runtime = OffsetRuntime(model, 1.0) if error == "offset" else NoisyRuntime(model, error)
    model.measure_plan = runtime
    truth_of = runtime.truth if error == "offset" else (lambda k: model.predict(k) * error)
    base = truth_of({})
    lat = parse_constraint("latency", f"{0.5 * base}ms", base)
    plan = land_on_target(graph, scores_from_widths(graph, {}), [lat], 1, model)
    rounds = plan.achieved["latency_rounds"]
    truth = truth_of(plan.keep)
    assert 0.97 * lat.limit <= truth <= 0.99 * lat.limit, rounds
    assert plan.achieved["latency"] == pytest.approx(truth)  # the mean of the two readings
    assert "second_ms" in rounds[-1] and plan.achieved["latency_met"]


def test_latency_target_that_cannot_be_measured_below_is_flagged(graph):
    model = tiny_model_with_runtime(graph, error=50.0)  # the runtime is far slower than modelled
    base = model.predict({})
    lat = Constraint("latency", 0.5 * base, "0.5")
    plan = land_on_target(graph, scores_from_widths(graph, {}), [lat], 1, model)
    assert not plan.achieved["latency_met"] and plan.achieved["latency"] > lat.limit
    from graphsearch.report import _failed_targets

    r = {"targets": [{"metric": "latency", "limit": lat.limit, "requested": "0.5"}],
         "result": {"latency_ms": plan.achieved["latency"]}}
    (line,) = _failed_targets(r)
    assert "latency" in line and "above the target" in line


def test_latency_target_below_the_floor_is_refused_with_the_floor(graph):
    model = tiny_model_with_runtime(graph, error=1.0)
    floor = model.predict({g.id: 1 for g in graph.prunable_groups})
    lat = Constraint("latency", 0.5 * floor, "0.0001")
    with pytest.raises(UserError, match=r"unreachable target: latency .* ms with every group"):
        land_on_target(graph, scores_from_widths(graph, {}), [lat], 1, model.predictor())
    assert model.measure_plan.calls == 0


def test_latency_target_alone_prepares_and_refuses_the_unreachable(tmp_path, monkeypatch):
    # The bug: `--latency 0.5` alone crashed in the up-front check (max() of no constraints).
    # The whole-model measurement is mocked (fast, deterministic); layer tables are real.
    from graphsearch import optimize as opt

    monkeypatch.setattr(lm, "probe_timings", lambda threads, **kw: blocked_timings(8))

    def fake(graph, x, threads=1, workdir=None):  # ms grows with the channels kept
        return lambda keep: 0.1 + 1e-3 * sum(len(keep.get(g.id, range(g.size)))
                                             for g in graph.prunable_groups)

    monkeypatch.setattr(lm, "onnx_measurer", fake)
    cfg = opt.OptimizeConfig(model="zoo:resnet20", data="synthetic:40:10", latency="0.5",
                             out=str(tmp_path / "a"), progress=False)
    run = opt.prepare(cfg, False, lambda m: None)
    assert [c.metric for c in run.constraints] == ["latency"]
    assert run.constraints[0].limit == pytest.approx(0.5 * run.baseline_latency)
    cfg = opt.OptimizeConfig(model="zoo:resnet20", data="synthetic:40:10", latency="0.001ms",
                             out=str(tmp_path / "b"), progress=False)
    with pytest.raises(UserError, match=r"unreachable target: latency 0.001 ms .*minimum width"):
        opt.prepare(cfg, False, lambda m: None)
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_cli_exits_non_zero_on_a_failed_target(monkeypatch, capsys, tmp_path):
    # `optimize` itself is replaced: this checks the CLI's handling of a report whose latency
    # target was missed (the old behaviour was exit 0 and nothing said).
    from graphsearch import cli, optimize as opt

    seen = {}

    def fake_optimize(config, resume=False, log=print):
        seen["round_to"] = config.round_to
        res = {"accuracy": 0.5, "flops": 1e6, "params": 10, "latency_ms": 0.657}
        return {"baseline": dict(res, latency_ms=1.0), "result": res,
                "failed_targets": ["latency 0.657 ms measured, above the target 0.500 ms"]}

    monkeypatch.setattr(opt, "optimize", fake_optimize)
    rc = cli.main(["optimize", "zoo:resnet20", "--latency", "0.5ms", "--params", "0.5",
                   "--out", str(tmp_path / "o")])
    assert rc == 1 and seen["round_to"] == "auto"
    assert "FAILED TARGET: latency 0.657 ms" in capsys.readouterr().err
    assert cli.main(["optimize", "zoo:resnet20", "--round-to", "0"]) == 2
    assert "--round-to 0: give a positive channel multiple" in capsys.readouterr().err


def test_round_to_auto_falls_back_to_a_finer_multiple_when_the_target_needs_it(tmp_path,
                                                                                monkeypatch):
    # Mocked probe (as above): a block of 16 on the tiny model (groups of 16 and 32) cannot
    # reach a third of the FLOPs; `auto` must not turn a reachable target into an error.
    from graphsearch.optimize import OptimizeConfig, prepare

    monkeypatch.setattr(lm, "probe_timings", lambda threads, **kw: blocked_timings(16))
    model_py = tmp_path / "model.py"
    model_py.write_text((Path(__file__).parent / "tiny_model.py").read_text())
    cfg = OptimizeConfig(model=str(model_py), data="synthetic:40:4", flops="0.3333",
                         out=str(tmp_path / "run"), progress=False)
    run = prepare(cfg, False, lambda m: None)
    assert run.round_to < 16 and run.round_to_choice["multiple"] == run.round_to
    assert "out of reach in multiples of 16" in run.round_to_choice["reason"]


def test_round_to_auto_takes_a_finer_multiple_when_the_target_lands_far_below(tmp_path,
                                                                             monkeypatch):
    # Mocked probe (as above). On ViT-tiny (width 48, MLP 192, 3 heads) multiples of 16 land
    # 1/3 of the FLOPs at 0.319 (4.3% below); the issue asks for targets within 1% below, so
    # `auto` takes multiples of 8 (0.330), which onnxruntime also runs faster here.
    from graphsearch.optimize import OptimizeConfig, prepare
    from graphsearch.target import land_on_target, scores_from_widths

    monkeypatch.setattr(lm, "probe_timings", lambda threads, **kw: blocked_timings(16))
    cfg = OptimizeConfig(model="zoo:vit_tiny", data="synthetic:40:10", flops="0.3333",
                         out=str(tmp_path / "run"), progress=False)
    run = prepare(cfg, False, lambda m: None)
    assert run.round_to == 8, run.round_to_choice
    assert "below the binding target (more than 1%) in multiples of 16" in \
        run.round_to_choice["reason"]
    plan = land_on_target(run.graph, scores_from_widths(run.graph, {}), run.constraints, 8)
    assert plan.achieved["flops"] >= 0.99 * run.constraints[0].limit


def test_latency_target_just_above_the_max_ratio_floor_lands_on_it(graph):
    # The bug: with a method's cap (`least`, --set max_ratio) the measured landing aims 2%
    # under the target; when that aim is under the cap's floor it fell back to the floor of
    # the uncapped widths, found the aim above it and refused a target the capped floor meets.
    model = tiny_model_with_runtime(graph, error=1.0)
    least = share_floors(graph, 0.5, 1)
    at_least = {gid: list(range(w)) for gid, w in least.items()}
    floor = model.predict(at_least)
    lat = Constraint("latency", floor / 0.99, "capped floor")  # aim 0.98 x limit < floor
    plan = land_on_target(graph, scores_from_widths(graph, {}), [lat], 1, model, least=least)
    assert plan.achieved["latency_met"], plan.achieved["latency_rounds"]
    assert all(plan.widths.get(gid, 0) >= w for gid, w in least.items())
    assert plan.achieved["latency"] <= lat.limit
