"""Tracing: nn.Module -> torch.fx graph, plus every node's output shape.

Shapes are propagated on meta tensors (no memory, no arithmetic), so analysing a large model
costs no real forward pass. A submodule that fx cannot trace becomes a leaf, with a warning
naming it, instead of a crash; if a leaf cannot run on meta tensors either, the shapes come
from one real forward pass and `Traced.shape_mode` says so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map


class TraceFailure(RuntimeError):
    """The model could not be traced at all; the message says what to do."""


class _LeafFallbackTracer(fx.Tracer):
    """A tracer that turns untraceable submodules into leaves instead of failing."""

    def __init__(self) -> None:
        super().__init__()
        self.untraceable: dict[str, str] = {}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.untraceable or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        stack_before = list(self.module_stack.keys())
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracing failure makes the module a leaf
            qualname = self.path_of_module(m)
            if qualname == "" or qualname in self.untraceable:
                raise
            # fx's module stack is not exception safe: drop what the failed call pushed.
            for key in list(self.module_stack.keys())[len(stack_before):]:
                del self.module_stack[key]
            self.untraceable[qualname] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return super().call_module(m, forward, args, kwargs)


@dataclass
class Traced:
    module: fx.GraphModule
    # node name -> output value on meta (a tensor, a tuple of tensors, an int, ...)
    values: dict[str, Any]
    untraceable: dict[str, str] = field(default_factory=dict)
    shape_mode: str = "meta"


def trace(model: torch.nn.Module, example_inputs: tuple) -> Traced:
    """Trace `model` with fx and record the output of every node on meta tensors."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if isinstance(model, fx.GraphModule):
        gm, untraceable = model, {}
    else:
        tracer = _LeafFallbackTracer()
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001
            raise TraceFailure(
                f"torch.fx could not trace {type(model).__name__}: {exc}. Move data-dependent "
                "Python control flow into a submodule (it will be kept as an opaque leaf) or "
                "make the forward traceable."
            ) from exc
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        if tracer.untraceable:
            gm.graph.eliminate_dead_code()  # nodes left by the failed attempts
            gm.recompile()
        untraceable = tracer.untraceable
        for name, why in untraceable.items():
            warnings.warn(
                f"graphsearch: submodule '{name}' could not be traced by torch.fx ({why}); "
                "it is kept as an opaque leaf and the channels it touches are not pruned.",
                stacklevel=2,
            )
    try:
        values = _propagate_meta(gm, example_inputs)
        mode = "meta"
    except Exception:  # noqa: BLE001 - some ops have no meta kernel: pay one real pass
        with torch.no_grad():
            values = _propagate(gm, tuple(example_inputs), record_as_meta=True)
        mode = "real"
    return Traced(gm, values, untraceable, mode)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return x


def _propagate_meta(gm: fx.GraphModule, example_inputs: tuple) -> dict[str, Any]:
    state = {k: _to_meta(v) for k, v in gm.state_dict(keep_vars=True).items()}
    holder = _Holder(gm)
    meta_inputs = tuple(tree_map(_to_meta, tuple(example_inputs)))
    state = {f"gm.{k}": v for k, v in state.items()}
    return torch.func.functional_call(holder, state, meta_inputs, strict=False, tie_weights=False)


class _Holder(torch.nn.Module):
    """Runs the recorder inside functional_call so that parameters are swapped for meta ones."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return _propagate(self.gm, args, record_as_meta=False)


# Modules whose output has the shape of their input: on meta tensors their (sometimes slow,
# decomposed) kernels are skipped.
_SAME_SHAPE = (
    torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm,
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.GELU, torch.nn.SiLU, torch.nn.Sigmoid, torch.nn.Tanh,
    torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.LeakyReLU, torch.nn.Identity,
    torch.nn.modules.dropout._DropoutNd,
)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record_as_meta: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.record_as_meta = record_as_meta
        self.recorded: dict[str, Any] = {}

    def call_module(self, target, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta and \
                isinstance(self.submodules[target], _SAME_SHAPE):
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.recorded[n.name] = tree_map(_to_meta, out) if self.record_as_meta else out
        return out


def _propagate(gm: fx.GraphModule, args: tuple, record_as_meta: bool) -> dict[str, Any]:
    rec = _Recorder(gm, record_as_meta)
    rec.run(*args)
    return rec.recorded
