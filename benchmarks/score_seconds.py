"""Seconds per candidate of the cheap scores, one thread, on the benchmarks' CIFAR folders:
the uniform plan at 1/3 FLOPs from the converged baseline, each score run 3 times (median).

    OMP_NUM_THREADS=1 python benchmarks/score_seconds.py
"""
import time, torch, numpy as np, os
from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.evaluator import EvalSettings, run_candidate
from graphsearch.passes.slim import slim
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths
from graphsearch.zoo import build, example_inputs
torch.set_num_threads(1)
data = load_dataset("/work/runs/cifar/train40k", val_data="/work/runs/cifar/val5k", val_fraction=0.0, test_fraction=0.0)
m = build("resnet20"); m.load_state_dict(torch.load("benchmarks/weights/resnet20_cifar10.pt"))
g = analyze(m, example_inputs("resnet20"))
c = [parse_constraint("flops", str(1/3), g.baseline.flops)]
plan = land_on_target(g, scores_from_widths(g, {}), c, 8)
for name, es in [("sliced@1k", EvalSettings(steps=0, lr=0.02, batch_size=128, val_samples=1000)),
                 ("adaptive-bn-256@1k", EvalSettings(steps=0, lr=0.02, batch_size=128, bn_images=256, val_samples=1000)),
                 ("adaptive-bn-256 (5k)", EvalSettings(steps=0, lr=0.02, batch_size=128, bn_images=256))]:
    ts = []
    for _ in range(3):
        mod = slim(g, plan.keep)
        t = time.time(); r = run_candidate(mod, data.for_search(), es, seed=0); ts.append(time.time() - t)
    print(f"{name}: {np.median(ts):.2f} s (runs {', '.join(f'{x:.2f}' for x in ts)}), load {os.getloadavg()[0]:.1f}", flush=True)
