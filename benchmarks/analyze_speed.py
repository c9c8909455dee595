"""How fast is `graphsearch.analyze`, and how fast is its cost model, on every zoo model.

For each model of ``graphsearch.zoo.MODELS``: the median wall time of ``analyze(model, inputs)``
over ``--runs`` calls (default 3), against the median of as many plain forward passes under
``torch.no_grad()`` at the same input (after 1 warm-up); their ratio; the floor under the
design, torch.fx's own trace (bare ``torch.fx.Tracer().trace(model)``, no GraphModule built, and
``torch.fx.symbolic_trace(model)``, which builds one) against the same forward; and cost-model
throughput, ``g.cost(widths)`` per second over ~2000 calls, with random int widths for every
prunable group (each in 1..size) and with random kept-index lists of the same widths. Plans are
drawn before the clock starts. Threads: ``torch.get_num_threads()`` (set OMP_NUM_THREADS to fix
them). Prints a markdown table and writes it, with the command, date and versions, as a new
section on top of ``benchmarks/results/analyze_speed.md`` (earlier sections are kept below).

    python benchmarks/analyze_speed.py [--models resnet20 vit_tiny] [--calls 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without an (up-to-date) install
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphsearch import PlanError, analyze, zoo  # noqa: E402


def median_ms(fn, runs: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cost_rate(g, plans: list[dict]) -> float:
    """Calls of g.cost per second over the pre-drawn plans."""
    t0 = time.perf_counter()
    for plan in plans:
        g.cost(plan)
    return len(plans) / (time.perf_counter() - t0)


def measure(name: str, calls: int, rng: np.random.Generator, runs: int = 3) -> dict:
    model, inputs = zoo.build(name), zoo.example_inputs(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zoo model must trace without an opaque leaf
        analyze_ms = median_ms(lambda: analyze(model, inputs), runs=runs)
        g = analyze(model, inputs)
    with torch.no_grad():
        forward_ms = median_ms(lambda: model(*inputs), runs=runs, warmup=1)
    prunable = g.prunable_groups
    counts = [{grp.id: int(rng.integers(1, grp.size + 1)) for grp in prunable} for _ in range(calls)]
    # Random index lists can empty a node that a shuffle shares between groups (a plan the
    # graph refuses): draw again until valid, checked on a separate graph so that the timed
    # one starts with cold caches.
    checker, lists, redrawn = analyze(model, inputs), [], 0
    for plan in counts:
        while True:
            kept = {gid: np.sort(rng.choice(g.groups[gid].size, w, replace=False)).tolist()
                    for gid, w in plan.items()}
            try:
                checker.check(kept)
                break
            except PlanError:
                redrawn += 1
        lists.append(kept)
    # the floor under the design: torch.fx's own trace (after every analysis of this model)
    tracer_ms = median_ms(lambda: torch.fx.Tracer().trace(model), runs=runs, warmup=1)
    symbolic_ms = median_ms(lambda: torch.fx.symbolic_trace(model), runs=runs)
    s = g.summary()
    return {
        "model": name, "params": s["params"], "macs": s["macs"], "groups": s["groups"],
        "prunable": s["prunable"], "analyze_ms": analyze_ms, "forward_ms": forward_ms,
        "tracer_ms": tracer_ms, "symbolic_ms": symbolic_ms,
        "count_rate": cost_rate(g, counts), "list_rate": cost_rate(g, lists), "redrawn": redrawn,
    }


# --------------------------------------------------------------------------- against a peer

PEER_MODELS = {  # torchvision builder -> input size (the eight models of issue 21)
    "resnet50": 224, "inception_v3": 299, "densenet121": 224, "mobilenet_v2": 224,
    "efficientnet_b0": 224, "convnext_tiny": 224, "regnet_y_1_6gf": 224, "vit_b_16": 224}


def torchvision_models():
    """torchvision's model builders. Its C extension does not load against this torch build
    (`operator torchvision::nms does not exist`); the model definitions are plain Python, so
    the package is imported without its __init__ (which loads the extension)."""
    import importlib.util
    import types

    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            raise SystemExit("--peer needs torchvision: pip install --no-deps torchvision")
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = pkg
    import torchvision.models

    return torchvision.models


def measure_peer(name: str, runs: int, folder: Path) -> dict:
    """analyze, Torch-Pruning's DependencyGraph().build_dependency and the analysis cache's
    hit on one model, interleaved (A B C A B C ...) so that a change of load hits all three."""
    import torch_pruning as tp

    from graphsearch.graph_cache import analyze_cached

    models = torchvision_models()
    model = getattr(models, name)().eval()
    x = (torch.randn(1, 3, PEER_MODELS[name], PEER_MODELS[name]),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = analyze(model, x)  # warm-up; and the groups for the table
        tp.DependencyGraph().build_dependency(model, example_inputs=x[0])
        analyze_cached(model, x, folder=folder)  # writes the entry
        steps = {"analyze": lambda: analyze(model, x),
                 "peer": lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x[0]),
                 "cached": lambda: analyze_cached(model, x, folder=folder)}
        times = {k: [] for k in steps}
        for _ in range(runs):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                out = fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
                if k == "cached" and not out[1]:
                    raise RuntimeError(f"{name}: the analysis cache missed")
    s = g.summary()
    return {"model": name, "params": s["params"], "groups": s["groups"],
            "prunable": s["prunable"], **{k: statistics.median(v) for k, v in times.items()},
            "spread": {k: (min(v), max(v)) for k, v in times.items()}}


def peer_section(args) -> list[str]:
    import torch_pruning as tp

    folder = Path(tempfile.mkdtemp(prefix="gs-analysis-cache-"))
    rows, ratios = [], {"analyze": [], "cached": []}
    for name in args.peer_models:
        r = measure_peer(name, args.runs, folder)
        for k in ratios:
            ratios[k].append(r[k] / r["peer"])
        rows.append(f"| {name} | {r['params'] / 1e6:.1f} | {r['groups']} ({r['prunable']}) "
                    f"| {r['peer']:.0f} ({r['spread']['peer'][0]:.0f}-{r['spread']['peer'][1]:.0f}) "
                    f"| {r['analyze']:.0f} ({r['spread']['analyze'][0]:.0f}-"
                    f"{r['spread']['analyze'][1]:.0f}) | {r['analyze'] / r['peer']:.2f}x "
                    f"| {r['cached']:.0f} ({r['spread']['cached'][0]:.0f}-"
                    f"{r['spread']['cached'][1]:.0f}) | {r['cached'] / r['peer']:.2f}x |")
        print(rows[-1], flush=True)
    geo = {k: float(np.exp(np.mean(np.log(v)))) for k, v in ratios.items()}
    import torchvision  # noqa: F401 (the version of the definitions)

    head = [
        f"Torch-Pruning {tp.__version__}: `tp.DependencyGraph().build_dependency(model, "
        "example_inputs=x)` against `graphsearch.analyze(model, (x,))` and the analysis "
        "cache's hit (`graph_cache.analyze_cached`: the key, the entry read and bound to the "
        f"model), on torchvision's definitions (random weights, eval mode, batch 1, 224x224; "
        f"Inception-v3 299x299). Median of {args.runs} rounds, the three interleaved in each "
        "round (min-max in brackets), after one warm-up of each.", "",
        "| model | params (M) | groups (prunable) | Torch-Pruning ms | analyze ms "
        "| analyze / peer | cached ms | cached / peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    foot = ["", f"Geometric mean over the {len(rows)} models: analyze / peer "
            f"{geo['analyze']:.2f}x, cached / peer {geo['cached']:.2f}x (goal of issue 21: "
            "analysis at most 0.5x the peer)."]
    return head + rows + foot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.MODELS), help="zoo model names (default: all)")
    parser.add_argument("--calls", type=int, default=2000, help="g.cost calls per model and plan kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3,
                        help="timed calls per median (analyze, forward, fx trace)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analyze_speed.md")
    parser.add_argument("--peer", action="store_true",
                        help="instead: torchvision's eight models of issue 21 against "
                             "Torch-Pruning's dependency graph, with the analysis cache's time")
    parser.add_argument("--peer-models", nargs="*", default=list(PEER_MODELS))
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in zoo.MODELS]
    if unknown:
        parser.error(f"unknown zoo model(s): {', '.join(unknown)}")

    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    now = _dt.datetime.now(_dt.timezone.utc)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" \
        if "OMP_NUM_THREADS" in os.environ else "default"
    header = [
        f"## {now:%Y-%m-%d %H:%M} UTC (load average at start {load.split(' / ')[0]})",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Versions: python {platform.python_version()}, torch {torch.__version__}, numpy "
        f"{np.__version__}; {platform.machine()} ({platform.system()}), {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()} ({threads}); load average at start {load} "
        "(1 / 5 / 15 min; other jobs may share this machine)",
        "",
        f"analyze: median of {args.runs} calls of `graphsearch.analyze(model, example_inputs)` "
        f"(trace, meta shapes, rules, groups, cost tables). forward: median of {args.runs} eager "
        "`model(*inputs)` under "
        "`torch.no_grad()` after 1 warm-up, batch 1, the zoo input shape. Cost evals/s: "
        f"`g.cost(widths)` over {args.calls} pre-drawn plans, a random width in 1..size for every "
        "prunable group (counts), and the same widths as random kept-index lists (exact mode; a "
        "drawn list that the graph refuses, emptying a node shared through a shuffle, is drawn "
        f"again: `redrawn` counts those). fx floor: median of {args.runs} bare `torch.fx.Tracer()"
        f".trace(model)` (no GraphModule) / of {args.runs} `torch.fx.symbolic_trace(model)` (with "
        "one), and the "
        "first against the forward pass: what any analysis built on torch.fx pays at least.",
        "",
        "| model | params (M) | MACs (G) | groups (prunable) | analyze ms | forward ms "
        "| analyze / forward | fx trace ms (bare / symbolic_trace) | fx trace / forward "
        "| cost evals/s (counts) | cost evals/s (index lists) | redrawn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if args.peer:  # the common lines (title, command, versions, load), then the peer's table
        print("\n".join(header[:8]), flush=True)
        header = header[:8] + peer_section(args)
    else:
        print("\n".join(header), flush=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for name in [] if args.peer else args.models:
        r = measure(name, args.calls, rng, args.runs)
        row = (f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} "
               f"| {r['groups']} ({r['prunable']}) | {r['analyze_ms']:.0f} | {r['forward_ms']:.1f} "
               f"| {r['analyze_ms'] / r['forward_ms']:.1f}x "
               f"| {r['tracer_ms']:.1f} / {r['symbolic_ms']:.1f} "
               f"| {r['tracer_ms'] / r['forward_ms']:.1f}x | {r['count_rate']:,.0f} "
               f"| {r['list_rate']:,.0f} | {r['redrawn']} |")
        rows.append(row)
        print(row, flush=True)
    end_load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    footer = ["", f"Load average at end: {end_load}." + ("" if args.peer else
              " Forward passes use torch's thread pool as set above: on a shared machine they "
              "are the noisiest column.")]
    print("\n".join(footer))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = "# Analysis and cost-model speed on the zoo"
    earlier = args.out.read_text() if args.out.exists() else ""
    if earlier.startswith(title):
        earlier = earlier[len(title):].lstrip("\n")
    section = "\n".join(header + rows + footer) + "\n"
    args.out.write_text(f"{title}\n\n{section}" + (f"\n{earlier}" if earlier else ""))
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
