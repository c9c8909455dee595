"""Would a search's candidate score have chosen the better plan? The peer benchmark's plans
(benchmarks/peer.py) scored by the candidate evaluator's cheap scores, over several training
seeds, beside their fine-tuned validation accuracy from peer.py's cells.

    python benchmarks/plan_scores.py --weights benchmarks/weights/resnet20_cifar10_116ep.pt \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --plans graphsearch:schedule=one-shot graphsearch:schedule=iterative torch-pruning \
        --seeds 0 1 2 --peer-out /work/runs/peer

A plan `method:NAME[:key=value,...]` is the plan method NAME's search makes from the weights
(`--search-epochs` over `--search-images` training images, one seed: the plan is scored over
several): do the searches' plans beat uniform widths and magnitude's, on the score that ranks
plans as fine-tuning does?

Scores (benchmarks/rank_correlation.py's names): `adaptive-bn-256@1k` (what the searches use by
default: BatchNorm statistics re-estimated on 256 training images, top-1 on a fixed 1,000 of
the validation folder) and `bn-256+steps-30` (that, then 30 SGD steps, top-1 on all of it).
Only the training and validation folders are read.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402
from rank_correlation import cheap_scores, correct  # noqa: E402

from graphsearch.data import load_dataset  # noqa: E402
from graphsearch.evaluator import run_candidate, validation_indices  # noqa: E402
from graphsearch.zoo import build  # noqa: E402

SCORES = ("adaptive-bn-256", "bn-256+steps-30")


def fine_tuned_val(peer_out: Path | None, plan: str) -> str:
    """Mean validation top-1 of peer.py's finished cells for this plan, per recipe."""
    if peer_out is None:
        return ""
    rows = [json.loads(p.read_text()) for p in peer_out.glob("*__*__s*.json")]
    by = {}
    for r in rows:
        if r["plan"] == plan or (plan == "graphsearch:schedule=one-shot" and
                                 r["plan"] == "graphsearch" and r.get("recipe") == "peer"):
            by.setdefault(r["recipe"], []).append(r["val"] * 100)
    return "; ".join(f"{k}: {statistics.mean(v):.2f}" for k, v in sorted(by.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--plans", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--flops", type=float, default=1 / 3)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--peer-out", type=Path)
    ap.add_argument("--search-images", type=int, default=8000,
                    help="training images a method:NAME plan's search sees (evenly spaced)")
    ap.add_argument("--search-epochs", type=float, default=2.0)
    args = ap.parse_args(argv)
    args.tp_step = 0.01
    torch.set_num_threads(1)
    data = load_dataset(args.train, val_data=args.val, val_fraction=0.0, test_fraction=0.0)
    baseline = build("resnet20")
    baseline.load_state_dict(torch.load(args.weights))
    part = validation_indices(len(data.val), 1000).numpy()
    settings = cheap_scores(30, 100)
    print("| plan | params | search s | adaptive-bn-256@1k: mean (min-max) | bn-256+steps-30: "
          "mean (min-max) | fine-tuned val top-1 (peer.py) |")
    print("|---|---:|---:|---:|---:|---|")
    for plan in args.plans:
        start = time.time()
        pruned = peer.plan_module(baseline, plan, args, data)
        searched = time.time() - start
        params = sum(p.numel() for p in pruned.parameters())
        cols = []
        for key in SCORES:
            acc = []
            for seed in args.seeds:
                module = copy.deepcopy(pruned)
                run_candidate(module, data.for_search(), settings[key], seed=seed)
                hits = correct(module, data.val)
                acc.append(100 * float((hits[part] if key == "adaptive-bn-256" else hits).mean()))
            cols.append(f"{np.mean(acc):.2f} ({min(acc):.2f}-{max(acc):.2f})")
        print(f"| {plan} | {params:,} | {searched:.0f} | {cols[0]} | {cols[1]} | "
              f"{fine_tuned_val(args.peer_out, plan)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
