"""onnxruntime latency of the zoo models before and after a uniform plan at 1/3 of the FLOPs.

Prints a markdown table with the FLOPs ratio beside the latency ratio at batch 1 and at batch 8
(`--batches`). Widths follow `--round-to` (default `auto`: the channel multiple
`graphsearch.latency_model.choose_round_to` measures on this machine, made finer for a model
where it would land the target more than 1% below, as `graphsearch optimize` does; the
`multiple` column). Every latency is the median of `--repeats` runs after 10 warm-up runs; the baseline and
the slim model are timed interleaved, run by run, and the latency ratio is the median of the
per-pair ratios (on a machine shared with other jobs both models see the same load, so the ratio
holds while the absolute figures drift). The load average is printed at
the start and beside every row.

    .venv/bin/python benchmarks/latency.py [--threads 1] [--repeats 30] [--round-to auto]
        [--batches 1,8] [NAME ...]
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
from graphsearch.latency_model import choose_round_to  # noqa: E402
from graphsearch.optimize import fit_round_to  # noqa: E402
from graphsearch.passes.export import export_onnx  # noqa: E402
from graphsearch.passes.latency import latency_pair  # noqa: E402
from graphsearch.passes.slim import slim  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402


def paired(a, b, threads, repeats, batch) -> tuple[float, float, float, float]:
    """Medians of a and b timed interleaved, the median of the per-pair ratios b / a, and the
    ratio of their 10th percentiles (the runs least disturbed by other jobs)."""
    la, lb, ratio = latency_pair(a, b, threads=threads, repeats=repeats, batch_size=batch)
    return la.median_ms, lb.median_ms, ratio, lb.p10_ms / la.p10_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=list(zoo.MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--round-to", default="auto")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--flops", default="0.3333")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    batches = [int(b) for b in args.batches.split(",")]
    if args.round_to == "auto":
        choice = choose_round_to(args.threads)
        round_to = choice.multiple
        how = f"auto: {choice.multiple} ({choice.reason})"
    else:
        round_to = int(args.round_to)
        how = str(round_to)
    print(f"onnxruntime CPU, {args.threads} thread(s), median of {args.repeats} runs after 10 "
          f"warm-up, baseline and slim model interleaved (ratio: median of per-pair ratios); uniform widths at {args.flops} FLOPs; "
          f"round-to {how}; load average at start {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}\n")
    head = "| model | multiple | FLOPs ratio | params ratio |"
    rule = "|---|---|---|---|"
    for b in batches:
        head += f" b{b} before ms | b{b} after ms | b{b} latency ratio | b{b} p10 ratio |"
        rule += "---|---|---|---|"
    print(head + " load |")
    print(rule + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            model = zoo.build(name).eval()
            x = zoo.example_inputs(name)
            g = gs.analyze(model, x)
            c = parse_constraint("flops", args.flops, g.baseline.flops)
            multiple = round_to
            if args.round_to == "auto":  # as `optimize` does: finer where 16 lands far below
                multiple, _ = fit_round_to(g, [c], round_to, choice.to_dict())
            plan = land_on_target(g, scores_from_widths(g, {}), [c], multiple)
            small = slim(g, plan.keep).eval()
            a, b = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_slim.onnx"
            export_onnx(model, x, a)
            export_onnx(small, x, b)
            cost = g.cost(plan.keep)
            row = (f"| {name} | {multiple} | {cost.flops / g.baseline.flops:.3f} | "
                   f"{cost.params / g.baseline.params:.3f} |")
            for batch in batches:
                reps = args.repeats if batch == 1 else max(10, args.repeats // 3)
                before, after, ratio, p10 = paired(a, b, args.threads, reps, batch)
                row += f" {before:.3f} | {after:.3f} | {ratio:.3f} | {p10:.3f} |"
            print(row + f" {os.getloadavg()[0]:.1f} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
