"""onnxruntime latency of the zoo models before and after a uniform plan at 1/3 of the FLOPs.

Prints a markdown table with the FLOPs ratio beside the latency ratio.

    .venv/bin/python benchmarks/latency.py [--threads 1] [--repeats 30] [--round-to 1] [NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import graphsearch as gs  # noqa: E402
from graphsearch import zoo  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402
from graphsearch.passes.export import export_onnx  # noqa: E402
from graphsearch.passes.latency import latency  # noqa: E402
from graphsearch.passes.slim import slim  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=list(zoo.MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print(f"onnxruntime CPU, {args.threads} thread(s), batch {args.batch}, median of "
          f"{args.repeats} runs after 10 warm-up; uniform widths at 1/3 FLOPs "
          f"(round-to {args.round_to}); load average at start {os.getloadavg()[0]:.1f}\n")
    print("| model | FLOPs ratio | params ratio | before ms | after ms | latency ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            model = zoo.build(name)
            x = zoo.example_inputs(name)
            g = gs.analyze(model, x)
            c = parse_constraint("flops", "0.3333", g.baseline.flops)
            plan = land_on_target(g, scores_from_widths(g, {}), [c], args.round_to)
            small = slim(g, plan.keep)
            xb = zoo.example_inputs(name, batch_size=args.batch)
            a, b = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_slim.onnx"
            export_onnx(model, x, a)
            export_onnx(small, x, b)
            before = latency(a, threads=args.threads, repeats=args.repeats,
                             batch_size=args.batch).median_ms
            after = latency(b, threads=args.threads, repeats=args.repeats,
                            batch_size=args.batch).median_ms
            cost = g.cost(plan.keep)
            print(f"| {name} | {cost.flops / g.baseline.flops:.3f} | "
                  f"{cost.params / g.baseline.params:.3f} | {before:.3f} | {after:.3f} | "
                  f"{after / before:.3f} |", flush=True)
            del xb
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
