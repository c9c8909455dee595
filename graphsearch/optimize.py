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
    round_to: int | str = "auto"  # a channel multiple, or "auto": measured on this machine
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
    latency_batch: int = 8  # the report also times this batch size (batch 1 always)
    settings: dict = field(default_factory=dict)  # method hyper-parameters (--set k=v)
    progress: bool = True

    def identity(self) -> dict:
        """What must match for a resume to be the same run."""
        d = asdict(self)
        d.pop("progress")
        d.pop("out")
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
    round_to: int = 1  # the channel multiple in use (--round-to auto resolved)
    round_to_choice: dict | None = None  # what --round-to auto measured and chose


def optimize(config: OptimizeConfig, resume: bool = False, log: Callable = print) -> dict:
    run = prepare(config, resume, log)
    baseline = stage_baseline(run)
    proposal = stage_search(run)
    slim_model, plan = stage_slim(run, proposal)
    final = stage_finetune(run, slim_model)
    exported = stage_export(run, slim_model)
    from .report import write_reports

    report = write_reports(run, baseline, proposal, plan, final, exported)
    for line in report.get("failed_targets", []):
        log(f"FAILED TARGET: {line}")
    return report


# --------------------------------------------------------------------------- preparation


def prepare(config: OptimizeConfig, resume: bool, log: Callable) -> Run:
    from .analysis import analyze
    from .data import load_dataset
    from .methods import get_method
    from .trace import TraceFailure

    get_method(config.method)  # an unknown method fails before any work
    if config.round_to != "auto" and (not isinstance(config.round_to, int)
                                      or config.round_to < 1):
        raise UserError(f"--round-to {config.round_to}: give a positive channel multiple, "
                        "or 'auto' (measured on this machine)")
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
    round_to, choice = _resolve_round_to(config, log, state)
    # An unreachable target is refused now, before any training or any file is written
    # (a latency target alone has nothing to check before the latency model exists).
    while constraints:
        try:
            land_on_target(graph, scores_from_widths(graph, {}), constraints, round_to)
            break
        except UserError:
            if choice is None or round_to == 1:
                raise
            # `auto` never makes a target unreachable: a smaller multiple, down to any width
            round_to = max(1, round_to // 2)
            choice = {**choice, "multiple": round_to, "reason": choice["reason"] + f"; the "
                      f"targets are out of reach in multiples of {choice['multiple']} on this "
                      f"model, so multiples of {round_to}"}
            log(f"--round-to auto: the targets need finer widths on this model: multiples of "
                f"{round_to}")
    fresh = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    run = Run(config, out, state, loaded.model, x, data, graph, constraints, None, None, log,
              notes=list(loaded.notes) + list(data.notes), weights=loaded.weights,
              round_to=round_to, round_to_choice=choice)
    try:
        if config.latency:
            fit_latency(run)
            lat = parse_constraint("latency", config.latency, run.baseline_latency)
            constraints.append(lat)
            _check_latency_floor(run, lat)
    except UserError:
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
            if out.exists() and not any(out.iterdir()):
                out.rmdir()
        raise
    _write_json(state / "config.json", config.identity())
    if run.round_to_choice is not None:
        _write_json(state / "round_to.json", run.round_to_choice)
    log(f"model {loaded.source}: {base.flops / 1e6:.2f} MFLOPs, {base.params:,} params, "
        f"{len(graph.prunable_groups)} prunable groups; targets: "
        + "; ".join(c.describe() for c in constraints))
    return run


def _resolve_round_to(config: OptimizeConfig, log: Callable,
                      state: Path) -> tuple[int, dict | None]:
    """`--round-to auto`: the multiple measured for onnxruntime's CPU provider here (cached per
    machine, and kept in the state folder: a resumed run keeps its multiple); a number is used
    as given."""
    if config.round_to != "auto":
        return int(config.round_to), None
    from .latency_model import choose_round_to

    saved = state / "round_to.json"
    if saved.exists():
        d = json.loads(saved.read_text())
        return int(d["multiple"]), d
    choice = choose_round_to(config.threads)
    log(f"--round-to auto: channels in multiples of {choice.multiple} ({choice.reason}; "
        + ("cached for this machine" if choice.cached else
           f"measured in {choice.seconds:.0f} s, cached for this machine") + ")")
    return choice.multiple, choice.to_dict()


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
    """The per-layer latency model of `graphsearch.latency_model` (tables measured in
    onnxruntime, cached in the state folder per machine), with the slim model's measurement
    attached: the shared target step lands, measures and corrects (`land_on_measured_latency`)."""
    from .latency_model import build_latency_model, choose_round_to, onnx_measurer

    measure = onnx_measurer(run.graph, run.example_inputs, threads=run.config.threads,
                            workdir=run.state)
    # the runtime's channel block (what --round-to auto measures), even under --round-to 1
    block = (run.round_to_choice or choose_round_to(run.config.threads).to_dict())["multiple"]
    model = build_latency_model(run.graph, measure, block=block, threads=run.config.threads,
                                state=run.state, log=run.log)
    run.baseline_latency = float(model.fit["calibration"][0]["measured_ms"])
    run.latency_model = model
    run.log(f"latency: baseline {run.baseline_latency:.3f} ms in onnxruntime "
            f"({run.config.threads} thread, batch 1)")


def _check_latency_floor(run: Run, lat: Constraint) -> None:
    """Refuse a latency target below the measured latency of the smallest plan."""
    from .latency_model import latency_floor

    floor, _ = latency_floor(run.graph, run.latency_model, run.round_to)
    run.latency_model.fit["floor_ms"] = floor
    if floor > lat.limit:
        raise UserError(
            f"unreachable target: latency {lat.limit:.3f} ms (asked {lat.requested}) is below "
            f"the fastest this model runs: {floor:.3f} ms measured in onnxruntime with every "
            f"group at its minimum width (multiples of {run.round_to}); ask for at least "
            f"{floor:.3f} ms" + (", or try --round-to 1" if run.round_to > 1 else ""))


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
        constraints=run.constraints, round_to=run.round_to, settings=settings,
        epochs=cfg.search_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
        seed=cfg.seed, state_dir=run.state, progress=cfg.progress, log=run.log,
        latency_model=run.latency_model, example_inputs=run.example_inputs)
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
    from graphsearch.passes.latency import latency, latency_pair
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
    before, after, _ = latency_pair(base_onnx, onnx_path, threads=threads, repeats=30)
    batch = max(1, int(run.config.latency_batch or 1))
    at_batch = {}
    if batch > 1:
        b_before, b_after, _ = latency_pair(base_onnx, onnx_path, threads=threads,
                                            repeats=10, batch_size=batch)
        at_batch = {"batch_size": batch, "before": asdict(b_before), "after": asdict(b_after)}
    return {"onnx": str(onnx_path), "portable": str(saved.path),
            "portable_note": getattr(saved, "note", ""),
            "latency_before": asdict(before), "latency_after": asdict(after),
            "latency_at_batch": at_batch}
