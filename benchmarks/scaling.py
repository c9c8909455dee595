"""Scaling of the candidate evaluator: one search method on the CIFAR ResNet-20 with 1, 2, ...
local worker processes; wall-clock search time, the speed-up over one worker, and a check that
every worker count reached the same plan (the evaluator is deterministic).

    python benchmarks/scaling.py --data ../shared/data/cifar10/train.zip \
        [--weights runs/baseline_resnet20.pt] [--method autoshrink] [--workers 1 2] \
        [--out benchmarks/results/scaling.md]

Every run searches from scratch in a fresh state folder (no cache shared between runs). The
load average of the machine before and after each run is recorded: on a machine shared with
other jobs the speed-up says little (the workers compete with them for the cores).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10/train.zip"))
    ap.add_argument("--model", default=str(ROOT / "examples/cifar_resnet20.py"))
    ap.add_argument("--weights", help="baseline state dict (default: the untrained model; "
                                      "the timing does not depend on the weights)")
    ap.add_argument("--method", default="autoshrink", choices=["autoshrink", "submodular",
                                                                 "esnac", "gensynth"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--val-fraction", type=float, default=0.02,
                    help="validation images scoring every candidate (0.02: 1,000)")
    ap.add_argument("--candidate-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="method settings (default for autoshrink: max_steps=2)")
    ap.add_argument("--flops", default="0.33")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scaling.md"))
    args = ap.parse_args(argv)

    from graphsearch.analysis import analyze
    from graphsearch.cli import _parse_settings
    from graphsearch.data import load_dataset
    from graphsearch.load import UserError, load_model
    from graphsearch.methods import METHODS
    from graphsearch.methods.base import SearchContext
    from graphsearch.optimize import _limit_training
    from graphsearch.target import parse_constraint

    torch.manual_seed(0)
    method = METHODS[args.method]
    settings = {**method.defaults,
                **({} if args.method == "gensynth" else {"candidate_steps": args.candidate_steps}),
                **({"max_steps": 2} if args.method == "autoshrink" else {}),
                **({"steps": 1, "init": 4, "kernels": 4} if args.method == "esnac" else {}),
                **({"max_evaluations": 12} if args.method == "submodular" else {}),
                **({"cycles": 2, "children": 4} if args.method == "gensynth" else {}),
                **_parse_settings(args.set)}
    try:
        method().check_settings(settings)
    except UserError as exc:
        raise SystemExit(f"scaling.py: {exc}") from None
    loaded = load_model(args.model, args.weights)
    data = load_dataset(args.data, val_fraction=args.val_fraction, seed=0)
    data = _limit_training(data, args.max_train, 0)
    graph = analyze(loaded.model, loaded.example_inputs)
    rows = []
    for n in args.workers:
        with tempfile.TemporaryDirectory() as state:
            ctx = SearchContext(
                graph=graph, model=copy.deepcopy(loaded.model), data=data,
                constraints=[parse_constraint("flops", args.flops, graph.baseline.flops)],
                round_to=1, settings=dict(settings), epochs=1.0, lr=0.02,
                batch_size=args.batch_size, seed=0, state_dir=Path(state), progress=False,
                log=lambda s: print(s, file=sys.stderr), example_inputs=loaded.example_inputs,
                workers=n)
            load0 = os.getloadavg()
            t0 = time.time()
            proposal = method().search(ctx)
            seconds = time.time() - t0
            load1 = os.getloadavg()
        rows.append({"workers": n, "seconds": seconds, "load_before": load0[0],
                     "load_after": load1[0], "keep": proposal.plan.keep,
                     "evaluations": proposal.info.get("evaluations_run"),
                     "flops": proposal.plan.achieved["flops"]})
        print(f"{n} worker(s): {seconds:.1f} s, {rows[-1]['evaluations']} evaluations, load "
              f"{load0[0]:.2f} -> {load1[0]:.2f}", file=sys.stderr)
    same = all(r["keep"] == rows[0]["keep"] for r in rows)
    lines = [
        f"# Candidate evaluator scaling: {args.method} on the CIFAR ResNet-20",
        "",
        f"Command: `python benchmarks/scaling.py {' '.join(argv or sys.argv[1:])}`",
        "",
        f"Data: {args.data}, first {args.max_train} training images, validation fraction "
        f"{args.val_fraction} ({len(data.val)} images score every candidate); "
        + (f"{args.candidate_steps} fine-tune steps of batch {args.batch_size} per candidate; "
           if args.method != "gensynth" else "one epoch of training split over the children "
           f"(batch {args.batch_size}); ")
        + f"settings {', '.join(f'{k}={v}' for k, v in settings.items())}. Machine: "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| workers | search s | speed-up | evaluations | load avg before | load avg after |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['seconds']:.1f} | "
                     f"{rows[0]['seconds'] / r['seconds']:.2f} | {r['evaluations']} | "
                     f"{r['load_before']:.2f} | {r['load_after']:.2f} |")
    lines += ["", f"Same plan for every worker count: {'yes' if same else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
