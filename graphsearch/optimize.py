"""`graphsearch optimize`: load -> analyze -> baseline -> search -> slim -> fine-tune -> export
-> report, one direction, each stage checkpointed in `OUT/.state` so that `--resume` after
any interruption (even kill -9) continues where it stopped and reaches the same result.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from .graph import ChannelGraph
from .load import UserError, load_model
from .target import Constraint, Plan, land_on_target, parse_constraint, scores_from_widths

STATE = ".state"


@dataclass
class OptimizeConfig:
    model: str
    method: str = "uniform"
    weights: str | None = None
    data: str | None = None
    flops: str | None = None
    params: str | None = None
    latency: str | None = None
    round_to: int = 1
    out: str = "graphsearch-out"
    seed: int = 0
    baseline_epochs: int = 6
    search_epochs: float = 2.0
    finetune_epochs: int = 4
    lr: float = 0.05
    finetune_lr: float = 0.02
    batch_size: int = 128
    val_fraction: float = 0.1
    max_train: int | None = None  # use the first N training images (quick runs)
    threads: int = 1  # onnxruntime threads for latency
    settings: dict = field(default_factory=dict)  # method hyper-parameters (--set k=v)
    progress: bool = True
    workers: int | None = None  # candidate evaluations at once (None: one per core)
    ray: str | None = None  # a Ray cluster for candidate evaluations ("auto" or an address)

    def identity(self) -> dict:
        """What must match for a resume to be the same run."""
        d = asdict(self)
        for k in ("progress", "out", "workers", "ray"):  # where it runs is not what it does
            d.pop(k)
        return d


@dataclass
class Run:
    """Everything the stages share; built once by `prepare`."""

    config: OptimizeConfig
    out: Path
    state: Path
    model: torch.nn.Module
    example_inputs: tuple
    data: Any
    graph: ChannelGraph
    constraints: list[Constraint]
    baseline_latency: float | None
    latency_model: Callable | None
    log: Callable[[str], None]
    notes: list[str] = field(default_factory=list)
    weights: str | None = None


def optimize(config: OptimizeConfig, resume: bool = False, log: Callable = print) -> dict:
    run = prepare(config, resume, log)
    baseline = stage_baseline(run)
    proposal = stage_search(run)
    slim_model, plan = stage_slim(run, proposal)
    final = stage_finetune(run, slim_model)
    exported = stage_export(run, slim_model)
    from .report import write_reports

    report = write_reports(run, baseline, proposal, plan, final, exported)
    return report


# --------------------------------------------------------------------------- preparation


def prepare(config: OptimizeConfig, resume: bool, log: Callable) -> Run:
    from .analysis import analyze
    from .data import load_dataset
    from .methods import get_method
    from .trace import TraceFailure

    get_method(config.method)  # an unknown method fails before any work
    if config.round_to < 1:
        raise UserError(f"--round-to {config.round_to}: give a positive channel multiple")
    out = Path(config.out)
    state = out / STATE
    if state.exists() and not resume:
        raise UserError(f"{out} holds an earlier run; pass --resume to continue it, or choose "
                        "another --out")
    if resume and state.exists():
        saved = json.loads((state / "config.json").read_text())
        if saved != json.loads(json.dumps(config.identity())):
            diff = sorted(k for k in saved if saved.get(k) != config.identity().get(k))
            raise UserError(f"--resume: the run in {out} was started with other settings "
                            f"({', '.join(diff)}); repeat them or choose another --out")

    torch.manual_seed(config.seed)
    loaded = load_model(config.model, config.weights)
    data = load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)
    if config.max_train:
        data = _limit_training(data, config.max_train, config.seed)
    x = loaded.example_inputs
    if tuple(x[0].shape[1:]) != tuple(data.input_shape):
        raise UserError(f"the model's example input is {tuple(x[0].shape[1:])} but the data's "
                        f"images are {tuple(data.input_shape)}; make example_inputs() match")
    with torch.no_grad():
        logits = loaded.model.eval()(*x)
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    if logits.dim() != 2 or logits.shape[1] != data.num_classes:
        raise UserError(f"the model outputs {tuple(logits.shape)} but the data has "
                        f"{data.num_classes} classes; build the model with "
                        f"{data.num_classes} outputs")
    try:
        graph = analyze(loaded.model, x)
    except TraceFailure as exc:
        raise UserError(str(exc)) from exc
    base = graph.baseline
    constraints = []
    if config.flops:
        constraints.append(parse_constraint("flops", config.flops, base.flops))
    if config.params:
        constraints.append(parse_constraint("params", config.params, base.params))
    if not constraints and not config.latency:
        constraints.append(parse_constraint("flops", "0.3333", base.flops))
        log("no target given: using --flops 0.3333 (a third of the baseline's FLOPs)")
    # An unreachable target is refused now, before any training or any file is written.
    land_on_target(graph, scores_from_widths(graph, {}), constraints, config.round_to)
    fresh = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    run = Run(config, out, state, loaded.model, x, data, graph, constraints, None, None, log,
              notes=list(loaded.notes) + list(data.notes), weights=loaded.weights)
    try:
        if config.latency:
            fit_latency(run)
            constraints.append(parse_constraint("latency", config.latency,
                                                run.baseline_latency))
            land_on_target(graph, scores_from_widths(graph, {}), constraints, config.round_to,
                           run.latency_model)
    except UserError:
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
            if out.exists() and not any(out.iterdir()):
                out.rmdir()
        raise
    _write_json(state / "config.json", config.identity())
    log(f"model {loaded.source}: {base.flops / 1e6:.2f} MFLOPs, {base.params:,} params, "
        f"{len(graph.prunable_groups)} prunable groups; targets: "
        + "; ".join(c.describe() for c in constraints))
    return run


def _limit_training(data, n: int, seed: int = 0):
    """Keep `n` training images drawn by `seed` (the files may be sorted by class)."""
    from .data import ImageTensorDataset

    if n < 1:
        raise UserError(f"--max-train {n}: give a positive number of images")
    t = data.train
    if n < len(t):
        pick = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))[:n]
        pick = pick.sort().values
        data.train = ImageTensorDataset(t.images[pick], t.labels[pick], t.mean, t.std,
                                        augment=t.augment, pad=t.pad, flip=t.flip)
        data.preprocessing = {**data.preprocessing, "num_train": n,
                              "max_train": n}
    return data


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------- latency


def fit_latency(run: Run) -> None:
    """A cheap latency model, ms = a + b * MACs, from the baseline and two uniform plans
    measured in onnxruntime; the final model is measured, never only predicted."""
    from graphsearch.passes.export import export_onnx
    from graphsearch.passes.latency import latency
    from graphsearch.passes.slim import slim

    path = run.state / "latency_fit.json"
    if path.exists():
        points = json.loads(path.read_text())
    else:
        points = []
        for m in (1.0, 0.6, 0.3):
            widths = {g.id: max(1, int(round(m * g.size))) for g in run.graph.prunable_groups}
            keep = {gid: list(range(w)) for gid, w in widths.items()} if m < 1 else {}
            module = slim(run.graph, keep)
            onnx_path = run.state / f"latency_fit_{m}.onnx"
            export_onnx(module, run.example_inputs, onnx_path)
            ms = latency(onnx_path, threads=run.config.threads, repeats=30).median_ms
            points.append({"macs": run.graph.cost(keep).macs, "ms": ms})
            onnx_path.unlink()
        _write_json(path, points)
    macs = np.array([p["macs"] for p in points], dtype=float)
    ms = np.array([p["ms"] for p in points], dtype=float)
    b, a = np.polyfit(macs, ms, 1)
    run.baseline_latency = float(ms[0])
    run.latency_model = lambda cost, a=a, b=b: a + b * cost.macs
    run.log(f"latency: baseline {ms[0]:.3f} ms in onnxruntime ({run.config.threads} thread); "
            f"model {a:.3f} ms + {b * 1e6:.4f} ms per MMAC")


# --------------------------------------------------------------------------- stages


def stage_baseline(run: Run) -> dict:
    """The trained baseline: given weights, or trained here (checkpointed)."""
    from .train import evaluate

    path = run.state / "baseline.pt"
    cfg = run.config
    if path.exists():
        saved = ckpt.load(path)
        run.model.load_state_dict(saved["state_dict"])
        return saved["summary"]
    t0 = time.time()
    epochs = 0
    if run.weights is None:
        run.log(f"baseline: no trained weights given, training {cfg.baseline_epochs} epochs")
        from .train import train

        train(run.model, run.data, epochs=cfg.baseline_epochs, lr=cfg.lr,
              batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
              checkpoint=run.state / "baseline.ckpt", desc="baseline")
        epochs = cfg.baseline_epochs
    acc = evaluate(run.model.eval(), run.data.val)
    cost = run.graph.baseline
    summary = {"accuracy": acc, **cost.as_dict(), "epochs": epochs,
               "seconds": time.time() - t0}
    ckpt.save_atomic({"state_dict": run.model.state_dict(), "summary": summary}, path)
    run.log(f"baseline: top-1 {acc * 100:.2f}% on the validation split")
    return summary


def stage_search(run: Run):
    from .methods import get_method
    from .methods.base import Proposal, SearchContext

    path = run.state / "proposal.pt"
    if path.exists():
        saved = ckpt.load(path, weights_only=False)
        return Proposal(Plan.from_dict(saved["plan"]), saved["state_dict"], saved["info"])
    cfg = run.config
    method = get_method(cfg.method)
    settings = {**method.defaults, **cfg.settings}
    ctx = SearchContext(
        graph=run.graph, model=copy.deepcopy(run.model), data=run.data,
        constraints=run.constraints, round_to=cfg.round_to, settings=settings,
        epochs=cfg.search_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
        seed=cfg.seed, state_dir=run.state, progress=cfg.progress, log=run.log,
        latency_model=run.latency_model, example_inputs=run.example_inputs,
        workers=cfg.workers, ray=cfg.ray)
    t0 = time.time()
    run.log(f"search: {method.name} ({method.summary})")
    proposal = method.search(ctx)
    proposal.info = {**proposal.info, "settings": settings, "seconds": time.time() - t0,
                     "epochs": float(cfg.search_epochs) if method.trains else 0.0,
                     "candidates": ctx.candidates}
    ckpt.save_atomic({"plan": proposal.plan.to_dict(), "state_dict": proposal.state_dict,
                      "info": proposal.info}, path)
    return proposal


def stage_slim(run: Run, proposal):
    from graphsearch.passes.mask import mask, verify
    from graphsearch.passes.slim import slim

    run.model.load_state_dict(proposal.state_dict)
    plan = proposal.plan
    module = slim(run.graph, plan.keep)
    check = verify(module.eval(), mask(run.graph, plan.keep).eval(), run.example_inputs,
                   rtol=1e-4)
    if not check.ok:
        raise RuntimeError(f"graphsearch bug: the slim model differs from its reference: "
                           f"{check.message}")
    real = sum(p.numel() for p in module.parameters())
    if real != plan.achieved["params"]:
        raise RuntimeError(f"graphsearch bug: slim model has {real} params, the cost model "
                           f"says {plan.achieved['params']}")
    return module, plan


def stage_finetune(run: Run, module) -> dict:
    from .train import evaluate, train

    cfg = run.config
    path = run.state / "final.pt"
    if path.exists():
        saved = ckpt.load(path)
        module.load_state_dict(saved["state_dict"])
        return saved["summary"]
    before = evaluate(module.eval(), run.data.val)
    t0 = time.time()
    result = None
    if cfg.finetune_epochs > 0:
        run.log(f"fine-tune: {cfg.finetune_epochs} epochs of the slim model")
        result = train(module, run.data, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                       batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
                       checkpoint=run.state / "finetune.ckpt", desc="fine-tune")
    acc = evaluate(module.eval(), run.data.val)
    summary = {"accuracy": acc, "accuracy_before_finetune": before,
               "epochs": cfg.finetune_epochs, "seconds": time.time() - t0,
               "history": result.history if result else []}
    ckpt.save_atomic({"state_dict": module.state_dict(), "summary": summary}, path)
    run.log(f"result: top-1 {acc * 100:.2f}% (before fine-tuning {before * 100:.2f}%)")
    return summary


def stage_export(run: Run, module) -> dict:
    """model.onnx (checked in onnxruntime), model.pt2 (runs without the model's code), and
    latency before and after, with the same settings."""
    from graphsearch.passes.export import export_onnx
    from graphsearch.passes.latency import latency
    from graphsearch.passes.save import save_portable

    module = module.eval()
    out = run.out
    onnx_path = out / "model.onnx"
    export_onnx(module, run.example_inputs, onnx_path)
    saved = save_portable(module, run.example_inputs, out / "model.pt2")
    base_onnx = run.state / "baseline.onnx"
    if not base_onnx.exists():
        export_onnx(run.model.eval(), run.example_inputs, base_onnx)
    threads = run.config.threads
    before = latency(base_onnx, threads=threads, repeats=30)
    after = latency(onnx_path, threads=threads, repeats=30)
    return {"onnx": str(onnx_path), "portable": str(saved.path),
            "portable_note": getattr(saved, "note", ""),
            "latency_before": asdict(before), "latency_after": asdict(after)}
