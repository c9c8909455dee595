"""The slim pass: a keep plan in, a really smaller `torch.fx.GraphModule` out.

Steps, on a deep copy of the traced model (the original is never touched):
1. slice every parameter and buffer along the dims the analysis bound to channels;
2. remove the branches whose groups keep nothing: a residual add becomes its other operand,
   a concat loses that input, and the dead nodes go;
3. walk the graph and fix what still names a width: module attributes (`in_channels`,
   `groups` of a grouped conv, `normalized_shape`...), literal sizes of shape ops (view,
   reshape, unflatten, split, chunk, slices, narrow, pad), and pruned attention modules;
4. check every node's output shape on meta tensors against the plan.

Shape ops see their input in one of two states. Normally a value is *slim*: its kept
channels, in order. When the kept positions of an op's output are no regular selection (a
channel shuffle of two halves that keep different counts), the op runs in *full* layout:
its input is scattered back to the original width with zeros in the dropped places, the op
runs with its original sizes, and as soon as a value is a regular selection again it is
gathered back to slim. That keeps any chain of shape ops exact without a rule per pattern.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analysis import NodeInfo
from ..graph import ChannelGraph, PlanError
from ..trace import _propagate_meta

from .attention import PrunedMultiheadAttention
from .plan import Keep, ResolvedPlan, resolve


# --------------------------------------------------------------------------- helper modules


class ScatterChannels(nn.Module):
    """Slim -> full layout: put kept positions back in place, zeros elsewhere."""

    def __init__(self, dims: list[int], sources: list[np.ndarray]) -> None:
        super().__init__()
        self.dims = dims
        for i, s in enumerate(sources):
            self.register_buffer(f"source{i}", torch.as_tensor(s, dtype=torch.long))

    def forward(self, x):
        for i, d in enumerate(self.dims):
            pad = [0, 0] * (x.dim() - 1 - d % x.dim()) + [0, 1]  # one zero slot at the end
            x = torch.index_select(F.pad(x, pad), d, getattr(self, f"source{i}"))
        return x


class GatherChannels(nn.Module):
    """Full -> slim layout: keep the kept positions along each dim."""

    def __init__(self, dims: list[int], indices: list[np.ndarray]) -> None:
        super().__init__()
        self.dims = dims
        for i, s in enumerate(indices):
            self.register_buffer(f"index{i}", torch.as_tensor(s, dtype=torch.long))

    def forward(self, x):
        for i, d in enumerate(self.dims):
            x = torch.index_select(x, d, getattr(self, f"index{i}"))
        return x


# --------------------------------------------------------------------------- entry point


def slim(graph: ChannelGraph, keep: Keep | None, state_dict: dict | None = None
         ) -> fx.GraphModule:
    """A smaller GraphModule computing the original restricted to the kept channels.

    `state_dict` (of the original architecture, e.g. after a method trained it) replaces the
    traced model's weights before slicing."""
    plan = resolve(graph, keep)
    gm = copy.deepcopy(graph.module)
    if state_dict is not None:
        gm.load_state_dict(state_dict)
    sliced = _slice_tensors(gm, graph, plan)
    _remove_dead(gm, graph, plan)
    _Rewriter(gm, graph, plan, sliced).run()
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    _check_shapes(gm, graph, plan)
    return gm


# --------------------------------------------------------------------------- 1. tensors


def _slice_tensors(gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan) -> set[str]:
    """Slice every bound parameter and buffer; returns the modules that own a sliced one."""
    sliced: set[str] = set()
    for name, b in graph._bindings.items():
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        t = getattr(owner, attr)
        new = t.detach()
        if b.ids is not None:
            sel = plan.selection(b.ids, tuple(t.shape))
            if sel is None:
                raise PlanError(f"parameter '{name}': the kept channels are no regular slice")
            dims = {d: s for d, s in enumerate(sel) if s is not None}
        else:
            dims = {d: np.flatnonzero(plan.kept(torch.from_numpy(line)).numpy())
                    for d, line in b.dims.items()}
            dims = {d: idx for d, idx in dims.items() if len(idx) < t.shape[d]}
        if not dims:
            continue
        for d, idx in dims.items():
            new = new.index_select(d, torch.as_tensor(idx, dtype=torch.long))
        new = new.clone()
        sliced.add(owner_name)
        if isinstance(t, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            owner._buffers[attr] = new
    return sliced


# --------------------------------------------------------------------------- 2. dead branches


def _remove_dead(gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan) -> None:
    if not plan.dead:
        return
    infos = {i.name: i for i in graph.nodes}
    gone = set(plan.dead)
    for node in list(gm.graph.nodes):
        if node.name in gone:
            continue
        dead_inputs = [a for a in node.all_input_nodes if a.name in gone]
        if not dead_inputs:
            continue
        kind = infos[node.name].dead
        if kind in ("add", "sub"):
            alive = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.name not in gone]
            if len(alive) != 1 or (kind == "sub" and alive[0] is not node.args[0]):
                raise PlanError(f"'{node.name}' cannot drop its removed operand")
            node.replace_all_uses_with(alive[0])
            gone.add(node.name)
        elif kind == "cat":
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            kept = [t for t in tensors if not (isinstance(t, fx.Node) and t.name in gone)]
            if node.args:
                node.args = (kept, *node.args[1:])
            else:
                node.kwargs = {**node.kwargs, "tensors": kept}
        else:
            raise PlanError(f"'{node.name}' reads the removed '{dead_inputs[0].name}'")
    for node in reversed(list(gm.graph.nodes)):
        if node.name in gone:
            if node.users:
                raise PlanError(f"removed node '{node.name}' is still used by "
                                f"{[u.name for u in node.users]}")
            gm.graph.erase_node(node)


# --------------------------------------------------------------------------- 3. rewrites

SLIM, FULL = "slim", "full"

# Shape ops that commute with dropping channels: nothing in their arguments names a width.
_FREE_FUNCTIONS = {torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   torch.swapaxes, torch.movedim, torch.flip, F.pixel_shuffle, F.pixel_unshuffle,
                   torch.cat, torch.concat, torch.concatenate, torch.stack, torch.tile}
_FREE_METHODS = {"flatten", "permute", "transpose", "squeeze", "unsqueeze", "swapaxes",
                 "movedim", "flip", "t", "mT", "contiguous", "repeat", "tile", "view_as",
                 "reshape_as"}
_FREE_MODULES = (nn.Flatten, nn.PixelShuffle, nn.PixelUnshuffle)
# Shape ops that move channel positions in a way only the full layout expresses.
_FULL_FUNCTIONS = {torch.roll, torch.channel_shuffle, torch.native_channel_shuffle,
                   torch.index_select, torch.repeat_interleave, torch.tensor_split}
_FULL_METHODS = {"roll", "index_select", "repeat_interleave", "tensor_split"}
_FULL_MODULES = (nn.ChannelShuffle, nn.Unflatten)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan,
                 sliced: set[str] = frozenset()) -> None:
        self.gm, self.graph, self.plan = gm, graph, plan
        self.sliced = sliced  # modules whose parameters were sliced (attention heads)
        self.infos: dict[str, NodeInfo] = {i.name: i for i in graph.nodes}
        self.state: dict[str, str] = {}
        self.fixed_modules: set[str] = set()
        self.count = 0
        self.origin: dict[str, str] = {}  # inserted scatter/gather node -> original node

    # ---- what the analysis knows of a node
    def ids(self, node: fx.Node, index: int | None = None):
        info = self.infos.get(self.origin.get(node.name, node.name))
        ids = info.ids if info is not None else None
        if index is not None and isinstance(ids, (tuple, list)):
            ids = ids[index]
        if ids is None and node.op == "get_attr":
            b = self.graph._bindings.get(node.target)
            ids = b.ids if b is not None else None
        return ids

    def value(self, node: fx.Node):
        return self.graph.values.get(self.origin.get(node.name, node.name))

    def shape(self, node: fx.Node) -> tuple | None:
        v = self.value(node)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def selection(self, node: fx.Node):
        ids, shape = self.ids(node), self.shape(node)
        if not isinstance(ids, torch.Tensor) or shape is None:
            return [None] * (len(shape) if shape else 0)
        return self.plan.selection(ids, shape)

    def changes(self, node: fx.Node) -> bool:
        ids = self.ids(node)
        if isinstance(ids, (tuple, list)):
            return any(self.plan.changes(i) for i in ids if isinstance(i, torch.Tensor))
        return self.plan.changes(ids)

    # ---- the walk
    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op in ("placeholder", "get_attr", "output"):
                self.state[node.name] = SLIM
                continue
            inputs = [a for a in node.all_input_nodes]
            full_in = any(self.state.get(a.name) == FULL for a in inputs)
            touched = full_in or self.changes(node) or any(self.changes(a) for a in inputs) \
                or (node.op == "call_module" and any(
                    o == node.target or o.startswith(node.target + ".") for o in self.sliced))
            kind = self.layout_kind(node)
            if kind is None:
                if full_in:
                    raise PlanError(f"'{node.name}' reads channels that the plan leaves in no "
                                    "regular layout (keep equal counts across the shuffle)")
                if touched and node.op == "call_module":
                    self.fix_module(node)
                elif touched and node.op == "call_function" and node.target in _FUNCTION_FIXES:
                    _FUNCTION_FIXES[node.target](self, node)
                self.state[node.name] = SLIM
                continue
            if not touched:
                self.state[node.name] = SLIM
                continue
            self.layout(node, kind, full_in)

    def layout_kind(self, node: fx.Node) -> str | None:
        info = self.infos.get(node.name)
        if info is not None and info.rule == "elementwise_unary":
            return "free"  # position by position: works in either layout
        if info is None or info.rule not in ("layout", "cat", "stack", "pad"):
            return None
        if node.op == "call_function" and node.target is operator.getitem and \
                not isinstance(self.value(node.args[0]), torch.Tensor):
            return "free"  # an element of a tuple of outputs
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            return "free" if isinstance(m, _FREE_MODULES) else "full"
        if node.op == "call_function":
            if node.target in _FREE_FUNCTIONS:
                return "free"
            if node.target in _FULL_FUNCTIONS:
                return "full"
        if node.op == "call_method":
            if node.target in _FREE_METHODS:
                return "free"
            if node.target in _FULL_METHODS:
                return "full"
        return "rewrite"

    def layout(self, node: fx.Node, kind: str, full_in: bool) -> None:
        sel = self.selection(node) if isinstance(self.ids(node), torch.Tensor) else None
        tuple_out = not isinstance(self.value(node), torch.Tensor)
        if not full_in and not tuple_out and sel is not None and \
                (kind == "free" or (kind == "rewrite" and self.rewrite(node, SLIM))):
            self.state[node.name] = SLIM
            return
        if not full_in and tuple_out and kind in ("free", "rewrite") and \
                (kind == "free" or self.rewrite(node, SLIM)):
            self.state[node.name] = SLIM
            return
        if tuple_out:
            raise PlanError(f"cannot slim '{node.name}': a split whose pieces keep channels "
                            "in no regular layout")
        # Full layout: scatter slim inputs back, run with the original sizes.
        for a in node.all_input_nodes:
            if self.state.get(a.name) != FULL and self.changes(a) and \
                    isinstance(self.value(a), torch.Tensor):
                self.scatter_input(node, a)
        if kind == "rewrite":
            self.rewrite(node, FULL)
        self.state[node.name] = FULL
        if sel is not None:
            self.gather_output(node, sel)

    def scatter_input(self, node: fx.Node, arg: fx.Node) -> None:
        sel = self.selection(arg)
        if sel is None:
            raise PlanError(f"'{arg.name}' keeps channels in no regular layout")
        shape = self.shape(arg)
        dims, sources = [], []
        for d, s in enumerate(sel):
            if s is None:
                continue
            src = np.full(shape[d], len(s), dtype=np.int64)  # the zero slot
            src[s] = np.arange(len(s))
            dims.append(d)
            sources.append(src)
        name = self.add_module("scatter", ScatterChannels(dims, sources))
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (arg,))
        node.replace_input_with(arg, new)
        self.state[new.name] = FULL
        self.origin[new.name] = arg.name

    def gather_output(self, node: fx.Node, sel) -> None:
        dims = [d for d, s in enumerate(sel) if s is not None]
        if not dims:
            self.state[node.name] = SLIM
            return
        name = self.add_module("gather", GatherChannels(dims, [sel[d] for d in dims]))
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self.state[new.name] = SLIM
        self.origin[new.name] = node.name

    def add_module(self, kind: str, module: nn.Module) -> str:
        name = f"slim_{kind}_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, module)
        return name

    # ---- literal sizes of shape ops
    def rewrite(self, node: fx.Node, state: str) -> bool:
        target = node.target if node.op != "call_module" else None
        fn = _REWRITES.get(target if node.op == "call_function" else ("method", target))
        if fn is None:
            return False
        return fn(self, node, state) is not False

    def out_sizes(self, node: fx.Node, state: str, index: int | None = None) -> list:
        """Per output dim: the new size where it names channels the plan changes, else None."""
        ids = self.ids(node, index)
        v = self.graph.values[node.name]
        shape = tuple((v[index] if index is not None else v).shape)
        sel = self.plan.selection(ids, shape) if isinstance(ids, torch.Tensor) else None
        out = []
        for d in range(len(shape)):
            varies = isinstance(ids, torch.Tensor) and ids.size(d) > 1
            if not varies:
                out.append(None)
            elif state == FULL:
                out.append(shape[d])
            elif sel is None:
                raise PlanError(f"'{node.name}': no regular layout")
            else:
                out.append(shape[d] if sel[d] is None else len(sel[d]))
        return out

    def input_selection(self, node: fx.Node, dim: int) -> np.ndarray | None:
        x = node.args[0]
        sel = self.selection(x)
        if sel is None:
            return None
        return sel[dim % len(sel)]

    # ---- module attributes
    def fix_module(self, node: fx.Node) -> None:
        if node.target in self.fixed_modules:
            return
        self.fixed_modules.add(node.target)
        m = self.gm.get_submodule(node.target)
        for cls, fix in _MODULE_FIXES:
            if isinstance(m, cls):
                fix(self, node, m)
                return


def _slim_width(rw: _Rewriter, arg: fx.Node, dim: int) -> int:
    shape = rw.shape(arg)
    sel = rw.selection(arg)
    if sel is None or sel[dim % len(shape)] is None:
        return shape[dim % len(shape)]
    return len(sel[dim % len(shape)])


def _fix_conv(rw: _Rewriter, node, m: nn.modules.conv._ConvNd) -> None:
    old = rw.graph.module.get_submodule(node.target)
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
    m.num_features = _slim_width(rw, node.args[0], 1)


def _fix_group_norm(rw, node, m: nn.GroupNorm) -> None:
    old = rw.graph.module.get_submodule(node.target)
    m.num_channels = _slim_width(rw, node.args[0], 1)
    m.num_groups = m.num_channels // (old.num_channels // old.num_groups)


def _fix_layer_norm(rw, node, m: nn.LayerNorm) -> None:
    m.normalized_shape = (_slim_width(rw, node.args[0], -1),)


def _fix_prelu(rw, node, m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


def _fix_attention(rw, node, m: nn.MultiheadAttention) -> None:
    owner_name, _, attr = node.target.rpartition(".")
    setattr(rw.gm.get_submodule(owner_name), attr, PrunedMultiheadAttention.from_module(m))


def _fix_pruned_attention(rw, node, m: PrunedMultiheadAttention) -> None:
    m.num_heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape


_MODULE_FIXES: list[tuple[type, Callable]] = [
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.Linear, _fix_linear),
    (nn.modules.batchnorm._NormBase, _fix_batch_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.PReLU, _fix_prelu),
    (nn.MultiheadAttention, _fix_attention),
    (PrunedMultiheadAttention, _fix_pruned_attention),
]


# --------------------------------------------------------------------------- shape-op rewrites


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


def _rewrite_view(rw: _Rewriter, node, state) -> None:
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
    if state == FULL:
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
        elif not isinstance(item, (int, slice)):
            return False  # a tensor index: only the full layout knows
        new.append(item)
        d += 1
    node.args = (x, tuple(new) if len(new) != 1 else new[0])
    return None


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
    new = tuple(_slim_width(rw, x, d) for d in range(rank - k, rank))
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
    new = given * _slim_width(rw, x, 1) // old
    if len(node.args) > 1:
        node.args = (x, new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new}


# Functions (not layout ops) with literal arguments that name channel counts.
_FUNCTION_FIXES: dict[Any, Callable] = {
    F.layer_norm: _fix_functional_layer_norm,
    torch.layer_norm: _fix_functional_layer_norm,
    F.group_norm: _fix_functional_group_norm,
    torch.group_norm: _fix_functional_group_norm,
}


_REWRITES: dict[Any, Callable] = {
    torch.reshape: _rewrite_view,
    ("method", "view"): _rewrite_view,
    ("method", "reshape"): _rewrite_view,
    ("method", "expand"): _rewrite_expand,
    ("method", "unflatten"): _rewrite_unflatten,
    torch.unflatten: _rewrite_unflatten,
    torch.split: _rewrite_split,
    ("method", "split"): _rewrite_split,
    ("method", "split_with_sizes"): _rewrite_split,
    torch.chunk: _rewrite_chunk,
    ("method", "chunk"): _rewrite_chunk,
    operator.getitem: _rewrite_getitem,
    torch.narrow: _rewrite_narrow,
    ("method", "narrow"): _rewrite_narrow,
    torch.select: _rewrite_select,
    ("method", "select"): _rewrite_select,
    F.pad: _rewrite_pad,
}


# --------------------------------------------------------------------------- 4. check


def _check_shapes(gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan) -> None:
    """Every surviving node of the original must have the shape the plan predicts."""
    inputs = [graph.values[n.name] for n in graph.module.graph.nodes if n.op == "placeholder"]
    try:
        values = _propagate_meta(gm, tuple(inputs))
    except Exception as exc:  # noqa: BLE001 - say which plan broke which op
        raise PlanError(f"the slimmed model does not run: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}") from exc
    infos = {i.name: i for i in graph.nodes}
    for node in gm.graph.nodes:
        info = infos.get(node.name)
        got = values.get(node.name)
        if info is None or not isinstance(got, torch.Tensor) or \
                not isinstance(info.ids, torch.Tensor):
            continue
        want = plan.slim_shape(info.ids, tuple(graph.values[node.name].shape))
        if want is not None and tuple(got.shape) != want and \
                not any(u.op == "call_module" and u.target.startswith("slim_gather")
                        for u in node.users):
            raise PlanError(f"slim pass bug: '{node.name}' has shape {tuple(got.shape)}, "
                            f"the plan says {want}")


__all__ = ["slim", "ScatterChannels", "GatherChannels"]
