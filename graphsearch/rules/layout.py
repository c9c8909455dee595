"""Layout and shape ops: concat, stack, view/reshape, permute, split, slicing, size queries.

They move channel identities around: the rule runs the same op on the ids themselves. How
the slim pass treats each is its `slim` field: "free" (nothing in its arguments names a
width), "full" (it runs on the original layout), or a rewrite of its literal sizes below.
The rewrites run inside the slim pass (`passes/slim.py`) on the copy being slimmed, through
the rewriter's small API (`rw.shape`, `rw.value`, `rw.selection`, `rw.input_selection`,
`rw.out_sizes`, `rw.slim_width`); `state` is FULL when the op runs on the original layout
(its literal sizes then stay as they are).
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..atoms import NO_ATOM
from ..errors import PlanError
from .registry import BLOCK, FULL, DeadInput, Rule, arg, methods, plain_meta, rule, unsupported


class ZeroChannels(nn.Module):
    """The zeros a removed concat branch leaves where its channels are still kept (they are
    also produced elsewhere, e.g. by a residual add on the concat's output): the shape of
    the live concat operand `ref`, with `size` along the concat dim `dim`."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.dim, self.size = dim, size

    def forward(self, ref):
        shape = list(ref.shape)
        shape[self.dim] = self.size
        return ref.new_zeros(shape)


def _cat_operands_left(gm: fx.GraphModule, graph, plan, node: fx.Node, tensors: list,
                       gone: set) -> list:
    """The operands of concat `node` once its removed ones are gone. A removed operand
    whose channels the plan still keeps (a residual add after the concat produces them
    too: the mask reference computes zeros there) becomes zeros of its slim width; one
    that keeps none of them leaves the concat."""
    live = [t for t in tensors if not (isinstance(t, fx.Node) and t.name in gone)]
    if not live:
        return live
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = []
    for t in tensors:
        if not (isinstance(t, fx.Node) and t.name in gone):
            out.append(t)
            continue
        info, value = graph.info(t.name), graph.values.get(t.name)
        if info is None or not isinstance(info.ids, torch.Tensor) or \
                not isinstance(value, torch.Tensor):
            continue
        d = dim % value.dim()
        if not bool(plan.kept(info.ids).any()):
            continue
        shape = plan.slim_shape(info.ids, tuple(value.shape))
        if shape is None:
            raise PlanError(f"'{node.name}': the removed operand '{t.name}' keeps channels "
                            "in no regular layout")
        if shape[d] == 0:
            continue
        name = next(f"slim_zeros_{i}" for i in range(len(tensors) + len(gm._modules))
                    if not hasattr(gm, f"slim_zeros_{i}"))
        gm.add_submodule(name, ZeroChannels(d, int(shape[d])))
        with gm.graph.inserting_before(node):
            out.append(gm.graph.call_module(name, (live[0],)))
    return out


def _cat_without_removed(gm, graph, plan, node: fx.Node, gone: set) -> None:
    """Slim: a concat whose removed operands leave it (`CAT.rewrite`)."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    kept = _cat_operands_left(gm, graph, plan, node, list(tensors), gone)
    if node.args:
        node.args = (kept, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "tensors": kept}


CAT = DeadInput("cat", drops=True, rewrite=_cat_without_removed)


def _cat_meta(target, args, kwargs):
    """`torch.cat` of row-major meta tensors of one dtype and rank, equal but along `dim`:
    a row-major tensor of the summed size, as torch's kernel gives (its Python meta kernel
    is most of a DenseNet's shape pass); None for anything else."""
    if len(args) not in (1, 2) or set(kwargs) - {"dim"} or (len(args) == 2 and kwargs):
        return None
    tensors = args[0]
    dim = args[1] if len(args) == 2 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not all(plain_meta(t) for t in tensors) or first.dim() == 0 or \
            not -first.dim() <= dim < first.dim():
        return None
    dim %= first.dim()
    shape = list(first.shape)
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.dim() != first.dim() or \
                any(a != b for d, (a, b) in enumerate(zip(t.shape, shape)) if d != dim):
            return None
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


@rule(torch.cat, torch.concat, torch.concatenate, edge="offset", dead=CAT, slim="free",
      meta=_cat_meta)
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


@rule(torch.stack, edge="offset", dead=BLOCK, slim="free")
def stack(ctx, node):
    return ctx.run_on_ids(node)


def index_by_tensor(ctx, node: fx.Node, items: tuple | None = None):
    """`x[:, idx]` or `index_select(x, dim, idx)` with an integer index *tensor* (a relative
    position-bias lookup: `table[index]`): the index holds positions, whose values meta
    tensors do not have. Along each dim it indexes, x's entries are tied into one unit,
    so that whichever positions it picks carry the same channels; then the op reads
    position 0. An index whose values are known (a real tensor among `items`: a constant
    the graph holds, ATen's `x[..., [-2], :]`) picks its positions, as a slice does, and
    ties nothing. None if no tensor indexes x; a boolean mask is refused. `items`: the
    index of an op that is no getitem (ATen's index), as getitem's."""
    x = node.args[0]
    shape = ctx.shape(x)
    ids = ctx.ids(x)
    ids = ids.reshape((1,) * (len(shape) - ids.dim()) + tuple(ids.shape))

    def plain(a):  # an fx node that is no tensor: its value (a size read from a shape)
        if isinstance(a, fx.Node):
            return ctx.value(a)
        if isinstance(a, slice):
            return slice(plain(a.start), plain(a.stop), plain(a.step))
        return a

    def tensor_index(a):
        v = ctx.value(a) if isinstance(a, fx.Node) else a
        return v if isinstance(v, torch.Tensor) else None

    if items is not None or node.target is operator.getitem:
        if items is None:
            items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(tensor_index(i) is not None and tensor_index(i).dtype == torch.bool
               for i in items):  # which positions it keeps depends on values
            raise NotImplementedError("a boolean mask index is not followed")
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        dims, d = [], 0
        for i in items:
            if i is Ellipsis:
                d += len(shape) - consumed
            elif i is not None:
                if tensor_index(i) is not None:
                    dims.append(d)
                d += 1
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        dims = [dim % len(shape)]
        items = None
        index = node.args[2] if len(node.args) > 2 else node.kwargs["index"]
    if not dims:
        return None
    known = set() if items is None else \
        {d for d, i in zip(dims, (i for i in items if tensor_index(i) is not None))
         if known_index(i)}
    for d in dims:
        if ids.size(d) > 1 and d not in known:  # every entry along d tied to one
            one = ids.amax(d, keepdim=True).expand_as(ids)  # (NO_ATOM, a constant, not)
            ctx.tie(ids, one.contiguous())
            ids = ctx.find_ids(ids.contiguous()).amax(d, keepdim=True)
    ids = ids.expand(*[1 if d in dims and d not in known else s for d, s in enumerate(shape)])
    if items is None:
        out = torch.index_select(ids, dims[0],
                                 torch.zeros(tensor_index(index).shape, dtype=torch.long))
    else:
        new = tuple(i if known_index(i) else torch.zeros(tensor_index(i).shape, dtype=torch.long)
                    if tensor_index(i) is not None else plain(i) for i in items)
        out = ids[new]
    return ctx.compress(out.contiguous())


def known_index(index) -> bool:
    """An integer index whose values are at hand: a real tensor, not a node or meta."""
    return isinstance(index, torch.Tensor) and index.device.type != "meta" and \
        not index.dtype.is_floating_point and index.dtype != torch.bool


def positions_among_kept(positions, size: int, kept) -> np.ndarray | None:
    """Constant positions along a dim of `size` (negative ones from its end) rewritten as
    positions among the `kept` ones (sorted) of a slimmed dim; None if the plan drops one."""
    pos = np.asarray(positions, dtype=np.int64) % size
    return np.searchsorted(kept, pos) if np.isin(pos, kept).all() else None


# a view of the ids (expanded: stride 0 where constant) may need a copy
_AS_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}


def layout(ctx, node):
    """Shape ops move channel identities around: run the same op on the ids themselves."""
    if node.target is operator.getitem and not isinstance(ctx.value(node.args[0]), torch.Tensor):
        return ctx.ids(node.args[0])[node.args[1]]  # picking from a tuple of outputs
    if node.target in (operator.getitem, torch.index_select, "index_select"):
        out = index_by_tensor(ctx, node)
        if out is not None:
            return out
    emptied = _emptied_dims(ctx, node)
    if emptied:
        return _empty_slice(ctx, node.args[0], emptied)
    return ctx.run_on_ids(node, _AS_RESHAPE.get(node.target) if node.op == "call_method"
                          else None)


def _emptied_dims(ctx, node) -> list[int]:
    """The dims a slice (`x[..., 8:]` of 8, a narrow of length 0) leaves empty, where it
    changes no other dim; [] for anything else."""
    x = node.args[0] if node.args else None
    v, vx = ctx.value(node), ctx.value(x) if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor) or not isinstance(vx, torch.Tensor) or \
            v.numel() or not vx.numel() or v.dim() != vx.dim():
        return []
    if any(a != b and a != 0 for a, b in zip(v.shape, vx.shape)):
        return []
    return [d for d, (a, b) in enumerate(zip(v.shape, vx.shape)) if a != b]


def _empty_slice(ctx, x, dims: list[int]) -> torch.Tensor:
    """The ids of `x` sliced to nothing along `dims`. No entry is left, but the other dims
    keep their sizes, which a plan still changes (the heads of the part a partial rotary
    embedding passes through, empty where the rotary dim is the head's: Phi-3's
    `q[..., rotary_dim:]`). Empty ids would say nothing of them: along `dims` the ids shrink
    to one entry (size 1 broadcasts to 0), the entries along them tied into one unit where
    the ids vary along other dims too (a head's dims: one unit already wherever attention
    reads them); where they vary along `dims` only, no channel is left."""
    rank = len(ctx.shape(x))
    ids = ctx.ids(x)
    ids = ids.reshape((1,) * (rank - ids.dim()) + tuple(ids.shape))
    for d in dims:
        if ids.size(d) == 1:
            continue
        if all(ids.size(k) == 1 for k in range(rank) if k != d):
            return torch.full((1,) * rank, NO_ATOM, dtype=torch.int64)
        ctx.tie_along(ids, d)
        ids = ctx.find_ids(ids.narrow(d, 0, 1).contiguous())
    return ctx.compress(ids)


def _layout_rule(slim_kind, *targets) -> Rule:
    """`layout` for `targets`: one op family, whose members differ only in how slim treats
    them (free, full layout, or a rewrite of their literal sizes). Its modules (nn.Flatten,
    nn.PixelShuffle, nn.Unflatten...) are pure functions of their configuration."""
    return Rule("layout", layout, edge="permutation", slim=slim_kind, flow="pass",
                pure=True, targets=targets)


# Shape ops that commute with dropping channels: nothing in their arguments names a width.
FREE_LAYOUT = _layout_rule(
    "free", torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.swapaxes, torch.movedim, torch.flip, F.pixel_shuffle, F.pixel_unshuffle, torch.tile,
    nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle,
    *methods("flatten", "permute", "transpose", "squeeze", "unsqueeze", "swapaxes", "movedim",
             "flip", "t", "mT", "repeat", "tile", "view_as", "reshape_as"))
# Shape ops that move channel positions in a way only the full layout expresses, and those
# with no rewrite of their own.
FULL_LAYOUT = _layout_rule(
    FULL, torch.roll, torch.channel_shuffle, torch.native_channel_shuffle, torch.index_select,
    torch.repeat_interleave, torch.tensor_split, nn.ChannelShuffle, nn.Unflatten,
    *methods("roll", "index_select", "repeat_interleave", "tensor_split"))


# attributes of a tensor that are metadata, not values computed from its data
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})


def _reads_metadata(target, args) -> bool:
    return target is not getattr or (len(args) > 1 and args[1] in SHAPE_ATTRIBUTES)


@rule(*methods("size", "dim", "numel", "__len__"), getattr, len, edge="none",
      metadata=_reads_metadata)
def shape_query(ctx, node):
    if isinstance(ctx.value(node), torch.Tensor):
        # A tensor attribute (x.mT, x.T, x.data) carries channels: keep following them.
        attr = node.args[1]
        if attr not in ("T", "mT", "data", "real"):
            return unsupported(ctx, node, why=f"tensor attribute .{attr}")
        return ctx.run_on_ids(node)
    return None


def _set_shape_args(node: fx.Node, start: int, sizes: list) -> None:
    """Write `sizes` (None: leave) into the shape arguments from position `start` on."""
    args = list(node.args)
    packed = len(args) == start + 1 and isinstance(args[start], (tuple, list))
    shape = list(args[start]) if packed else args[start:]
    if len(shape) != len(sizes):
        raise PlanError(f"'{node.name}': unexpected shape arguments")
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


VIEW = _layout_rule(_rewrite_view, torch.reshape, *methods("view", "reshape"))


def _rewrite_expand(rw, node, state) -> None:
    _set_shape_args(node, 1, rw.out_sizes(node, state))


EXPAND = _layout_rule(_rewrite_expand, *methods("expand"))


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


UNFLATTEN = _layout_rule(_rewrite_unflatten, torch.unflatten, *methods("unflatten"))


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


def _retarget_split(node, x, counts, dim) -> None:
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, list(counts), dim)
    node.kwargs = {}


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


SPLIT = _layout_rule(_rewrite_split, torch.split, *methods("split", "split_with_sizes"))


def _rewrite_chunk(rw, node, state):
    x = node.args[0]
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs["chunks"]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    total = rw.shape(x)[dim]
    step = -(-total // chunks)
    sizes = [min(step, total - s) for s in range(0, total, step)]
    _retarget_split(node, x, _piece_counts(rw, node, dim, sizes, state), dim)


CHUNK = _layout_rule(_rewrite_chunk, torch.chunk, *methods("chunk"))


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
        elif isinstance(item, list) and s is not None and \
                all(type(i) is int for i in item):  # x[..., [-2], :]: kept positions only
            pos = positions_among_kept(item, shape[d], s)
            if pos is None:
                return False
            item = pos.tolist()
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


GETITEM = _layout_rule(_rewrite_getitem, operator.getitem)


def _rewrite_unbind(rw, node, state):
    """unbind along a dim the plan keeps whole (q, k, v of a qkv projection) is unchanged;
    along a pruned dim the pieces would no longer be the same ones."""
    dim = arg(node, 1, "dim", 0)
    if state == FULL:
        return None
    return None if rw.input_selection(node, dim) is None else False


UNBIND = _layout_rule(_rewrite_unbind, torch.unbind, *methods("unbind"))


def _rewrite_narrow(rw, node, state):
    x, dim, start, length = (list(node.args) + [None] * 4)[:4]
    if state == FULL or not all(isinstance(v, int) for v in (dim, start, length)):
        return None if state == FULL else False
    s = rw.input_selection(node, dim)
    if s is not None:
        start, length = (int(np.count_nonzero(s < start)),
                         int(np.count_nonzero((s >= start) & (s < start + length))))
    node.args = (x, dim, start, length)


NARROW = _layout_rule(_rewrite_narrow, torch.narrow, *methods("narrow"))


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


SELECT = _layout_rule(_rewrite_select, torch.select, *methods("select"))


RULES = (cat, stack, shape_query, FREE_LAYOUT, FULL_LAYOUT, VIEW, EXPAND, UNFLATTEN, SPLIT, CHUNK, GETITEM, NARROW, UNBIND, SELECT)
