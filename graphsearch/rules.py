"""One rule per op family: what the op ties together, what it costs.

A rule receives the analysis context (`graphsearch.analysis.Context`) for one fx node and
returns the channel ids of the node's output. Ids are int64 tensors of the output's rank,
broadcastable to its shape, whose entries are channel atoms (see `atoms.py`): a conv's output
is `(1, C, 1, 1)` holding C fresh atoms; a flatten into a linear layer repeats each atom H*W
times; a concat lays its inputs' atoms side by side. Rules tie atoms with `ctx.tie`, bind
parameter dimensions with `ctx.bind`, and record MACs with `ctx.macs`.

Adding an op is adding one rule: `@register(targets..., edge=..., dead=...)`. An op with no
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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .atoms import NO_ATOM


@dataclass(frozen=True)
class Rule:
    name: str
    apply: Callable[..., Any]
    edge: str  # how channel indices map from inputs to output (networkx edge label)
    dead: str  # see module docstring


REGISTRY: dict[Any, Rule] = {}


def register(*targets: Any, edge: str, dead: str = "pass") -> Callable:
    """Register `fn` as the rule for module types, functions and method names in `targets`."""

    def wrap(fn: Callable) -> Callable:
        rule = Rule(fn.__name__, fn, edge, dead)
        for t in targets:
            REGISTRY[t] = rule
        return fn

    return wrap


def rule_for(node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in REGISTRY:
                return REGISTRY[cls]
        return None
    if node.op == "call_method":
        return REGISTRY.get(("method", node.target))
    if node.op == "call_function":
        return REGISTRY.get(node.target)
    return None


def methods(*names: str) -> tuple:
    return tuple(("method", n) for n in names)


# --------------------------------------------------------------------------- pass-through


@register(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.neg, torch.clamp, torch.nn.functional.relu_, operator.neg, torch.square, torch.sqrt,
    *methods("relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_",
             "contiguous", "float", "half", "double", "to", "type_as", "detach", "clone",
             "sqrt", "square", "pow", "sigmoid_", "hardtanh_", "type"),
    edge="identity",
)
def elementwise_unary(ctx, node):
    """Activations, dropout, casts: channel i out is channel i in."""
    return ctx.ids(node.args[0])


@register(nn.PReLU, edge="identity")
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
    nn.ReplicationPad2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    F.upsample, torch.max_pool2d,
    edge="identity",
)
def channelwise_spatial(ctx, node):
    """Pooling, interpolation, spatial padding: each channel maps to itself (dim 1)."""
    return ctx.channel_ids(ctx.line(ctx.ids(node.args[0]), 1, node.args[0]), node)


@register(F.pad, edge="offset")
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


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, edge="identity")
def batch_norm(ctx, node):
    """Per-channel statistics and affine parameters, all sliced with the channel."""
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(ctx.module, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", 0, line)
    return ctx.channel_ids(line, node)


@register(nn.GroupNorm, F.group_norm, edge="identity")
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
            ctx.bind(f"{node.target}.weight", 0, line)
            ctx.bind(f"{node.target}.bias", 0, line)
    else:
        for arg in list(node.args[2:4]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]:
            if ctx.param_name(arg):
                ctx.bind(ctx.param_name(arg), 0, line)
    return ctx.channel_ids(line, node)


@register(nn.LayerNorm, F.layer_norm, edge="identity")
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
                ctx.bind(f"{node.target}.{name}", 0, line)
    else:
        for arg in list(node.args[2:4]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]:
            if ctx.param_name(arg):
                ctx.bind(ctx.param_name(arg), 0, line)
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


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, edge="mix")
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


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, edge="mix")
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


@register(nn.Linear, edge="mix")
def linear(ctx, node):
    m = ctx.module
    return _linear(ctx, node, node.args[0], m.out_features, f"{node.target}.weight",
                   f"{node.target}.bias" if m.bias is not None else None)


@register(F.linear, edge="mix")
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
    rows = math.prod(ctx.shape(node)[1:-1])  # tokens per sample
    ctx.macs(rows, line_in, out)
    return ctx.channel_ids(out, node, dim=-1)


@register(torch.matmul, operator.matmul, torch.bmm, *methods("matmul", "bmm"), edge="mix",
          dead="block")
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
    a_rows = _identity_outside(ctx, ia, -1)      # (..., M, 1)
    b_cols = _identity_outside(ctx, ib, -2)      # (..., 1, N)
    if ctx.varies_along(a_rows, -2) and ctx.varies_along(b_cols, -1):
        return unsupported(ctx, node, why="matmul whose rows and columns both carry channels")
    ctx.macs(sb[-1] if ib.size(-1) == 1 else 1, (ia, sa[1:]), *(
        [] if ib.size(-1) == 1 else [ctx.line(ib, -1, b)]))
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
    ctx.macs(sk[-2], (per_head, sq[1:]))  # q k^T: every q element meets every key
    ctx.macs(sq[-2], (per_head, sv[1:]))  # attn @ v: every v element meets every query
    return per_head


@register(nn.MultiheadAttention, edge="heads")
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
          edge="identity", dead="add")
def add(ctx, node):
    return ctx.elementwise(node)


@register(operator.sub, torch.sub, *methods("sub", "sub_"), edge="identity", dead="sub")
def sub(ctx, node):
    return ctx.elementwise(node)


@register(operator.mul, torch.mul, operator.truediv, torch.div, torch.where, torch.maximum,
          torch.minimum, *methods("mul", "mul_", "div", "div_", "__mul__", "__rmul__",
                                  "__truediv__", "masked_fill", "expand_as"),
          edge="identity", dead="block")
def multiply(ctx, node):
    """Broadcasting multiply: an SE gate (B, C, 1, 1) ties its C channels to the feature map."""
    return ctx.elementwise(node)


@register(torch.cat, torch.concat, torch.concatenate, edge="offset", dead="cat")
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


@register(torch.stack, edge="offset", dead="block")
def stack(ctx, node):
    return ctx.run_on_ids(node)


# --------------------------------------------------------------------------- layout ops


@register(
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.split, torch.chunk, torch.roll, torch.flip, torch.swapaxes,
    torch.movedim, torch.narrow, torch.unbind, torch.tensor_split, torch.select,
    torch.index_select, torch.repeat_interleave, torch.tile, operator.getitem, F.pixel_shuffle,
    F.pixel_unshuffle, torch.channel_shuffle, torch.native_channel_shuffle,
    nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
    *methods("view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze",
             "unsqueeze", "split", "chunk", "expand", "repeat", "roll", "flip", "narrow",
             "unbind", "select", "index_select", "view_as", "reshape_as", "swapaxes", "movedim",
             "tensor_split", "repeat_interleave", "t", "tile", "split_with_sizes", "mT"),
    edge="permutation",
)
def layout(ctx, node):
    """Shape ops move channel identities around: run the same op on the ids themselves."""
    if node.target is operator.getitem and not isinstance(ctx.value(node.args[0]), torch.Tensor):
        return ctx.ids(node.args[0])[node.args[1]]  # picking from a tuple of outputs
    return ctx.run_on_ids(node)


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


# --------------------------------------------------------------------------- fallback


def unsupported(ctx, node, why: str | None = None):
    """No rule: stop propagation. Inputs and outputs become unprunable, with the reason."""
    reason = why or f"no rule for {_target_name(node)}"
    reason = f"{reason} (at '{node.name}')"
    for arg in ctx.tensor_args(node):
        ids = ctx.ids(arg)
        if ids is not None:
            ctx.fix(ids, reason)
    return ctx.opaque_output(node, reason)


def _target_name(node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_method":
        return f"method .{t}()"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")
