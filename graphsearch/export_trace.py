"""The second front end: `torch.export` for models torch.fx cannot trace.

`trace_model` is what the analysis calls: torch.fx first (`trace.trace`: readable node
names, modules kept whole), and `torch.export` for a Hugging Face `PreTrainedModel` (whose
forward fx cannot follow: `**kwargs` signatures, mask builders, output classes) or a model
fx fails on. An exported graph is a plain `fx.GraphModule` of ATen ops (`rules/aten.py`)
whose parameters keep the names of the model's state dict (`get_attr` nodes), and every node
records the modules around it (`nn_module_stack`), so the slim pass, the mask reference and
in-place pruning read it as they read an fx trace.

The batch dimension is exported dynamic (`torch.export.Dim`): sizes computed from it are
`aten.sym_size` nodes, not literals. A model whose code fixes the batch (a reshape with the
example's batch written in) cannot be exported so; it is exported with static shapes and
`Traced.static_batch` says why: an ONNX file of it must not claim a dynamic batch.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings

import torch
import torch.fx as fx

from . import hf
from .errors import TraceFailure
from .rules import default_rules
from .trace import Traced, fuse, propagate_shapes, trace


def trace_model(model: torch.nn.Module, example_inputs: tuple, rules=None) -> Traced:
    """fx where it can trace the model, torch.export where it cannot (or for a Hugging
    Face model)."""
    if isinstance(model, fx.GraphModule) or not hf.is_pretrained(model):
        try:
            return trace(model, example_inputs, rules)
        except TraceFailure as fx_failure:
            try:
                return export_trace(model, example_inputs, rules)
            except TraceFailure as exc:
                raise TraceFailure(f"{fx_failure} (torch.export could not trace it either: "
                                   f"{exc})") from fx_failure
    return export_trace(model, example_inputs, rules)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def export_trace(model: torch.nn.Module, example_inputs: tuple, rules=None) -> Traced:
    """`torch.export` `model` (dynamic batch where the model allows it) into a Traced."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs)
    kwargs = hf.call_kwargs(model)
    batch_sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim()}
    static_batch = ""
    if len(batch_sizes) != 1:
        static_batch = "the inputs share no batch dimension"
    traced_args = args
    if batch_sizes == {1}:  # export fixes a batch of one: trace two samples (the sizes
        # it computes from the batch become symbolic), record the shapes of the example's one
        traced_args = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim()
                            else a for a in args)
    was_training = model.training
    model.eval()
    try:
        program = None
        if not static_batch:
            batch = torch.export.Dim("batch")

            def dim0(a):
                if isinstance(a, dict):
                    return {k: dim0(v) for k, v in a.items()}
                if isinstance(a, (tuple, list)):
                    return type(a)(dim0(v) for v in a)
                return {0: batch} if isinstance(a, torch.Tensor) and a.dim() else None

            bound = inspect.signature(model.forward).bind_partial(*traced_args,
                                                                  **kwargs).arguments
            spec = tuple(dim0(a) for a in bound.values())
            try:
                program = _export(model, traced_args, kwargs, spec)
            except Exception as exc:  # noqa: BLE001 - the batch is fixed somewhere: static
                static_batch = f"torch.export with a dynamic batch: {_first_line(exc)}"
        if program is None:
            try:
                program = _export(model, args, kwargs, None)
            except Exception as exc:  # noqa: BLE001
                raise TraceFailure(f"torch.export could not trace {type(model).__name__}: "
                                   f"{_first_line(exc)}") from exc
    finally:
        model.train(was_training)
    gm = _plain_module(program, model)
    rules = rules if rules is not None else default_rules()
    if fuse(gm, rules):  # a rule's rewrite of its neighbourhood (`Rule.fuse`)
        gm.recompile()
    if static_batch:
        warnings.warn(f"graphsearch: {type(model).__name__} is traced with its batch fixed at "
                      f"the example's ({static_batch}); its exports have a static batch.",
                      stacklevel=2)
    try:
        values, mode = propagate_shapes(gm, args, rules), "meta"
    except Exception:  # noqa: BLE001 - an op without a meta kernel (a copy to the cpu)
        values, mode = propagate_shapes(gm, args, rules, real=True), "real"
    constraints = [hf.config_ties(model)] if hf.is_pretrained(model) else []
    return Traced(gm, values, shape_mode=mode, front_end="export", static_batch=static_batch,
                  constraints=constraints)


# torch.export logs what it could not follow (a graph dump, symbolic-shape warnings) on these
# loggers; a failure is reported once, in the TraceFailure's one line, so they stay quiet
_QUIET = ("torch._dynamo", "torch._export", "torch.export", "torch.fx.experimental",
          "torch._subclasses", "torch._functorch")


def _export(model, args, kwargs, dynamic_shapes):
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        # a failed export also prints its partial graph straight to sys.stderr
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, kwargs=kwargs,
                                       dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _plain_module(program, model: torch.nn.Module) -> fx.GraphModule:
    """The exported program as a plain GraphModule: parameters as attributes under their
    state-dict names, tensor inputs only (export's own input guard and the keyword
    constants dropped), a flat tuple of tensors out."""
    gm = program.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and \
                not isinstance(node.meta.get("val"), torch.Tensor):
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.contiguous.default:
            # the copy it stands for: the ONNX exporter's export of this graph dropped
            # `contiguous` after an attention's output on a symbolic batch, and the reshape
            # after it held the example's batch (Swin's window attention: its ONNX file
            # failed at batch 3); a clone in contiguous format stays
            node.target = torch.ops.aten.clone.default
            node.kwargs = {**node.kwargs, "memory_format": torch.contiguous_format}
    graph.set_codegen(fx.graph.CodeGen())
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    if not isinstance(flat, (tuple, list)):
        flat = (flat,)
    out.args = (tuple(a for a in flat if isinstance(a, fx.Node)),)
    graph.eliminate_dead_code()
    # a plain GraphModule (the exported one refuses train() and eval())
    plain = fx.GraphModule(gm, graph, type(model).__name__)
    plain.meta["graphsearch_model_class"] = type(model).__name__
    # tensors the forward makes (`torch.tensor(head_dim)`), which the graph holds as buffers
    plain.meta["graphsearch_constants"] = frozenset(
        program.graph_signature.lifted_tensor_constants)
    return plain


__all__ = ["trace_model", "export_trace"]
