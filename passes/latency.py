"""ONNX Runtime CPU latency of an exported model, and latency-budget parsing.

:func:`latency` times ``session.run`` with a fixed, reported number of
intra-op threads (inter-op threads 1, sequential execution, all graph
optimisations), after a warm-up, over several repeats, and reports the median
with the 10th / 90th percentiles. Inputs are random (normal for floating
inputs, zeros for integer inputs, ``True`` for boolean inputs) with the shapes
the ONNX model declares, dynamic batch dimensions replaced by ``batch_size``.

>>> parse_latency("800us")
0.8
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Latency", "latency", "latency_pair", "onnx_session", "parse_latency",
           "pair_reliability", "machine_load"]

# A ratio of two interleaved timings is flagged unreliable when its per-pair ratios spread
# wider than this (p90 - p10 over the median), or when the machine's load average exceeds its
# CPU count (timed runs then wait for a core, unevenly).
RATIO_SPREAD_LIMIT = 0.5
LOAD_PER_CPU_LIMIT = 1.0


def machine_load() -> float | None:
    """The 1-minute load average per CPU this process may use (None where unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return load / max(cpus, 1)


def pair_reliability(ratios: Sequence[float], load_per_cpu: float | None) -> dict:
    """How far the median of per-pair latency ratios (b / a, interleaved runs) can be
    trusted: its p10 and p90, the relative spread (p90 - p10) / median, and a warning when the
    spread exceeds RATIO_SPREAD_LIMIT or the load per CPU exceeds LOAD_PER_CPU_LIMIT."""
    r = np.asarray(ratios, dtype=np.float64)
    median = float(np.median(r))
    p10, p90 = float(np.percentile(r, 10)), float(np.percentile(r, 90))
    spread = (p90 - p10) / median if median > 0 else float("inf")
    why = []
    if spread > RATIO_SPREAD_LIMIT:
        why.append(f"the per-run ratios spread from {p10:.2f} to {p90:.2f} "
                   f"({spread:.0%} of the median, limit {RATIO_SPREAD_LIMIT:.0%})")
    if load_per_cpu is not None and load_per_cpu > LOAD_PER_CPU_LIMIT:
        why.append(f"the machine was busy (load average {load_per_cpu:.2f} per CPU, "
                   f"limit {LOAD_PER_CPU_LIMIT:.2f})")
    warning = ""
    if why:
        warning = (f"latency ratio {median:.3f} is unreliable: " + " and ".join(why)
                   + "; measure again on a quiet machine (e.g. `graphsearch export` with the "
                   "report's plan) before relying on it")
    return {"ratio": median, "ratio_p10": p10, "ratio_p90": p90, "spread": spread,
            "pairs": int(r.size), "load_per_cpu": load_per_cpu, "reliable": not why,
            "warning": warning}


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _fmt(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3g}"


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds over ``repeats`` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    threads: int
    batch_size: int
    providers: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...] = field(default=())
    # the machine's 1-minute load average per CPU when the timing ended (None: unknown)
    load_per_cpu: float | None = None
    # on the second model of `latency_pair`: how far its ratio to the first can be trusted
    # (ratio, ratio_p10, ratio_p90, spread, reliable, warning; see `pair_reliability`)
    pair: dict | None = None

    def __str__(self) -> str:
        return (f"{_fmt(self.median_ms)} ms (p10 {_fmt(self.p10_ms)}, p90 {_fmt(self.p90_ms)}; "
                f"{self.repeats} runs, {self.threads} thread{'' if self.threads == 1 else 's'}, "
                f"batch {self.batch_size})")


def onnx_session(onnx_path: str | os.PathLike | bytes, threads: int):
    """An onnxruntime CPU session, sequential, `threads` intra-op threads, full graph
    optimisation: how every latency here is measured (a path, or a serialised model)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _resolve_shapes(session, input_shapes, batch_size: int) -> list[tuple[int, ...]]:
    inputs = session.get_inputs()
    if input_shapes is not None:
        if isinstance(input_shapes, Mapping):
            unknown = set(input_shapes) - {i.name for i in inputs}
            if unknown:
                raise ValueError(f"input_shapes names unknown inputs {sorted(unknown)}; "
                                 f"the model's inputs are {[i.name for i in inputs]}")
            missing = [i.name for i in inputs if i.name not in input_shapes]
            if missing:
                raise ValueError(f"input_shapes has no shape for inputs {missing}")
            return [tuple(int(d) for d in input_shapes[i.name]) for i in inputs]
        shapes = list(input_shapes)
        if shapes and isinstance(shapes[0], (int, np.integer)):  # a single shape for a single input
            shapes = [shapes]
        if len(shapes) != len(inputs):
            raise ValueError(f"input_shapes has {len(shapes)} shapes but the model has {len(inputs)} inputs")
        return [tuple(int(d) for d in s) for s in shapes]
    shapes = []
    for inp in inputs:
        shape = []
        for axis, dim in enumerate(inp.shape):
            if isinstance(dim, int) and dim >= 0:
                if axis == 0 and dim != batch_size:
                    raise ValueError(f"input {inp.name!r} has a fixed batch dimension of {dim}; cannot time it "
                                     f"at batch_size={batch_size} (pass input_shapes to override)")
                shape.append(dim)
            elif axis == 0:
                shape.append(batch_size)
            else:
                raise ValueError(f"input {inp.name!r} has a dynamic dimension {axis} ({dim!r}) other than the "
                                 f"batch; pass input_shapes")
        shapes.append(tuple(shape))
    return shapes


def latency(onnx_path: str | os.PathLike, *, input_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]]
            | None = None, batch_size: int = 1, threads: int = 1, warmup: int = 10, repeats: int = 50,
            min_time_s: float = 0.0, seed: int = 0) -> Latency:
    """Time ``onnx_path`` in onnxruntime on CPU.

    ``threads`` intra-op threads (inter-op 1, sequential execution, graph
    optimisations ALL). ``warmup`` untimed runs, then at least ``repeats``
    timed runs, continuing until ``min_time_s`` seconds of timed runs have
    accumulated. ``input_shapes`` (a shape per input, in model order or by
    name) overrides the shapes read from the model; ``Latency.batch_size`` is
    dim 0 of the first input actually used.
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if repeats < 1 or warmup < 0 or min_time_s < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0, min_time_s >= 0; got {repeats}, {warmup}, {min_time_s}")
    session = onnx_session(onnx_path, threads)
    shapes = _resolve_shapes(session, input_shapes, batch_size)
    feeds = _random_feeds(session, shapes, seed)

    for _ in range(warmup):
        session.run(None, feeds)
    times_ns: list[int] = []
    start = time.perf_counter()
    while len(times_ns) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        times_ns.append(time.perf_counter_ns() - t0)

    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    batch = shapes[0][0] if shapes and shapes[0] else 1
    return Latency(
        median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()), std_ms=float(ms.std()), repeats=len(ms), threads=threads,
        batch_size=int(batch), providers=tuple(session.get_providers()), input_shapes=tuple(shapes),
        load_per_cpu=machine_load())


def _random_feeds(session, shapes, seed: int) -> dict:
    """Inputs for a timing run: normal floats, ones for bools, zeros for integers."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp, shape in zip(session.get_inputs(), shapes):
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has unsupported type {inp.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[inp.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def latency_pair(a: str | os.PathLike, b: str | os.PathLike, *, batch_size: int = 1, threads: int = 1,
                 warmup: int = 10, repeats: int = 30, seed: int = 0) -> tuple[Latency, Latency, float]:
    """Time two models (a baseline and its slim version) with their runs interleaved, a, b, a, b,
    ...: on a machine shared with other jobs both see the same load, so their ratio holds even
    when the absolute figures drift. Returns both latencies and the median of the per-pair
    ratios b / a. Settings as :func:`latency`."""
    import onnxruntime  # noqa: F401  (fail early without onnxruntime)

    sessions, feeds = [], []
    for path in (a, b):
        session = onnx_session(path, threads)
        shapes = _resolve_shapes(session, None, batch_size)
        feed = _random_feeds(session, shapes, seed)
        sessions.append((session, shapes))
        feeds.append(feed)
    for _ in range(warmup):
        for (session, _), feed in zip(sessions, feeds):
            session.run(None, feed)
    times = [[], []]
    for k in range(repeats):
        # alternate which model goes first, so neither always runs on a cache the other warmed
        order = (0, 1) if k % 2 == 0 else (1, 0)
        for i in order:
            session, _ = sessions[i]
            t0 = time.perf_counter_ns()
            session.run(None, feeds[i])
            times[i].append(time.perf_counter_ns() - t0)
    load = machine_load()
    ratios = np.asarray(times[1], dtype=float) / np.asarray(times[0], dtype=float)
    trust = pair_reliability(ratios, load)
    out = []
    for (session, shapes), t, pair in zip(sessions, times, (None, trust)):
        ms = np.asarray(t, dtype=np.float64) / 1e6
        out.append(Latency(
            median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)),
            p90_ms=float(np.percentile(ms, 90)), mean_ms=float(ms.mean()), std_ms=float(ms.std()),
            repeats=len(ms), threads=threads, batch_size=int(shapes[0][0]) if shapes and shapes[0] else 1,
            providers=tuple(session.get_providers()), input_shapes=tuple(shapes),
            load_per_cpu=load, pair=pair))
    return out[0], out[1], trust["ratio"]


_UNITS_MS = {"ms": 1.0, "msec": 1.0, "s": 1000.0, "sec": 1000.0, "us": 1e-3, "\u00b5s": 1e-3, "\u03bcs": 1e-3}
_LATENCY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z\u00b5\u03bc]*)\s*$")


def parse_latency(text: str | float | int) -> float:
    """Parse a latency budget into milliseconds.

    ``"4ms"``, ``"4 ms"``, ``"0.5s"``, ``"800us"`` (or ``"800µs"``) and a bare
    ``"4"`` (milliseconds) are accepted; a number is taken as milliseconds.
    Anything else, and non-positive or non-finite values, raise ``ValueError``.
    """
    hint = ("expected a positive number with an optional unit ms, s or us "
            "(e.g. '4ms', '4 ms', '0.5s', '800us'; a bare number means milliseconds)")
    if isinstance(text, bool):
        raise ValueError(f"cannot parse latency {text!r}: {hint}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        m = _LATENCY_RE.match(text)
        unit = m.group(2).lower() if m else ""
        if not m or (unit and unit not in _UNITS_MS):
            raise ValueError(f"cannot parse latency {text!r}: {hint}")
        value = float(m.group(1)) * _UNITS_MS.get(unit, 1.0)
    else:
        raise ValueError(f"cannot parse latency {text!r}: {hint}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"cannot parse latency {text!r}: {hint}")
    return value
