"""The rule registry: what a `Rule` is, the `Rules` object that maps ops to rules, and the
fallback for an op without one. It holds no state of its own: `graphsearch.rules.default_rules()`
builds a fresh `Rules` from the family modules on every call.

A rule receives the analysis context (`graphsearch.analysis.Context`) for one fx node and
returns the channel ids of the node's output. Ids are int64 tensors of the output's rank,
broadcastable to its shape, whose entries are channel atoms (see `atoms.py`): a conv's output
is `(1, C, 1, 1)` holding C fresh atoms; a flatten into a linear layer repeats each atom H*W
times; a concat lays its inputs' atoms side by side. Rules tie atoms with `ctx.tie`, bind
parameter dimensions with `ctx.bind`, and record MACs with `ctx.macs`.

An op with no rule is handled by `unsupported`: it stops propagation and marks every channel
it touches as not prunable, with the reason.

`dead` says what the op does when an input loses all its channels (a branch at width 0), a
`DeadInput`: `PASS` (the output dies with it: unary ops, shape ops, conv/linear: a conv of
nothing is a constant, which the removed branch takes with it), `BLOCK` (the op cannot lose
an input: multiply by a gate, matmul, model output), or one that drops the removed operand
and lives on with the others (`elementwise.ADD`, `elementwise.SUB`, `layout.CAT`), with the
slim pass's rewrite of the op once it is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import operator

import torch
import torch.nn as nn

from ..errors import RuleConflict

# The slim pass's name for an op that runs on the original (full) layout (see passes/slim.py).
FULL = "full"

# Calls that write (their operands, or the program's state) or read values rather than only
# return a result: the meta shape pass never reuses their output (`Rules.pure`).
WRITING_FUNCTIONS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
    operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.iconcat})
IMPURE_METHODS = frozenset({
    "copy_", "set_", "record_stream", "register_hook", "retain_grad", "backward", "tolist",
    "item", "numpy", "data_ptr", "untyped_storage", "storage"})


@dataclass(frozen=True)
class DeadInput:
    """What an op does when one of its inputs is removed (a branch whose channels all go).

    `drops`  the removed operand is dropped and the others flow on (a residual add, a
             concat): the op dies only with all its inputs. Otherwise it dies with any one
             (`PASS`), or cannot lose one at all (`blocks`: `BLOCK`).
    `first_stays` a dropping op whose first operand cannot go (`a - b`: b may, a not).
    `rewrite` `(gm, graph, plan, node, gone)`: how the slim pass rewrites a dropping op once
             its removed operands (fx nodes named in `gone`) are gone; an op that itself
             goes (an add becomes its live operand) adds its name to `gone`.
    """

    name: str
    drops: bool = False
    first_stays: bool = False
    blocks: bool = False
    rewrite: Callable | None = None


PASS = DeadInput("pass")
BLOCK = DeadInput("block", blocks=True)


@dataclass(frozen=True)
class Rule:
    """Everything the project knows about one op family.

    `tie`   (ctx, node) -> channel ids of the output; ties atoms, binds parameter dims and
            records MACs (`ctx.macs`): what the op ties and what it costs.
    `edge`  how channel indices map from inputs to output (networkx edge label).
    `dead`  what the op does when an input loses all its channels (a `DeadInput`).
    `slim`  how the slim pass treats it as a shape op: "free" (commutes with dropping
            channels), "full" (runs on the original layout, see passes/slim.py), a rewrite
            function `(rw, node, state) -> False | None` fixing its literal sizes, or None
            (not a shape op).
    `fix`   `(rw, node, module_or_None)`: after slicing, fix what still names a width (a
            module's `in_channels`, a functional op's literal `num_groups`).
    `gate`  where a per-channel gate goes: "producer" (on this op's output), "norm" (a gate
            of the producer right before moves here: a norm rescales away what precedes it).
    `roles` parameter attribute -> role: which ones play gamma, beta, a statistic.
    `flow`  for finding gates: "pass" (channels flow position by position: activations,
            adds, shape ops), "scale" (a product: a factor broadcast over the other is a
            gate), "" (neither).
    `same_shape` output shape = input shape (the meta shape pass skips its kernel).
    `mask`  `(graph, plan, node, info) -> runner | None`: when zeroing dropped channels is
            not the slim model's computation (LayerNorm statistics, attention heads), a
            runner `(interp, node, keep) -> output` for the mask reference, with its keep.
    `idempotent` f(f(x)) = f(x) for any of the rule's targets applied to another's output
            (the slim pass drops the second: one op less at run time).
    `pure`  a module target's forward is a function of its configuration, parameters and
            inputs only (no state written, no branching on values): the meta shape pass may
            reuse its output metadata for an equal call (`trace._MetaMemo`).
    `identity` the op returns its input unchanged (nn.Identity): the slim pass looks through
            it (an idempotent op after a shortcut written as one).
    `latency` how the latency model times the op as a layer of its own: "conv" (a 2-d
            convolution module), "linear" (a linear module), "" (with the other MAC terms).
    `trace_as` a plain function `(module, *args, **kwargs)` that the tracer follows in place
            of the module's forward (for its own class only): the module is never a node, so
            the rule has no tie of its own (torch's transformer layers, whose fused fast path
            fx cannot trace).
    `fuse`  `(gm, node) -> bool`: a rewrite the tracer applies at each of the rule's nodes
            before shapes are propagated, True if it rewrote (a weight-standardised
            convolution's chain on its parameter becomes one `standardised_conv` node).
    `metadata` `(target, args) -> bool`: the call returns only its tensor's metadata (sizes,
            rank, dtype, device), never a value computed from the data: the tracer may
            follow a Python condition on it (`if x.size(1) != c`).
    `meta`  `(target, args, kwargs) -> output | None`: the op's output on meta tensors
            without running its meta kernel (torch's, in Python, is the slow part of the
            shape pass for a pooling or a broadcast product), with exactly the kernel's
            shape, strides and dtype; None where the function is not sure: the kernel runs.
            `target` is the module of a call_module node, else the node's target; a
            module's own parameters may still be real there (`plain_parameter`).
    `family` the op family: "conv", "linear", "norm", "attention"... (a project rule's
            defaults to its module in graphsearch.rules; "" for a user's that sets none). A
            method reads a layer's kind here (ESNAC: convolution or not), so a rule of
            another front end (an ATen convolution) sets the family of the op it stands for.
    `targets` what the project registers the rule for (`default_rules`); a user's rule may
            leave it empty and name its targets in `Rules.extend`.
    """

    name: str
    tie: Callable[..., Any]
    edge: str = "identity"
    dead: DeadInput = PASS
    slim: Any = None
    fix: Callable | None = None
    gate: str | None = None
    roles: Mapping[str, str] = field(default_factory=dict)
    flow: str = ""
    same_shape: bool = False
    mask: Callable | None = None
    idempotent: bool = False
    pure: bool = False
    identity: bool = False
    latency: str = ""
    trace_as: Callable | None = None
    fuse: Callable | None = None
    metadata: Callable | None = None
    meta: Callable | None = None
    family: str = ""
    targets: tuple = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.family:  # a project rule's family: the module of its tie
            package, _, family = getattr(self.tie, "__module__", "").rpartition(".")
            if package == __name__.rpartition(".")[0] and family != "registry":
                object.__setattr__(self, "family", family)

    def role(self, attr: str) -> str | None:
        return self.roles.get(attr)


def rule(*targets: Any, **fields: Any) -> Callable[[Callable], Rule]:
    """Decorator for a family module: the function becomes the tie of a `Rule` for `targets`
    (named after the function unless `name=` says otherwise), which replaces it."""

    name = fields.pop("name", None)

    def make(tie: Callable) -> Rule:
        return Rule(name or tie.__name__, tie, targets=targets, **fields)

    return make


def plain_meta(t) -> bool:
    """A plain tensor on meta, row-major contiguous with the standard strides (no view's
    odd strides on size-1 dims), no autograd, floating point: what `Rule.meta` functions
    accept, where torch's kernels give a fresh row-major tensor of the same dtype."""
    if type(t) is not torch.Tensor or not t.is_meta or t.requires_grad or \
            not t.is_floating_point() or t.layout != torch.strided:
        return False
    expected, stride = 1, t.stride()
    for d in range(t.dim() - 1, -1, -1):
        if stride[d] != expected:
            return False
        expected *= t.shape[d]
    return True


def plain_parameter(t) -> bool:
    """A module's parameter or buffer that its kernel sees as a plain meta tensor
    (`plain_meta`) in the meta shape pass: one already on meta must be one; a real one is
    swapped for a row-major meta copy when the kernel runs (`trace.propagate_shapes` leaves
    the state of a module its rule answers as it is until then), so it needs only be a
    floating-point tensor of torch's own types."""
    if t.is_meta:
        return plain_meta(t)
    return type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and \
        t.is_floating_point()


def methods(*names: str) -> tuple:
    """Registry keys of tensor methods (`x.view(...)` is `("method", "view")`)."""
    return tuple(("method", n) for n in names)


def arg(node, pos: int, key: str, default=None):
    """An fx node's argument by position, else by keyword, else `default`."""
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)


def set_arg(node, pos: int, key: str, value) -> None:
    """Rewrite the argument `arg(node, pos, key)` reads, where the node gives it."""
    if len(node.args) > pos:
        node.args = (*node.args[:pos], value, *node.args[pos + 1:])
    else:
        node.kwargs = {**node.kwargs, key: value}


class Rules:
    """An explicit registry: module types, functions and ("method", name) keys -> Rule.

    `analyze(model, inputs, rules=...)` takes one; `default_rules()` gives a fresh copy of the
    project's. A user adds rules for their own modules with `rules.extend({MyBlock: rule})`;
    a module type with a rule is kept whole by the tracer (a leaf), so the rule sees it.
    Registering a different rule for a target that has one is refused (`RuleConflict`).
    """

    def __init__(self, table: Mapping[Any, Rule] | None = None) -> None:
        self._table: dict[Any, Rule] = dict(table or {})

    def copy(self) -> "Rules":
        return Rules(self._table)

    def __contains__(self, target: Any) -> bool:
        return target in self._table

    def __len__(self) -> int:
        return len(self._table)

    def get(self, target: Any) -> Rule | None:
        return self._table.get(target)

    def extend(self, rules: Mapping[Any, "Rule | Callable"]) -> "Rules":
        """Add `{target: rule}` (a `Rule`, or a tie function for an identity-edge rule);
        returns self. A target that already has a different rule is refused."""
        for target, rule in rules.items():
            if not isinstance(rule, Rule):
                if not callable(rule):
                    raise RuleConflict(f"the rule for {describe(target)} must be a Rule or a "
                                       f"function (ctx, node) -> ids, not {type(rule).__name__}")
                rule = Rule(getattr(rule, "__name__", "custom"), rule)
            had = self._table.get(target)
            if had is not None and had != rule:
                raise RuleConflict(
                    f"{describe(target)} already has the rule '{had.name}'; registering "
                    f"'{rule.name}' for it would silently change how it is analysed. Extend a "
                    "copy without it (Rules({k: v for k, v in rules.items() if k is not "
                    "target})) or register your module's own subclass instead.")
            self._table[target] = rule
        return self

    def add(self, *rules: Rule) -> "Rules":
        """Register each rule for its own `targets`; returns self."""
        for r in rules:
            self.extend({t: r for t in r.targets})
        return self

    def items(self):
        return self._table.items()

    def register(self, *targets: Any, **fields: Any) -> Callable:
        """Decorator: `fn` becomes the tie function of a Rule (with `fields`) for `targets`."""

        def wrap(fn: Callable) -> Callable:
            rule = Rule(fields.pop("name", fn.__name__), fn, **fields)
            self.extend({t: rule for t in targets})
            return fn

        return wrap

    def module_rule(self, module: nn.Module) -> tuple[Rule, type] | None:
        """The rule of a module (by its class, else the nearest base class that has one)."""
        for cls in type(module).__mro__:
            rule = self._table.get(cls)
            if rule is not None:
                return rule, cls
        return None

    def keeps_whole(self, module: nn.Module) -> bool:
        """Should the tracer keep this module as a leaf? Yes when its rule applies to it: its
        class has one, or it subclasses a class with one without changing `forward`."""
        found = self.module_rule(module)
        if found is None or found[0].trace_as is not None:
            return False
        cls = found[1]
        return cls is type(module) or type(module).forward is cls.forward

    def with_running_statistics(self, model: nn.Module) -> list[nn.Module]:
        """Modules of `model` that keep running statistics: their rule gives attributes the
        role "statistic" (a batch norm's running mean and variance) and they hold tensors
        there (a batch norm that tracks them). Adaptive BN re-estimates these."""
        found = []
        for m in model.modules():
            rule = self.module_rule(m)
            stats = [a for a, role in rule[0].roles.items() if role == "statistic"] \
                if rule is not None else []
            if stats and all(isinstance(getattr(m, a, None), torch.Tensor) for a in stats):
                found.append(m)
        return found

    def traced_as(self, module: nn.Module) -> Callable | None:
        """The plain function the tracer follows instead of this module's forward (its own
        class's rule says `trace_as`), or None."""
        rule = self._table.get(type(module))
        return rule.trace_as if rule is not None else None

    def rule_for(self, node, module: nn.Module | None) -> Rule | None:
        if node.op == "call_module":
            found = self.module_rule(module)
            # a module traced through (`trace_as`) is a node only where fx failed: opaque
            return found[0] if found is not None and found[0].trace_as is None else None
        return self.call_rule(node.op, node.target)

    def call_rule(self, op: str, target: Any) -> Rule | None:
        """The rule of a function call (`op` "call_function") or a tensor method call
        ("call_method", `target` its name); None for anything else."""
        try:
            if op == "call_method":
                return self._table.get(("method", target))
            if op == "call_function":
                return self._table.get(target)
        except TypeError:  # an unhashable callable
            pass
        return None

    def reads_metadata(self, op: str, target: Any, args: tuple) -> bool:
        """Does this call return only a tensor's metadata (its rule's `metadata`)?"""
        rule = self.call_rule(op, target)
        return rule is not None and rule.metadata is not None and rule.metadata(target, args)

    def pure_module(self, module: nn.Module) -> bool:
        """Is the module's forward a function of its configuration, parameters and inputs
        (its own class's rule says `pure`)?"""
        found = self.module_rule(module)
        return found is not None and found[0].pure and found[1] is type(module)

    @staticmethod
    def pure_call(op: str, target: Any) -> bool:
        """Does a call of torch (or of Python's operator module) only compute its result?
        Not when it works in place (a trailing underscore, an augmented assignment), writes
        an item, reads values into Python or touches autograd's state (`IMPURE_METHODS`)."""
        if op == "call_method":
            return isinstance(target, str) and not target.endswith("_") and \
                hasattr(torch.Tensor, target) and target not in IMPURE_METHODS
        if target in WRITING_FUNCTIONS:
            return False
        name = getattr(target, "__name__", "")
        module = getattr(target, "__module__", None) or ""
        if name.endswith("_") and not name.endswith("__"):  # torch.relu_, F.relu_ (in place)
            return False
        return target.__class__.__module__ == "_operator" or module == "_operator" or \
            module == "operator" or (module == "torch" or module.startswith("torch.")) and \
            not module.startswith("torch.fx") and not module.startswith("torch._dynamo")


def describe(target: Any) -> str:
    if isinstance(target, tuple) and len(target) == 2 and target[0] == "method":
        return f"method .{target[1]}()"
    if isinstance(target, type):
        return f"module type {target.__module__}.{target.__qualname__}"
    return f"function {getattr(target, '__module__', '') or ''}." \
           f"{getattr(target, '__name__', str(target))}".replace(" .", " ")


def unsupported(ctx, node, why: str | None = None):
    """No rule: stop propagation. Inputs and outputs become unprunable, with the reason.

    Its MACs are still counted (a real count of its matmuls and convolutions), as a cost no
    plan changes: a FLOPs target must see the whole model."""
    reason = why or f"no rule for {target_name(node)}"
    reason = f"{reason} (at '{node.name}')"
    for arg in ctx.tensor_args(node):
        ids = ctx.ids(arg)
        if ids is not None:
            ctx.fix(ids, reason)
    macs = ctx.count_macs(node)
    if macs:
        ctx.macs(macs, why=reason)
    return ctx.opaque_output(node, reason)


def target_name(node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{t}()"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")
