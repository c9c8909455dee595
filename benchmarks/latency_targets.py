"""Latency targets that land: `--latency` at fractions of the measured baseline.

For every model: the per-layer latency model of `graphsearch.latency_model` (tables timed in
onnxruntime, fitted on uniform plans, checked on held-out plans), then for every fraction the
shared target step with a uniform plan's scores (land with the model, measure the slim model,
correct, land again), then a fresh measurement of the exported slim model with the report's
settings (median of 30 runs, batch 1). Prints requested, predicted and measured latency; the
goal is every measurement within 3% below the request. Widths follow `--round-to auto`.

    .venv/bin/python benchmarks/latency_targets.py [--fractions 0.5,0.33] [NAME ...]
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
from graphsearch.latency_model import build_latency_model, choose_round_to, onnx_measurer  # noqa: E402
from graphsearch.load import UserError  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402

DEFAULT = ["resnet50", "mobilenet_v2", "shufflenet_v2", "resnet20"]


def _readings(rounds: list, limit: float) -> str:
    """Each round's reading over the request; a plan read twice near the band shows both."""
    out = []
    for r in rounds:
        ms = [r["measured_ms"]] + ([r["second_ms"]] if "second_ms" in r else [])
        out.append("+".join(f"{m / limit:.3f}" for m in ms))
    return ", ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", default=DEFAULT)
    p.add_argument("--fractions", default="0.5,0.33")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    choice = choose_round_to(args.threads)
    print(f"onnxruntime CPU, {args.threads} thread(s), batch 1, median of 30 runs after 10 "
          f"warm-up; round-to auto: {choice.multiple} ({'cached' if choice.cached else 'measured'}"
          f"); load average at start {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}\n")
    fits = []
    print("| model | target | requested ms | predicted ms | measured ms (landing) | "
          "measured ms (fresh) | fresh / requested | rounds: measured / requested | "
          "FLOPs ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.names:
        model = zoo.build(name).eval()
        x = zoo.example_inputs(name)
        g = gs.analyze(model, x)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            measure = onnx_measurer(g, x, threads=args.threads, workdir=Path(tmp))
            lm = build_latency_model(g, measure, block=choice.multiple, threads=args.threads,
                                     state=Path(tmp))
            fits.append((name, lm.fit, time.time() - t0))
            base = lm.fit["calibration"][0]["measured_ms"]
            for frac in args.fractions.split(","):
                c = parse_constraint("latency", frac, base)
                try:
                    plan = land_on_target(g, scores_from_widths(g, {}), [c], choice.multiple, lm)
                except UserError as exc:
                    print(f"| {name} | {frac} | {c.limit:.3f} | refused: {exc} | | | | | | |")
                    continue
                a = plan.achieved
                fresh = measure(plan.keep)
                print(f"| {name} | {frac} | {c.limit:.3f} | {a['latency_predicted']:.3f} | "
                      f"{a['latency']:.3f} | {fresh:.3f} | {fresh / c.limit:.3f} | "
                      f"{_readings(a['latency_rounds'], c.limit)} | "
                      f"{a['flops'] / g.baseline.flops:.3f} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
    print("\nLatency model fit (per-layer tables + least squares on uniform plans), "
          "predicted against measured on plans the fit did not see:\n")
    print("| model | baseline ms | held-out plan | predicted ms | measured ms | error | "
          "layers (distinct) | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fit, secs in fits:
        for h in fit["held_out"]:
            print(f"| {name} | {fit['calibration'][0]['measured_ms']:.3f} | {h['plan']} | "
                  f"{h['predicted_ms']:.3f} | {h['measured_ms']:.3f} | {h['error']:+.1%} | "
                  f"{fit['layers']} ({fit['distinct_layers']}) | {secs:.0f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
