"""The Python API: `graphsearch.optimize(model, example_inputs, ...)` for a model in memory.

It runs the pipeline of `graphsearch optimize` (`graphsearch.optimize.optimize`: the same
stages, checkpoints, seeds and report) on the user's model object instead of a model.py,
then prunes that object in place (`graphsearch.inplace.prune`) and loads the fine-tuned
slim weights into it. The CLI's options are keyword arguments with the same defaults
(`OptimizeConfig`); data come as torch Datasets of (input, target) pairs, as model.py's
`datasets()` gives them.

    import graphsearch
    result = graphsearch.optimize(model, (torch.randn(1, 3, 32, 32),), train=train_set,
                                  flops=0.33, method="magnitude")
    result.model is model   # True: the same object, pruned and fine-tuned
    result.report["result"]["params"]

The model is taken as the trained baseline, as the CLI takes `--weights`: its weights are
used as they are (`baseline_epochs` defaults to 0 here); pass `baseline_epochs=N` to train an
untrained model first. The search and the fine-tune then train it in place.
Where the plan cannot be expressed by editing modules (`InPlaceError`: a size written in the
forward code, a channel shuffle of unequal counts), the model keeps the original
architecture, a warning says why, and `result.model` is the slim fx module.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import hf
from .inplace import InPlaceError, PruneResult, prune
from .load import LoadedModel, UserError
from .optimize import OptimizeConfig, optimize as run_pipeline
from .passes.mask import verify

_OUTPUTS = ("model.onnx", "model.pt2", "report.json", "report.md")


@dataclass
class OptimizeResult:
    """What `optimize` hands back."""

    report: dict  # report.json's content: baseline and result, widths, method, time...
    model: nn.Module  # the user's model, pruned in place (or the slim module, see in_place)
    slim: torch.fx.GraphModule  # the fine-tuned slim fx module (what model.onnx holds)
    plan: Any  # graphsearch.target.Plan: kept channels by group, widths, achieved cost
    in_place: bool  # whether `model` is the user's object pruned in place
    pruned: PruneResult | None = None  # what in-place pruning changed
    paths: dict[str, Path] = field(default_factory=dict)  # outputs written, when `out` given
    note: str = ""  # why the model could not be pruned in place, if so

    def __repr__(self) -> str:
        r, b = self.report["result"], self.report["baseline"]
        return (f"OptimizeResult({self.report['method']}: {r['flops'] / 1e6:.2f} of "
                f"{b['flops'] / 1e6:.2f} MFLOPs, {r['params']:,} of {b['params']:,} params, "
                f"val {r['accuracy']:.4f} (baseline {b['accuracy']:.4f}), "
                f"in_place={self.in_place}, paths={sorted(self.paths)})")


def optimize(model: nn.Module, example_inputs, *, train=None, val=None, test=None,
             data: str | None = None, flops: float | str | None = None,
             params: float | str | None = None, latency: float | str | None = None,
             method: str = "magnitude", loss_fn: Callable | None = None,
             evaluate: Callable | None = None, out: str | Path | None = None,
             resume: bool = False, seed: int = 0, round_to: int | str = "auto",
             settings: dict | None = None, progress: bool = True, in_place: bool = True,
             **options) -> OptimizeResult:
    """Search a compact architecture for `model` and prune it to it, in place.

    `example_inputs`: a tensor or tuple of tensors the model runs on (batch 1 is usual).
    `train`, `val`, `test`: torch Datasets of (input, target); a missing `test` (then `val`)
    is held out of `train` at random by `seed` (`val_fraction`, `test_fraction`). Or `data`,
    as the CLI's `--data` (a folder, a zip, `synthetic:N:C`). `flops`, `params`: a fraction of
    the baseline (0.33) or a count ("46M"); `latency`: "4ms" or a fraction; none given: a
    third of the FLOPs. `loss_fn(output, target)` and `evaluate(model, dataset) -> float`
    as in model.py. `out`: a folder for model.onnx, model.pt2 and the reports (and the
    checkpoints `resume` continues from); None: a temporary one, removed at the end.
    `options`: the other fields of `graphsearch.optimize.OptimizeConfig` (baseline_epochs,
    search_epochs, finetune_epochs, lr, finetune_lr, batch_size, max_train, workers, ...).
    Progress goes to stderr as the CLI's does (`progress=False`: silent).
    """

    if not isinstance(model, nn.Module):
        raise UserError(f"optimize: the model is a {type(model).__name__}, not a "
                        "torch.nn.Module")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else \
        tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UserError("optimize: example_inputs must be a tensor or a tuple of tensors")
    known = {f.name for f in fields(OptimizeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"optimize: unknown options {unknown}; see OptimizeConfig's fields")
    splits = {"train": train, "val": val, "test": test}
    if train is None and (val is not None or test is not None):
        raise UserError("optimize: val and test go with train")
    if train is not None and data is not None:
        raise UserError("optimize: give train (and val, test) or data, not both")
    for role, ds in splits.items():
        if ds is not None and not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise UserError(f"optimize: {role} is a {type(ds).__name__}, not a map-style "
                            "torch Dataset of (input, target) pairs")
    source = f"<{type(model).__name__} in memory>"
    loaded = LoadedModel(model, inputs, source, loss_fn=loss_fn, evaluate=evaluate,
                         datasets=(lambda: {k: v for k, v in splits.items() if v is not None})
                         if train is not None else None)
    # A model object is the user's trained model: its weights are the baseline's, as
    # `--weights` makes them for the CLI (a model.py's build_model() is untrained instead).
    options.setdefault("baseline_epochs", 0)
    if options["baseline_epochs"] == 0:
        loaded.weights = f"the weights of {source}"

    def text(v):
        return None if v is None else str(v)

    with tempfile.TemporaryDirectory(prefix="graphsearch-") as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "out"
        config = OptimizeConfig(model=source, method=method, data=data, flops=text(flops),
                                params=text(params), latency=text(latency), round_to=round_to,
                                out=str(folder), seed=seed, settings=dict(settings or {}),
                                progress=progress, **options)
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda *_: None)
        outcome: dict = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as the CLI: the analysis's own are printed
            report = run_pipeline(config, resume=resume, log=log, loaded=loaded,
                                  outcome=outcome)
        run, plan, slim_module = outcome["run"], outcome["plan"], outcome["slim"]
        result = OptimizeResult(report, slim_module, slim_module, plan, in_place=False)
        if out is not None:
            result.paths = {name: folder / name for name in _OUTPUTS
                            if (folder / name).exists()}
    if in_place:
        _prune_to_result(model, run, plan, slim_module, result, log)
    return result


def _prune_to_result(model: nn.Module, run, plan, slim_module, result: OptimizeResult,
                     log: Callable) -> None:
    """Prune the user's model to the plan, then give it the fine-tuned slim weights; checked
    against the slim module on the example inputs."""

    try:
        result.pruned = prune(model, run.graph, plan.keep, inputs=run.example_inputs)
    except InPlaceError as exc:
        result.note = str(exc)
        warnings.warn(f"graphsearch: {exc}; result.model is the slim fx module", stacklevel=3)
        return
    state = slim_module.state_dict()
    mine = {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}  # (non-persistent ones too)
    extra = sorted(set(state) - set(mine))
    if extra:
        raise RuntimeError(f"graphsearch bug: the slim module has tensors the model pruned in "
                           f"place lacks: {extra[:5]}")
    model.load_state_dict(state, strict=False)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    check = verify(hf.Called(model), slim_module.eval(), run.example_inputs, rtol=1e-4)
    for m, mode in modes:
        m.training = mode
    if not check.ok:
        raise RuntimeError(f"graphsearch bug: the model pruned in place differs from the "
                           f"fine-tuned slim module: {check.message}")
    result.model, result.in_place = model, True
    log(f"in place: {type(model).__name__} pruned to the plan "
        f"({result.pruned.params:,} params), fine-tuned weights loaded")


__all__ = ["optimize", "OptimizeResult"]
