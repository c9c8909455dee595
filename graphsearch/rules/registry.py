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

`dead` says what the op does when an input loses all its channels (a branch at width 0):
  "pass"  - the output dies with it (unary ops, shape ops, conv/linear: a conv of nothing is
            a constant, which the removed branch takes with it);
  "add"   - the dead operand is dropped and the others flow on (residual add);
  "sub"   - as "add", but the first operand (the one subtracted from) cannot go;
  "cat"   - the dead operand's channels leave the concat;
  "block" - the op cannot lose an input (multiply by a gate, attention, model output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from ..errors import RuleConflict

# The slim pass's name for an op that runs on the original (full) layout (see passes/slim.py).
FULL = "full"

# `dead` kinds whose op drops a removed operand and lives on with the others
DROPS_DEAD_OPERAND = ("add", "sub", "cat")


@dataclass(frozen=True)
class Rule:
    """Everything the project knows about one op family.

    `tie`   (ctx, node) -> channel ids of the output; ties atoms, binds parameter dims and
            records MACs (`ctx.macs`): what the op ties and what it costs.
    `edge`  how channel indices map from inputs to output (networkx edge label).
    `dead`  what the op does when an input loses all its channels (module docstring).
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
    `targets` what the project registers the rule for (`default_rules`); a user's rule may
            leave it empty and name its targets in `Rules.extend`.
    """

    name: str
    tie: Callable[..., Any]
    edge: str = "identity"
    dead: str = "pass"
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
    targets: tuple = field(default=(), compare=False)

    def role(self, attr: str) -> str | None:
        return self.roles.get(attr)

    @property
    def family(self) -> str:
        """The op family of a project rule (its module in graphsearch.rules: "conv",
        "linear", "norm", ...); "" for a rule defined elsewhere (a user's)."""
        package, _, family = getattr(self.tie, "__module__", "").rpartition(".")
        return family if package == __name__.rpartition(".")[0] else ""


def rule(*targets: Any, **fields: Any) -> Callable[[Callable], Rule]:
    """Decorator for a family module: the function becomes the tie of a `Rule` for `targets`
    (named after the function unless `name=` says otherwise), which replaces it."""

    name = fields.pop("name", None)

    def make(tie: Callable) -> Rule:
        return Rule(name or tie.__name__, tie, targets=targets, **fields)

    return make


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
        if found is None:
            return False
        cls = found[1]
        return cls is type(module) or type(module).forward is cls.forward

    def rule_for(self, node, module: nn.Module | None) -> Rule | None:
        if node.op == "call_module":
            found = self.module_rule(module)
            return found[0] if found is not None else None
        if node.op == "call_method":
            return self._table.get(("method", node.target))
        if node.op == "call_function":
            return self._table.get(node.target)
        return None


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
