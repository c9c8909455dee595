"""The slim pass: a keep plan in, a really smaller `torch.fx.GraphModule` out.

Steps, on a deep copy of the traced model (the original is never touched):
1. slice every parameter and buffer along the dims the analysis bound to channels;
2. remove the branches whose groups keep nothing: a residual add becomes its other operand,
   a concat loses that input (or, where the plan still keeps its channels because an add
   after the concat produces them too, gets zeros in their place), and the dead nodes go;
   an idempotent op now applied to its own kind's output (relu(x + branch) with the branch
   gone and x a ReLU's output) is dropped (`Rule.idempotent`);
3. walk the graph and fix what still names a width, as each node's rule says (`Rule.fix`:
   module attributes such as `in_channels`, `groups` of a grouped conv, `normalized_shape`,
   pruned attention modules; `Rule.slim`: literal sizes of shape ops such as view, reshape,
   unflatten, split, chunk, slices, narrow, pad);
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

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphsearch.graph import ChannelGraph, PlanError
from graphsearch.rules.layout import ZeroChannels
from graphsearch.passes.plan import Keep, ResolvedPlan, resolve
from graphsearch.trace import propagate_shapes


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
    _drop_repeated(gm, graph)
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
    for name, b in graph.bindings.items():
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        t = getattr(owner, attr)
        new = t.detach()
        dims = _kept_dims(plan, name, b, tuple(t.shape))
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


def _kept_dims(plan: ResolvedPlan, name: str, b, shape: tuple) -> dict[int, np.ndarray]:
    """The kept indices along each sliced dim of tensor `name` (binding `b`, full `shape`)."""
    if b.ids is not None:
        sel = plan.selection(b.ids, shape)
        if sel is None:
            raise PlanError(f"parameter '{name}': the kept channels are no regular slice")
        return {d: s for d, s in enumerate(sel) if s is not None}
    dims = {d: np.flatnonzero(plan.kept(torch.from_numpy(line)).numpy())
            for d, line in b.dims.items()}
    return {d: idx for d, idx in dims.items() if len(idx) < shape[d]}


def unslim_state(graph: ChannelGraph, keep: Keep | None, slim_state: dict,
                 like: dict | None = None) -> dict[str, torch.Tensor]:
    """The inverse of slicing the weights: full-architecture tensors (names, shapes and dtypes
    of `like`, default the traced model's state) holding `slim_state`'s values (the state of
    `slim(graph, keep, ...)`, e.g. after training it) at the kept positions and zeros at the
    dropped ones; the tensors of modules the plan removed entirely are zeros. So
    `slim(graph, keep, unslim_state(graph, keep, s))` has exactly the weights `s`, and the
    full model computes the slim one wherever a dropped channel's zero weights give a zero
    output (a norm with zero gamma and beta, a producer with zero rows and bias)."""
    plan = resolve(graph, keep)
    like = graph.module.state_dict() if like is None else like
    owners = {k.rpartition(".")[0] for k in slim_state}
    out: dict[str, torch.Tensor] = {}
    for name, t in like.items():
        if not isinstance(t, torch.Tensor):
            continue
        b = graph.bindings.get(name)
        dims = _kept_dims(plan, name, b, tuple(t.shape)) if b is not None else {}
        if name not in slim_state:
            if name.rpartition(".")[0] in owners:
                raise PlanError(f"'{name}' is missing from the slim model's state, its module "
                                "is not: the slim tensor cannot be mapped back")
            out[name] = torch.zeros_like(t)
            continue
        src = slim_state[name].detach().to(t.device, t.dtype)
        want = tuple(len(dims[d]) if d in dims else int(n) for d, n in enumerate(t.shape))
        if tuple(src.shape) != want:
            raise PlanError(f"'{name}': slim shape {tuple(src.shape)}, expected {want} from the "
                            "plan; the slim tensor cannot be mapped back")
        for d, idx in dims.items():  # widen one dim at a time, zeros at the dropped positions
            shape = list(src.shape)
            shape[d] = t.shape[d]
            wide = torch.zeros(shape, dtype=src.dtype, device=src.device)
            src = wide.index_copy_(d, torch.as_tensor(idx, dtype=torch.long,
                                                      device=src.device), src)
        out[name] = src.clone() if not dims else src
    return out


# --------------------------------------------------------------------------- 2. dead branches


def _remove_dead(gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan) -> None:
    if not plan.dead:
        return
    gone = set(plan.dead)
    for node in list(gm.graph.nodes):
        if node.name in gone:
            continue
        dead_inputs = [a for a in node.all_input_nodes if a.name in gone]
        if not dead_inputs:
            continue
        dead = graph.info(node.name).dead  # the rule's: a residual add, a concat drop it
        if dead.rewrite is None:
            raise PlanError(f"'{node.name}' reads the removed '{dead_inputs[0].name}'")
        dead.rewrite(gm, graph, plan, node, gone)
    for node in reversed(list(gm.graph.nodes)):
        if node.name in gone:
            if node.users:
                raise PlanError(f"removed node '{node.name}' is still used by "
                                f"{[u.name for u in node.users]}")
            gm.graph.erase_node(node)


def _drop_repeated(gm: fx.GraphModule, graph: ChannelGraph) -> None:
    """An idempotent op (`Rule.idempotent`) applied to the output of an op of the same rule is
    the identity: its uses read the first op's output. A removed residual branch leaves one
    (relu(x + branch) becomes relu(x), x a ReLU's output); each is an op onnxruntime runs."""
    for node in list(gm.graph.nodes):
        rule = graph.rule(node.name) if node.op.startswith("call_") else None
        if rule is None or not rule.idempotent or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and src.op.startswith("call_") and src.args and \
                getattr(graph.rule(src.name), "identity", False):
            src = src.args[0]  # a shortcut written as nn.Identity()
        if isinstance(src, fx.Node) and src.op.startswith("call_") and \
                graph.rule(src.name) is rule:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)


# --------------------------------------------------------------------------- 3. rewrites

SLIM, FULL = "slim", "full"

class _Rewriter:
    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan,
                 sliced: set[str] = frozenset()) -> None:
        self.gm, self.graph, self.plan = gm, graph, plan
        self.sliced = sliced  # modules whose parameters were sliced (attention heads)
        self.state: dict[str, str] = {}
        self.fixed_modules: set[str] = set()
        self.count = 0
        self.origin: dict[str, str] = {}  # inserted scatter/gather node -> original node

    # ---- what the analysis knows of a node
    def ids(self, node: fx.Node, index: int | None = None):
        info = self.graph.info(self.origin.get(node.name, node.name))
        ids = info.ids if info is not None else None
        if index is not None and isinstance(ids, (tuple, list)):
            ids = ids[index]
        if ids is None and node.op == "get_attr":
            b = self.graph.bindings.get(node.target)
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
            if kind == "rewrite" and not touched:
                # sizes computed from other tensors' shapes (`B, N, C = x.shape` then
                # `reshape(B, N, 3, heads, C // heads)`): C may have changed even where this
                # op's own channels did not; its rewrite writes the widths it must have
                touched = any(isinstance(a, fx.Node) and not isinstance(self.value(a), torch.Tensor)
                              for a in node.all_input_nodes)
            if kind is None:
                if full_in:
                    raise PlanError(f"'{node.name}' reads channels that the plan leaves in no "
                                    "regular layout (keep equal counts across the shuffle)")
                if touched:
                    self.fix(node)
                self.state[node.name] = SLIM
                continue
            if not touched:
                self.state[node.name] = SLIM
                continue
            self.layout(node, kind, full_in)

    def layout_kind(self, node: fx.Node) -> str | None:
        """The rule's `slim` field: "free", "full", "rewrite" (a function), or None."""
        rule = self.graph.rule(node.name)
        kind = rule.slim if rule is not None else None
        if kind is None or isinstance(kind, str):
            return kind
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
        return self.graph.rule(node.name).slim(self, node, state) is not False

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

    # ---- what still names a width: module attributes, functional ops' literal sizes
    def fix(self, node: fx.Node) -> None:
        rule = self.graph.rule(node.name)
        if rule is None or rule.fix is None:
            return
        m = None
        if node.op == "call_module":
            if node.target in self.fixed_modules:
                return
            self.fixed_modules.add(node.target)
            m = self.gm.get_submodule(node.target)
        rule.fix(self, node, m)

    def original(self, target: str) -> nn.Module:
        """The module `target` of the traced original (before slicing)."""
        return self.graph.module.get_submodule(target)

    def slim_width(self, arg: fx.Node, dim: int) -> int:
        """The width of `arg` along `dim` in the slim model."""
        shape = self.shape(arg)
        sel = self.selection(arg)
        if sel is None or sel[dim % len(shape)] is None:
            return shape[dim % len(shape)]
        return len(sel[dim % len(shape)])


# --------------------------------------------------------------------------- 4. check


def _check_shapes(gm: fx.GraphModule, graph: ChannelGraph, plan: ResolvedPlan) -> None:
    """Every surviving node of the original must have the shape the plan predicts."""
    inputs = [graph.values[n.name] for n in graph.module.graph.nodes if n.op == "placeholder"]
    try:
        if graph.shape_mode == "meta":
            values = propagate_shapes(gm, tuple(inputs), graph.rules)
        else:  # some op has no meta kernel (the analysis paid a real pass too): zeros in
            zeros = tuple(torch.zeros(t.shape, dtype=t.dtype) for t in inputs)
            values = propagate_shapes(gm, zeros, graph.rules, real=True)
    except Exception as exc:  # noqa: BLE001 - say which plan broke which op
        raise PlanError(f"the slimmed model does not run: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}") from exc
    for node in gm.graph.nodes:
        info = graph.info(node.name)
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


__all__ = ["slim", "unslim_state", "ScatterChannels", "GatherChannels", "ZeroChannels"]
