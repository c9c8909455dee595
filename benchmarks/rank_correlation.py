"""How well does each cheap candidate score predict the accuracy a plan reaches after a real
fine-tune? Kendall's tau and seconds per candidate, from one converged baseline.

    python benchmarks/rank_correlation.py --weights benchmarks/weights/resnet20_cifar10_116ep.pt \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --plans 30 --truth-epochs 2 --out /work/runs/rank

Plans, all landed at --flops of the baseline's FLOPs by the project's target step (widths in
multiples of --round-to): magnitude (normalised per group and not; one global cut and the
iterative schedule, `magnitude`'s default since 2026-12-02), uniform, and random ones:
each group's channel scores (its magnitude order, or a random order) multiplied by a random
group factor (log-uniform in [1/4, 4]), so the plans differ in which groups keep width.

The truth: each plan's slim model fine-tuned for --truth-epochs on the training folder (or
--truth-images of it) with the project's fine-tuning recipe (`graphsearch optimize`'s default),
then top-1 on the validation folder. Decisions taken on this table (the evaluator's default
score) use the validation folder only; the test folder is not read.

Cheap scores: what a candidate evaluator can afford, each timed on one thread through the
evaluator's own `run_candidate`: the sliced weights as they are; after adaptive BN (BatchNorm
statistics re-estimated on N training images, EagleEye); after k fine-tuning steps without
and with that recalibration; after k distilled steps (logit MSE to the baseline, as ESNAC's
candidates, SGD); after k of ESNAC's own candidate steps (Adam at 1e-3, logit distillation,
after adaptive BN: `bn-256+adam-distill-k`; its default at the table's budget is one step);
each scored on the whole validation folder and on a fixed 1,000 of it.

Plans can also be given (`--plan-keep NAME=FILE`, repeated): a JSON file with a "keep"
mapping (group id -> kept channel indices), such as a candidate in a search's evaluator cache
(`STATE/evals-esnac/*.json`). `--truth-epochs 0` scores the plans without fine-tuning them
(their truth measured elsewhere, e.g. by peer.py's cells). `--model` picks the zoo network
(resnet20, the default, or resnet32).
Each plan's results are saved under --out as they finish (the run resumes); --table prints
the table of what is finished.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.evaluator import EvalSettings, run_candidate, validation_indices
from graphsearch.methods.base import SearchContext  # the methods' own channel norms
from graphsearch.methods.magnitude import removal_order
from graphsearch.optimize import OptimizeConfig
from graphsearch.passes.slim import slim
from graphsearch.target import land_on_target, parse_constraint, scores_from_widths
from graphsearch.train import RECIPES, evaluate, train
from graphsearch.zoo import build, example_inputs

BATCH = 128
PER_PLAN = ("sliced", "adaptive-bn-256", "bn-256+steps-30")  # per-plan columns


def cheap_scores(k_small: int, k_large: int) -> dict[str, EvalSettings]:
    """The candidate evaluator's settings behind each cheap score (scored separately)."""
    def es(**kw):
        return EvalSettings(lr=0.02, batch_size=BATCH, val_samples=1, **kw)
    return {"sliced": es(steps=0), "adaptive-bn-256": es(steps=0, bn_images=256),
            "adaptive-bn-512": es(steps=0, bn_images=512),
            "adaptive-bn-1024": es(steps=0, bn_images=1024),
            f"steps-{k_small}": es(steps=k_small),
            f"bn-256+steps-{k_small}": es(steps=k_small, bn_images=256),
            f"bn-256+distill-{k_small}": es(steps=k_small, bn_images=256, distill=True),
            f"bn-256+steps-{k_large}": es(steps=k_large, bn_images=256),
            **{f"bn-256+adam-distill-{k}": EvalSettings(
                steps=k, lr=1e-3, batch_size=BATCH, optimizer="adam", weight_decay=0.0,
                distill=True, bn_images=256, val_samples=1) for k in (1, k_small)}}


def hits_and_logp(model, val) -> tuple[np.ndarray, np.ndarray]:
    """Per validation sample: 1 if the model's top-1 is right, and the log-probability of the
    right class."""
    model.eval()
    hits, logp = [], []
    with torch.no_grad():
        for idx in torch.arange(len(val)).split(500):
            x, y = val.get_batch(idx, augment=False)
            out = model(x)
            hits.append((out.argmax(1) == y).numpy())
            logp.append(torch.log_softmax(out, 1).gather(1, y[:, None])[:, 0].numpy())
    return np.concatenate(hits).astype(float), np.concatenate(logp).astype(float)


def correct(model, val) -> np.ndarray:
    """Per validation sample: 1 if the model's top-1 is right."""
    return hits_and_logp(model, val)[0]


def score_entries(module, data, settings: EvalSettings, key: str, part, seed: int,
                  teacher=None, nll: bool = False) -> dict[str, dict]:
    """One cheap score of `module` (trained in place by the evaluator's `run_candidate`, its
    own score one sample): top-1 on the whole validation split (`key`) and on its fixed
    `part` (`key@1k`), with the seconds each costs; with `nll`, also the log-likelihood
    (`key~nll`, `key~nll@1k`: minus the mean cross entropy) from the same pass."""
    r = run_candidate(module, data.for_search(), settings, seed=seed, teacher=teacher)
    t0 = time.time()
    hits, logp = hits_and_logp(module, data.val)
    evals = time.time() - t0
    out = {}
    for suffix, per in (("", hits), ("~nll", logp)) if nll else (("", hits),):
        out[key + suffix] = {"accuracy": float(per.mean()), "seconds": r["seconds"] + evals}
        out[key + suffix + "@1k"] = {"accuracy": float(per[part].mean()),
                                     "seconds": r["seconds"] + evals * len(part) / len(per)}
    return out


def normed_norms(graph, model, constraints, round_to: int) -> tuple[dict, dict]:
    """Each prunable group's channel norms (the methods' own `channel_norms`), raw and divided
    by their group's mean."""
    ctx = SearchContext(graph=graph, model=model, data=None, constraints=constraints,
                        round_to=round_to, settings={}, epochs=0, lr=0.0, batch_size=BATCH,
                        seed=0, state_dir=Path("."), progress=False)
    with torch.no_grad():
        norms = {g: v.double().numpy() for g, v in ctx.channel_norms().items()}
    groups = [g.id for g in graph.prunable_groups if g.id in norms]
    return norms, {g: norms[g] / max(norms[g].mean(), 1e-12) for g in groups}


def random_scores(rng, normed: dict, random_order: bool) -> dict:
    """One random plan's channel scores: per group its magnitude order or a random order,
    times a random group factor (log-uniform in [1/4, 4])."""
    scores = {}
    for g in normed:
        base = rng.random(len(normed[g])) if random_order else normed[g]
        scores[g] = base * float(np.exp(rng.uniform(np.log(0.25), np.log(4))))
    return scores


def random_plan(graph, model, constraints, round_to: int, seed: int, random_order: bool):
    """The random plan `seed` draws (random channel order or magnitude order, random group
    factors), landed on the target; a draw the target step cannot land is drawn again."""
    _, normed = normed_norms(graph, model, constraints, round_to)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        try:
            return land_on_target(graph, random_scores(rng, normed, random_order),
                                  constraints, round_to)
        except Exception:  # a draw the target step cannot land: draw again
            continue
    raise RuntimeError(f"no random plan landed on the target in 100 draws (seed {seed})")


def make_plans(graph, model, constraints, round_to: int, n: int, seed: int):
    norms, normed = normed_norms(graph, model, constraints, round_to)
    plans = {"magnitude": land_on_target(graph, normed, constraints, round_to),
             "magnitude-iterative": land_on_target(
                 graph, removal_order(graph, normed, round_to), constraints, round_to),
             "magnitude-raw": land_on_target(graph, norms, constraints, round_to),
             "uniform": land_on_target(graph, scores_from_widths(graph, {}), constraints,
                                       round_to)}
    rng = np.random.default_rng(seed)
    tries = 0
    while len(plans) < n and tries < 20 * n:
        tries += 1
        random_order = tries % 2 == 0
        scores = random_scores(rng, normed, random_order)
        try:
            plan = land_on_target(graph, scores, constraints, round_to)
        except Exception:  # a draw the target step cannot land: draw again
            continue
        name = f"random-{'order' if random_order else 'magnitude'}-{tries}"
        if all(plan.keep != p.keep for p in plans.values()):
            plans[name] = plan
    return plans


def kendall_tau(a, b) -> float:
    """Kendall's tau-b (ties counted on either side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        da, db = np.sign(a[i + 1:] - a[i]), np.sign(b[i + 1:] - b[i])
        conc += int(np.sum(da * db > 0))
        disc += int(np.sum(da * db < 0))
        ta += int(np.sum((da == 0) & (db != 0)))
        tb += int(np.sum((db == 0) & (da != 0)))
    denom = np.sqrt((conc + disc + ta) * (conc + disc + tb))
    return float((conc - disc) / denom) if denom else float("nan")


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("plan-*.json"))]
    rows = [r for r in rows if "truth" in r]
    if len(rows) < 3:
        return f"{len(rows)} plans finished: too few for a correlation"
    truth = [r["truth"] for r in rows]
    names = list(dict.fromkeys(k for r in rows for k in r["scores"]))
    lines = [f"{len(rows)} plans; truth: top-1 on the validation folder after "
             f"{rows[0]['truth_epochs']} epoch(s) of fine-tuning on {rows[0]['truth_images']:,}"
             f" training images ({rows[0]['recipe']}), mean {np.mean(truth) * 100:.2f}%, "
             f"range {min(truth) * 100:.2f}-{max(truth) * 100:.2f}%, "
             f"{np.mean([r['truth_seconds'] for r in rows]):.0f} s per plan", "",
             "| cheap score | plans | Kendall tau | s per candidate | mean score |",
             "|---|---:|---:|---:|---:|"]
    stats = []
    for k in names:  # each score over the plans it was run on
        have = [r for r in rows if k in r["scores"]]
        s = [r["scores"][k]["accuracy"] for r in have]
        sec = np.mean([r["scores"][k]["seconds"] for r in have])
        stats.append((kendall_tau(s, [r["truth"] for r in have]), k, sec, np.mean(s),
                      len(have)))
    for tau, k, sec, mean, n in sorted(stats, key=lambda t: (-t[4], -t[0])):
        lines.append(f"| {k} | {n} | {tau:.3f} | {sec:.2f} | {mean * 100:.2f}% |")
    names = [k for k in names if all(k in r["scores"] for r in rows)]
    lines += ["", "| plan | truth | params | " + " | ".join(
        k for k in PER_PLAN if k in names) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * sum(
        k in names for k in PER_PLAN))
    for r in sorted(rows, key=lambda r: -r["truth"]):
        lines.append(f"| {r['name']} | {r['truth'] * 100:.2f} | {r['params']:,} | " + " | ".join(
            f"{r['scores'][k]['accuracy'] * 100:.2f}"
            for k in PER_PLAN if k in names) + " |")
    return "\n".join(lines)


PLAN_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def plan_file(file) -> tuple[dict, dict[int, list[int]]]:
    """A JSON file with a "keep" mapping (a `peer.py` cell, an evaluator cache entry) -> (its
    whole record, the plan: group id -> kept channels); raises one of `PLAN_FILE_ERRORS`."""
    row = json.loads(Path(file).read_text())
    return row, {int(g): [int(i) for i in v] for g, v in row["keep"].items()}


def read_keep(spec: str) -> tuple[str, dict[int, list[int]]]:
    """`NAME=FILE` -> (NAME, the plan in FILE's "keep" mapping); exits with the reason if FILE
    is not such a file."""
    name, _, file = spec.partition("=")
    try:
        return name, plan_file(file)[1]
    except PLAN_FILE_ERRORS as e:
        sys.exit(f"--plan-keep {spec}: give NAME=FILE, FILE a JSON file with a 'keep' "
                 f"mapping of group id to kept channels ({type(e).__name__}: {e})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--train")
    ap.add_argument("--val")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--flops", type=float, default=1 / 3)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--truth-epochs", type=int, default=2,
                    help="0: score the plans only (no truth)")
    ap.add_argument("--model", default="resnet20", help="zoo network: resnet20 or resnet32")
    ap.add_argument("--plan-keep", action="append", default=[], metavar="NAME=FILE",
                    help="also this plan: a JSON file with a 'keep' mapping (repeatable)")
    ap.add_argument("--truth-images", type=int, default=0, help="0: the whole training folder")
    ap.add_argument("--steps", type=int, nargs=2, default=[30, 100], metavar=("K1", "K2"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scores", nargs="+", metavar="NAME",
                    help="only these cheap scores (names as in the table; default: all)")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    given = dict(read_keep(spec) for spec in args.plan_keep)
    if len(given) < len(args.plan_keep):
        sys.exit("--plan-keep: each plan needs its own NAME")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(args.out))
        return 0
    torch.set_num_threads(1)
    data = load_dataset(args.train, val_data=args.val, val_fraction=0.0, test_fraction=0.0)
    if args.truth_images:
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(
            args.seed))[:args.truth_images]
        truth_data = copy.copy(data)
        truth_data.train = data.train.subset(pick.sort().values.tolist())
    else:
        truth_data = data
    model = build(args.model)
    model.load_state_dict(torch.load(args.weights))
    teacher = copy.deepcopy(model).eval()
    graph = analyze(model, example_inputs(args.model))
    constraints = [parse_constraint("flops", str(args.flops), graph.baseline.flops)]
    plans = {k: p.keep for k, p in make_plans(graph, model, constraints, args.round_to,
                                              args.plans, args.seed).items()}
    plans.update(given)
    scores = cheap_scores(*args.steps)
    if args.scores:
        unknown = sorted(set(args.scores) - set(scores))
        if unknown:
            sys.exit(f"unknown --scores {unknown}; choose from {sorted(scores)}")
        scores = {k: v for k, v in scores.items() if k in args.scores}
    part = validation_indices(len(data.val), 1000).numpy()  # the evaluator's fixed part
    cfg = OptimizeConfig(model=args.model)
    recipe = RECIPES[cfg.finetune_recipe]
    for i, (name, plan) in enumerate(plans.items()):
        path = args.out / f"plan-{i:03d}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            cost = graph.cost(plan)
            row = {"name": name, "model": args.model,
                   "keep": {str(k): list(v) for k, v in plan.items()},
                   "flops": float(cost.flops), "params": int(cost.params), "scores": {}}
        if row["name"] != name or row.get("model", "resnet20") != args.model:
            sys.exit(f"{path} holds {row.get('model', 'resnet20')} plan {row['name']!r}, this "
                     f"run's plan {i} is {args.model} {name!r}: the plan list changed since "
                     "that run; use another --out")
        for key, settings in scores.items():
            if key in row["scores"]:
                continue
            row["scores"].update(score_entries(slim(graph, plan), data, settings, key,
                                               part, args.seed, teacher))
            path.write_text(json.dumps(row))
        if "truth" not in row and args.truth_epochs:
            module = slim(graph, plan)
            t0 = time.time()
            train(module, truth_data.for_search(), epochs=args.truth_epochs,
                  lr=cfg.finetune_lr, batch_size=BATCH, seed=args.seed, progress=False,
                  evaluate_every_epoch=False, **recipe.factories(cfg.finetune_lr))
            row.update(truth=evaluate(module.eval(), data.val),
                       truth_seconds=time.time() - t0, truth_epochs=args.truth_epochs,
                       truth_images=len(truth_data.train), recipe=recipe.name,
                       load=os.getloadavg()[0])
            path.write_text(json.dumps(row))
        truth = f"{row['truth']:.2%}" if "truth" in row else "-"
        print(f"{i:3d} {name:>28}: {row['params']:,} params, truth {truth}  " + "  ".join(
            f"{k} {row['scores'][k]['accuracy']:.2%}" for k in scores), flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
