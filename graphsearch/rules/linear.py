"""Linear layers and matrix products between activations.

A linear layer produces fresh channels along the last dim; a matmul between activations
ties the contracted entries pairwise (attention scores, attention times values).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..atoms import NO_ATOM
from .registry import BLOCK, Rule, methods, plain_meta, plain_parameter, rule, unsupported


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


linear_on = _linear  # for another family's linear layer (aten.addmm)


def _fix_linear(rw, node, m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _linear_meta(m, args, kwargs):
    """nn.Linear of a row-major meta tensor with parameters of its dtype (`plain_parameter`):
    a row-major (..., out_features) of that dtype, as torch's kernel gives; None for anything
    else (the kernel runs)."""
    if len(args) != 1 or kwargs:
        return None
    x, w, b = args[0], m.weight, m.bias
    if not (plain_meta(x) and plain_parameter(w)) or x.dim() == 0 or not all(x.shape) or \
            w.dim() != 2 or not all(w.shape) or w.dtype != x.dtype or x.shape[-1] != w.shape[1]:
        return None
    if b is not None and (not plain_parameter(b) or b.dtype != x.dtype or
                          tuple(b.shape) != (w.shape[0],)):
        return None
    return torch.empty(tuple(x.shape[:-1]) + (w.shape[0],), dtype=x.dtype, device="meta")


@rule(nn.Linear, edge="mix", gate="producer", fix=_fix_linear, pure=True, latency="linear",
      meta=_linear_meta)
def linear(ctx, node):
    m = ctx.module
    return _linear(ctx, node, node.args[0], m.out_features, f"{node.target}.weight",
                   f"{node.target}.bias" if m.bias is not None else None)


@rule(F.linear, edge="mix", gate="producer")
def functional_linear(ctx, node):
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None:
        return unsupported(ctx, node, why="F.linear with a computed weight")
    return _linear(ctx, node, node.args[0], ctx.shape(w)[0], wname, bname)


def _identity_outside(ctx, ids, dim):
    """The identity an operand passes to the output once `dim` is contracted away."""
    if all(ids.size(d) == 1 for d in range(ids.dim()) if d != ids.dim() + dim):
        return torch.full((1,) * ids.dim(), NO_ATOM, dtype=torch.int64)
    ctx.tie_along(ids, dim)
    return ctx.find_ids(ids.narrow(dim, 0, 1))


aten = torch.ops.aten
# ops that transpose a matrix: x @ W.T (`W.T`, `W.t()`, `W.transpose(0, 1)`, their ATen
# overloads) is a linear layer on W
_TRANSPOSES = {torch.t, aten.t.default, aten.numpy_T.default, ("method", "t")}
_SWAPS = {torch.transpose, aten.transpose.int, ("method", "transpose")}
_PERMUTES = {torch.permute, aten.permute.default, ("method", "permute")}


def _transposed_parameter(gm, w) -> fx.Node | None:
    """The 2-d parameter (its get_attr node) that `w` is the transpose of, or None."""
    if not isinstance(w, fx.Node) or w.op not in ("call_function", "call_method") or \
            not w.args or not isinstance(w.args[0], fx.Node) or w.args[0].op != "get_attr":
        return None
    key = ("method", w.target) if w.op == "call_method" else w.target
    rest = list(w.args[1:])
    if w.target is getattr:  # `W.T` in an fx trace
        ok = rest in (["T"], ["mT"])
    elif key in _TRANSPOSES:
        ok = not rest
    elif key in _SWAPS:
        ok = len(rest) == 2 and sorted(d % 2 for d in rest) == [0, 1]
    elif key in _PERMUTES:
        dims = rest[0] if len(rest) == 1 else rest
        ok = [d % 2 for d in dims] == [1, 0]
    else:
        ok = False
    if not ok or w.kwargs:
        return None
    try:
        value = gm.get_parameter(w.args[0].target)
    except AttributeError:
        return None
    return w.args[0] if value.dim() == 2 else None


def _fuse_transposed_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The tracer's rewrite at a matmul (`Rule.fuse`): `x @ W.T` with a parameter W (a
    linear layer written as a product: Falcon's `FalconLinear`) becomes `linear(x, W)`
    (`aten.linear` in an ATen graph), which the linear rule knows; True if it rewrote."""
    if len(node.args) != 2 or node.kwargs:
        return False
    x, w = node.args
    param = _transposed_parameter(gm, w)
    if param is None or not isinstance(x, fx.Node):
        return False
    target = aten.linear.default if isinstance(node.target, torch._ops.OpOverload) else \
        F.linear
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, (x, param))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


@rule(torch.matmul, operator.matmul, torch.bmm, *methods("matmul", "bmm"), edge="mix",
      dead=BLOCK, gate="producer", fuse=_fuse_transposed_weight)
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


def _decompose_baddbmm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The tracer's rewrite at a baddbmm (`Rule.fuse`): `beta * input + alpha * (b1 @ b2)`
    (BLOOM's attention scores, ALiBi's bias as `input`) becomes a bmm, a scalar multiply and
    an add, whose rules tie, cost and slim it: the product is the attention's matmul, the
    sum an add (ATen ops in an ATen graph, torch's in an fx one); True if it rewrote."""
    if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"}:
        return False  # (an `out=` tensor)
    bias, b1, b2 = node.args  # torch.baddbmm(input, b1, b2) and input.baddbmm(b1, b2) alike
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if isinstance(node.target, torch._ops.OpOverload):
        bmm, mul, add = aten.bmm.default, aten.mul.Tensor, aten.add.Tensor
    else:
        bmm, mul, add = torch.bmm, operator.mul, operator.add
    graph = gm.graph
    with graph.inserting_before(node):
        new = graph.call_function(bmm, (b1, b2))
        if alpha != 1:
            new = graph.call_function(mul, (new, alpha))
        if beta != 0:  # (beta 0: input is ignored, its nan and inf too)
            if beta != 1:
                bias = graph.call_function(mul, (bias, beta))
            new = graph.call_function(add, (bias, new))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return True


# no tie of its own: the tracer rewrites every baddbmm before the analysis (`fuse`)
BADDBMM = Rule("baddbmm", unsupported, edge="mix", fuse=_decompose_baddbmm, family="linear",
               targets=(torch.baddbmm, *methods("baddbmm")))

RULES = (linear, functional_linear, matmul, BADDBMM)
