"""onnxruntime latency of the plans finished `peer.py` cells recorded, against their baseline.

Each plan is sliced from the baseline's weights by the cell's `keep` (the weights do not
change the timing), exported to ONNX beside the baseline, and the two are timed interleaved
(`passes.latency.latency_pair`: the median of `--repeats` runs after 10 warm-up runs each,
and the median of the per-pair ratios, which holds on a machine shared with other jobs). The
point: what a plan's channel multiple costs or buys in speed at the same MACs (say, a
`--round-to 1` plan beside the multiples-of-8 one), which a cell's accuracy does not show.

    .venv/bin/python benchmarks/plan_latency.py --model resnet32 \
        --weights benchmarks/weights/resnet32_cifar10_111ep_cutout.pt \
        NAME=CELL.json [NAME=CELL.json ...] [--threads 1] [--repeats 50] [--batches 1,8]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from graphsearch.analysis import analyze  # noqa: E402
from graphsearch.passes.export import export_onnx  # noqa: E402
from graphsearch.passes.latency import latency_pair  # noqa: E402
from graphsearch.passes.slim import slim  # noqa: E402
from graphsearch.zoo import build, example_inputs  # noqa: E402
from rank_correlation import read_keep  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plans", nargs="+", metavar="NAME=CELL.json")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--weights", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    batches = [int(b) for b in args.batches.split(",")]
    if not Path(args.weights).is_file():
        sys.exit(f"--weights {args.weights}: no such file (a state dict of --model "
                 f"{args.model}, as peer.py takes)")
    plans = [read_keep(spec) for spec in args.plans]  # a bad NAME=CELL.json exits here
    baseline = build(args.model).eval()
    baseline.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    x = example_inputs(args.model)
    graph = analyze(baseline, x)
    print(f"onnxruntime CPU, {args.threads} thread(s), median of {args.repeats} runs after 10 "
          f"warm-up (batch 8: a third of them), baseline and plan interleaved (ratio: median "
          f"of per-pair ratios); {args.model} from {args.weights}; load average at start "
          f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}, torch "
          f"{torch.__version__}\n")
    head, rule = "| plan | MACs ratio | params |", "|---|---:|---:|"
    for b in batches:
        head += f" b{b} baseline ms | b{b} plan ms | b{b} latency ratio |"
        rule += "---:|---:|---:|"
    print(head + " load |\n" + rule + "---:|")
    with tempfile.TemporaryDirectory() as tmp:
        base_onnx = Path(tmp) / "baseline.onnx"
        export_onnx(baseline, x, base_onnx)
        for i, (name, keep) in enumerate(plans):
            small = slim(graph, keep).eval()
            path = Path(tmp) / f"plan{i}.onnx"
            export_onnx(small, x, path)
            cost = graph.cost(keep)
            row = (f"| {name} | {cost.macs / graph.baseline.macs:.4f} | "
                   f"{int(cost.params):,} |")
            for batch in batches:
                reps = args.repeats if batch == 1 else max(10, args.repeats // 3)
                la, lb, ratio = latency_pair(base_onnx, path, threads=args.threads,
                                             repeats=reps, batch_size=batch)
                row += f" {la.median_ms:.3f} | {lb.median_ms:.3f} | {ratio:.3f} |"
            print(row + f" {os.getloadavg()[0]:.1f} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
