"""Loading a user's `model.py` by the project's convention.

`model.py` defines:
- `build_model()` -> nn.Module (required);
- `example_inputs()` -> tuple of tensors (optional; default: one tensor of shape
  `INPUT_SHAPE`, itself defaulting to (1, 3, 32, 32));
- optionally `WEIGHTS = "path.pt"` (a state dict, relative to model.py);
- optionally, for models that are not image classifiers (or to use your own data, loss and
  metric), the hooks `optimize` reads:
  - `datasets()` -> {"train": ds, "val": ds, "test": ds} (or a tuple in that order; "val"
    and "test" optional): map-style datasets of (input, target) pairs, batched by a plain
    DataLoader. Used when `--data` is not given. A missing "test" is held out of "train"
    at random by the seed (`--test-fraction`), then a missing "val" (`--val-fraction`).
  - `loss_fn(output, target)` -> scalar tensor: the training loss (default cross-entropy).
  - `evaluate(model, dataset)` -> float, higher is better (e.g. mean IoU, macro F1): the
    metric of every decision (on the validation split) and of the report (validation and
    test), in place of top-1. The model comes in eval mode, under torch.no_grad().
- optionally `rules()` -> the rules for the model's own modules: a `graphsearch.rules.Rules`
  (e.g. `default_rules().extend({MyBlock: rule})`), or a mapping `{MyBlock: rule}` that
  extends the project's. `inspect`, `optimize` and every method's graph analyse with them.

Instead of a path, `zoo:NAME` names a model of the built-in zoo (`graphsearch.zoo`).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

import torch

from .errors import UserError
from .rules import Rules, default_rules

DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple
    source: str
    namespace: ModuleType | None = None
    notes: list[str] = field(default_factory=list)
    weights: str | None = None  # the trained weights that were loaded, if any
    datasets: Callable | None = None  # model.py's hooks (see the module docstring)
    loss_fn: Callable | None = None
    evaluate: Callable | None = None
    rules: Rules | None = None  # model.py's `rules()` (None: the project's defaults)


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    if spec.startswith("zoo:"):
        loaded = _load_zoo(spec[4:])
    else:
        loaded = _load_file(Path(spec))
    if weights:
        _load_weights(loaded.model, Path(weights))
        loaded.weights = str(weights)
    return loaded


def _load_zoo(name: str) -> LoadedModel:
    from . import zoo

    if name not in zoo.MODELS:
        raise UserError(f"no zoo model '{name}'; choose one of: {', '.join(sorted(zoo.MODELS))}")
    return LoadedModel(zoo.build(name), zoo.example_inputs(name), f"zoo:{name}")


def _load_file(path: Path) -> LoadedModel:
    if not path.exists():
        raise UserError(f"model file '{path}' does not exist; pass a model.py that defines "
                        "build_model(), or zoo:NAME for a built-in model")
    if path.is_dir():
        path = path / "model.py"
        if not path.exists():
            raise UserError(f"'{path.parent}' is a folder without a model.py")
    name = f"graphsearch_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure in user code becomes one line
        sys.modules.pop(name, None)
        raise UserError(f"could not import '{path}': {type(exc).__name__}: {exc}") from exc
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise UserError(f"'{path}' must define build_model() returning a torch.nn.Module")
    try:
        model = build()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"build_model() in '{path}' failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"build_model() in '{path}' returned {type(model).__name__}, "
                        "not a torch.nn.Module")
    notes = []
    if callable(getattr(module, "example_inputs", None)):
        try:
            inputs = module.example_inputs()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"example_inputs() in '{path}' failed: {exc}") from exc
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, (tuple, list)) or not inputs:
            raise UserError(f"example_inputs() in '{path}' must return a tuple of tensors")
    else:
        shape = tuple(getattr(module, "INPUT_SHAPE", DEFAULT_INPUT_SHAPE))
        inputs = (torch.randn(shape),)
        notes.append(f"no example_inputs() in {path.name}: using one input of shape {shape}")
    hooks = {}
    for hook in ("datasets", "loss_fn", "evaluate"):
        fn = getattr(module, hook, None)
        if fn is not None and not callable(fn):
            raise UserError(f"'{hook}' in '{path}' must be a function, not "
                            f"{type(fn).__name__}")
        hooks[hook] = fn
    weights = getattr(module, "WEIGHTS", None)
    loaded = LoadedModel(model, tuple(inputs), str(path), module, notes, **hooks,
                         rules=_user_rules(module, path))
    if weights:
        _load_weights(model, (path.parent / weights))
        loaded.weights = str(path.parent / weights)
    return loaded


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.exists():
        raise UserError(f"weights file '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        why = ("the file is empty" if path.stat().st_size == 0 else
               str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise UserError(f"could not read weights '{path}' ({why}); pass a state dict "
                        "saved with torch.save") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"weights '{path}' do not fit the model: {first}") from exc


def _user_rules(module: ModuleType, path: Path) -> Rules | None:
    """The registry of model.py's `rules()` hook, or None when it has none."""
    hook = getattr(module, "rules", None)
    if hook is None:
        return None
    if not callable(hook):
        raise UserError(f"'rules' in '{path}' must be a function, not {type(hook).__name__}")
    try:
        given = hook()
    except Exception as exc:  # noqa: BLE001 - any failure in user code becomes one line
        raise UserError(f"rules() in '{path}' failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(given, Rules):
        return given
    if isinstance(given, Mapping):
        return default_rules().extend(given)
    raise UserError(f"rules() in '{path}' must return a graphsearch.rules.Rules or a mapping "
                    f"{{module type: Rule}}, not {type(given).__name__}")
