"""Seconds of what searches and fine-tunes pay for, in the default memory layout and
channels-last (`graphsearch.train.CHANNELS_LAST`), on one thread.

    OMP_NUM_THREADS=1 python benchmarks/channels_last.py \
        --weights benchmarks/weights/resnet20_cifar10_116ep.pt \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --out-md benchmarks/results/channels_last.md

Models: CIFAR ResNet-20 (the converged baseline) and its uniform and magnitude plans at 1/3 of
the FLOPs (multiples of 8). Work: a candidate's cheap scores through the evaluator's own
`run_candidate` (adaptive BN on 256 or 1,024 training images, then top-1 on the fixed 1,000
validation images; the sliced weights scored alone), and 20 steps of the pipeline's
distilled fine-tune (batch 128). Each is timed --repeats times per layout, the two layouts
alternating so that both see the same machine load; the median is reported, with the scores
of both layouts (they must agree up to float rounding).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphsearch.train as train_mod  # noqa: E402
from graphsearch.analysis import analyze  # noqa: E402
from graphsearch.data import load_dataset  # noqa: E402
from graphsearch.evaluator import EvalSettings, run_candidate  # noqa: E402
from graphsearch.optimize import OptimizeConfig  # noqa: E402
from graphsearch.passes.slim import slim  # noqa: E402
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths  # noqa: E402
from graphsearch.train import Distilled, RECIPES, soft_target_loss, train  # noqa: E402
from graphsearch.zoo import build, example_inputs  # noqa: E402
from rank_correlation import normed_norms  # noqa: E402


def models(weights: Path) -> dict:
    base = build("resnet20")
    base.load_state_dict(torch.load(weights))
    g = analyze(base, example_inputs("resnet20"))
    cons = [parse_constraint("flops", str(1 / 3), g.baseline.flops)]
    _, normed = normed_norms(g, base, cons, 8)
    return {"resnet20 (full)": base,
            "uniform at 1/3 FLOPs": slim(g, land_on_target(g, scores_from_widths(g, {}), cons,
                                                           8).keep),
            "magnitude at 1/3 FLOPs": slim(g, land_on_target(g, normed, cons, 8).keep)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out-md", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(args.train, val_data=args.val, val_fraction=0.0, test_fraction=0.0)
    nets = models(args.weights)
    teacher = copy.deepcopy(nets["resnet20 (full)"]).eval()
    cfg = OptimizeConfig(model="resnet20")

    def es(**kw):
        return EvalSettings(steps=0, lr=0.02, batch_size=128, val_samples=1000, **kw)
    scores = {"sliced@1k": es(), "adaptive-bn-256@1k": es(bn_images=256),
              "adaptive-bn-1024@1k": es(bn_images=1024)}

    def finetune(net):
        kw = RECIPES[cfg.finetune_recipe].factories(0.05)
        train(Distilled(net, teacher), SimpleNamespace(train=data.train, val=None), epochs=1, lr=0.05, batch_size=128,
              seed=0, progress=False, evaluate_every_epoch=False, max_steps=args.steps,
              loss_fn=soft_target_loss(cfg.distill_temperature, cfg.distill_weight), **kw)
        return float("nan")

    rows, was = [], train_mod.CHANNELS_LAST
    for mname, net in nets.items():
        def score(m, s):
            return run_candidate(m, data.for_search(), s, seed=0)["accuracy"]
        work = {k: (lambda m, s=s: score(m, s)) for k, s in scores.items()}
        work[f"{args.steps} fine-tuning steps"] = finetune
        for wname, fn in work.items():
            times = {False: [], True: []}
            result = {}
            for _ in range(args.repeats):
                for layout in (False, True):
                    train_mod.CHANNELS_LAST = layout
                    m = copy.deepcopy(net)
                    t0 = time.perf_counter()
                    result[layout] = fn(m)
                    times[layout].append(time.perf_counter() - t0)
            train_mod.CHANNELS_LAST = was
            row = (mname, wname, statistics.median(times[False]), statistics.median(times[True]),
                   result[False], result[True], os.getloadavg()[0])
            rows.append(row)
            print(f"{mname} | {wname}: default {row[2]:.3f} s, channels-last {row[3]:.3f} s, "
                  f"x{row[2] / row[3]:.2f}; scores {row[4]:.4f} / {row[5]:.4f}; load {row[6]:.1f}",
                  flush=True)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
             f"torch {torch.__version__}, one thread, {args.repeats} alternating repeats "
             f"(median); load average at the end: {os.getloadavg()[0]:.1f}", "",
             "| model | work | default layout s | channels-last s | speed-up | score default "
             "/ channels-last |", "|---|---|---:|---:|---:|---|"]
    for mname, wname, a, b, ra, rb, _ in rows:
        sc = "-" if ra != ra else f"{ra:.2%} / {rb:.2%}"
        lines.append(f"| {mname} | {wname} | {a:.3f} | {b:.3f} | {a / b:.2f} | {sc} |")
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        args.out_md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
