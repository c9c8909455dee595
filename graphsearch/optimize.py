"""`graphsearch optimize`: load -> analyze -> baseline -> search -> slim -> fine-tune -> test
-> export -> report, one direction, each stage checkpointed in `OUT/.state` so that `--resume`
after any interruption (even kill -9) continues where it stopped and reaches the same result.

Data roles: the training split fits weights; the validation split makes every decision
(the search and its methods see only these two, through `DataBundle.for_search`); the test
split is evaluated once, in `stage_test`, after every decision is taken, for the baseline and
the result, and only reported.

Under `torchrun` every rank runs the pipeline (training, evaluation and the search's training
are distributed), but only rank 0 logs and writes (state, checkpoints, exports, reports); the
other ranks wait for it at the end of each stage and continue from what it wrote.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .graph_cache import analyze_cached
from .errors import TraceFailure
from .graph import ChannelGraph
from .load import LoadedModel, UserError, load_model
from .passes.export import export_onnx
from .passes.latency import latency_pair
from .passes.mask import mask, verify
from .passes.save import save_portable
from .passes.slim import slim
from .target import (LANDED, Constraint, Plan, land_on_target, latency_text, parse_constraint,
                     scores_from_widths)
from .train import (RECIPES, Distilled, distributed_context, evaluate, logits_of,
                    soft_target_loss, train)
from .units import human, in_interval

STATE = ".state"


@dataclass
class OptimizeConfig:
    model: str
    method: str = "uniform"
    weights: str | None = None
    data: str | None = None
    val_data: str | None = None  # the user's validation data (else held out of `data`)
    test_data: str | None = None  # the user's test data (else held out of `data`)
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
    finetune_recipe: str = "nesterov-one-cycle"  # a name in graphsearch.train.RECIPES
    distill: bool = True  # the final fine-tune distils from the baseline's logits
    distill_temperature: float = 4.0
    distill_weight: float = 0.9  # share of the distillation term (the rest: the task loss)
    batch_size: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train: int | None = None  # train on N training images drawn by seed (quick runs)
    threads: int = 1  # onnxruntime threads for latency
    latency_batch: int = 8  # the report also times this batch size (batch 1 always)
    settings: dict = field(default_factory=dict)  # method hyper-parameters (--set k=v)
    progress: bool = True
    workers: int | None = None  # candidate evaluations at once (None: one per core)
    ray: str | None = None  # a Ray cluster for candidate evaluations ("auto" or an address)
    # decode --data once into this folder (one every worker and node sees) and let workers
    # memory-map it there instead of receiving copies; None: the data cache, mapped above
    # data.MAP_ABOVE_BYTES
    shared_data: str | None = None
    # the analysis' rules (graphsearch.rules.Rules); None: model.py's `rules()`, else defaults
    rules: Any = None

    # the number options' ranges (None, where a default is None, is always allowed)
    BOUNDS = {"baseline_epochs": "[0, inf)", "search_epochs": "[0, inf)",
              "finetune_epochs": "[0, inf)", "lr": "(0, inf)", "finetune_lr": "(0, inf)",
              "distill_temperature": "(0, inf)", "distill_weight": "[0, 1]",
              "batch_size": "[1, inf)", "max_train": "[1, inf)", "threads": "[1, inf)",
              "latency_batch": "[1, inf)", "workers": "[1, inf)"}
    WHOLE = ("baseline_epochs", "batch_size", "max_train", "threads", "latency_batch",
             "workers", "seed")

    def check(self) -> None:
        """Refuse a number option out of its range or not a whole number where it must be,
        before any work (a negative --finetune-epochs ran as none, a negative
        --search-epochs was taken and the search began)."""
        for name in sorted(set(self.BOUNDS) | set(self.WHOLE)):
            value = getattr(self, name)
            if value is None:
                continue
            whole = name in self.WHOLE
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not whole or float(value).is_integer())
            interval = self.BOUNDS.get(name, "(-inf, inf)")
            if not ok or not in_interval(float(value), interval):
                kind = "a whole number" if whole else "a number"
                where = f" in {interval}" if name in self.BOUNDS else ""
                raise UserError(f"--{name.replace('_', '-')} {value!r}: give {kind}{where}")

    def identity(self) -> dict:
        """What must match for a resume to be the same run."""
        d = asdict(replace(self, rules=None))
        # where it runs is not what it does; rules are code, as model.py is
        for k in ("progress", "out", "workers", "ray", "rules"):
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
    warnings: list[str] = field(default_factory=list)  # the analysis's, for the report
    round_to: int = 1  # the channel multiple in use (--round-to auto resolved)
    round_to_choice: dict | None = None  # what --round-to auto measured and chose


def optimize(config: OptimizeConfig, resume: bool = False, log: Callable = print,
             loaded: LoadedModel | None = None, outcome: dict | None = None) -> dict:
    """Run the pipeline; returns the report (on every rank under torchrun). `loaded`: a model
    in memory instead of `config.model`'s file (`graphsearch.api`), which also receives in
    `outcome` the run, the plan and the fine-tuned slim module."""

    distributed_context()  # under torchrun: join the process group before any file is touched
    if not ckpt.is_main():
        log = _silent
    # one run per --out at a time: a second one is refused while this one holds it
    with ckpt.hold_folder(config.out, enabled=ckpt.is_main()):
        return _pipeline(config, resume, log, loaded, outcome)


def _pipeline(config: OptimizeConfig, resume: bool, log: Callable,
              loaded: LoadedModel | None, outcome: dict | None) -> dict:
    run = prepare(config, resume, log, loaded)
    baseline = stage_baseline(run)
    proposal = stage_search(run)
    slim_model, plan = stage_slim(run, proposal)
    final = stage_finetune(run, slim_model)
    test = stage_test(run, slim_model)
    baseline = {**baseline, "test_accuracy": test["baseline"]}
    final = {**final, "test_accuracy": test["result"]}
    exported = stage_export(run, slim_model)
    from .report import write_reports

    report = on_main(lambda: write_reports(run, baseline, proposal, plan, final, exported))
    for line in report.get("failed_targets", []):
        log(f"FAILED TARGET: {line}")
    if outcome is not None:
        outcome.update(run=run, plan=plan, slim=slim_model)
    return report


def _silent(*_args, **_kwargs) -> None:
    pass


def on_main(fn: Callable):
    """Run `fn` on rank 0 only and hand its result (or its error) to every rank.

    Not distributed: just `fn()`. Under torchrun the other ranks wait, receive what rank 0
    returned, and raise the same UserError if it raised one, so that no rank is left waiting
    for a rank that failed.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as exc:
            error, box[0] = exc, ("user", str(exc))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error, box[0] = exc, ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "user":
        raise UserError(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# --------------------------------------------------------------------------- preparation


def prepare(config: OptimizeConfig, resume: bool, log: Callable,
            loaded: LoadedModel | None = None) -> Run:
    from .data import attach_hooks, load_dataset, user_datasets
    from .methods import get_method

    # an unknown method or setting, or an option out of its range, fails before any work
    get_method(config.method).check_settings(config.settings)
    config.check()
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
    if loaded is None:
        loaded = load_model(config.model, config.weights)
    own_data = loaded.datasets is not None and config.data is None
    if own_data:
        if config.val_data or config.test_data:
            raise UserError("--val-data and --test-data go with --data; model.py's datasets() "
                            "provides the data here: return 'val' and 'test' from it instead")
        data = user_datasets(loaded.datasets, val_fraction=config.val_fraction,
                             test_fraction=config.test_fraction, seed=config.seed)
    else:
        data = load_dataset(config.data, val_fraction=config.val_fraction,
                            test_fraction=config.test_fraction, seed=config.seed,
                            val_data=config.val_data, test_data=config.test_data,
                            cache_dir=config.shared_data,
                            mapped=True if config.shared_data else None)
    if config.max_train:
        data = _limit_training(data, config.max_train, config.seed)
    attach_hooks(data, loaded.loss_fn, loaded.evaluate)
    if own_data:
        data.notes.append("data, splits: datasets() of model.py")
    x = loaded.example_inputs
    if not own_data and tuple(x[0].shape[1:]) != tuple(data.input_shape):
        raise UserError(f"the model's example input is {tuple(x[0].shape[1:])} but the data's "
                        f"images are {tuple(data.input_shape)}; make example_inputs() match")
    if loaded.loss_fn is None:  # cross-entropy on class logits: check the output fits
        with torch.no_grad():
            logits = loaded.model.eval()(*x)
        logits = logits_of(logits)
        if own_data:
            classes = _count_classes(data.train)
            if logits.dim() != 2 or not classes or logits.shape[1] < classes:
                raise UserError(f"the model outputs {tuple(logits.shape)}; without loss_fn "
                                "in model.py the loss is cross-entropy, which needs class "
                                "logits (N, classes) and integer class targets: define "
                                "loss_fn (and evaluate) in model.py")
        elif logits.dim() != 2 or logits.shape[1] != data.num_classes:
            raise UserError(f"the model outputs {tuple(logits.shape)} but the data has "
                            f"{data.num_classes} classes; build the model with "
                            f"{data.num_classes} outputs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rules = config.rules if config.rules is not None else loaded.rules
            graph, cached = analyze_cached(loaded.model, x, rules=rules)
            if cached:
                log("analysis: read from the cache (same model code, shapes and rules)")
        except TraceFailure as exc:
            raise UserError(str(exc)) from exc
    # What the analysis says about the model (e.g. each submodule fx cannot trace): shown
    # now, whatever the caller's warning filters, and listed in the report.
    analysis_warnings = [str(w.message) for w in caught
                         if str(w.message).startswith("graphsearch")]
    for w in analysis_warnings:
        if ckpt.is_main():
            print(f"warning: {w}", file=sys.stderr)
    if graph.value_reads:  # the same on every rank
        on_main(lambda: _check_exportable(graph, loaded.model, x))
    base = graph.baseline
    constraints = []
    if config.flops:
        constraints.append(parse_constraint("flops", config.flops, base.flops))
    if config.params:
        constraints.append(parse_constraint("params", config.params, base.params))
    if config.latency:
        latency_text(config.latency)  # its spelling, before the latency model is measured
    if not constraints and not config.latency:
        constraints.append(parse_constraint("flops", "0.3333", base.flops))
        log("no target given: using --flops 0.3333 (a third of the baseline's FLOPs)")
    round_to, choice = _resolve_round_to(config, log, state)
    # An unreachable target is refused now, before any training or any file is written
    # (a latency target alone has nothing to check before the latency model exists).
    round_to, choice = fit_round_to(graph, constraints, round_to, choice, log)
    fresh = not state.exists()
    ckpt.barrier()  # every rank has looked at `out` before rank 0 creates anything in it
    if ckpt.is_main():
        state.mkdir(parents=True, exist_ok=True)
    run = Run(config, out, state, loaded.model, x, data, graph, constraints, None, None, log,
              notes=list(loaded.notes) + list(data.notes), weights=loaded.weights,
              warnings=analysis_warnings, round_to=round_to, round_to_choice=choice)
    try:
        if config.latency:
            # rank 0 measures and caches the tables in the state folder; the others read them
            on_main(lambda: fit_latency(run))
            if not ckpt.is_main():
                fit_latency(run)
            lat = parse_constraint("latency", config.latency, run.baseline_latency)
            constraints.append(lat)
            _check_latency_floor(run, lat)
    except UserError:
        if fresh and ckpt.is_main():
            shutil.rmtree(state, ignore_errors=True)
            if out.exists() and not any(out.iterdir()):
                out.rmdir()
        raise
    ckpt.write_json(state / "config.json", config.identity(), indent=2)
    if run.round_to_choice is not None:
        ckpt.write_json(state / "round_to.json", run.round_to_choice, indent=2)
    ckpt.barrier()
    log(f"model {loaded.source}: {human(base.flops, 'FLOPs')}, {base.params:,} params, "
        f"{len(graph.prunable_groups)} prunable groups; targets: "
        + "; ".join(c.describe() for c in constraints))
    return run


def _check_exportable(graph: ChannelGraph, model: torch.nn.Module, x: tuple) -> None:
    """A model whose forward reads tensor values into Python (`if x.sum().item() > 0`, the
    analysis notes where) is exported once now, before any training: model.onnx and
    model.pt2 record one path through the forward, which such code may leave. If either
    export fails, a UserError says which module reads values and what to do."""
    if not graph.value_reads:
        return
    import tempfile


    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            export_onnx(model, x, Path(tmp) / "model.onnx")
            save_portable(model, x, Path(tmp) / "model.pt2")
        except Exception as exc:  # noqa: BLE001 - whatever the exporter says, in one line
            raise value_reads_error(graph, exc) from exc


def value_reads_error(graph: ChannelGraph, exc: BaseException) -> UserError:
    """The UserError for an export of a model whose forward reads tensor values that failed
    with `exc`: which modules read values, and what to do."""
    who = "; ".join(sorted(set(graph.value_reads.values())))
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(
        f"{who} reads tensor values (item(), int(), float(), bool() or an `if` on a tensor), "
        "so the model cannot be exported to model.onnx / model.pt2, which follow one path "
        f"through it ({type(exc).__name__}: {first}). Write that code with tensor ops "
        "(torch.where(condition, a, b) for a branch, tensors instead of Python numbers), or "
        "move it out of the model")


def _count_classes(dataset, limit: int = 2048) -> int:
    """Classes in the integer targets of the first items of a user's dataset (0 if the
    targets are not class indices)."""
    top = -1
    for i in range(min(len(dataset), limit)):
        y = dataset[i][1]
        y = torch.as_tensor(y)
        if y.dim() != 0 or y.is_floating_point():
            return 0
        top = max(top, int(y))
    return top + 1


def fit_round_to(graph, constraints: list, round_to: int, choice: dict | None,
                 log: Callable = lambda m: None) -> tuple[int, dict | None]:
    """Check the targets are reachable in multiples of `round_to` (a `UserError` if not). For
    `--round-to auto` (`choice` given) take a smaller multiple, down to any width, while the
    targets are out of reach or land more than 1% below the binding one: `auto` never makes a
    target unreachable, nor lands it far below. Probed with uniform widths, before any method
    runs. Returns the multiple and the updated choice."""
    while constraints:
        try:
            probe = land_on_target(graph, scores_from_widths(graph, {}), constraints, round_to)
        except UserError:
            if choice is None or round_to == 1:
                raise
            why = "out of reach"
        else:
            closeness = max(probe.achieved[c.metric] / c.limit for c in constraints)
            if choice is None or round_to == 1 or closeness >= LANDED:
                break
            why = f"{1 - closeness:.1%} below the binding target (more than 1%)"
        round_to = max(1, round_to // 2)
        choice = {**choice, "multiple": round_to, "reason": choice["reason"] + f"; the "
                  f"targets are {why} in multiples of {choice['multiple']} on this "
                  f"model, so multiples of {round_to}"}
        log(f"--round-to auto: the targets need finer widths on this model: multiples of "
            f"{round_to}")
    return round_to, choice


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
    """Keep `n` training images drawn at random by `seed` (the files may be sorted by
    class)."""
    if n < 1:
        raise UserError(f"--max-train {n}: give a positive number of images")
    t = data.train
    if n < len(t):
        pick = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))[:n]
        pick = pick.sort().values
        data.train = t.subset(pick.tolist())
        data.preprocessing = {**data.preprocessing, "num_train": n,
                              "max_train": n}
    return data


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

        train(run.model, run.data.for_search(), epochs=cfg.baseline_epochs, lr=cfg.lr,
              batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
              checkpoint=run.state / "baseline.ckpt", desc="baseline")
        epochs = cfg.baseline_epochs
    acc = evaluate(run.model.eval(), run.data.val)
    train_acc, train_n = _train_side_accuracy(run)
    cost = run.graph.baseline
    summary = {"accuracy": acc, "val_accuracy": acc, "train_accuracy": train_acc,
               "train_accuracy_images": train_n, **cost.as_dict(), "epochs": epochs,
               "weights": "given" if run.weights is not None else "trained here",
               "seconds": time.time() - t0}
    ckpt.save_atomic({"state_dict": run.model.state_dict(), "summary": summary}, path)
    ckpt.barrier()
    run.log(f"baseline: {_metric(run)} {acc * 100:.2f}% on the validation split")
    return summary


def _metric(run: Run) -> str:
    return "metric" if run.data.preprocessing.get("metric", "top-1") != "top-1" else "top-1"


def _train_side_accuracy(run: Run) -> tuple[float, int]:
    """The baseline's top-1 on training images, measured like the validation split (eval
    mode, no augmentation), on a sample by seed as large as the validation split (at least
    500 images, at most the whole training split): the reference of the report's check that
    the held-out splits really are unseen."""

    t = run.data.train
    n = min(len(t), max(len(run.data.val), 500))
    pick = torch.randperm(len(t), generator=torch.Generator().manual_seed(run.config.seed))
    pick = pick[:n].sort().values
    sample = (_Sample(t, pick) if callable(getattr(t, "get_batch", None))
              else t.subset(pick.tolist()) if hasattr(t, "subset")
              else torch.utils.data.Subset(t, pick.tolist()))
    return evaluate(run.model.eval(), sample), int(n)


class _Sample(torch.utils.data.Dataset):
    """Some images of an ImageTensorDataset, keeping its fast, unaugmented batch path."""

    def __init__(self, base, indices: torch.Tensor):
        self.base, self.indices = base, indices
        self.loss_fn, self.metric = base.loss_fn, base.metric

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]

    def get_batch(self, indices, *, augment=None, aug_seed=None, device=None):
        idx = self.indices[torch.as_tensor(indices, dtype=torch.long)]
        return self.base.get_batch(idx, augment=False, device=device)


def stage_search(run: Run):
    from .methods import get_method
    from .methods.base import Proposal, SearchContext

    path = run.state / "proposal.pt"

    def saved_proposal():
        saved = ckpt.load(path, weights_only=False)
        return Proposal(Plan.from_dict(saved["plan"]), saved["state_dict"], saved["info"])

    if path.exists():
        return saved_proposal()
    cfg = run.config
    method = get_method(cfg.method)
    settings = {**method.defaults, **cfg.settings}
    ctx = SearchContext(
        graph=run.graph, model=copy.deepcopy(run.model), data=run.data.for_search(),
        constraints=run.constraints, round_to=run.round_to, settings=settings,
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
    ckpt.barrier()
    # Under torchrun every rank continues from rank 0's plan and weights, bit for bit.
    return proposal if ckpt.is_main() else saved_proposal()


def stage_slim(run: Run, proposal):

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


def finetune_recipe(run: Run) -> dict:
    """What the final fine-tune runs: the recipe, the peak learning rate and whether it
    distils from the baseline (for the log and the report)."""
    cfg = run.config
    if cfg.finetune_recipe not in RECIPES:
        raise UserError(f"fine-tuning recipe {cfg.finetune_recipe!r}: choose one of "
                        f"{', '.join(RECIPES)}")
    recipe = RECIPES[cfg.finetune_recipe]
    distill, why = bool(cfg.distill), ""
    if distill and getattr(run.data.train, "loss_fn", None) is not None:
        distill, why = False, "the model's own loss_fn replaces the class logits' loss"
    text = (f"{recipe.name}: {recipe.describe()}, peak lr {cfg.finetune_lr:g}, batch "
            f"{cfg.batch_size}; " + (
                f"distilled from the baseline's logits (temperature {cfg.distill_temperature:g},"
                f" weight {cfg.distill_weight:g} on the soft targets, "
                f"{1 - cfg.distill_weight:g} on the labels)" if distill else
                f"no distillation ({why or '--distill off'})"))
    return {"name": recipe.name, "lr": cfg.finetune_lr, "distill": distill,
            "temperature": cfg.distill_temperature if distill else None,
            "distill_weight": cfg.distill_weight if distill else None, "text": text}


def stage_finetune(run: Run, module) -> dict:

    cfg = run.config
    path = run.state / "final.pt"
    if path.exists():
        saved = ckpt.load(path)
        module.load_state_dict(saved["state_dict"])
        return saved["summary"]
    before = evaluate(module.eval(), run.data.val)
    t0 = time.time()
    result = None
    recipe = finetune_recipe(run)
    if cfg.finetune_epochs > 0:
        run.log(f"fine-tune: {cfg.finetune_epochs} epochs of the slim model ({recipe['text']})")
        net, loss_fn = module, None
        if recipe["distill"]:
            net = Distilled(module, _baseline_model(run))
            loss_fn = soft_target_loss(cfg.distill_temperature, cfg.distill_weight)
        result = train(net, run.data.for_search(), epochs=cfg.finetune_epochs,
                       lr=cfg.finetune_lr, loss_fn=loss_fn,
                       batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
                       checkpoint=run.state / "finetune.ckpt", desc="fine-tune",
                       **RECIPES[cfg.finetune_recipe].factories(cfg.finetune_lr))
    acc = evaluate(module.eval(), run.data.val)
    summary = {"accuracy": acc, "val_accuracy": acc, "accuracy_before_finetune": before,
               "epochs": cfg.finetune_epochs, "seconds": time.time() - t0,
               "recipe": recipe, "history": result.history if result else []}
    ckpt.save_atomic({"state_dict": module.state_dict(), "summary": summary}, path)
    ckpt.barrier()
    run.log(f"result: {_metric(run)} {acc * 100:.2f}% (before fine-tuning {before * 100:.2f}%)")
    return summary


def stage_test(run: Run, module) -> dict:
    """Top-1 of the baseline and of the fine-tuned result on the test split: measured once,
    after every decision, and only reported (None for both when there is no test split)."""

    path = run.state / "test.json"
    if path.exists():
        return json.loads(path.read_text())
    test = run.data.test
    if test is None or len(test) == 0:
        result = {"baseline": None, "result": None, "images": 0}
    else:
        result = {"baseline": evaluate(_baseline_model(run), test),
                  "result": evaluate(module.eval(), test), "images": len(test)}
        run.log(f"test split ({len(test)} samples, used only for this report): {_metric(run)} "
                f"of the baseline "
                f"{result['baseline'] * 100:.2f}%, result {result['result'] * 100:.2f}%")
    ckpt.write_json(path, result, indent=2)
    ckpt.barrier()
    return result


def stage_export(run: Run, module) -> dict:
    """model.onnx (checked in onnxruntime), model.pt2 (runs without the model's code), and
    latency before and after, with the same settings (rank 0 only under torchrun)."""
    return on_main(lambda: _export(run, module))


def _baseline_model(run: Run) -> torch.nn.Module:
    """The baseline with its own weights (`run.model` holds the search's after stage_slim)."""
    model = copy.deepcopy(run.model)
    model.load_state_dict(ckpt.load(run.state / "baseline.pt")["state_dict"])
    return model.eval()


def _export(run: Run, module) -> dict:

    module = module.eval()
    out = run.out
    onnx_path = out / "model.onnx"
    dynamic = not run.graph.static_batch  # a graph with the batch written in: static files
    export_onnx(module, run.example_inputs, onnx_path, dynamic_batch=dynamic)
    saved = save_portable(module, run.example_inputs, out / "model.pt2", dynamic_batch=dynamic)
    base_onnx = run.state / "baseline.onnx"
    if not base_onnx.exists():
        export_onnx(_baseline_model(run), run.example_inputs, base_onnx, dynamic_batch=dynamic)
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
