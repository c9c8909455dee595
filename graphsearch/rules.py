"""One rule per op family: what the op ties together, what it costs.

A rule receives the analysis context (`graphsearch.analysis.Context`) for one fx node and
returns the channel ids of the node's output. Ids are int64 tensors of the output's rank,
broadcastable to its shape, whose entries are channel atoms (see `atoms.py`): a conv's output
is `(1, C, 1, 1)` holding C fresh atoms; a flatten into a linear layer repeats each atom H*W
times; a concat lays its inputs' atoms side by side. Rules tie atoms with `ctx.tie`, bind
parameter dimensions with `ctx.bind`, and record MACs with `ctx.macs`.

Adding an op is adding one rule: `@register(targets..., edge=..., dead=..., slim=...)`; the
`Rule` holds everything the project knows of the op (analysis, cost, slim, gates, roles). An op with no
rule is handled by `unsupported`: it stops propagation and marks every channel it touches as
not prunable, with the reason.

`dead` says what the op does when an input loses all its channels (a branch at width 0):
  "pass"  - the output dies with it (unary ops, shape ops, conv/linear: a conv of nothing is
            a constant, which the removed branch takes with it);
  "add"   - the dead operand is dropped and the others flow on (residual add);
  "cat"   - the dead operand's channels leave the concat;
  "block" - the op cannot lose an input (multiply by a gate, attention, model output).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .atoms import NO_ATOM
from .load import UserError


class RuleConflict(UserError):
    """Two different rules registered for the same module type, function or method."""


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

    @property
    def apply(self) -> Callable[..., Any]:  # the name the analysis used before
        return self.tie

    def role(self, attr: str) -> str | None:
        return self.roles.get(attr)


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
                    raise RuleConflict(f"the rule for {_describe(target)} must be a Rule or a "
                                       f"function (ctx, node) -> ids, not {type(rule).__name__}")
                rule = Rule(getattr(rule, "__name__", "custom"), rule)
            had = self._table.get(target)
            if had is not None and had != rule:
                raise RuleConflict(
                    f"{_describe(target)} already has the rule '{had.name}'; registering "
                    f"'{rule.name}' for it would silently change how it is analysed. Extend a "
                    "copy without it (Rules({k: v for k, v in rules.items() if k is not "
                    "target})) or register your module's own subclass instead.")
            self._table[target] = rule
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


def _describe(target: Any) -> str:
    if isinstance(target, tuple) and len(target) == 2 and target[0] == "method":
        return f"method .{target[1]}()"
    if isinstance(target, type):
        return f"module type {target.__module__}.{target.__qualname__}"
    return f"function {getattr(target, '__module__', '') or ''}." \
           f"{getattr(target, '__name__', str(target))}".replace(" .", " ")


_DEFAULT = Rules()
register = _DEFAULT.register


def default_rules() -> Rules:
    """A fresh copy of the project's rules, safe to extend."""
    if not _late:
        # The module the slim pass makes of a pruned nn.MultiheadAttention: re-analysing a
        # slim model (a second search, `inspect` on it) needs the same rule. Added on first
        # use: the passes import this module.
        from .passes.attention import PrunedMultiheadAttention

        _DEFAULT.extend({PrunedMultiheadAttention: _DEFAULT.get(nn.MultiheadAttention)})
        _late.append(PrunedMultiheadAttention)
    return _DEFAULT.copy()


_late: list = []


def rule_for(node, module: nn.Module | None, rules: Rules | None = None) -> Rule | None:
    return (rules or default_rules()).rule_for(node, module)


def methods(*names: str) -> tuple:
    return tuple(("method", n) for n in names)


# --------------------------------------------------------------------------- pass-through


@register(
    nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.neg, torch.clamp, operator.neg, torch.square, torch.sqrt,
    *methods("sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_",
             "contiguous", "float", "half", "double", "to", "type_as", "detach", "clone",
             "sqrt", "square", "pow", "sigmoid_", "hardtanh_", "type"),
    edge="identity", slim="free", flow="pass", same_shape=True,
)
def elementwise_unary(ctx, node):
    """Activations, dropout, casts: channel i out is channel i in."""
    return ctx.ids(node.args[0])


@register(nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, *methods("relu", "relu_"),
          edge="identity", slim="free", flow="pass", same_shape=True, idempotent=True)
def relu(ctx, node):
    """ReLU: channel i out is channel i in. Idempotent: the slim pass drops a ReLU of a ReLU's
    output, which a removed residual branch leaves (relu(x + branch) with x a ReLU output)."""
    return ctx.ids(node.args[0])


@register(nn.PReLU, edge="identity", fix=lambda rw, node, m: _fix_prelu(rw, node, m))
def prelu(ctx, node):
    x = ctx.ids(node.args[0])
    m = ctx.module
    if m.num_parameters > 1:
        ctx.bind(f"{node.target}.weight", 0, ctx.line(x, 1, node.args[0]))
    return x


@register(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.ConstantPad2d, nn.CircularPad2d, nn.ZeroPad3d, nn.ConstantPad3d,
    nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    F.upsample, torch.max_pool2d,
    edge="identity",
)
def channelwise_spatial(ctx, node):
    """Pooling, interpolation, spatial padding: each channel maps to itself (dim 1)."""
    return ctx.channel_ids(ctx.line(ctx.ids(node.args[0]), 1, node.args[0]), node)


@register(F.pad, edge="offset", slim=lambda rw, node, state: _rewrite_pad(rw, node, state))
def pad(ctx, node):
    """Padding along spatial dims keeps channels; padded channels are new constant atoms."""
    x = node.args[0]
    pads = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    ids = ctx.ids(x)
    shape = ctx.shape(x)
    rank = len(shape)
    out = ids
    for i in range(len(pads) // 2):
        dim = rank - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        if (lo == 0 and hi == 0) or ids.size(dim) == 1:
            continue  # padding a dim that carries no channel identity changes nothing
        if lo < 0 or hi < 0:
            out = ctx.run_on_ids(node)  # cropping: a plain slice
            continue
        parts = [ctx.fresh_ids(lo, dim, rank, "pad"), out, ctx.fresh_ids(hi, dim, rank, "pad")]
        out = torch.cat([p for p in parts if p.size(dim)], dim)
    return out


# --------------------------------------------------------------------------- normalisation


_NORM_ROLES = {"weight": "gamma", "bias": "beta", "running_mean": "statistic",
               "running_var": "statistic"}


def _fix_batch_norm_module(rw, node, m) -> None:
    if m is not None:
        m.num_features = rw.slim_width(node.args[0], 1)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, edge="identity", fix=_fix_batch_norm_module,
          gate="norm", roles=_NORM_ROLES, same_shape=True)
def batch_norm(ctx, node):
    """Per-channel statistics and affine parameters, all sliced with the channel."""
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(ctx.module, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", 0, line, role=_NORM_ROLES[name])
    return ctx.channel_ids(line, node)


_F_BATCH_NORM_ARGS = (("running_mean", 1, "statistic"), ("running_var", 2, "statistic"),
                      ("weight", 3, "gamma"), ("bias", 4, "beta"))


@register(F.batch_norm, F.instance_norm, torch.batch_norm, edge="identity", gate="norm",
          roles=_NORM_ROLES)
def functional_batch_norm(ctx, node):
    """F.batch_norm on parameters the model owns (a norm + activation module that calls it):
    the same per-channel statistics and affine parameters as nn.BatchNorm2d."""
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    for key, pos, role in _F_BATCH_NORM_ARGS:
        arg = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
        if arg is None:
            continue
        name = ctx.param_name(arg)
        if name is None:
            return unsupported(ctx, node, why=f"batch_norm with a computed {key}")
        ctx.bind(name, 0, line, role=role)
    return ctx.channel_ids(line, node)


def _fix_group_norm_any(rw, node, m) -> None:
    if m is None:
        _fix_functional_group_norm(rw, node)
    else:
        _fix_group_norm(rw, node, m)


@register(nn.GroupNorm, F.group_norm, torch.group_norm, edge="identity", fix=_fix_group_norm_any,
          gate="norm", roles=_NORM_ROLES, same_shape=True)
def group_norm(ctx, node):
    """Statistics are per group of channels: a whole norm group is pruned as one unit."""
    m = ctx.module
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    groups = m.num_groups if m is not None else \
        (node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups"))
    if not isinstance(groups, int):
        ctx.fix(line, f"group_norm with a computed number of groups at '{node.name}'")
        return ctx.channel_ids(line, node)
    ctx.tie_blocks(line, groups)
    line = ctx.find(line)
    if m is not None:
        if m.affine:
            ctx.bind(f"{node.target}.weight", 0, line, role="gamma")
            ctx.bind(f"{node.target}.bias", 0, line, role="beta")
    else:
        _bind_functional_affine(ctx, node, line)
    return ctx.channel_ids(line, node)


def _bind_functional_affine(ctx, node, line) -> None:
    """weight and bias of F.layer_norm / F.group_norm (args 2 and 3): gamma and beta."""
    for pos, key, role in ((2, "weight", "gamma"), (3, "bias", "beta")):
        arg = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
        if ctx.param_name(arg):
            ctx.bind(ctx.param_name(arg), 0, line, role=role)


def _fix_layer_norm_any(rw, node, m) -> None:
    if m is None:
        _fix_functional_layer_norm(rw, node)
    else:
        _fix_layer_norm(rw, node, m)


def _mask_layer_norm(graph, plan, node, info):
    """LayerNorm over a pruned dim: the reference normalises over the kept channels only."""
    ids = info.ids  # output channels are the normalised dim
    if not plan.changes(ids):
        return None
    line = ids.reshape(-1) if ids.dim() else ids
    return _run_masked_layer_norm, plan.kept(line).float()


def _run_masked_layer_norm(interp, n, keep):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x = args[0]
    if n.op == "call_module":
        m = interp.fetch_attr(n.target)
        weight, bias, eps = m.weight, m.bias, m.eps
    else:
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@register(nn.LayerNorm, F.layer_norm, torch.layer_norm, edge="identity", fix=_fix_layer_norm_any,
          gate="norm", roles=_NORM_ROLES, same_shape=True, mask=_mask_layer_norm)
def layer_norm(ctx, node):
    """LayerNorm over the last dim: prunable, the statistics then cover the kept channels."""
    x = node.args[0]
    shape = ctx.module.normalized_shape if ctx.module is not None else node.args[1]
    ids = ctx.ids(x)
    if len(tuple(shape)) != 1:
        ctx.fix(ids, f"LayerNorm over several dims at '{node.name}'")
        return ids
    line = ctx.line(ids, -1, x)
    if ctx.module is not None:
        for name in ("weight", "bias"):
            if getattr(ctx.module, name, None) is not None:
                ctx.bind(f"{node.target}.{name}", 0, line, role=_NORM_ROLES[name])
    else:
        _bind_functional_affine(ctx, node, line)
    return ctx.channel_ids(line, node, dim=-1)


# --------------------------------------------------------------------------- channel mixers


def _conv_module_macs(ctx, node, line_in, line_out, transposed: bool):
    m = ctx.module
    out_shape = ctx.shape(node)
    in_shape = ctx.shape(node.args[0])
    spatial = math.prod(in_shape[2:]) if transposed else math.prod(out_shape[2:])
    k = math.prod(m.kernel_size)
    if m.groups == 1:
        ctx.macs(spatial * k, line_in, line_out)
    else:
        # Grouped: each output channel reads (in / groups) inputs (a transposed conv: each
        # input channel writes (out / groups) outputs); groups are pruned whole.
        if transposed:
            ctx.macs(spatial * k * (m.out_channels // m.groups), line_in)
        else:
            ctx.macs(spatial * k * (m.in_channels // m.groups), line_out)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, edge="mix", gate="producer",
          fix=lambda rw, node, m: _fix_conv(rw, node, m))
def conv(ctx, node):
    m = ctx.module
    x = node.args[0]
    line_in = ctx.line(ctx.ids(x), 1, x)
    # A grouped conv's outputs are tied to their inputs: "derived", not new channels.
    out = ctx.fresh(m.out_channels, "conv" if m.groups == 1 else "grouped_conv")
    if m.groups > 1:
        # Channel block k of the input feeds only output block k: tie each block into a unit
        # (for a depthwise conv, input channel c is output channel c).
        ctx.tie_group_blocks(line_in, out, m.groups)
        out = ctx.find(out)
        line_in = ctx.find(line_in)
    ctx.bind(f"{node.target}.weight", 0, out)
    if m.groups == 1:
        ctx.bind(f"{node.target}.weight", 1, line_in)
    if m.bias is not None:
        ctx.bind(f"{node.target}.bias", 0, out)
    _conv_module_macs(ctx, node, line_in, out, transposed=False)
    return ctx.channel_ids(out, node)


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, edge="mix", gate="producer",
          fix=lambda rw, node, m: _fix_conv(rw, node, m))
def conv_transpose(ctx, node):
    m = ctx.module
    x = node.args[0]
    line_in = ctx.line(ctx.ids(x), 1, x)
    out = ctx.fresh(m.out_channels, "conv_transpose" if m.groups == 1 else "grouped_conv")
    if m.groups > 1:
        ctx.tie_group_blocks(line_in, out, m.groups)
        out = ctx.find(out)
        line_in = ctx.find(line_in)
    ctx.bind(f"{node.target}.weight", 0, line_in, role="in")  # weight is (in, out / groups, k...)
    if m.groups == 1:
        ctx.bind(f"{node.target}.weight", 1, out, role="out")
    if m.bias is not None:
        ctx.bind(f"{node.target}.bias", 0, out)
    _conv_module_macs(ctx, node, line_in, out, transposed=True)
    return ctx.channel_ids(out, node)


@register(nn.Linear, edge="mix", gate="producer", fix=lambda rw, node, m: _fix_linear(rw, node, m))
def linear(ctx, node):
    m = ctx.module
    return _linear(ctx, node, node.args[0], m.out_features, f"{node.target}.weight",
                   f"{node.target}.bias" if m.bias is not None else None)


def _arg(node, pos: int, key: str, default=None):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key, default)


def _fix_functional_conv(rw, node, m) -> None:
    """A grouped F.conv2d's literal `groups` follows its slim output width (whole groups go)."""
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return
    old = rw.shape(node)[1]
    new = groups * rw.slim_width(node, 1) // old
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


@register(F.conv1d, F.conv2d, F.conv3d, edge="mix", gate="producer", fix=_fix_functional_conv)
def functional_conv(ctx, node):
    """F.conv2d on a weight the model owns (a conv subclass with its own forward): the rule
    of nn.Conv2d. A computed weight (standardised, re-parametrised) is not followed."""
    x = node.args[0]
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None:
        return unsupported(ctx, node, why="a convolution with a computed weight (standardised "
                                          "or re-parametrised): its channels are not followed")
    if (b is not None and bname is None) or not isinstance(groups, int):
        return unsupported(ctx, node, why="a convolution with a computed bias or groups")
    return ctx.channel_ids(_conv_on_owned_weight(ctx, node, x, w, wname, bname, groups), node)


def _conv_on_owned_weight(ctx, node, x, w, wname, bname, groups):
    """nn.Conv2d's rule for a functional conv on parameters: the output channels' atoms."""
    wshape = ctx.shape(w)
    line_in = ctx.line(ctx.ids(x), 1, x)
    out = ctx.fresh(wshape[0], "conv" if groups == 1 else "grouped_conv")
    if groups > 1:
        ctx.tie_group_blocks(line_in, out, groups)
        out, line_in = ctx.find(out), ctx.find(line_in)
    ctx.bind(wname, 0, out)
    if groups == 1:
        ctx.bind(wname, 1, line_in)
    if bname:
        ctx.bind(bname, 0, out)
    spatial, k = math.prod(ctx.shape(node)[2:]), math.prod(wshape[2:])
    if groups == 1:
        ctx.macs(spatial * k, line_in, out)
    else:
        ctx.macs(spatial * k * wshape[1], out)
    return out


def standardised_conv(x, weight, bias=None, gain=None, eps=1e-5, stride=1, padding=0,
                      dilation=1, groups=1):
    """A convolution whose weight is standardised per output channel (zero mean, unit
    variance over its inputs and kernel positions, times `gain`): weight-standardised
    ResNets (BiT) and NF-Nets. The tracer puts it in place of the pattern those models write
    (`F.batch_norm` over `weight.reshape(1, out, -1)` in training mode, then `F.conv2d`), so
    that one rule sees the convolution and the parameter it owns."""
    w = weight.reshape(weight.shape[0], -1)
    mean = w.mean(1, keepdim=True)
    w = (w - mean) * torch.rsqrt(((w - mean) ** 2).mean(1, keepdim=True) + eps)
    if gain is not None:
        w = w * gain.reshape(-1, 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return conv(x, w.reshape(weight.shape), bias, stride, padding, dilation, groups)


def _fix_standardised_conv(rw, node, m) -> None:
    """A grouped one's literal `groups` follows its slim output width (whole groups go)."""
    groups = _arg(node, 8, "groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return
    new = groups * rw.slim_width(node, 1) // rw.shape(node)[1]
    if len(node.args) > 8:
        node.args = (*node.args[:8], new, *node.args[9:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


def _mask_standardised_conv(graph, plan, node, info):
    """Pruned inputs of a standardised conv: the slim model standardises each row over the
    kept inputs (its weight has no others), and so does the reference."""
    if _arg(node, 8, "groups", 1) != 1:
        return None  # a grouped conv keeps or drops whole blocks: its rows stay whole
    x = graph.info(node.args[0].name)
    if x is None or not isinstance(x.ids, torch.Tensor) or x.ids.dim() < 2:
        return None
    line = x.ids.movedim(1, 0).reshape(x.ids.size(1), -1)[:, 0]
    if not plan.changes(line):
        return None
    return _run_masked_standardised_conv, torch.from_numpy(
        np.flatnonzero(plan.kept(line).numpy()))


def _run_masked_standardised_conv(interp, n, kept):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x, weight = args[0], args[1]
    if x.size(1) != weight.size(1) or len(kept) == weight.size(1):
        return standardised_conv(*args, **kwargs)
    return standardised_conv(x.index_select(1, kept), weight.index_select(1, kept), *args[2:],
                             **kwargs)


@register(standardised_conv, edge="mix", gate="producer", fix=_fix_standardised_conv,
          mask=_mask_standardised_conv)
def standardised_conv_rule(ctx, node):
    """The conv rule on the parameter before standardisation; `gain` follows the output
    channels. Rows are standardised one by one, so output channels prune exactly; pruned
    inputs change each row's statistics: slim and the mask reference both take them over
    the kept inputs (the pruned model is defined so)."""
    x = node.args[0]
    w, b, gain = _arg(node, 1, "weight"), _arg(node, 2, "bias"), _arg(node, 3, "gain")
    groups = _arg(node, 8, "groups", 1)
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None or (b is not None and bname is None) or not isinstance(groups, int):
        return unsupported(ctx, node, why="a standardised convolution on a computed weight, "
                                          "bias or groups")
    out = _conv_on_owned_weight(ctx, node, x, w, wname, bname, groups)
    # Scaling a row before standardisation changes nothing: the rows are no "out" slice that
    # a gate folds into or a norm penalty shrinks; the gain is the layer's gamma.
    ctx.bind(wname, 0, out, role="std_out")
    if gain is not None:
        ctx.tie(ctx.line(ctx.ids(gain), 0, gain), out)
        out = ctx.find(out)
        gname = _scaled_parameter(ctx, gain)
        if gname is not None and ctx.shape(gain)[0] == len(out):
            ctx.bind(gname, 0, out, role="gamma")
    return ctx.channel_ids(out, node)


def _scaled_parameter(ctx, n):
    """The parameter behind `(p * constant).view(-1)` (NF-Nets' gain times a fixed scale)."""
    while isinstance(n, fx.Node) and ctx.param_name(n) is None:
        nodes = [a for a in n.args if isinstance(a, fx.Node)]
        numbers = [a for a in n.args if not isinstance(a, fx.Node)]
        scale = n.target in (operator.mul, operator.truediv, "mul", "div") and \
            all(isinstance(a, (int, float)) for a in numbers)
        shape = n.op == "call_method" and n.target in ("view", "reshape", "flatten")
        if len(nodes) != 1 or not (scale or shape):
            return None
        n = nodes[0]
    name = ctx.param_name(n)
    shape = ctx.shape(n) if name is not None else ()
    return name if shape and math.prod(shape) == shape[0] else None  # one value per row


def _fix_embedding(rw, node, m) -> None:
    if m is not None:
        m.embedding_dim = m.weight.shape[1]


@register(nn.Embedding, F.embedding, edge="mix", gate="producer", fix=_fix_embedding)
def embedding(ctx, node):
    """A lookup table: its output width (weight dim 1) is fresh channels, like a producer's;
    the token ids it reads carry none."""
    if ctx.module is not None:
        wname, dim = f"{node.target}.weight", ctx.module.embedding_dim
    else:
        wname = ctx.param_name(_arg(node, 1, "weight"))
        if wname is None:
            return unsupported(ctx, node, why="an embedding with a computed table")
        dim = ctx.shape(_arg(node, 1, "weight"))[1]
    out = ctx.fresh(dim, "embedding")
    ctx.bind(wname, 1, out, role="out")
    return ctx.channel_ids(out, node, dim=-1)


@register(F.linear, edge="mix", gate="producer")
def functional_linear(ctx, node):
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None:
        return unsupported(ctx, node, why="F.linear with a computed weight")
    return _linear(ctx, node, node.args[0], ctx.shape(w)[0], wname, bname)


def _linear(ctx, node, x, out_features, wname, bname, weight_dims=(0, 1)):
    line_in = ctx.line(ctx.ids(x), -1, x)
    out = ctx.fresh(out_features, "linear")
    ctx.bind(wname, weight_dims[0], out, role="out")  # roles: x @ W has W as (in, out)
    ctx.bind(wname, weight_dims[1], line_in, role="in")
    if bname:
        ctx.bind(bname, 0, out)
    # rows per sample: tokens, also where they are folded into dim 0 (windows of a Swin
    # block) or lead it (a sequence-first layout)
    rows = math.prod(ctx.shape(node)[:-1]) / ctx.batch
    ctx.macs(rows, line_in, out)
    return ctx.channel_ids(out, node, dim=-1)


@register(torch.matmul, operator.matmul, torch.bmm, *methods("matmul", "bmm"), edge="mix",
          dead="block", gate="producer")
def matmul(ctx, node):
    """a @ b between activations (attention scores, attention @ values).

    The contracted entries are tied pairwise. An operand whose identity also varies outside
    the contracted dim (heads) is tied along it, so that its head survives into the output.
    """
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.shape(a), ctx.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return unsupported(ctx, node, why="matmul with a vector operand")
    if ctx.param_name(b) is not None and len(sb) == 2:
        # x @ W with a parameter W of shape (in, out): a linear layer without transpose.
        return _linear(ctx, node, a, sb[-1], ctx.param_name(b), None, weight_dims=(1, 0))
    ia, ib = ctx.ids(a), ctx.ids(b)
    ctx.tie(ia.unsqueeze(-1), ib.unsqueeze(-3))  # a[..., m, k] ~ b[..., k, n]
    ia, ib = ctx.find_ids(ia), ctx.find_ids(ib)
    lead = ctx.shape(node)[0] / ctx.batch  # dim 0 per sample (windows x batch: > 1)
    a_rows = _identity_outside(ctx, ia, -1)      # (..., M, 1)
    b_cols = _identity_outside(ctx, ib, -2)      # (..., 1, N)
    if ctx.varies_along(a_rows, -2) and ctx.varies_along(b_cols, -1):
        return unsupported(ctx, node, why="matmul whose rows and columns both carry channels")
    if ib.size(-1) == 1:  # b's columns carry no channel: every a element meets N of them
        ctx.macs(sb[-1] * lead, (ia, sa[1:]))
    elif all(ib.size(d) == 1 for d in range(ib.dim() - 1)):  # only b's columns carry channels
        ctx.macs(lead, (ia, sa[1:]), ctx.line(ib, -1, b))
    else:
        # b's identity varies beyond its columns (attention @ v, heads x head_dim): every b
        # element meets M rows of a, whose identity is tied into b's. (A line of b's columns
        # would tie the heads together.)
        ctx.macs(sa[-2] * lead, (ib, sb[1:]))
    return ctx.combine(a_rows, b_cols)


def _identity_outside(ctx, ids, dim):
    """The identity an operand passes to the output once `dim` is contracted away."""
    if all(ids.size(d) == 1 for d in range(ids.dim()) if d != ids.dim() + dim):
        return torch.full((1,) * ids.dim(), NO_ATOM, dtype=torch.int64)
    ctx.tie_along(ids, dim)
    return ctx.find_ids(ids.narrow(dim, 0, 1))


# --------------------------------------------------------------------------- attention


@register(F.scaled_dot_product_attention, edge="heads")
def sdpa(ctx, node):
    """Heads are the unit: q, k and v of head h, and the output of head h, go together."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    if len(ctx.shape(q)) < 3:
        return unsupported(ctx, node, why="attention without a head dimension")
    heads = [ctx.line(ctx.ids(t), -3, t) for t in (q, k, v)]  # (B, H, L, E): dim -3 is H
    ctx.tie(heads[0], heads[1])
    ctx.tie(heads[0], heads[2])
    line = ctx.find(heads[2])
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    per_head = ctx.channel_ids(line, None, dim=-3, rank=len(sq))
    lead = sq[0] / ctx.batch  # dim 0 per sample (windows x batch: > 1)
    ctx.macs(sk[-2] * lead, (per_head, sq[1:]))  # q k^T: every q element meets every key
    ctx.macs(sq[-2] * lead, (per_head, sv[1:]))  # attn @ v: every v element meets every query
    return per_head


def _fix_attention_any(rw, node, m) -> None:
    from .passes.attention import PrunedMultiheadAttention

    if isinstance(m, PrunedMultiheadAttention):
        m.num_heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
        m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    else:  # an nn.MultiheadAttention cannot hold fewer heads or a narrower in/out
        owner_name, _, attr = node.target.rpartition(".")
        setattr(rw.gm.get_submodule(owner_name), attr, PrunedMultiheadAttention.from_module(m))


def _mask_attention(graph, plan, node, info):
    """Attention over pruned heads: the reference drops those heads (not a zero mask)."""
    module = graph.module.get_submodule(node.target)
    heads = graph.internal_atoms(node.name, "heads")
    if heads is None or len(heads) != module.num_heads:
        return None
    heads = torch.from_numpy(heads)
    if not plan.changes(heads):
        return None
    return _run_masked_attention, plan.kept(heads).float()


def _run_masked_attention(interp, n, head_keep):
    from .passes.attention import multihead_attention as run

    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    return run(interp.fetch_attr(n.target), *args, head_mask=head_keep, **kwargs)


@register(nn.MultiheadAttention, edge="heads", fix=_fix_attention_any, mask=_mask_attention)
def multihead_attention(ctx, node):
    """nn.MultiheadAttention: embed dims of q/k/v inputs, heads inside, fresh output dims."""
    m = ctx.module  # nn.MultiheadAttention, or the PrunedMultiheadAttention slim makes of it
    if not getattr(m, "_qkv_same_embed_dim", True):
        return unsupported(ctx, node, why="MultiheadAttention with kdim/vdim")
    inner = m.num_heads * m.head_dim  # rows of each of q, k, v
    out_dim = m.out_proj.out_features
    q, k, v = node.args[0], node.args[1], node.args[2]
    last = -1
    lines = [ctx.line(ctx.ids(t), last, t) for t in (q, k, v)]
    ctx.tie(lines[0], lines[1])
    ctx.tie(lines[0], lines[2])
    embed_in = ctx.find(lines[0])
    heads = ctx.fresh(m.num_heads, "heads")
    per_head = ctx.repeat(heads, m.head_dim)  # row r of a projection belongs to head r // hd
    qkv_rows = np.concatenate([per_head, per_head, per_head])
    ctx.bind(f"{node.target}.in_proj_weight", 0, qkv_rows)
    ctx.bind(f"{node.target}.in_proj_weight", 1, embed_in)
    if m.in_proj_bias is not None:
        ctx.bind(f"{node.target}.in_proj_bias", 0, qkv_rows)
    out = ctx.fresh(out_dim, "attention_out")
    ctx.bind(f"{node.target}.out_proj.weight", 0, out)
    ctx.bind(f"{node.target}.out_proj.weight", 1, per_head)
    if m.out_proj.bias is not None:
        ctx.bind(f"{node.target}.out_proj.bias", 0, out)
    if getattr(m, "bias_k", None) is not None or getattr(m, "bias_v", None) is not None:
        ctx.fix(embed_in, f"MultiheadAttention '{node.target}' with add_bias_kv")
    sq = ctx.shape(q)
    tokens = sq[1] if m.batch_first else sq[0]
    sk = ctx.shape(k)
    src = sk[1] if m.batch_first else sk[0]
    ctx.macs(tokens, embed_in, qkv_rows[:inner])                 # q projection
    ctx.macs(src, embed_in, qkv_rows[inner:])                    # k and v projections
    ctx.macs(tokens * src * 2, per_head)                         # q k^T and attn @ v
    ctx.macs(tokens, per_head, out)                              # output projection
    attn_out = ctx.channel_ids(out, None, dim=-1, rank=len(sq))
    weights = torch.full((1,) * len(ctx.shape_of_value(node, 1)), NO_ATOM) \
        if ctx.shape_of_value(node, 1) is not None else None
    return (attn_out, weights)


# --------------------------------------------------------------------------- merges


@register(operator.add, torch.add, *methods("add", "add_", "__add__", "__radd__"),
          edge="identity", dead="add", flow="pass")
def add(ctx, node):
    return ctx.elementwise(node)


@register(operator.sub, torch.sub, *methods("sub", "sub_"), edge="identity", dead="sub", flow="pass")
def sub(ctx, node):
    return ctx.elementwise(node)


@register(operator.mul, torch.mul, operator.truediv, torch.div, torch.where, torch.maximum,
          torch.minimum, *methods("mul", "mul_", "div", "div_", "__mul__", "__rmul__",
                                  "__truediv__", "masked_fill", "expand_as"),
          edge="identity", dead="block", flow="scale")
def multiply(ctx, node):
    """Broadcasting multiply: an SE gate (B, C, 1, 1) ties its C channels to the feature map."""
    return ctx.elementwise(node)


@register(torch.cat, torch.concat, torch.concatenate, edge="offset", dead="cat", slim="free")
def cat(ctx, node):
    tensors = list(node.args[0] if node.args else node.kwargs["tensors"])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(ctx.shape(tensors[0]))
    dim = dim % rank
    ids = [ctx.ids(t) for t in tensors]
    shapes = [ctx.shape(t) for t in tensors]
    if not any(i.size(dim) > 1 for i in ids) and any(s[dim] > 1 for s in shapes):
        # A concat along tokens or positions (a class token): the channels must line up.
        return ctx.elementwise(node, operands=tensors)
    if all(i.size(d) == 1 for i in ids for d in range(rank) if d != dim):
        # Only the concat dim carries identity: lay the atoms side by side, no materialising.
        return torch.cat([i.expand(*[s[d] if d == dim else 1 for d in range(rank)])
                          for i, s in zip(ids, shapes)], dim)
    return ctx.run_on_ids(node)


@register(torch.stack, edge="offset", dead="block", slim="free")
def stack(ctx, node):
    return ctx.run_on_ids(node)


# --------------------------------------------------------------------------- layout ops


def layout(ctx, node):
    """Shape ops move channel identities around: run the same op on the ids themselves."""
    if node.target is operator.getitem and not isinstance(ctx.value(node.args[0]), torch.Tensor):
        return ctx.ids(node.args[0])[node.args[1]]  # picking from a tuple of outputs
    if node.target in (operator.getitem, torch.index_select, "index_select"):
        out = ctx.index_by_tensor(node)
        if out is not None:
            return out
    return ctx.run_on_ids(node)


def _layout_rules(slim_kind, *targets) -> None:
    """Register `layout` for `targets`: one op family, whose members differ only in how
    slim treats them (free, full layout, or a rewrite of their literal sizes)."""
    rule = Rule("layout", layout, edge="permutation", slim=slim_kind, flow="pass")
    _DEFAULT.extend({t: rule for t in targets})


# Shape ops that commute with dropping channels: nothing in their arguments names a width.
_layout_rules("free", torch.flatten, torch.permute, torch.transpose, torch.squeeze,
              torch.unsqueeze, torch.swapaxes, torch.movedim, torch.flip, F.pixel_shuffle,
              F.pixel_unshuffle, torch.tile, nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle,
              *methods("flatten", "permute", "transpose", "squeeze", "unsqueeze", "swapaxes",
                       "movedim", "flip", "t", "mT", "repeat", "tile", "view_as",
                       "reshape_as"))
# Shape ops that move channel positions in a way only the full layout expresses, and those
# with no rewrite of their own.
_layout_rules("full", torch.roll, torch.channel_shuffle, torch.native_channel_shuffle,
              torch.index_select, torch.repeat_interleave, torch.tensor_split,
              nn.ChannelShuffle, nn.Unflatten,
              *methods("roll", "index_select", "repeat_interleave", "tensor_split"))
@register(torch.mean, torch.sum, torch.amax, torch.amin, *methods("mean", "sum", "amax", "amin"),
          edge="identity")
def reduce(ctx, node):
    """Reducing over spatial dims keeps channels; reducing over channels consumes them."""
    x = node.args[0]
    ids = ctx.ids(x)
    rank = len(ctx.shape(x))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        dims = tuple(range(rank))
    dims = sorted({d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))})
    if any(ids.size(d) > 1 for d in dims):
        ctx.fix(ids, f"{_target_name(node)} over channels at '{node.name}'")
        return ctx.no_channels(node)
    out = ids
    for d in reversed(dims):
        out = out if keepdim else out.squeeze(d)
    return out


@register(F.softmax, F.log_softmax, torch.softmax, nn.Softmax, nn.LogSoftmax,
          *methods("softmax", "log_softmax"), edge="identity")
def softmax(ctx, node):
    x = node.args[0]
    ids = ctx.ids(x)
    dim = ctx.module.dim if ctx.module is not None else (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    if dim is None or ids.size(dim) > 1:
        ctx.fix(ids, f"softmax over channels at '{node.name}'")
    return ids


@register(*methods("size", "dim", "numel"), getattr, edge="none")
def shape_query(ctx, node):
    if isinstance(ctx.value(node), torch.Tensor):
        # A tensor attribute (x.mT, x.T, x.data) carries channels: keep following them.
        attr = node.args[1]
        if attr not in ("T", "mT", "data", "real"):
            return unsupported(ctx, node, why=f"tensor attribute .{attr}")
        return ctx.run_on_ids(node)
    return None


# --------------------------------------------------------------------------- how slim rewrites

# The functions below are the `fix` and `slim` fields of the rules above: they run inside
# the slim pass (`passes/slim.py`), on the copy being slimmed, through the rewriter's small
# API (`rw.shape`, `rw.value`, `rw.selection`, `rw.input_selection`, `rw.out_sizes`,
# `rw.slim_width`, `rw.original`, `rw.gm`, `rw.plan`). `state` is FULL when the op runs on
# the original layout (its literal sizes then stay as they are).

FULL = "full"


def _plan_error(message: str) -> Exception:
    from .graph import PlanError

    return PlanError(message)


def _fix_conv(rw, node, m: nn.modules.conv._ConvNd) -> None:
    old = rw.original(node.target)
    w = m.weight
    if m.transposed:  # (in, out / groups, k...)
        m.groups = old.groups * w.shape[0] // old.in_channels if old.groups > 1 else 1
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:  # (out, in / groups, k...)
        m.groups = old.groups * w.shape[0] // old.out_channels if old.groups > 1 else 1
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _fix_linear(rw, node, m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_batch_norm(rw, node, m) -> None:
    m.num_features = rw.slim_width(node.args[0], 1)


def _fix_group_norm(rw, node, m: nn.GroupNorm) -> None:
    old = rw.original(node.target)
    m.num_channels = rw.slim_width(node.args[0], 1)
    m.num_groups = m.num_channels // (old.num_channels // old.num_groups)


def _fix_layer_norm(rw, node, m: nn.LayerNorm) -> None:
    m.normalized_shape = (rw.slim_width(node.args[0], -1),)


def _fix_prelu(rw, node, m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _set_shape_args(node: fx.Node, start: int, sizes: list) -> None:
    """Write `sizes` (None: leave) into the shape arguments from position `start` on."""
    args = list(node.args)
    packed = len(args) == start + 1 and isinstance(args[start], (tuple, list))
    shape = list(args[start]) if packed else args[start:]
    if len(shape) != len(sizes):
        raise _plan_error(f"'{node.name}': unexpected shape arguments")
    for d, s in enumerate(sizes):
        if s is not None and not (isinstance(shape[d], int) and shape[d] == -1):
            shape[d] = s
    node.args = tuple(args[:start]) + ((tuple(shape),) if packed else tuple(shape))


def _rewrite_view(rw, node, state) -> None:
    if node.op == "call_function" or len(node.args) < 2:  # torch.reshape(x, shape)
        shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if shape_arg is None:
            return False
        new = list(shape_arg)
        for d, s in enumerate(rw.out_sizes(node, state)):
            if s is not None and not (isinstance(new[d], int) and new[d] == -1):
                new[d] = s
        node.args = (node.args[0], tuple(new), *node.args[2:])
        return None
    _set_shape_args(node, 1, rw.out_sizes(node, state))


def _rewrite_expand(rw, node, state) -> None:
    _set_shape_args(node, 1, rw.out_sizes(node, state))


def _rewrite_unflatten(rw, node, state):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    sizes = list(node.args[2] if len(node.args) > 2 else node.kwargs["sizes"])
    out = rw.out_sizes(node, state)
    rank_in = len(rw.shape(node.args[0]))
    dim = dim % rank_in
    for k in range(len(sizes)):
        s = out[dim + k]
        if s is not None and sizes[k] != -1:
            sizes[k] = s
    args = list(node.args) + [None] * (3 - len(node.args))
    args[1], args[2] = dim, tuple(sizes)
    node.args = tuple(args[:3])
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dim", "sizes")}


def _piece_counts(rw, node, dim: int, sizes: list[int], state) -> list[int] | None:
    sel = rw.input_selection(node, dim)
    if state == FULL or sel is None:
        return sizes
    bounds = np.cumsum([0] + list(sizes))
    return [int(np.count_nonzero((sel >= lo) & (sel < hi))) for lo, hi in zip(bounds, bounds[1:])]


def _split_args(node):
    x = node.args[0]
    size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(
        "split_size_or_sections", node.kwargs.get("split_size", node.kwargs.get("split_sizes")))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return x, size_arg, dim


def _rewrite_split(rw, node, state):
    x, size_arg, dim = _split_args(node)
    total = rw.shape(x)[dim]
    if isinstance(size_arg, int):
        sizes = [min(size_arg, total - s) for s in range(0, total, size_arg)]
    elif isinstance(size_arg, (list, tuple)) and all(isinstance(s, int) for s in size_arg):
        sizes = list(size_arg)
    else:
        return False
    counts = _piece_counts(rw, node, dim, sizes, state)
    _retarget_split(node, x, counts, dim)


def _rewrite_chunk(rw, node, state):
    x = node.args[0]
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs["chunks"]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    total = rw.shape(x)[dim]
    step = -(-total // chunks)
    sizes = [min(step, total - s) for s in range(0, total, step)]
    _retarget_split(node, x, _piece_counts(rw, node, dim, sizes, state), dim)


def _retarget_split(node, x, counts, dim) -> None:
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, list(counts), dim)
    node.kwargs = {}


def _rewrite_getitem(rw, node, state):
    x, index = node.args
    if state == FULL or not isinstance(rw.value(x), torch.Tensor):  # or a tuple's element
        return None
    index = index if isinstance(index, tuple) else (index,)
    shape = rw.shape(x)
    sel = rw.selection(x)
    if sel is None:
        return False
    n_consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    new, d = [], 0
    for item in index:
        if item is Ellipsis:
            new.append(item)
            d += len(shape) - n_consumed
            continue
        if item is None:
            new.append(item)
            continue
        s = sel[d] if d < len(sel) else None
        if isinstance(item, slice) and s is not None:
            start, stop, step = item.indices(shape[d])
            if step != 1:
                return False
            item = slice(int(np.count_nonzero(s < start)), int(np.count_nonzero(s < stop)))
        elif isinstance(item, int) and s is not None:
            pos = item % shape[d]
            hit = np.flatnonzero(s == pos)
            if not len(hit):
                return False
            item = int(hit[0])
        elif isinstance(item, fx.Node) and isinstance(rw.value(item), torch.Tensor):
            if s is not None or rw.value(item).dtype == torch.bool:
                return False  # positions picked from a pruned dim: only the full layout knows
            # an index tensor on a dim the plan keeps whole (a position-bias lookup): as is
        elif not isinstance(item, (int, slice)):
            return False
        new.append(item)
        d += 1
    node.args = (x, tuple(new) if len(new) != 1 else new[0])
    return None


def _rewrite_unbind(rw, node, state):
    """unbind along a dim the plan keeps whole (q, k, v of a qkv projection) is unchanged;
    along a pruned dim the pieces would no longer be the same ones."""
    dim = _arg(node, 1, "dim", 0)
    if state == FULL:
        return None
    return None if rw.input_selection(node, dim) is None else False


def _rewrite_narrow(rw, node, state):
    x, dim, start, length = (list(node.args) + [None] * 4)[:4]
    if state == FULL or not all(isinstance(v, int) for v in (dim, start, length)):
        return None if state == FULL else False
    s = rw.input_selection(node, dim)
    if s is not None:
        start, length = (int(np.count_nonzero(s < start)),
                         int(np.count_nonzero((s >= start) & (s < start + length))))
    node.args = (x, dim, start, length)


def _rewrite_select(rw, node, state):
    x, dim, index = node.args[:3]
    if state == FULL:
        return None
    s = rw.input_selection(node, dim)
    if s is not None:
        hit = np.flatnonzero(s == index % rw.shape(x)[dim])
        if not len(hit):
            return False
        node.args = (x, dim, int(hit[0]))


def _rewrite_pad(rw, node, state):
    x = node.args[0]
    pads = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    if state == FULL:
        return None
    shape_out = rw.shape(node)
    out_sel = rw.selection(node)
    if out_sel is None:
        return False
    rank = len(shape_out)
    for i in range(len(pads) // 2):
        d = rank - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        s = out_sel[d]
        if s is None or (lo == 0 and hi == 0):
            continue
        if lo < 0 or hi < 0:
            return False
        pads[2 * i] = int(np.count_nonzero(s < lo))
        pads[2 * i + 1] = int(np.count_nonzero(s >= shape_out[d] - hi))
    if len(node.args) > 1:
        node.args = (x, tuple(pads), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(pads)}


def _fix_functional_layer_norm(rw, node) -> None:
    """F.layer_norm's literal normalized_shape follows its input's slim sizes."""
    x = node.args[0]
    given = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if given is None:
        return
    rank = len(rw.shape(x))
    k = 1 if isinstance(given, int) else len(given)
    new = tuple(rw.slim_width(x, d) for d in range(rank - k, rank))
    if len(node.args) > 1:
        node.args = (x, new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


def _fix_functional_group_norm(rw, node) -> None:
    """F.group_norm's literal num_groups follows its input's slim channel count (the rule
    ties whole norm groups, so the group size is unchanged)."""
    x = node.args[0]
    given = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
    if not isinstance(given, int):
        return
    old = rw.shape(x)[1]
    new = given * rw.slim_width(x, 1) // old
    if len(node.args) > 1:
        node.args = (x, new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new}



_REWRITE_RULES = {
    _rewrite_view: (torch.reshape, *methods("view", "reshape")),
    _rewrite_expand: methods("expand"),
    _rewrite_unflatten: (torch.unflatten, *methods("unflatten")),
    _rewrite_split: (torch.split, *methods("split", "split_with_sizes")),
    _rewrite_chunk: (torch.chunk, *methods("chunk")),
    _rewrite_getitem: (operator.getitem,),
    _rewrite_narrow: (torch.narrow, *methods("narrow")),
    _rewrite_unbind: (torch.unbind, *methods("unbind")),
    _rewrite_select: (torch.select, *methods("select")),
}
for _fn, _targets in _REWRITE_RULES.items():
    _layout_rules(_fn, *_targets)


# --------------------------------------------------------------------------- fallback


def unsupported(ctx, node, why: str | None = None):
    """No rule: stop propagation. Inputs and outputs become unprunable, with the reason.

    Its MACs are still counted (a real count of its matmuls and convolutions), as a cost no
    plan changes: a FLOPs target must see the whole model."""
    reason = why or f"no rule for {_target_name(node)}"
    reason = f"{reason} (at '{node.name}')"
    for arg in ctx.tensor_args(node):
        ids = ctx.ids(arg)
        if ids is not None:
            ctx.fix(ids, reason)
    macs = ctx.count_macs(node)
    if macs:
        ctx.macs(macs, why=reason)
    return ctx.opaque_output(node, reason)


def _target_name(node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{t}()"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")
