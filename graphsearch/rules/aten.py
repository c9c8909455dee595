"""ATen ops: the graph `torch.export` produces (`graphsearch.export_trace`).

An exported graph calls ATen overloads (`aten.linear.default`, `aten.view.default`, ...)
where an fx trace calls torch functions, methods and modules. Most overloads take the same
arguments in the same positions as the torch function of another family: their rule here
is that family's rule, with every field the same (`dataclasses.replace(rule, targets=...)`:
one rule still owns what the op ties, costs, how slim rewrites it, its gate site and
parameter roles). The few whose arguments differ (`aten.embedding` takes the table first,
`aten.addmm` is a linear layer with its bias first, `aten.view` of expanded ids is a
reshape, `aten.slice` names its dim) have a small rule of their own below; the attention
looks through one key/value head repeated to every query head (`repeat_kv`: `Rule.fuse`).
Arithmetic merges (add, sub, multiply) also keep what a tensor made in the forward from
sizes alone meets (`_computed_operand`): an fx trace has no such tensor (its factories have
no rule).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import attention, conv, elementwise, embedding, layout, linear, norm, pooling
from ..atoms import NO_ATOM
from .registry import FULL, Rule, arg, rule, unsupported

aten = torch.ops.aten


def _same(rule_: Rule, *targets) -> Rule:
    """`rule_` itself (same tie, same fields) for the ATen overloads `targets`."""
    return dataclasses.replace(rule_, targets=tuple(targets))


def _overloads(*packets) -> list:
    """Every overload of each ATen op packet (`aten.add` -> add.Tensor, add.Scalar, ...)."""
    out = []
    for p in packets:
        out += [getattr(p, name) for name in p.overloads()]
    return out


UNARY = _same(elementwise.elementwise_unary, *_overloads(
    aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.neg, aten.rsqrt, aten.sqrt, aten.exp,
    aten.abs, aten.pow, aten.clamp, aten.to, aten.clone, aten.dropout, aten.alias, aten.detach,
    aten.detach_, aten.contiguous, aten.type_as, aten.hardtanh, aten.elu, aten.leaky_relu,
    aten.mish, aten.hardswish, aten.hardsigmoid, aten.softplus, aten.square, aten.erf, aten.log,
    aten.reciprocal, aten.sin, aten.cos, aten.native_dropout, aten.lift_fresh_copy,
    aten._to_copy, aten.feature_dropout))
RELU = _same(elementwise.relu, *_overloads(aten.relu, aten.relu_))
# the in-place forms (`x += residual` in a forward) as the fx front end's `add_` methods


def _computed_operand(ctx, node) -> None:
    """Keep the channels that an operand without channels (made in the forward from sizes:
    ALiBi's per-head slopes times positions, `torch.arange(C)`) meets along a dim where it
    has extent: the slim model cannot slice a computed tensor, nor a reloaded model compute
    it for fewer channels. A dim where the other operand's channels are one unit (a head's
    dims, which a plan keeps or drops whole) needs no slicing."""
    rank = len(ctx.shape(node))
    operands = [(a, ids) for a in ctx.tensor_args(node) if (ids := ctx.ids(a)) is not None]
    for a, ids in operands:
        if (ids != NO_ATOM).any():
            continue
        real = (1,) * (rank - len(ctx.shape(a))) + ctx.shape(a)
        extent = [d for d in range(rank) if real[d] > 1]
        for b, other in operands:
            if b is a:
                continue
            other = other.reshape((1,) * (rank - other.dim()) + tuple(other.shape))
            meets = [d for d in extent if other.size(d) > 1 and
                     bool((other != other.narrow(d, 0, 1)).any())]
            if meets:
                ctx.fix(other, f"a tensor computed in the forward ('{a.name}', no parameter) "
                               f"meets channels along dim {meets[0]} at '{node.name}'")


def _merge(rule_: Rule, *targets) -> Rule:
    """An arithmetic merge's rule for ATen overloads: `rule_`, after `_computed_operand`."""
    def tie(ctx, node):
        _computed_operand(ctx, node)
        return rule_.tie(ctx, node)

    return dataclasses.replace(rule_, tie=tie, targets=tuple(targets))


ADD = _merge(elementwise.add, *_overloads(aten.add, aten.add_))
SUB = _merge(elementwise.sub, *_overloads(aten.sub, aten.rsub, aten.sub_, aten.subtract,
                                          aten.subtract_))
MULTIPLY = _merge(elementwise.multiply, *_overloads(
    aten.mul, aten.div, aten.where, aten.maximum, aten.minimum, aten.masked_fill,
    aten.expand_as, aten.mul_, aten.div_, aten.multiply, aten.multiply_, aten.divide,
    aten.divide_, aten.true_divide, aten.true_divide_))
SOFTMAX = _same(elementwise.softmax, *_overloads(aten.softmax, aten._softmax, aten.log_softmax,
                                                 aten._log_softmax))
LINEAR = _same(linear.functional_linear, *_overloads(aten.linear))
MATMUL = _same(linear.matmul, *_overloads(aten.matmul, aten.bmm, aten.mm))
CONV = _same(conv.functional_conv, *_overloads(aten.conv1d, aten.conv2d, aten.conv3d))
LAYER_NORM = _same(norm.layer_norm, *_overloads(aten.layer_norm))
GROUP_NORM = _same(norm.group_norm, *_overloads(aten.group_norm))
BATCH_NORM = _same(norm.tensor_batch_norm, *_overloads(aten.batch_norm, aten.instance_norm))
# ops that merge dims (the sizes in and out say which)
_RESHAPES = frozenset(_overloads(aten.view, aten.reshape, aten._unsafe_view, aten.flatten))


def _same_sizes(a, b) -> bool:
    """Equal sizes, symbolic ones (the exported batch) included, without adding a guard."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _one_head_repeated(node) -> torch.fx.Node | None:
    """The tensor of one key/value head that `node` repeats across the head dim (-3), if it
    is one: `x[:, :, None].expand(B, 1, n, L, E).reshape(B, n, L, E)` (or a flatten) with x
    of one head, (B, 1, 1, L, E), transformers' `repeat_kv` for multi-query attention; else
    None. Read from the exported values (`meta["val"]`): an fx trace has none yet here."""
    expand = node.args[0] if node.op == "call_function" and node.target in _RESHAPES else None
    if not (isinstance(expand, torch.fx.Node) and expand.op == "call_function" and
            expand.target is aten.expand.default and isinstance(expand.args[0], torch.fx.Node)):
        return None
    x = expand.args[0]
    vx, ve, vo = (n.meta.get("val") for n in (x, expand, node))
    if not all(isinstance(v, torch.Tensor) for v in (vx, ve, vo)) or vo.dim() < 3 or \
            vx.dim() != vo.dim() + 1 or ve.dim() != vx.dim():
        return None
    sx, se, so = tuple(vx.shape), tuple(ve.shape), tuple(vo.shape)
    # one head (dim -4) and a unit dim (-3), broadcast along that dim alone, merged with it
    if not (_same_sizes(sx[-4:-2], (1, 1)) and _same_sizes(se[-4:-3], (1,)) and
            _same_sizes(sx[:-4] + sx[-2:], se[:-4] + se[-2:]) and
            _same_sizes(so, se[:-4] + se[-3:])):
        return None
    return x


def _broadcast_one_kv_head(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """The tracer's rewrite at an attention (`Rule.fuse`): a key or value of one head that
    the forward repeats to every query head (`repeat_kv` in multi-query attention, Falcon's
    since transformers 5.25) reaches the attention as that one head, which the attention
    broadcasts itself (as Falcon's forward did before). The repeat's count is the number of
    query heads, a literal in the graph that no channel of the key names; broadcast, the key
    is the attention rule's multi-query case: its head is kept, the query heads are pruned
    alone. True if it rewrote."""
    q = node.args[0] if node.args else None
    vq = q.meta.get("val") if isinstance(q, torch.fx.Node) else None
    if not isinstance(vq, torch.Tensor) or vq.dim() < 3 or \
            not statically_known_true(vq.shape[-3] > 1):
        return False
    rewrote = False
    for kv in node.args[1:3]:
        x = _one_head_repeated(kv) if isinstance(kv, torch.fx.Node) else None
        if x is None:
            continue
        with gm.graph.inserting_before(node):
            one = gm.graph.call_function(aten.squeeze.dim, (x, -3))
        one.meta["val"] = x.meta["val"].squeeze(-3)
        node.replace_input_with(kv, one)
        rewrote = True
    return rewrote


SDPA = dataclasses.replace(attention.sdpa, fuse=_broadcast_one_kv_head,
                           targets=tuple(_overloads(aten.scaled_dot_product_attention)))
REDUCE = _same(pooling.reduce, *_overloads(aten.sum, aten.amax, aten.amin))
SPATIAL = _same(pooling.channelwise_spatial, *_overloads(
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.max_pool2d, aten.avg_pool2d,
    aten.upsample_nearest2d, aten.upsample_bilinear2d))
PAD = _same(pooling.pad, *_overloads(aten.pad, aten.constant_pad_nd))
CAT = _same(layout.cat, *_overloads(aten.cat))
STACK = _same(layout.stack, *_overloads(aten.stack))
FREE = _same(layout.FREE_LAYOUT, *_overloads(
    aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze, aten.flatten, aten.t,
    aten.movedim, aten.swapaxes, aten.flip))
EXPAND = _same(layout.EXPAND, *_overloads(aten.expand))
SPLIT = _same(layout.SPLIT, *_overloads(aten.split, aten.split_with_sizes))
CHUNK = _same(layout.CHUNK, *_overloads(aten.chunk))
UNBIND = _same(layout.UNBIND, *_overloads(aten.unbind))
UNFLATTEN = _same(layout.UNFLATTEN, *_overloads(aten.unflatten))
SELECT = _same(layout.SELECT, *_overloads(aten.select))
NARROW = _same(layout.NARROW, *_overloads(aten.narrow))


def _view(ctx, node):
    """aten.view / reshape: the same op on the (expanded, not viewable) ids is a reshape."""
    return ctx.run_on_ids(node, fn=torch.reshape)


VIEW = dataclasses.replace(layout.VIEW, tie=_view,
                           targets=tuple(_overloads(aten.view, aten.reshape, aten._unsafe_view)))


def _rewrite_slice(rw, node, state):
    """aten.slice(x, dim, start, end, step): start and end count the kept channels."""
    x, dim, start, end, step = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
    if state == FULL:
        return None
    s = rw.input_selection(node, dim)
    if s is None:
        return None  # a dim the plan keeps whole (tokens, positions)
    size = rw.shape(x)[dim]
    lo, hi, st = slice(start, end, step).indices(size)
    if st != 1:
        return False
    node.args = (x, dim, int(np.count_nonzero(s < lo)), int(np.count_nonzero(s < hi)))
    return None


SLICE = Rule("layout", layout.layout, edge="permutation", slim=_rewrite_slice, flow="pass",
             pure=True, targets=tuple(_overloads(aten.slice)))


def _index_items(node) -> tuple:
    """aten.index(x, indices)'s indices as getitem's items (None: a whole dim)."""
    return tuple(slice(None) if i is None else i for i in node.args[1])


# copies of a tensor, through which a constant is read (`lift_fresh_copy` of a lifted one)
_COPIES = frozenset(_overloads(aten.lift_fresh_copy, aten.clone, aten.alias, aten.detach))


def _constant(gm, index):
    """The values of an index that the exported graph `gm` holds as a constant its forward
    made (`x[..., [-2], :]`: a lifted tensor, read through `lift_fresh_copy`), and the
    nodes that read it (the copies, then the get_attr); None for any other index (a buffer
    of the model, a computed one)."""
    chain = []
    while isinstance(index, torch.fx.Node) and index.op == "call_function" and \
            index.target in _COPIES:
        chain.append(index)
        index = index.args[0]
    if not isinstance(index, torch.fx.Node) or index.op != "get_attr" or \
            index.target not in gm.meta.get("graphsearch_constants", ()):
        return None
    value = gm.get_buffer(index.target)
    return (value, [*chain, index]) if layout.known_index(value) else None


def _index(ctx, node):
    """aten.index(x, indices) is x[indices]: getitem's rule for an index tensor (a relative
    position-bias table's lookup keeps the table's heads); a constant index (Falcon's
    `fused_qkv[..., [-2], :]`, the key head) picks its positions, as a slice does."""
    items = tuple(c[0] if (c := _constant(ctx.gm, i)) is not None else i
                  for i in _index_items(node))
    out = layout.index_by_tensor(ctx, node, items)
    return out if out is not None else unsupported(ctx, node)


def _rewrite_index(rw, node, state):
    """The indices are tensors or None (a whole dim): unchanged, unless a tensor picks
    positions of a pruned dim. A constant index then holds the positions in the slim
    layout (every one it picks must be kept); any other, only the full layout knows."""
    if state == FULL:
        return None
    sel = rw.selection(node.args[0])
    if sel is None:
        return False
    for d, i in enumerate(node.args[1]):
        if i is None or d >= len(sel) or sel[d] is None:
            continue
        const = _constant(rw.graph.module, i)  # (its nodes: the slim pass's copy's)
        if const is None or any(len(n.users) != 1 for n in const[1]):
            return False  # (a constant read elsewhere too keeps its values)
        value, reads = const
        positions = layout.positions_among_kept(value.numpy(), rw.shape(node.args[0])[d],
                                                sel[d])
        if positions is None:
            return False  # a position the plan drops
        owner, _, attr = reads[-1].target.rpartition(".")
        # the copy that the slim pass rewrites holds the positions among the kept ones
        rw.gm.get_submodule(owner)._buffers[attr] = torch.as_tensor(positions,
                                                                    dtype=value.dtype)
    return None


INDEX = Rule("layout", _index, edge="permutation", slim=_rewrite_index, flow="pass", pure=True,
             targets=(aten.index.Tensor,))


def _averaged_channel_dim(ids, rank: int, dims) -> int | None:
    """The channel dim of `ids` (a dim along which they vary) that a mean over `dims`
    averages alone; None for a mean over positions or over several dims."""
    dims = range(rank) if dims is None else dims if isinstance(dims, (tuple, list)) else (dims,)
    dims = sorted({d % rank for d in dims})
    ids = ids.reshape((1,) * (rank - ids.dim()) + tuple(ids.shape))
    if len(dims) != 1 or ids.size(dims[0]) == 1:
        return None
    return dims[0]


def _mask_channel_mean(graph, plan, node, info):
    """The reference's mean over a pruned channel dim counts the kept channels only."""
    ids = graph.info(node.args[0].name).ids
    x = graph.values.get(node.args[0].name)
    if not isinstance(ids, torch.Tensor) or not isinstance(x, torch.Tensor) or \
            arg(node, 1, "dim") is None or not plan.changes(ids) or \
            _averaged_channel_dim(ids, x.dim(), arg(node, 1, "dim")) is None:
        return None
    return _run_channel_mean, plan.kept(ids).float()


def _run_channel_mean(interp, n, keep):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x = args[0]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = [d % x.dim() for d in (args[1] if isinstance(args[1], (tuple, list)) else (args[1],))]
    keep = keep.reshape((1,) * (x.dim() - keep.dim()) + tuple(keep.shape)).to(x.dtype)
    # a head the plan drops (a per-head statistic) keeps none of its dims: its mean is 0, not
    # 0 / 0 (the statistic only ever multiplies that head's zeroed dims)
    count = keep.expand_as(x).sum(dims, keepdim=keepdim).clamp(min=1)
    return (x * keep).sum(dims, keepdim=keepdim) / count


@rule(*_overloads(aten.mean), edge="identity", mask=_mask_channel_mean)
def channel_mean(ctx, node):
    """A mean over the channel dim (an RMSNorm's statistic, which an export leaves as its
    ATen ops): the slim model averages its kept channels, the mask reference too (`mask`),
    so the channels stay prunable; over a head's dims (heads x head_dim) the head's dims are
    tied into one unit. Over other dims (a global average pool), it is `pooling.reduce`."""
    ids = ctx.ids(node.args[0])
    if ids is None or arg(node, 1, "dim") is None:
        return pooling.reduce.tie(ctx, node)
    rank = len(ctx.shape(node.args[0]))
    dim = _averaged_channel_dim(ids, rank, arg(node, 1, "dim"))
    if dim is None:
        return pooling.reduce.tie(ctx, node)
    ids = ids.reshape((1,) * (rank - ids.dim()) + tuple(ids.shape))
    if [d for d in range(rank) if ids.size(d) > 1] == [dim]:
        return ctx.no_channels(node)
    # a statistic per head (Qwen3's query norm over head_dim): the head's dims are one unit,
    # the output carries the head
    ctx.tie_along(ids, dim)
    out = ctx.find_ids(ids.narrow(dim, 0, 1).contiguous())
    return out if arg(node, 2, "keepdim", False) else out.squeeze(dim)


@rule(*_overloads(aten.embedding), edge="mix", gate="producer",
      fix=embedding.embedding.fix)
def aten_embedding(ctx, node):
    """aten.embedding(weight, indices): nn.Embedding's rule with the table first."""
    wname = ctx.param_name(node.args[0])
    if wname is None:
        return unsupported(ctx, node, why="an embedding with a computed table")
    out = ctx.fresh(ctx.shape(node.args[0])[1], "embedding")
    ctx.bind(wname, 1, out, role="out")
    return ctx.channel_ids(out, node, dim=-1)


@rule(*_overloads(aten.addmm), edge="mix", gate="producer")
def aten_addmm(ctx, node):
    """aten.addmm(bias, x, W): x @ W + bias with W (in, out) owned by the model (a
    Hugging Face Conv1D): a linear layer."""
    b, x, w = node.args[:3]
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None or (b is not None and bname is None):
        return unsupported(ctx, node, why="addmm with a computed weight or bias")
    return linear.linear_on(ctx, node, x, ctx.shape(w)[1], wname, bname, weight_dims=(1, 0))


@rule(*_overloads(aten.sym_size, aten.sym_numel, aten.sym_stride), edge="none")
def aten_size(ctx, node):
    """A size read (a symbolic batch): no channels."""
    return None


@rule(*_overloads(aten._assert_tensor_metadata, aten._assert_scalar,
                  aten.sym_constrain_range_for_size), edge="none")
def aten_check(ctx, node):
    """A check export records (dtype, device, a size's range): it computes nothing."""
    return None


@rule(*_overloads(aten.arange, aten.ones, aten.zeros, aten.full, aten.new_ones,
                  aten.new_zeros, aten.new_full, aten.empty, aten.ones_like, aten.zeros_like,
                  aten.full_like, aten.scalar_tensor), edge="none")
def aten_factory(ctx, node):
    """A tensor made from sizes (positions, a mask's ones): no channels of the model."""
    v = ctx.value(node)
    return ctx.no_channels(node) if isinstance(v, torch.Tensor) else None


BADDBMM = _same(linear.BADDBMM, *_overloads(aten.baddbmm))


@rule(*_overloads(aten.repeat), edge="none")
def aten_repeat(ctx, node):
    """x.repeat(sizes) of a tensor without channels (ALiBi's slopes x positions, tiled over
    the batch): none; of one with channels, unsupported (its copies would be one channel
    space each)."""
    ids = ctx.ids(node.args[0])
    if ids is not None and (ids == NO_ATOM).all():
        return ctx.no_channels(node)
    return unsupported(ctx, node, why="repeat of a tensor with channels")


COMPARE = _same(elementwise.multiply, *_overloads(
    aten.eq, aten.ne, aten.le, aten.lt, aten.ge, aten.gt, aten.__and__, aten.__or__,
    aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.logical_not, aten.logical_and,
    aten.logical_or))

RULES = (UNARY, RELU, ADD, SUB, MULTIPLY, SOFTMAX, LINEAR, MATMUL, CONV, LAYER_NORM,
         GROUP_NORM, BATCH_NORM, SDPA, REDUCE, SPATIAL, PAD, CAT, STACK, FREE, EXPAND, SPLIT,
         CHUNK, UNBIND, UNFLATTEN, SELECT, NARROW, VIEW, SLICE, INDEX, channel_mean,
         aten_embedding, aten_addmm, aten_size, aten_check, aten_factory, COMPARE, BADDBMM,
         aten_repeat)
