"""Latency that knows the runtime: the channel multiple onnxruntime likes on this machine, and a
per-layer latency model measured in onnxruntime.

`choose_round_to` (``--round-to auto``) times three representative layers (a 3x3 conv, a 1x1
conv, a depthwise 3x3 conv) at every width from 32 to 64 in onnxruntime's CPU provider and
picks the smallest channel multiple whose widths run as fast per channel as the best multiple
does (the runtime's channel block: a width of 33 costs about what 40 or 48 costs). The choice is
cached per machine (CPU, onnxruntime version, threads) under ``$GRAPHSEARCH_CACHE`` (default
``~/.cache/graphsearch``).

`LatencyModel` predicts the latency of a slim model from its widths: every conv / linear layer
of the channel graph (one MAC term) gets a table of its latency measured alone in onnxruntime
(conv + bias + ReLU, batch 1) over a grid of input and output widths, read as
``T(c_in, c_out) = T_in(c_in) * T_out(c_out) / T(full, full)`` and interpolated linearly in
widths padded up to the runtime's block; the rest of the model (adds, pools, the per-node
overhead, matmuls of attention) is ``a + b * sum(tables) + c * other MACs``, fitted by least
squares on whole-model measurements of a few uniform plans. Fit quality is measured on plans
that the fit did not see. Tables and fit are cached in the run's state folder, keyed by machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .checkpoint import write_json
from .passes.export import export_onnx
from .passes.latency import latency, latency_pair, onnx_session
from .passes.slim import slim
from .target import allowed_widths

CANDIDATE_MULTIPLES = (1, 2, 4, 8, 16, 32)
_PROBE_WIDTHS = tuple(range(32, 65))


# --------------------------------------------------------------------------- machine identity


def machine_key(threads: int = 1) -> str:
    """What a latency measurement depends on: CPU model, core count, onnxruntime version,
    threads. Timings cached under one key are reused only on a machine with the same key."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ",".join(sorted({f for f in text.split() if f.startswith("avx")}))
    except OSError:
        pass
    raw = f"{platform.node()}|{cpu}|{flags}|{os.cpu_count()}|ort {ort.__version__}|{threads} threads"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHSEARCH_CACHE") or Path.home() / ".cache" / "graphsearch")


# --------------------------------------------------------------------------- single-op timing


def _op_model(kind: str, c_in: int, c_out: int, hw: int, k: int = 3, stride: int = 1,
              depthwise: bool = False):
    """A one-layer ONNX model: Conv(+bias)+Relu on [1, c_in, hw, hw], or Gemm on [1, c_in]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "linear":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in])
        w = numpy_helper.from_array(rng.standard_normal((c_out, c_in)).astype(np.float32), "w")
        b = numpy_helper.from_array(np.zeros(c_out, np.float32), "b")
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        nodes = [node]
    else:
        groups = c_in if depthwise else 1
        if depthwise:
            c_out = c_in
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])
        w = numpy_helper.from_array(
            rng.standard_normal((c_out, c_in // groups, k, k)).astype(np.float32), "w")
        b = numpy_helper.from_array(np.zeros(c_out, np.float32), "b")
        pad = k // 2
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k],
                                  strides=[stride, stride], pads=[pad] * 4, group=groups),
                 helper.make_node("Relu", ["c"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "op", [x], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def time_op(kind: str, c_in: int, c_out: int, hw: int, k: int = 3, stride: int = 1,
            depthwise: bool = False, threads: int = 1, repeats: int = 15, warmup: int = 3) -> float:
    """Median latency in ms of one layer alone in onnxruntime's CPU provider."""

    if c_in <= 0 or c_out <= 0:
        return 0.0
    sess = onnx_session(_op_model(kind, c_in, c_out, hw, k, stride, depthwise), threads)
    shape = [1, c_in] if kind == "linear" else [1, c_in, hw, hw]
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e6


# --------------------------------------------------------------------------- --round-to auto


@dataclass
class RoundToChoice:
    multiple: int
    reason: str
    gains: dict  # multiple -> speed per channel at its widths relative to all widths
    machine: str
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict:
        return {"multiple": self.multiple, "reason": self.reason,
                "gains": {str(k): v for k, v in self.gains.items()}, "machine": self.machine,
                "seconds": self.seconds, "cached": self.cached}


PROBE_LAYERS = (  # (name, kind, hw, k, depthwise): a CIFAR 3x3 conv, a 1x1 conv, a depthwise conv
    ("conv3x3@16", "conv", 16, 3, False),
    ("conv1x1@14", "conv", 14, 1, False),
    ("dw3x3@28", "conv", 28, 3, True),
)


def probe_timings(threads: int = 1, widths=_PROBE_WIDTHS, repeats: int = 9) -> dict[str, dict]:
    """Per probe layer: width -> ms (c_in = c_out = width). Widths are timed in an interleaved
    order over two passes (the minimum of the two medians), so that a burst of load on a shared
    machine does not land on one block of widths."""
    out: dict[str, dict] = {name: {} for name, *_ in PROBE_LAYERS}
    rng = np.random.default_rng(0)
    for _ in range(2):
        for w in rng.permutation(list(widths)).tolist():
            for name, kind, hw, k, dw in PROBE_LAYERS:
                ms = time_op(kind, w, w, hw, k, 1, dw, threads, repeats=repeats, warmup=2)
                out[name][w] = min(out[name].get(w, np.inf), ms)
    return out


def pick_multiple(timings: Mapping[str, Mapping[int, float]], candidates=CANDIDATE_MULTIPLES,
                  min_gain: float = 0.01, share: float = 0.8) -> tuple[int, dict, str]:
    """From probe timings (layer -> width -> ms), the smallest multiple whose widths reach the
    best speed per channel. Speed per channel at width w is w / T(w); a multiple's gain is the
    mean over its widths divided by the mean over all widths, per layer, then the geometric
    mean over layers. A runtime that pads to blocks of B channels gives every multiple of B
    the top gain and smaller multiples a fraction of it (some of their widths are padded): the
    choice is the smallest multiple with at least `share` of the best gain's excess over 1.
    With no multiple `min_gain` faster than arbitrary widths, widths stay free (1)."""
    gains = {}
    for m in candidates:
        per_layer = []
        for t in timings.values():
            ws = np.array(sorted(t), dtype=float)
            eff = ws / np.array([t[int(w)] for w in ws])
            sel = (ws % m) == 0
            if not sel.any():
                continue
            per_layer.append(eff[sel].mean() / eff.mean())
        gains[m] = float(np.exp(np.mean(np.log(per_layer)))) if per_layer else 1.0
    top = max(gains.values())
    if top < 1 + min_gain:
        return 1, gains, (f"no multiple runs faster per channel than arbitrary widths by "
                          f"{min_gain:.0%} or more (best {top:.3f}x): widths are left free")
    for m in sorted(gains):
        if gains[m] - 1 >= share * (top - 1):
            return m, gains, (f"widths in multiples of {m} run {gains[m]:.3f}x as fast per "
                              f"channel as arbitrary widths (best multiple {top:.3f}x); the "
                              f"smallest multiple with {share:.0%} of the best gain")
    raise AssertionError("unreachable")


def choose_round_to(threads: int = 1, use_cache: bool = True,
                    measure: Callable[[int], dict] | None = None) -> RoundToChoice:
    """`--round-to auto`: the channel multiple onnxruntime's CPU provider likes here."""
    key = machine_key(threads)
    path = cache_dir() / f"round_to_{key}.json"
    if use_cache and path.exists():
        try:
            d = json.loads(path.read_text())
            return RoundToChoice(int(d["multiple"]), d["reason"],
                                 {int(k): v for k, v in d["gains"].items()}, d["machine"],
                                 float(d.get("seconds", 0.0)), cached=True)
        except (ValueError, KeyError):
            pass
    t0 = time.time()
    timings = (measure or (lambda th: probe_timings(th)))(threads)
    multiple, gains, reason = pick_multiple(timings)
    choice = RoundToChoice(multiple, reason, gains, key, time.time() - t0)
    if use_cache:
        try:
            write_json(path, {**choice.to_dict(), "timings": {
                k: {str(w): v for w, v in t.items()} for k, t in timings.items()}}, indent=1,
                every_rank=True)
        except OSError:
            pass
    return choice


# --------------------------------------------------------------------------- per-layer model


@dataclass
class _Layer:
    """One MAC term of the channel graph that the model times as a layer."""

    sig: str  # kind|k|stride|depthwise|hw|full_in|full_out
    node: str
    layouts: list  # [(const, positions, mult)] in (in, out) order; one for depthwise
    full: tuple


def _padded(w: np.ndarray, block: int) -> np.ndarray:
    return np.where(w > 0, np.ceil(w / block) * block, 0.0)


def _grid(full: int, block: int) -> list[int]:
    pts = {full, min(block, full)}
    for f in (0.125, 0.25, 0.375, 0.5, 0.75):
        pts.add(int(min(full, max(block, np.ceil(full * f / block) * block))))
    return sorted(pts)


class LatencyModel:
    """Predicts onnxruntime latency (ms, batch 1) of the slim model from a keep plan.

    Called as ``model(cost, keep)`` by the target step's evaluator (``takes_plan``), or
    ``model.predict(keep)``. ``measure_plan`` (when given) times the real slim model; the
    shared target step then corrects its aim against measurements."""

    takes_plan = True

    def __init__(self, graph, block: int, tables: dict, layers: list[_Layer], other_terms,
                 coef=(0.0, 1.0, 0.0)) -> None:
        self.graph = graph
        self.block = int(block)
        self.tables = tables  # sig -> {"in": [[w, ms]...], "out": [[w, ms]...], "full": ms}
        self.layers = layers
        self.other_terms = other_terms  # [(coeff, layouts)] MAC terms without a table
        self.coef = tuple(float(c) for c in coef)
        self.scale = 1.0  # measured / fitted at the baseline: the full model is predicted exactly
        self.fit: dict = {}
        self.measure_plan: Callable | None = None
        self._offsets = np.concatenate([[0], np.cumsum([g.size for g in graph.groups])])

    # ---- kept counts of layouts
    def _kept_vector(self, keep: Mapping) -> np.ndarray:
        kept = np.ones(int(self._offsets[-1]))
        for gid, w in (keep or {}).items():
            off, size = int(self._offsets[gid]), self.graph.groups[gid].size
            kept[off:off + size] = 0.0
            if isinstance(w, (int, np.integer)):
                kept[off:off + int(w)] = 1.0
            else:
                kept[off + np.asarray(list(w), dtype=np.int64)] = 1.0
        return kept

    @staticmethod
    def _count(layout, kept) -> float:
        const, pos, mult = layout
        return float(const + np.dot(mult, kept[pos])) if len(pos) else float(const)

    def _table_ms(self, sig: str, counts: list[float]) -> float:
        t = self.tables[sig]
        if any(c <= 0 for c in counts):
            return 0.0
        fin = np.array(t["in"], dtype=float)
        if len(counts) == 1:  # depthwise: one width
            return float(np.interp(_padded(np.array(counts[0]), self.block), fin[:, 0], fin[:, 1]))
        fout = np.array(t["out"], dtype=float)
        a = np.interp(_padded(np.array(counts[0]), self.block), fin[:, 0], fin[:, 1])
        b = np.interp(_padded(np.array(counts[1]), self.block), fout[:, 0], fout[:, 1])
        return float(a * b / max(t["full"], 1e-9))

    def features(self, keep: Mapping | None) -> np.ndarray:
        kept = self._kept_vector(keep or {})
        s = sum(self._table_ms(l.sig, [self._count(lay, kept) for lay in l.layouts])
                for l in self.layers)
        other = 0.0
        for coeff, layouts in self.other_terms:
            v = coeff
            for lay in layouts:
                v *= self._count(lay, kept)
            other += v
        return np.array([1.0, s, other / 1e6])

    def predict(self, keep: Mapping | None) -> float:
        return self.scale * float(np.dot(self.coef, self.features(keep)))

    def __call__(self, cost=None, keep: Mapping | None = None) -> float:
        return self.predict(keep or {})

    def predictor(self) -> Callable:
        """The model without measurements (the up-front reachability check)."""
        return _Predictor(self)

    # ---- persistence
    def to_dict(self) -> dict:
        return {"block": self.block, "tables": self.tables, "coef": list(self.coef),
                "scale": self.scale, "fit": self.fit}


class _Predictor:
    takes_plan = True

    def __init__(self, model: LatencyModel) -> None:
        self.model = model

    def __call__(self, cost=None, keep=None) -> float:
        return self.model.predict(keep or {})


def _layers_of(graph) -> tuple[list[_Layer], list]:
    """Conv / linear MAC terms with the op's geometry; other MAC terms (matmuls) apart."""
    import torch

    nodes = {n.name: n for n in graph.module.graph.nodes}
    offsets = np.concatenate([[0], np.cumsum([g.size for g in graph.groups])])
    layers, others = [], []
    for term in graph.mac_terms():
        lays = [(lay.const, (offsets[lay.groups] + lay.index).astype(np.int64),
                 np.asarray(lay.mult, dtype=float)) for lay in term.layouts]
        full = [float(c + m.sum()) for c, _, m in lays]
        node = nodes.get(term.nodes[0]) if term.nodes else None
        mod, kind = None, ""
        if node is not None and node.op == "call_module":
            mod = graph.module.get_submodule(node.target)
            kind = getattr(graph.rule(node.name), "latency", "")  # the rule's latency kind
        sig = None
        if kind == "conv" and node.args:
            src = graph.values.get(getattr(node.args[0], "name", ""))
            if isinstance(src, torch.Tensor) and src.dim() == 4 and src.shape[2] == src.shape[3]:
                hw = int(src.shape[2])
                dw = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                if (mod.groups == 1 or dw) and mod.kernel_size[0] == mod.kernel_size[1]:
                    if not dw and len(lays) == 2 and round(full[0]) == mod.out_channels and \
                            round(full[1]) == mod.in_channels and mod.in_channels != mod.out_channels:
                        lays = lays[::-1]
                    if dw and len(lays) == 2:
                        lays = lays[:1]
                    sig = (f"conv|{mod.kernel_size[0]}|{mod.stride[0]}|{int(dw)}|{hw}|"
                           f"{mod.in_channels}|{mod.out_channels}")
        elif kind == "linear" and len(lays) == 2:
            if round(full[0]) == mod.out_features and mod.in_features != mod.out_features:
                lays = lays[::-1]
            sig = f"linear|0|1|0|1|{mod.in_features}|{mod.out_features}"
        if sig is not None and len(lays) == (1 if sig.split("|")[3] == "1" else 2):
            layers.append(_Layer(sig, term.nodes[0], lays, tuple(full)))
        else:
            others.append((term.coeff, lays))
    return layers, others


def measure_tables(layers: list[_Layer], block: int, threads: int = 1,
                   log: Callable = lambda m: None) -> dict:
    """Time every distinct layer over its width grid (input widths at full output, output
    widths at full input)."""
    tables = {}
    sigs = list(dict.fromkeys(l.sig for l in layers))
    t0 = time.time()
    for sig in sigs:
        kind, k, stride, dw, hw, cin, cout = sig.split("|")
        k, stride, dw, hw, cin, cout = int(k), int(stride), dw == "1", int(hw), int(cin), int(cout)
        kw = dict(hw=hw, k=k, stride=stride, depthwise=dw, threads=threads)
        full = time_op(kind, cin, cout, **kw)
        t_in = [[w, time_op(kind, w, cout if not dw else w, **kw) if w != cin else full]
                for w in _grid(cin, block)]
        t_out = [[w, time_op(kind, cin, w, **kw) if w != cout else full]
                 for w in _grid(cout, block)] if not dw else t_in
        tables[sig] = {"in": t_in, "out": t_out, "full": full}
    log(f"latency model: {len(sigs)} distinct layers timed over width grids in "
        f"{time.time() - t0:.1f} s")
    return tables


def uniform_keep(graph, m: float, block: int) -> dict[int, list[int]]:
    """Every prunable group at fraction `m`, rounded up to `block` (1: nearest width)."""
    keep = {}
    for g in graph.prunable_groups:
        w = max(1, int(round(m * g.size)))
        if block > 1:
            w = min(g.size, int(np.ceil(w / block) * block))
        if w < g.size:
            keep[g.id] = list(range(w))
    return keep


def random_keep(graph, seed: int, lo: float = 0.25, hi: float = 1.0, block: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    keep = {}
    for g in graph.prunable_groups:
        w = max(1, int(round(rng.uniform(lo, hi) * g.size)))
        if block > 1:
            w = min(g.size, int(np.ceil(w / block) * block))
        if w < g.size:
            keep[g.id] = list(range(w))
    return keep


def build_latency_model(graph, measure_plan: Callable[[Mapping], float], block: int,
                        threads: int = 1, state: Path | None = None,
                        log: Callable = lambda m: None, calibrate=(1.0, 0.7, 0.45, 0.25),
                        held_out: int = 2, tables: dict | None = None) -> LatencyModel:
    """Tables (cached in `state/latency_model.json` under the machine's key), a least-squares
    fit of the whole-model measurements of uniform plans, and the error on held-out plans (a
    uniform plan at round-to 1 and random per-group widths)."""
    layers, others = _layers_of(graph)
    key = machine_key(threads)
    path = state / "latency_model.json" if state is not None else None
    cached = None
    if path is not None and path.exists():
        d = json.loads(path.read_text())
        if d.get("machine") == key and d.get("block") == block and \
                d.get("layers") == len(layers):
            cached = d
    if cached is not None:
        model = LatencyModel(graph, block, cached["tables"], layers, others, cached["coef"])
        model.scale = float(cached.get("scale", 1.0))
        model.fit = cached["fit"]
        model.measure_plan = measure_plan
        log(f"latency model: reused from {path} (machine {key})")
        return model
    if tables is None:
        tables = measure_tables(layers, block, threads, log)
    model = LatencyModel(graph, block, tables, layers, others)
    plans = [uniform_keep(graph, m, block) if m < 1 else {} for m in calibrate]
    rows, ys = [], []
    for keep in plans:
        rows.append(model.features(keep))
        ys.append(measure_plan(keep))
    X, y = np.array(rows), np.array(ys)
    cols = [0, 1] + ([2] if np.ptp(X[:, 2]) > 0 else [])
    coef = np.zeros(3)
    sol = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
    coef[cols] = sol
    if (coef[1:] < 0).any() or coef[1] == 0:  # keep it monotone: scale the tables only
        coef = np.zeros(3)
        coef[1] = float(np.dot(X[:, 1], y) / max(np.dot(X[:, 1], X[:, 1]), 1e-12))
    model.coef = tuple(coef)
    full = float(np.dot(coef, X[0]))
    if calibrate[0] >= 1 and full > 0:
        model.scale = float(y[0] / full)
    fit_err = [float(model.predict(k) / yy - 1) for k, yy in zip(plans, ys)]
    held = [("uniform 0.55, any width", uniform_keep(graph, 0.55, 1))]
    held += [(f"random widths in multiples of {block} (seed {s})", random_keep(graph, s, block=block))
             for s in range(held_out - 1)]
    checks = []
    for name, keep in held:
        measured = measure_plan(keep)
        predicted = model.predict(keep)
        checks.append({"plan": name, "predicted_ms": predicted, "measured_ms": measured,
                       "error": predicted / measured - 1})
    model.fit = {"calibration": [{"plan": f"uniform {m}", "measured_ms": float(v),
                                  "error": e} for m, v, e in zip(calibrate, ys, fit_err)],
                 "held_out": checks, "coef": list(coef), "layers": len(layers),
                 "distinct_layers": len(tables), "other_terms": len(others)}
    model.measure_plan = measure_plan
    if path is not None:
        write_json(path, {"machine": key, "block": block, "layers": len(layers),
                          **model.to_dict()}, indent=1, every_rank=True)
    log("latency model: held-out plans " + "; ".join(
        f"{c['plan']}: predicted {c['predicted_ms']:.3f} ms, measured {c['measured_ms']:.3f} ms "
        f"({c['error']:+.1%})" for c in checks))
    return model


def latency_floor(graph, model: LatencyModel, round_to: int) -> tuple[float, dict]:
    """The measured latency of the model with every prunable group at its smallest nonzero
    allowed width: the fastest a latency target can reach (up to removable branches)."""

    keep = {}
    for g in graph.prunable_groups:
        a = allowed_widths(g.size, g.min_width, round_to)
        w = int(a[a > 0][0])
        if w < g.size:
            keep[g.id] = list(range(w))
    return float(model.measure_plan(keep)), keep


def onnx_measurer(graph, example_inputs, threads: int = 1, repeats: int = 30,
                  workdir: Path | None = None) -> Callable[[Mapping], float]:
    """measure(keep) -> ms of the slim model exported to ONNX, batch 1, the report's settings
    (`threads`, 10 warm-up runs, `repeats` timed runs). The slim model is timed interleaved
    with the baseline (`latency_pair`) and its latency given as the median per-pair ratio times
    the baseline's first measurement: on a machine shared with other jobs the ratio holds when
    absolute timings drift."""

    folder = Path(tempfile.mkdtemp(prefix="latency-", dir=workdir))
    base = folder / "baseline.onnx"
    ref: dict = {}

    def measure(keep: Mapping) -> float:
        if not base.exists():
            export_onnx(slim(graph, {}).eval(), example_inputs, base)
        if not keep:
            if "ms" not in ref:
                ref["ms"] = latency(base, threads=threads, repeats=repeats).median_ms
            return ref["ms"]
        path = folder / "plan.onnx"
        export_onnx(slim(graph, dict(keep)).eval(), example_inputs, path)
        a, _, ratio = latency_pair(base, path, threads=threads, repeats=repeats)
        ref.setdefault("ms", a.median_ms)
        return ratio * ref["ms"]

    return measure


__all__ = ["choose_round_to", "pick_multiple", "probe_timings", "RoundToChoice",
           "LatencyModel", "build_latency_model", "onnx_measurer", "machine_key", "time_op",
           "uniform_keep", "random_keep", "latency_floor"]
