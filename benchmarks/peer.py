"""Torch-Pruning beside graphsearch from one converged baseline: plan x fine-tuning recipe.

    python benchmarks/peer.py --weights benchmarks/weights/resnet20_cifar10_116ep.pt \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --test /work/runs/cifar/test5k --epochs 10 --seeds 0 1 --out /work/runs/peer

Plans (all at 1/3 of the baseline's MACs, widths in multiples of --round-to):
- `graphsearch`: the `magnitude` method through the project's target step (a global ranking of
  channels by the L2 norm of everything tied to them, each group's norms divided by their
  mean), with the method's settings given by `--set`-style `graphsearch:key=value` variants;
- `torch-pruning`: Torch-Pruning's `MetaPruner` with `GroupMagnitudeImportance(p=2)` (its
  defaults: mean over the group, mean normalisation), global pruning, `round_to`, the final
  linear layer ignored, iterative steps of --tp-step of the channels until the MACs are at or
  under the target;
- `method:NAME[:key=value,...]`: method NAME's search (its proposal sliced, as the pipeline
  would fine-tune it);
- `random-order:SEED`, `random-groups:SEED`: a random plan (`rank_correlation.random_plan`),
  for the cheap scores' truth.

Recipes (same epochs, same peak learning rate, same training images, batch 128):
- `project`: what `graphsearch optimize` fine-tunes with by default (`OptimizeConfig`), or
  any recipe of `graphsearch.train.RECIPES` by name (`nesterov-one-cycle`, `sgd-cosine`,
  `one-cycle`); the table names the recipe `project` stood for when the cell ran;
- `peer`: SGD with Nesterov momentum 0.9, weight decay 5e-4, torch's `OneCycleLR`;
- any of them `+distill`: the pipeline's distillation from the unpruned baseline
  (`Distilled`, `soft_target_loss` with `OptimizeConfig`'s temperature and weight).

Every plan is counted by graphsearch's cost model (the pruned module analysed afresh), so
both sides are measured with one ruler. Top-1 on the test folder is reported; nothing is
chosen on it. Each finished cell is saved as JSON under --out, so an interrupted run
continues, and a cell's fine-tune checkpoints every epoch (`LABEL__RECIPE__sN.ckpt`, deleted
when the cell is written): run the same command again and it resumes from the last finished
epoch (the cell's `seconds` then count the resumed part, `resumed_from` says where);
`--table` prints the markdown table of every finished cell. The cells of one run
share each plan (a method's search runs once for all of the run's seeds and recipes), and
`--plan-from LABEL=CELL.json` takes a plan a finished cell recorded instead of searching again
(more seeds of a method whose search ran in another run; checked: the rebuilt module must
score the cell's test top-1 before fine-tuning, which holds where the method's proposal
carries the baseline's weights - magnitude, uniform, AutoShrink, submodular, ESNAC and the
refitting ones - and not for gensynth's default, which hands on its trained weights).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graphsearch.analysis import analyze
from graphsearch.data import load_dataset
from graphsearch.errors import UserError
from graphsearch.methods import get_method
from graphsearch.methods.base import SearchContext
from graphsearch.passes.slim import slim
from graphsearch.target import parse_constraint
from graphsearch.train import (CHANNELS_LAST, RECIPES, Distilled, evaluate, soft_target_loss,
                               train)
from graphsearch.zoo import build, example_inputs
from rank_correlation import PLAN_FILE_ERRORS, plan_file, random_plan  # noqa: E402 - beside


def graphsearch_plan(model, data, flops: float, round_to: int, settings: dict, state: Path,
                     method: str = "magnitude", epochs: float = 0.0, log=None, seed: int = 0,
                     arch: str = "resnet20"):
    """The module `method` plans at the target (its search run on `data` for `epochs`), sliced
    from the weights the pipeline would fine-tune (the search's, or the baseline's where the
    method refits)."""
    m = get_method(method)
    m.check_settings(settings)  # a misspelt variant fails here, not after a default run
    graph = analyze(model, example_inputs(arch))
    ctx = SearchContext(
        graph=graph, model=copy.deepcopy(model), data=data.for_search() if data is not None else None,
        constraints=[parse_constraint("flops", str(flops), graph.baseline.flops)],
        round_to=round_to, settings={**m.defaults, **settings}, epochs=epochs, lr=0.05,
        batch_size=128, seed=seed, state_dir=state, progress=False,
        log=log or (lambda *_: None), example_inputs=example_inputs(arch))
    proposal = m.search(ctx)
    model.load_state_dict(proposal.state_dict)
    pruned = slim(graph, proposal.plan.keep)
    pruned.graphsearch_keep = proposal.plan.keep  # the cell records it (rank_correlation.py)
    return pruned


def torch_pruning_plan(model, flops: float, round_to: int, step: float, arch: str = "resnet20"):
    """Torch-Pruning's iterative global pruning, stopped at the first step at or under the
    target; with widths in multiples of `round_to` one step can jump past it, so the steps
    are refined (halved, up to 4 times) while that leaves the result more than 1% under."""
    import torch_pruning as tp

    x = example_inputs(arch)[0]
    base, _ = tp.utils.count_ops_and_params(model.eval(), x)
    best = None
    for _ in range(5):
        pruned = copy.deepcopy(model).eval()
        steps = int(round(1 / step))
        pruner = tp.pruner.MetaPruner(
            pruned, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=1.0, iterative_steps=steps, round_to=round_to,
            ignored_layers=[pruned.fc])
        for _ in range(steps):
            pruner.step()
            macs, _ = tp.utils.count_ops_and_params(pruned, x)
            if macs <= flops * base:
                break
        if best is None or macs > best[0]:
            best = (macs, pruned)
        if macs >= 0.99 * flops * base:
            break
        step /= 2
    return best[1]


def peer_recipe(lr: float):
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)

    def one_cycle(opt, total):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    return dict(optimizer=sgd, scheduler=one_cycle)


def settings_of(text: str) -> dict:
    """`key=value,...` as a settings dict (values read as JSON where they parse)."""
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def plan_module(baseline, plan: str, args, data=None):
    """The pruned module a plan names: `torch-pruning`, `graphsearch[:k=v,...]` (magnitude
    through the target step), `method:NAME[:k=v,...]` (method NAME's search from the
    baseline on `args.search_images` evenly spaced training images for `args.search_epochs`,
    search seed 0; the module carries the weights the pipeline would fine-tune), or
    `random-order:SEED` / `random-groups:SEED` (`rank_correlation.random_plan`: random channel
    order or magnitude order, times random group factors, landed on the target)."""
    model = copy.deepcopy(baseline)
    arch = getattr(args, "model", "resnet20")
    if plan == "torch-pruning":
        return torch_pruning_plan(model, args.flops, args.round_to, args.tp_step, arch)
    if plan.split(":")[0] in ("random-order", "random-groups"):
        kind, seed = plan.split(":")
        graph = analyze(model, example_inputs(arch))
        constraints = [parse_constraint("flops", str(args.flops), graph.baseline.flops)]
        keep = random_plan(graph, model, constraints, args.round_to, int(seed),
                           random_order=kind == "random-order").keep
        pruned = slim(graph, keep)
        pruned.graphsearch_keep = keep
        return pruned
    state = Path(tempfile.mkdtemp(prefix="peer_state_"))
    if plan.startswith("method:"):
        _, name, *rest = plan.split(":", 2)
        search = copy.copy(data)
        search.train = data.train.subset(
            np.linspace(0, len(data.train) - 1, args.search_images).round().astype(int).tolist())
        return graphsearch_plan(model, search, args.flops, args.round_to,
                                settings_of(rest[0] if rest else ""), state, method=name,
                                epochs=args.search_epochs, log=lambda s: print("  " + s),
                                seed=args.search_seed, arch=arch)
    settings = settings_of(plan.split(":", 1)[1]) if ":" in plan else {}
    return graphsearch_plan(model, None, args.flops, args.round_to, settings, state, arch=arch)


def widths(module) -> list[int]:
    """Every convolution's output channels, in module order: the plan, readable."""
    return [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def keep_record(module) -> dict | None:
    """The plan a pruned module was sliced by, as a cell records it (group id -> kept
    channels; None for Torch-Pruning's, which is not a graphsearch plan): a cell can be
    rescored by `rank_correlation.py --plan-keep NAME=CELL.json`."""
    keep = getattr(module, "graphsearch_keep", None)
    return {str(g): [int(i) for i in v] for g, v in keep.items()} if keep else None


def copy_plan(module):
    """A deep copy of a pruned module with the plan it was sliced by (a GraphModule's deep
    copy keeps its graph and weights, not other attributes)."""
    out = copy.deepcopy(module)
    if getattr(module, "graphsearch_keep", None) is not None:
        out.graphsearch_keep = module.graphsearch_keep
    return out


def recorded_plan(baseline, source: str, arch: str):
    """The pruned module a finished cell recorded (its `keep`), sliced from the baseline's
    weights, and that cell's JSON; exits naming the file if it has no plan."""
    try:
        row, keep = plan_file(source)
    except PLAN_FILE_ERRORS as e:
        sys.exit(f"--plan-from {source}: not a finished cell with a recorded plan ('keep'): "
                 f"{type(e).__name__}: {e}")
    model = copy.deepcopy(baseline)
    pruned = slim(analyze(model, example_inputs(arch)), keep)
    pruned.graphsearch_keep = keep
    return pruned, row


def cell(args, data, baseline, plan: str, recipe: str, seed: int,
         plans: dict | None = None) -> dict:
    """One plan x recipe x fine-tuning seed, saved as JSON under --out. `plans` (label ->
    (pristine pruned module, search seconds)) lets the cells of one run share a plan: a
    method's search runs once for all its seeds and recipes (the searches are seeded: the
    fifteenth session's three AutoShrink runs found one plan), and the cell says `plan_reused`."""
    label = f"{plan}@search{args.search_seed}" if args.search_seed and \
        plan.startswith("method:") else plan
    path = args.out / f"{label}__{recipe}__s{seed}.json"
    if path.exists():
        row = json.loads(path.read_text())
        if row.get("model", "resnet20") != args.model:
            sys.exit(f"{path} is a {row.get('model', 'resnet20')} cell, not {args.model}: "
                     "give each model its own --out")
        return row
    reused = plans is not None and label in plans
    source = (getattr(args, "plan_from", None) or {}).get(label)
    expect = None  # a recorded plan's test top-1 before fine-tuning
    if reused:
        pruned, searched = copy_plan(plans[label][0]), plans[label][1]
    elif source:
        pruned, recorded = recorded_plan(baseline, source, args.model)
        reused, searched = True, recorded.get("search_seconds", 0.0)
        expect = recorded.get("test_before")
        if recorded.get("widths") not in (None, widths(pruned)):
            sys.exit(f"--plan-from {label}={source}: the rebuilt plan's widths differ from "
                     "the cell's (another model or baseline?)")
        if plans is not None:
            plans[label] = (copy_plan(pruned), searched)
    else:
        t0 = time.time()
        pruned = plan_module(baseline, plan, args, data)
        searched = time.time() - t0
        if plans is not None:
            plans[label] = (copy_plan(pruned), searched)
    cost = analyze(pruned, example_inputs(args.model)).baseline
    base_cost = analyze(baseline, example_inputs(args.model)).baseline
    before = evaluate(pruned.eval(), data.test)
    if expect is not None and abs(before - expect) > 1e-9:
        sys.exit(f"--plan-from {label}={source}: the rebuilt plan scores {before:.2%} before "
                 f"fine-tuning, the cell {expect:.2%}: its method does not "
                 "fine-tune the baseline's weights (or another baseline or test folder); "
                 "run its search instead")
    from graphsearch.optimize import OptimizeConfig

    cfg = OptimizeConfig(model=args.model)
    lr = args.lr
    name, _, extra = recipe.partition("+")
    kw = (peer_recipe(lr) if name == "peer" else
          RECIPES[cfg.finetune_recipe if name == "project" else name].factories(lr))
    net = pruned
    if extra == "distill":  # the pipeline's distillation from the unpruned baseline
        net = Distilled(pruned, copy.deepcopy(baseline))
        kw["loss_fn"] = soft_target_loss(cfg.distill_temperature, cfg.distill_weight)
    t0 = time.time()
    # an interrupted fine-tune resumes from its last finished epoch (a 15-epoch ResNet-32 cell
    # takes longer on one core than a session lasts); deleted once the cell is written
    ckpt = path.with_suffix(".ckpt")
    result = train(net, data.for_search(), epochs=args.epochs, lr=lr, batch_size=128,
                   seed=seed, progress=False, evaluate_every_epoch=False, checkpoint=ckpt, **kw)
    row = {"plan": label, "model": args.model, "recipe": recipe, "seed": seed,
           "epochs": args.epochs, "lr": lr,
           "recipe_name": cfg.finetune_recipe if name == "project" else name,
           "macs_ratio": cost.macs / base_cost.macs, "macs": cost.macs, "params": cost.params,
           "test_before": before, "val": evaluate(pruned.eval(), data.val),
           "test": evaluate(pruned.eval(), data.test), "seconds": time.time() - t0,
           "load": os.getloadavg()[0], "train_images": len(data.train),
           "search_seconds": searched, "plan_reused": reused, "widths": widths(pruned),
           "keep": keep_record(pruned), "plan_from": source,
           "channels_last": CHANNELS_LAST,  # the layout it ran in (README)
           "resumed_from": result.resumed_from}  # set: `seconds` count the resumed part
    path.write_text(json.dumps(row, indent=1))
    ckpt.unlink(missing_ok=True)
    return row


def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*__*__s*.json"))]
    cells: dict[tuple, list] = {}
    for r in rows:
        recipe = r["recipe"] if r["recipe"].split("+")[0] != "project" else \
            r["recipe"].replace("project", f"project ({r['recipe_name']})", 1)
        cells.setdefault((r["plan"], recipe, r["epochs"]), []).append(r)
    lines = ["| plan | recipe | epochs | seeds | MACs ratio | params | test top-1 before "
             "fine-tuning | test top-1 after: mean | min-max | val top-1: mean | min-max | "
             "search s | s per run |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (plan, recipe, epochs), rs in sorted(cells.items(),
                                             key=lambda kv: -statistics.mean(
                                                 r["test"] for r in kv[1])):
        t = [r["test"] * 100 for r in rs]
        v = [r["val"] * 100 for r in rs]
        lines.append(
            f"| {plan} | {recipe} | {epochs} | {','.join(str(r['seed']) for r in rs)} | "
            f"{rs[0]['macs_ratio']:.4f} | {rs[0]['params']:,} | "
            f"{statistics.mean(r['test_before'] for r in rs) * 100:.2f} | "
            f"{statistics.mean(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
            f"{statistics.mean(v):.2f} | {min(v):.2f}-{max(v):.2f} | "
            f"{statistics.mean(r.get('search_seconds', 0.0) for r in rs):.0f} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def plan_sources(given: list[str], plans: list[str]) -> dict[str, str]:
    """`--plan-from LABEL=CELL.json` values as {label: cell}. A label may hold '=' itself
    (`method:morphnet:max_ratio=0.7`) and so may a cell's file name, so the split is at the
    '=' whose left side is one of the `--plans`; a value that names none of them is an error
    (ignored, it would quietly run the search again)."""
    out = {}
    for value in given:
        cuts = [i for i, ch in enumerate(value) if ch == "=" and value[:i] in plans]
        if not cuts:
            sys.exit(f"--plan-from {value}: give LABEL=CELL.json, LABEL one of --plans "
                     f"({', '.join(plans)})")
        out[value[:cuts[-1]]] = value[cuts[-1] + 1:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--train")
    ap.add_argument("--val")
    ap.add_argument("--test")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--flops", type=float, default=1 / 3)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--tp-step", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--plans", nargs="+", default=["graphsearch", "torch-pruning"])
    ap.add_argument("--recipes", nargs="+", default=["project", "peer"])
    ap.add_argument("--search-images", type=int, default=8000,
                    help="training images a method:NAME plan's search sees (evenly spaced)")
    ap.add_argument("--search-epochs", type=float, default=2.0)
    ap.add_argument("--search-seed", type=int, default=0,
                    help="a method:NAME plan's search seed (nonzero: the plan is labelled "
                         "NAME@searchK)")
    ap.add_argument("--model", default="resnet20",
                    help="the zoo architecture --weights belong to (resnet20, resnet32, ...)")
    ap.add_argument("--plan-from", action="append", default=[], metavar="LABEL=CELL.json",
                    help="the plan LABEL (as --plans names it) is the one a finished cell "
                         "recorded, instead of a new search (repeatable)")
    ap.add_argument("--table", action="store_true", help="print the finished cells and exit")
    args = ap.parse_args(argv)
    args.plan_from = plan_sources(args.plan_from, args.plans)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(args.out))
        return 0
    if not (args.weights and args.train and args.val and args.test):
        sys.exit("--weights, --train, --val and --test are needed to run cells")
    try:
        data = load_dataset(args.train, val_data=args.val, test_data=args.test,
                            val_fraction=0.0)
    except UserError as e:
        sys.exit(f"peer.py: {e}")
    baseline = build(args.model)
    baseline.load_state_dict(torch.load(args.weights))
    print(f"baseline: test {evaluate(baseline.eval(), data.test):.2%}, "
          f"val {evaluate(baseline.eval(), data.val):.2%}", flush=True)
    plans: dict = {}  # one search per plan for every seed and recipe of this run
    for seed in args.seeds:
        for plan in args.plans:
            for recipe in args.recipes:
                r = cell(args, data, baseline, plan, recipe, seed, plans)
                print(f"{plan:>28} {recipe:>8} s{seed}: MACs {r['macs_ratio']:.4f} params "
                      f"{r['params']:,} test {r['test_before']:.2%} -> {r['test']:.2%} "
                      f"({r['seconds']:.0f} s)", flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
