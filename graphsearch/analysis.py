"""Analysis: walk the traced graph once, applying each node's rule to channel ids.

The `Context` is the small API that rules use (ids of an argument, tie, bind a parameter
dimension, count MACs). `analyze` runs the rules and hands the result to `build.build_graph`,
which turns atoms into groups, members and a cost model: a `graph.ChannelGraph`.
"""

from __future__ import annotations

import contextlib
import gc
import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import SUPPORTED_NODES, tree_leaves, tree_map

from . import rules as R
from .atoms import NO_ATOM, AtomTable
from .build import build_graph
from .graph import Binding, ChannelGraph, MacTerm, NodeInfo, Space
from .errors import UserError
from .export_trace import trace_model
from .trace import REAL_MACS, Traced


class Context:
    def __init__(self, traced: Traced, rules: R.Rules | None = None) -> None:
        self.traced = traced
        self.rules = rules if rules is not None else R.default_rules()
        self.rule: R.Rule | None = None  # the rule being applied
        self._batch: int | None = None
        self.gm = traced.module
        self.atoms = AtomTable()
        self.modules = dict(self.gm.named_modules())
        # every name of a tied weight (an exported graph may read it by either)
        self.params = dict(self.gm.named_parameters(remove_duplicate=False))
        self.buffers = dict(self.gm.named_buffers(remove_duplicate=False))
        self.node_ids: dict[str, Any] = {}
        self.spaces: list[Space] = []
        self.bindings: dict[str, Binding] = {}
        self.macs_terms: list[MacTerm] = []
        self.node = None
        self.module = None

    # ------------------------------------------------------------------ values and shapes
    def value(self, arg: Any) -> Any:
        return self.traced.values[arg.name] if isinstance(arg, fx.Node) else arg

    def shape(self, arg: Any) -> tuple:
        v = self.value(arg)
        return tuple(v.shape)

    def shape_of_value(self, node: fx.Node, index: int):
        v = self.value(node)
        return tuple(v[index].shape) if isinstance(v, (tuple, list)) and \
            isinstance(v[index], torch.Tensor) else None

    def param_name(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and \
                (arg.target in self.params or arg.target in self.buffers):
            return arg.target
        return None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        flat = _leaves((node.args, node.kwargs))
        return [a for a in flat if isinstance(a, fx.Node) and
                isinstance(self.value(a), torch.Tensor)]

    def ids(self, arg: Any) -> torch.Tensor | None:
        """Channel ids of an argument (current class representatives), or None if no tensor."""
        if not isinstance(arg, fx.Node):
            return None
        if arg.name not in self.node_ids and arg.op == "get_attr":
            self.node_ids[arg.name] = self._parameter_ids(arg)
        ids = self.node_ids.get(arg.name)
        if ids is None:
            v = self.value(arg)
            return torch.full((1,) * v.dim(), NO_ATOM) if isinstance(v, torch.Tensor) else None
        if isinstance(ids, torch.Tensor):
            return self.find_ids(ids)
        return tuple(self.find_ids(i) if isinstance(i, torch.Tensor) else i for i in ids)

    def _parameter_ids(self, arg: fx.Node) -> torch.Tensor | None:
        """A parameter used as a tensor (class token, positional embedding) gets own atoms."""
        v = self.value(arg)
        if not isinstance(v, torch.Tensor):
            return None
        if not (v.is_floating_point() or v.is_complex()):  # indices (position ids): no channels
            return torch.full((1,) * v.dim(), NO_ATOM)
        shape = tuple(v.shape)
        compressed = tuple(s if s > 1 else 1 for s in shape)
        atoms = self.atoms.fresh(math.prod(compressed))
        self.spaces.append(Space(arg.name, "parameter", atoms))
        ids = torch.from_numpy(atoms).reshape(compressed)
        b = self._binding(arg.target)
        b.ids = ids
        b.nodes.append(arg.name)
        return ids

    # ------------------------------------------------------------------ atoms
    def find(self, atoms) -> np.ndarray:
        return self.atoms.find(_np(atoms))

    def find_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.atoms.find(ids.numpy()).reshape(ids.shape))

    def fresh(self, n: int, kind: str) -> np.ndarray:
        atoms = self.atoms.fresh(n)
        self.spaces.append(Space(self.node.name, kind, atoms))
        return atoms

    def fresh_ids(self, n: int, dim: int, rank: int, kind: str) -> torch.Tensor:
        shape = [1] * rank
        shape[dim] = n
        return torch.from_numpy(self.fresh(n, kind)).reshape(shape)

    def fix(self, ids, reason: str) -> None:
        if ids is not None:
            self.atoms.fix(_np(ids), reason)

    def fix_apart(self, ids, reason: str) -> None:
        """Fix these channels as a group of their own, apart from the rest of the spaces
        that made them (`AtomTable.fix_apart`)."""
        if ids is not None:
            self.atoms.fix_apart(_np(ids), reason)

    def tie(self, a, b) -> None:
        """Tie a and b elementwise, after broadcasting them against each other."""
        ta, tb = _np(a), _np(b)
        if ta.shape != tb.shape:
            ta, tb = np.broadcast_arrays(ta, tb)
        self.atoms.union(ta, tb)

    def tie_along(self, ids: torch.Tensor, dim: int) -> None:
        """Tie all entries along `dim`, separately for every position of the other dims."""
        rows = ids.movedim(dim, -1).reshape(-1, ids.size(dim)).numpy()
        if rows.shape[1] > 1:
            self.atoms.union(rows[:, :-1], rows[:, 1:])

    def tie_blocks(self, line, blocks: int) -> None:
        """Tie each of `blocks` consecutive equal slices of a channel line into one unit."""
        rows = _np(line).reshape(blocks, -1)
        if rows.shape[1] > 1:
            self.atoms.union(rows[:, :-1], rows[:, 1:])

    def tie_group_blocks(self, line_in, line_out, groups: int) -> None:
        """Grouped conv: input block k and output block k become one unit."""
        rows = np.concatenate([_np(line_in).reshape(groups, -1),
                               _np(line_out).reshape(groups, -1)], axis=1)
        self.atoms.union(rows[:, :-1], rows[:, 1:])

    @staticmethod
    def compress(ids: torch.Tensor) -> torch.Tensor:
        """Canonical ids (see `compress`)."""
        return compress(ids)

    @staticmethod
    def repeat(atoms, times: int) -> np.ndarray:
        return np.repeat(_np(atoms), times)

    # ------------------------------------------------------------------ lines
    def line(self, ids: torch.Tensor | None, dim: int, arg: Any) -> np.ndarray:
        """The atom of every index along `dim`; identity varying along other dims is tied in."""
        shape = self.shape(arg) if not isinstance(arg, tuple) else arg
        size = shape[dim]
        if ids is None:
            return np.full(size, NO_ATOM, dtype=np.int64)
        dim = dim % ids.dim()
        if any(ids.size(d) > 1 for d in range(ids.dim()) if d != dim):
            rows = ids.movedim(dim, 0).reshape(ids.size(dim), -1)
            self.tie_along(rows, 1)
            ids = self.find_ids(rows.contiguous())[:, 0]
        else:
            ids = ids.reshape(-1)
        return np.ascontiguousarray(np.broadcast_to(ids.numpy(), (size,)))

    def channel_ids(self, line, node: fx.Node | None, dim: int = 1, rank: int | None = None):
        """Ids for an output whose channels along `dim` are `line` (broadcast elsewhere)."""
        rank = rank if rank is not None else len(self.shape(node))
        shape = [1] * rank
        shape[dim] = -1
        return torch.from_numpy(np.array(_np(line), dtype=np.int64)).reshape(shape)

    def no_channels(self, node: fx.Node) -> torch.Tensor:
        return torch.full((1,) * len(self.shape(node)), NO_ATOM)

    @staticmethod
    def varies_along(ids: torch.Tensor, dim: int) -> bool:
        return ids.size(dim) > 1

    # ------------------------------------------------------------------ costs
    def _binding(self, name: str) -> Binding:
        if name not in self.bindings:
            self.bindings[name] = Binding(name, name in self.buffers)
        return self.bindings[name]

    def bind(self, name: str, dim: int, line, role: str | None = None) -> None:
        """Parameter `name` is sliced along `dim` with the channel of every index in `line`."""
        b = self._binding(name)
        line = _np(line).copy()
        if dim in b.dims:
            self.atoms.union(b.dims[dim], line)  # a shared weight: both uses must agree
        else:
            b.dims[dim] = line
        if role:
            b.roles[dim] = role
        if self.node is not None and self.node.name not in b.nodes:
            b.nodes.append(self.node.name)

    def macs(self, coeff: float, *layouts, why: str = "") -> None:
        """MACs = coeff * product over layouts of their kept positions (per sample)."""
        resolved = []
        for lay in layouts:
            if isinstance(lay, tuple):
                ids, real = lay
                resolved.append((ids.reshape(-1).numpy().copy(), math.prod(real) / ids.numel()))
            else:
                resolved.append((_np(lay).copy(), 1.0))
        self.macs_terms.append(MacTerm(float(coeff), resolved, self.node.name, why))

    def count_macs(self, node: fx.Node) -> float:
        """MACs per sample of an op no rule sees into, counted for real (torch's FLOP counter
        on zeros of the recorded shapes: matmuls, convolutions, attention); 0 if it cannot
        run alone."""
        if node.op != "call_module" and all(
                _plain(self.value(a) if isinstance(a, fx.Node) else a)
                for a in _leaves((node.args, node.kwargs))):
            return 0.0  # no tensor in, none computed (`c // groups` on sizes): no MACs
        if REAL_MACS in node.meta:  # it reads values: zeros may not take the example's branch
            return node.meta[REAL_MACS] / max(self.batch, 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        def real(a):
            if isinstance(a, fx.Node):
                if a.op == "get_attr":
                    return self.gm.get_parameter(a.target) if a.target in self.params else \
                        self.gm.get_buffer(a.target) if a.target in self.buffers else None
                v = self.value(a)
                return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype)
                                if isinstance(t, torch.Tensor) else t, v)
            if isinstance(a, (list, tuple)):
                return type(a)(real(x) for x in a)
            if isinstance(a, dict):
                return {k: real(x) for k, x in a.items()}
            return a

        try:
            args, kwargs = real(node.args), real(node.kwargs)
            counter = FlopCounterMode(display=False)
            # grad on and attention's math kernel: torch's fused paths, which the counter
            # does not see, stay off
            with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                if node.op == "call_module":
                    self.modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    node.target(*args, **kwargs)
                elif node.op == "call_method":
                    getattr(args[0], node.target)(*args[1:], **kwargs)
            flops = counter.get_total_flops()
        except Exception:  # noqa: BLE001 - an op that cannot run alone stays uncounted
            return 0.0
        return flops / 2 / max(self.batch, 1)

    @property
    def batch(self) -> int:
        """Samples in the example inputs (MACs are per sample): dim 0 of the first input."""
        if self._batch is None:
            self._batch = 1
            for n in self.gm.graph.nodes:
                if n.op == "placeholder":
                    v = self.value(n)
                    if isinstance(v, torch.Tensor) and v.dim():
                        self._batch = max(int(v.shape[0]), 1)
                    break
        return self._batch

    # ------------------------------------------------------------------ generic behaviours
    def elementwise(self, node: fx.Node, operands: list | None = None) -> torch.Tensor:
        """Broadcasting elementwise op: positions that meet are tied; the result keeps them.

        An operand broadcast along a dim where another operand carries channels (a spatial
        attention map times a feature map) cannot follow those channels: it is not pruned.
        Channels count as carried along a dim only where they differ along it as tied so far:
        a per-head statistic (an RMSNorm over head_dim, whose mean tied each head's dims into
        one unit) broadcast along head_dim meets one unit per head, which a plan keeps or
        drops whole, and is accepted; broadcast across dims a plan may cut inside the unit,
        it is refused, with the operand and the dim in the reason.
        """
        out_shape = self.shape(node)
        rank = len(out_shape)
        args = operands if operands is not None else self.tensor_args(node)
        items = []
        for a in args:
            ids = self.ids(a)
            if ids is None:
                continue
            real = (1,) * (rank - ids.dim()) + self.shape(a)
            # canonical (`compress`): a dim along which the current classes are constant
            # carries no channel of its own
            ids = compress(ids.reshape((1,) * (rank - ids.dim()) + tuple(ids.shape)))
            items.append((ids, real, a))
        if not items:
            return self.no_channels(node)
        varying = [{d for d in range(rank) if i.size(d) > 1} for i, _, _ in items]
        kept = []
        for k, (ids, real, a) in enumerate(items):
            broadcast = {d for d in range(rank) if real[d] == 1 and out_shape[d] > 1}
            others = set().union(*(v for j, v in enumerate(varying) if j != k))
            if broadcast & others:
                self.fix(ids, self._broadcast_reason(node, a, varying[k], broadcast & others))
            else:
                kept.append(ids)
        if not kept:
            return self.opaque_output(node, f"broadcast across channels at '{node.name}'")
        for other in kept[1:]:
            self.tie(kept[0], other)
        out = torch.broadcast_tensors(*kept)[0] if len(kept) > 1 else kept[0]
        # Where the first operand has no atom (a constant), take the next one's.
        for other in kept[1:]:
            other = torch.broadcast_to(other, out.shape)
            out = torch.where(out >= 0, out, other)
        return compress(self.find_ids(out.contiguous()))

    @staticmethod
    def _broadcast_reason(node: fx.Node, operand, own: set, across: set) -> str:
        """Why an operand broadcast across another's channels is kept; one with channels of
        its own along other dims (a value per head) names them and the dim it meets."""
        why = f"broadcast across channels at '{node.name}'"
        if not own:
            return why
        name = operand.name if isinstance(operand, fx.Node) else "an operand"
        return (f"{why}: '{name}' (channels along dim {', '.join(map(str, sorted(own)))}) "
                f"is broadcast along dim {min(across)}, where another operand's channels are "
                f"not one unit (a plan may cut them apart)")

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Output identity made of two operands' identities (tied where both have atoms)."""
        ta, tb = torch.broadcast_tensors(a, b)
        both = (ta >= 0) & (tb >= 0)
        if both.any():
            self.atoms.union(ta[both].numpy(), tb[both].numpy())
        out = torch.where(ta >= 0, ta, tb)
        return compress(self.find_ids(out.contiguous()))

    def run_on_ids(self, node: fx.Node, method: str | None = None, fn=None):
        """Apply a layout op (view, permute, cat, split, slicing...) to the ids themselves;
        `method`: the tensor method to call instead of a call_method node's own; `fn`: the
        function to run instead of a call_function node's own (ATen's view: a reshape)."""

        def sub(a):
            if isinstance(a, fx.Node):
                v = self.value(a)
                if isinstance(v, torch.Tensor):
                    ids = self.ids(a)
                    return ids.expand(v.shape)
                return v
            if isinstance(a, (list, tuple)):
                return type(a)(sub(x) for x in a)
            if isinstance(a, dict):
                return {k: sub(x) for k, x in a.items()}
            if isinstance(a, slice):  # x[:, :h] with h computed from a shape
                return slice(sub(a.start), sub(a.stop), sub(a.step))
            return a

        args, kwargs = sub(node.args), sub(node.kwargs)
        if fn is not None:
            out = fn(*args, **kwargs)
        elif node.op == "call_function":
            out = node.target(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], method or node.target)(*args[1:], **kwargs)
        else:
            out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return compress(out)
        return tuple(compress(o) if isinstance(o, torch.Tensor) else o for o in out)

    def opaque_output(self, node: fx.Node, reason: str):
        """Fresh, unprunable channels for the output(s) of an op the analysis cannot see into."""
        v = self.value(node)

        # Give the output its own channels along the dim where the input carried them, so
        # that a later add with that input ties channel to channel, not everything to one.
        carried = [d for a in self.tensor_args(node) if (i := self.ids(a)) is not None
                   for d in range(i.dim()) if i.size(d) > 1]

        def make(t):
            if not isinstance(t, torch.Tensor):
                return None
            if t.dim() == 0:
                return torch.full((), NO_ATOM)
            dim = 1 if t.dim() >= 2 else 0
            if len(set(carried)) == 1 and carried[0] < t.dim():
                dim = carried[0]
            ids = self.fresh_ids(t.shape[dim], dim, t.dim(), "opaque")
            self.fix(ids, reason)
            return ids

        if isinstance(v, (tuple, list)):
            return tuple(make(t) for t in v)
        return make(v)


_SEQUENCES = frozenset({tuple, list, fx.immutable_collections.immutable_list})
_MAPPINGS = frozenset({dict, fx.immutable_collections.immutable_dict})
_LEAVES = frozenset({fx.Node, int, float, bool, str, type(None), slice, type(Ellipsis),
                     torch.dtype, torch.device, torch.memory_format, torch.layout})


def _leaves(tree, out: list | None = None) -> list:
    """`tree_flatten(tree)[0]` (the same leaves, in the same order), without building a spec:
    the containers of fx arguments are walked here, anything else is left to pytree."""
    out = [] if out is None else out
    t = type(tree)
    if t in _SEQUENCES and t in SUPPORTED_NODES:
        for x in tree:
            _leaves(x, out)
    elif t in _MAPPINGS and t in SUPPORTED_NODES:
        for x in tree.values():
            _leaves(x, out)
    elif t in _LEAVES and t not in SUPPORTED_NODES:
        out.append(tree)
    else:
        out.extend(tree_leaves(tree))
    return out


_PLAIN = frozenset({int, float, bool, str, type(None)})


def _plain(v) -> bool:
    """A Python number, string or None, or a tuple, list, torch.Size or slice of them."""
    t = type(v)
    if t in _PLAIN:
        return True
    if t in (tuple, list, torch.Size):
        return all(_plain(x) for x in v)
    if t is slice:
        return _plain(v.start) and _plain(v.stop) and _plain(v.step)
    return False


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.numpy()
    return np.asarray(x, dtype=np.int64)


def compress(t: torch.Tensor) -> torch.Tensor:
    """Canonical ids: every dim along which the ids are constant shrinks to size 1."""
    for d in range(t.dim()):
        if t.size(d) > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    for d in range(t.dim()):
        if t.size(d) > 1 and bool((t == t.narrow(d, 0, 1)).all()):
            t = t.narrow(d, 0, 1)
    return t.contiguous()


def analyze(model: torch.nn.Module, example_inputs, rules: R.Rules | None = None
            ) -> ChannelGraph:
    """Trace `model` and build its channel graph: coupled channel groups and a cost model.

    `rules` (default: `graphsearch.rules.default_rules()`) says what each op ties, costs and
    how the passes rewrite it; extend a copy with rules for your own modules."""
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"analyze: the model is a {type(model).__name__}, not a "
                        "torch.nn.Module (a model.py: graphsearch.load.load_model(path).model)")
    with _collector_paused():
        return _analyze(model, example_inputs, rules)


@contextlib.contextmanager
def _collector_paused():
    """Python's cycle collector off while the analysis runs. An analysis makes and drops
    tens of thousands of short-lived objects (fx nodes, proxies, meta tensors, dicts) that
    survive a young collection while still in use, so they count as long-lived; enough of
    them start a full collection, which walks every object of the process (torch's and the
    user's: about 0.3 s under torch and torchvision, more than the analysis itself). Off,
    they are freed by reference counts; what cycles remain (the fx graph) go in the next
    young collection after it, which sees only the objects made since."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _analyze(model: torch.nn.Module, example_inputs, rules: R.Rules | None) -> ChannelGraph:
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    rules = rules if rules is not None else R.default_rules()
    traced = trace_model(model, tuple(example_inputs), rules)
    ctx = Context(traced, rules)
    infos: list[NodeInfo] = []
    for node in traced.module.graph.nodes:
        ctx.node = node
        ctx.module = ctx.modules.get(node.target) if node.op == "call_module" else None
        info = _apply(ctx, node, traced)
        node.meta["channels"] = info
        infos.append(info)
    ctx.node = None
    for constrain in traced.constraints:  # widths a config must be able to state
        constrain(ctx)
    return build_graph(traced, ctx, infos, rules)


def _producers(ctx: Context, node: fx.Node) -> list[str]:
    """Producers of tensor arguments, including tuples of tensors (chunk, split, attention):
    a getitem on a dead chunk dies with it."""
    flat = _leaves((node.args, node.kwargs))
    out = []
    for a in flat:
        if not isinstance(a, fx.Node) or a.op == "get_attr":
            continue
        v = ctx.value(a)
        if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and
                                           any(isinstance(t, torch.Tensor) for t in v)):
            out.append(a.name)
    return out


def _apply(ctx: Context, node: fx.Node, traced: Traced) -> NodeInfo:
    inputs = _producers(ctx, node)
    if node.op == "placeholder":
        v = ctx.value(node)
        ids = None
        if isinstance(v, torch.Tensor):
            dim = 1 if v.dim() >= 2 else 0
            ids = ctx.fresh_ids(v.shape[dim], dim, v.dim(), "input") if v.dim() else \
                torch.from_numpy(ctx.fresh(1, "input")).reshape(())
            ctx.fix(ids, f"model input '{node.name}'")
        ctx.node_ids[node.name] = ids
        return NodeInfo(node.name, "input", "none", R.PASS, [], ids)
    if node.op == "get_attr":
        return NodeInfo(node.name, "parameter", "none", R.PASS, [], None)
    if node.op == "output":
        for a in ctx.tensor_args(node):
            ctx.fix(ctx.ids(a), "model output")
        return NodeInfo(node.name, "output", "none", R.BLOCK, inputs, None)
    rule = ctx.rules.rule_for(node, ctx.module)
    ctx.rule = rule
    if rule is None:
        why = None
        if node.op == "call_module" and node.target in traced.untraceable:
            why = f"submodule '{node.target}' is opaque (fx: {traced.untraceable[node.target]})"
        ids = R.unsupported(ctx, node, why)
        name, edge, dead = "unsupported", "stop", R.BLOCK
    else:
        try:
            ids = rule.tie(ctx, node)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot cope stops propagation
            ids = R.unsupported(ctx, node, f"rule '{rule.name}' could not handle it "
                                           f"({type(exc).__name__}: {exc})")
            name, edge, dead, rule = "unsupported", "stop", R.BLOCK, None
        else:
            name, edge, dead = rule.name, rule.edge, rule.dead
    ctx.node_ids[node.name] = ids
    return NodeInfo(node.name, name, edge, dead, inputs, ids, rule)
