"""In-place pruning: the user's own `nn.Module` object edited to a keep plan.

`prune(model, graph, keep)` makes `model` compute what `passes.slim(graph, keep)` computes,
without replacing the model: it keeps its class, its methods, its forward hooks and its own
forward code. The slim pass is the one source of what changes: it is run first, and its
result is read back into the user's modules:

- parameters and buffers (BN running statistics included) take the slim tensors (the same
  Parameter objects, so tied weights stay tied);
- the width attributes that the rules' `fix` wrote into the slim copy of a standard layer
  (`in_channels`/`out_channels`/`groups`, `in_features`/`out_features`, `num_features`,
  `normalized_shape`, `num_channels`/`num_groups`, `embedding_dim`, ...) are set on the
  user's layer;
- a submodule the slim pass had to swap for another class (an `nn.MultiheadAttention` that
  keeps fewer heads becomes `PrunedMultiheadAttention`, its forward takes the same
  arguments) is swapped in the user's model too, its hooks moved over;
- a literal size the slim pass rewrote in a traced-through module's code (`unflatten(-1,
  (3, self.num_heads, self.head_dim))`) comes from an attribute of that module: the one int
  attribute holding the old size is set to the new one;
- a leaf module the plan removes entirely (a branch whose width went to 0) is replaced by
  `RemovedBranch`: no parameters, no MACs, it returns the zeros the mask reference computes
  there (in the slim shape), so a residual add or a concat around it still runs.

What cannot be expressed by editing modules is refused with a `UserError` naming the node,
the groups and why, before anything is touched: a size written as a literal in the forward
code (`x.view(-1, 512)`), channels kept in no regular layout (the slim pass scatters and
gathers them), a parameter used only by a removed branch outside any module. After editing,
the model is run against the slim module on `inputs` (random ones by default); any
difference, or a parameter count other than the cost model's, puts every change back and
raises.

The graph keeps describing the original architecture: it gets its own copy of the modules
it shared with `model` (fx's GraphModule holds the traced model's leaf modules themselves).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from . import hf
from .graph import ChannelGraph
from .load import UserError
from .passes.mask import verify
from .passes.plan import resolve
from .passes.slim import slim

_SIMPLE = (int, float, bool, str, tuple, list, torch.Size, type(None))
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class InPlaceError(UserError):
    """A plan that in-place pruning cannot express on this model; `groups` are the groups
    whose pruning needs what module edits cannot do (empty where unknown)."""

    def __init__(self, message: str, groups: list[int] | None = None) -> None:
        super().__init__(message)
        self.groups = list(groups or [])


class RemovedBranch(nn.Module):
    """Stands in for a module whose every output the plan removes: no parameters, no MACs.
    Returns zeros of `shape` (the slim model's shape of that value; dim 0 follows the first
    tensor argument's when it did at analysis, a batch), as the mask reference does, so the
    forward code around it (a residual add, a concat) runs unchanged."""

    def __init__(self, shape: tuple, dtype: torch.dtype, batch_from_input: bool,
                 was: str = "") -> None:
        super().__init__()
        self.shape, self.dtype, self.batch_from_input, self.was = \
            tuple(shape), dtype, batch_from_input, was

    def forward(self, *args, **kwargs):
        ref = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)),
                   None)
        shape = list(self.shape)
        if self.batch_from_input and ref is not None and ref.dim() > 0 and shape:
            shape[0] = ref.shape[0]
        # the input's float type (a model cast with .half() after pruning), else the analysed
        dtype = ref.dtype if ref is not None and ref.is_floating_point() and \
            self.dtype.is_floating_point else self.dtype
        return torch.zeros(shape, dtype=dtype, device=ref.device if ref is not None else None)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, was={self.was}"


@dataclass
class PruneResult:
    """What `prune` changed in the user's model."""

    params: int  # parameters of the pruned model (== graph.cost(keep).params + untraced ones)
    resized: list[str] = field(default_factory=list)  # modules whose tensors or widths changed
    replaced: dict[str, str] = field(default_factory=dict)  # module -> what stands there now
    attributes: dict[str, tuple] = field(default_factory=dict)  # "mod.attr" -> (old, new)
    check: str = ""  # the comparison with the slim module

    def __str__(self) -> str:
        lines = [f"{self.params:,} params; {len(self.resized)} modules resized"]
        lines += [f"  {k}: now {v}" for k, v in self.replaced.items()]
        lines += [f"  {k}: {a} -> {b}" for k, (a, b) in self.attributes.items()]
        lines.append(f"  {self.check}")
        return "\n".join(lines)


def prune(model: nn.Module, graph: ChannelGraph, keep, inputs: tuple | None = None,
          rtol: float = 1e-4) -> PruneResult:
    """Edit `model` (the module `graph` was analysed from) to the keep plan `keep` (group id
    -> kept channel indices, groups not named keep all; or a `graphsearch.target.Plan`).
    Returns what changed. `inputs`: the inputs the edited model is checked on against the
    slim module (default: random ones of the analysed shapes)."""
    keep = getattr(keep, "keep", keep)  # a Plan: its kept channels
    for gid, kept in dict(keep).items():
        if isinstance(kept, (int, np.integer)) or not hasattr(kept, "__iter__"):
            raise UserError(f"prune: group {gid} is given {kept!r}; give the kept channel "
                            f"indices (list(range({kept!r})) keeps the first channels)")
    plan = resolve(graph, keep)
    base_params = _count(model)
    untraced = base_params - graph.baseline.params
    original = graph.module
    _check_same_model(model, original)
    slim_gm = slim(graph, keep)
    _refuse_rewrites(graph, plan, original, slim_gm)
    pretrained, untraced_slices = None, {}
    if hf.is_pretrained(model):  # its config states every width; the class has the attributes
        used = {n.target for n in slim_gm.graph.nodes if n.op == "get_attr"}
        governed = hf.governed_dims(model)
        untraced_slices = _untraced_slices(model, graph, plan, governed, original)
        pretrained = hf.pretrained_edits(model, governed,
                                         {**{name: _get(slim_gm, name) for name in used},
                                          **untraced_slices})
        attributes = pretrained.attributes
        untraced -= sum(_get(model, k).numel() - t.numel() for k, t in untraced_slices.items())
    else:
        attributes = _attribute_edits(graph, plan, model, original, slim_gm)
    removed = _removed_modules(graph, plan, original)
    inputs = tuple(inputs) if inputs is not None else _random_inputs(graph)
    modes = [(m, m.training) for m in model.modules()]
    slim_gm.eval()
    with torch.no_grad():
        want = slim_gm(*inputs)
    graph.module = copy.deepcopy(original)  # the graph keeps the original architecture

    undo = _Undo()
    result = PruneResult(params=0)
    try:
        _apply_tensors_and_widths(model, original, slim_gm, undo, result)
        for name, t in untraced_slices.items():
            undo.set_data(_get(model, name), t)
            result.resized.append(name.rpartition(".")[0])
        for path, (old, new) in attributes.items():
            owner, _, attr = path.rpartition(".")
            undo.set(_get(model, owner), attr, new)
            result.attributes[path] = (old, new)
        if pretrained is not None:
            for name, value in pretrained.assign.items():
                undo.set(model.config, name, value)
            for name, (old, new) in pretrained.config.items():
                result.attributes[f"config.{name}"] = (old, new)
        for path, stand_in in removed.items():
            undo.replace(model, path, stand_in)
            result.replaced[path] = f"RemovedBranch (zeros {stand_in.shape}: the plan removes it)"
        model.eval()
        try:
            check = verify(hf.Called(model), _Constant(want), inputs, rtol=rtol)
        except Exception as exc:  # noqa: BLE001 - the user's forward does not run as edited
            raise InPlaceError(
                f"in-place pruning: {type(model).__name__}'s forward does not run once its "
                f"modules are pruned ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"some size in its code does not follow the modules{_zero_note(plan)}: the "
                "model is left as it was; use passes.slim's module") from exc
        if not check.ok:
            raise InPlaceError(
                f"in-place pruning: {type(model).__name__} pruned in place differs from the "
                f"slim module ({check.message}); some size in its forward code does not "
                f"follow the modules{_zero_note(plan)}: the model is left as it was; use "
                "passes.slim's module")
        params = _count(model)
        if params != graph.cost(plan.keep).params + untraced:
            raise RuntimeError(f"graphsearch bug: the model pruned in place has {params:,} "
                               f"params, the cost model says {graph.cost(plan.keep).params:,}"
                               + (f" (+{untraced:,} outside the traced graph)" if untraced
                                  else ""))
    except BaseException:
        undo.rollback()
        graph.module = original
        raise
    finally:
        _restore_modes(model, modes)
    result.params = params
    result.check = check.message
    return result


# --------------------------------------------------------------------------- checks


def _check_same_model(model: nn.Module, gm: fx.GraphModule) -> None:
    """Every module and tensor the graph calls must exist in `model` under the same name."""
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or _traced_constant(gm, node):
            continue
        try:
            mine, theirs = _get(model, node.target), _get(gm, node.target)
        except AttributeError:
            raise UserError(f"in-place pruning: the model has no '{node.target}', which the "
                            "graph uses; pass the model the graph was analysed from") from None
        if type(mine) is not type(theirs):
            raise UserError(f"in-place pruning: '{node.target}' is a {type(mine).__name__} in "
                            f"the model and a {type(theirs).__name__} in the graph; pass the "
                            "model the graph was analysed from")


def _refuse_rewrites(graph: ChannelGraph, plan, original: fx.GraphModule,
                     slim_gm: fx.GraphModule) -> None:
    """Nodes the slim pass inserted to move channels between layouts: no module edit can
    express them."""
    names = {n.name for n in original.graph.nodes}
    for node in slim_gm.graph.nodes:
        if node.name in names or node.op != "call_module":
            continue
        helper = type(_get(slim_gm, node.target)).__name__
        near = next((a for a in node.all_input_nodes if a.name in names), None)
        if helper == "ZeroChannels":
            near = next((u for u in node.users if u.name in names), near)
            why = ("a removed concat operand whose channels the plan keeps elsewhere (the "
                   "slim model puts zeros there)")
        else:
            why = "channels kept in no regular layout (the slim model scatters and gathers them)"
        where = near.name if near is not None else node.name
        groups = _groups_at(graph, plan, where)
        raise InPlaceError(f"in-place pruning cannot express the plan at '{where}': {why}; "
                           f"groups {groups}: keep equal counts across the shuffle or keep "
                           "those groups whole, or use passes.slim's module", groups)


def _attribute_edits(graph: ChannelGraph, plan, model: nn.Module, original: fx.GraphModule,
                     slim_gm: fx.GraphModule) -> dict[str, tuple]:
    """The literal sizes the slim pass rewrote in traced-through code, as attribute edits of
    the module whose code holds them: {"module.attr": (old, new)}. A literal no attribute
    of that module (or of a module around it) holds is refused."""
    slim_nodes = {n.name: n for n in slim_gm.graph.nodes}
    edits: dict[str, tuple] = {}
    for node in original.graph.nodes:
        new = slim_nodes.get(node.name)
        if new is None or node.op not in ("call_function", "call_method"):
            continue
        before, after = _literals(node), _literals(new)
        if before == after or len(before) != len(after):
            continue  # (operands of a removed branch dropped: RemovedBranch zeros run on)
        # Only int -> int needs an edit. A size the slim pass wrote in place of one the code
        # computes from a tensor (x.size(1) // 2), or a negative literal it wrote out (-1 of
        # a view, a dim from the end), holds in place as it is: the check run decides.
        changed = [(a, b) for a, b in zip(before, after)
                   if a != b and type(a) is int and type(b) is int and a >= 0]
        if not changed:
            continue
        for old_v, new_v in changed:
            path = _attribute_holding(model, node, old_v, new_v, edits)
            if path is None:
                raise _literal_error(graph, plan, node, new, f"no attribute of the module around it "
                                     f"holds {old_v} alone")
            if path in edits and edits[path][1] != new_v:
                raise _literal_error(graph, plan, node, new, f"'{path}' would need both "
                                     f"{edits[path][1]} and {new_v}")
            edits[path] = (old_v, new_v)
    return edits


def _attribute_holding(model: nn.Module, node: fx.Node, old: int, new: int,
                       edits: dict) -> str | None:
    """The one public int attribute equal to `old` on the innermost module around `node`
    that has any, or already chosen to become `new`."""
    for path in reversed(_module_stack(node)):
        owner = _get(model, path)
        hits = [k for k, v in vars(owner).items()
                if not k.startswith("_") and type(v) is int and v == old]
        full = [f"{path}.{k}" if path else k for k in hits]
        chosen = [p for p in full if edits.get(p, (None, None))[1] == new]
        if chosen:
            return chosen[0]
        if len(hits) == 1:
            return full[0]
        if len(hits) > 1:
            return None  # ambiguous: which one the code read cannot be told
    return None


def _literal_error(graph, plan, node: fx.Node, new: fx.Node, why: str) -> InPlaceError:
    where = _module_stack(node)
    owner = f"the forward of '{where[-1]}'" if where and where[-1] else "the model's forward"
    groups = _groups_at(graph, plan, node.name)
    return InPlaceError(
        f"in-place pruning cannot express the plan at '{node.name}' ({_target(node)} in "
        f"{owner}): its sizes {_show(node)} become {_show(new)} with groups {groups} ({why}); "
        "sizes written in the code cannot be edited: compute them from the tensor "
        "(x.flatten(1), x.shape) or an attribute of the module, or use passes.slim's module",
        groups)


def _removed_modules(graph: ChannelGraph, plan, original: fx.GraphModule) -> dict[str, nn.Module]:
    """The outermost modules all of whose nodes the plan removes, each with the
    RemovedBranch that stands in for it (one tensor out, the slim shape of the mask
    reference's zeros). Refused: a parameter used by a removed branch outside any removed
    module (it would stay in the model)."""
    if not plan.dead:
        return {}
    nodes_of: dict[str, list[fx.Node]] = {}
    for node in original.graph.nodes:
        paths = set(_module_stack(node)[1:])
        if node.op == "call_module":
            paths.add(node.target)
        for p in paths:
            nodes_of.setdefault(p, []).append(node)
    out: dict[str, nn.Module] = {}
    for path in sorted(nodes_of, key=lambda p: p.count(".")):
        if any(path.startswith(t + ".") for t in out):
            continue
        inside = nodes_of[path]
        if not all(n.name in plan.dead for n in inside):
            continue
        names = {n.name for n in inside}
        results = [n for n in inside if any(u.name not in names for u in n.users)]
        value = graph.values.get(results[0].name) if len(results) == 1 else None
        if not isinstance(value, torch.Tensor):
            continue  # (a module returning a tuple: its parent may go whole instead)
        info = graph.info(results[0].name)
        shape = plan.slim_shape(info.ids, tuple(value.shape)) if info is not None and \
            isinstance(info.ids, torch.Tensor) else tuple(value.shape)
        if shape is None:
            continue
        first = next((graph.values.get(a.name) for n in inside for a in n.all_input_nodes
                      if a.name not in names and isinstance(graph.values.get(a.name),
                                                            torch.Tensor)), None)
        batch = first is not None and first.dim() > 0 and value.dim() > 0 and \
            first.shape[0] == value.shape[0]
        out[path] = RemovedBranch(shape, value.dtype, batch,
                                  was=type(_get(original, path)).__name__)
    for node in original.graph.nodes:
        if node.name not in plan.dead or node.op not in ("get_attr", "call_module") or \
                _traced_constant(original, node):
            continue
        where = node.target if node.op == "call_module" else node.target.rpartition(".")[0]
        if not any(where == t or where.startswith(t + ".") for t in out):
            groups = _groups_at(graph, plan, node.name)
            raise InPlaceError(
                f"in-place pruning cannot remove '{node.target}': the plan removes the branch "
                f"that uses it (groups {groups} at width 0) but no module around it is removed "
                "whole (it would stay in the model, or its output is no single tensor); keep "
                "those groups above 0 or use passes.slim's module", groups)
    return out


# --------------------------------------------------------------------------- edits


def _untraced_slices(model: nn.Module, graph: ChannelGraph, plan, governed,
                     original: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face model that the traced graph never reads (DINOv2's
    `mask_token`, used only with `bool_masked_pos`) sliced where a config field states a dim
    of theirs that the plan narrows: as a traced dim that field alone states (the config
    ties keep all of them index for index), so that the model matches its pruned config
    and `from_pretrained` loads it. Tensors shared with a traced name are left to it."""
    traced = {n.target for n in original.graph.nodes if n.op == "get_attr"}
    state = model.state_dict(keep_vars=True)
    shared = {id(state[k]) for k in traced if k in state}
    stated_by: dict[str, tuple] = {}  # field -> a traced (name, dim) it alone states
    for (name, d), fields in governed.fields.items():
        b = graph.bindings.get(name)
        if len(fields) == 1 and b is not None and d in b.dims:
            stated_by.setdefault(next(iter(fields)), b.dims[d])
    out = {}
    for name, t in state.items():
        if name in traced or id(t) in shared or not isinstance(t, torch.Tensor):
            continue
        new = t.detach()
        for d in range(t.dim()):
            fields = governed.fields.get((name, d), set())
            line = stated_by.get(next(iter(fields))) if len(fields) == 1 else None
            if line is None or len(line) != t.shape[d]:
                continue
            kept = np.flatnonzero(plan.kept(torch.from_numpy(line)).numpy())
            if len(kept) < t.shape[d]:
                new = new.index_select(d, torch.as_tensor(kept, dtype=torch.long))
        if new.shape != t.shape:
            out[name] = new.clone()
    return out


def _apply_tensors_and_widths(model: nn.Module, original: fx.GraphModule,
                              slim_gm: fx.GraphModule, undo: "_Undo",
                              result: PruneResult) -> None:
    """Tensors of every module of the slim model, width attributes of its leaf modules, and
    the modules the slim pass swapped for another class."""
    leaves = {n.target for n in original.graph.nodes if n.op == "call_module"}
    swapped: list[str] = []
    for path, sm in slim_gm.named_modules():
        if any(path.startswith(p + ".") for p in swapped):
            continue  # inside a module already put in whole
        try:
            before = _get(original, path)
            mine = _get(model, path)
        except AttributeError:
            continue  # a module the slim pass added (none survive the refusal checks)
        if path and type(sm) is not type(before):  # swapped by a rule's fix (attention)
            undo.replace(model, path, sm)
            result.replaced[path] = type(sm).__name__
            result.resized.append(path)
            swapped.append(path)
            continue
        changed = False
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(sm, kind).items():
                old = getattr(mine, kind).get(name)
                if t is None or old is None or old.shape == t.shape:
                    continue
                undo.set_data(old, t.detach())
                changed = True
        if path in leaves:  # a layer the graph calls whole: its widths are attributes
            for k, v in vars(sm).items():
                if k.startswith("_") or k == "training" or not isinstance(v, _SIMPLE):
                    continue
                if k in vars(mine) and vars(mine)[k] != v:
                    undo.set(mine, k, v)
                    changed = True
        if changed:
            result.resized.append(path)


def _restore_modes(model: nn.Module, modes: list) -> None:
    """Each module back in the train/eval mode it had; a module put in by `prune` takes
    the mode of the module it replaced (recorded by `_Undo.replace`)."""
    saved = {id(m): mode for m, mode in modes}
    for m in model.modules():
        m.training = saved.get(id(m), getattr(m, "_graphsearch_mode", m.training))
        m.__dict__.pop("_graphsearch_mode", None)


class _Undo:
    """Every edit, in order, so that a refused result leaves the model as it was."""

    def __init__(self) -> None:
        self.steps: list = []

    def set_data(self, t: torch.Tensor, new: torch.Tensor) -> None:
        self.steps.append(("data", t, t.data))
        t.data = new.clone()

    def set(self, obj: Any, attr: str, value: Any) -> None:
        self.steps.append(("attr", obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def replace(self, model: nn.Module, path: str, new: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = _get(model, parent_path)
        old = getattr(parent, attr)
        for hooks in _HOOK_DICTS:  # the user's hooks on the module go with its place
            if hasattr(old, hooks):
                setattr(new, hooks, getattr(old, hooks))
        new._graphsearch_mode = old.training
        self.steps.append(("attr", parent, attr, old))
        setattr(parent, attr, new)

    def rollback(self) -> None:
        for step in reversed(self.steps):
            if step[0] == "data":
                step[1].data = step[2]
            else:
                setattr(step[1], step[2], step[3])
        self.steps.clear()


class _Constant(nn.Module):
    """A module that returns a fixed output (the slim module's, computed before editing)."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args):
        return self.out


# --------------------------------------------------------------------------- helpers


def _get(root: nn.Module, path: str):
    """The submodule, parameter or buffer at dotted `path` ('' is `root`)."""
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def _traced_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A tensor the traced graph holds that is not the model's state: a constant its forward
    makes (`torch.tensor(head_dim)`), which torch.export lifts into the graph."""
    return node.op == "get_attr" and node.target in gm.meta.get("graphsearch_constants", ())


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _module_stack(node: fx.Node) -> list[str]:
    """The module paths around `node`, outermost first ('' for the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = [""]
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else key
        if path and path not in out:
            out.append(path)
    return out


def _literals(node: fx.Node) -> list:
    """The leaves of a node's arguments, in order, each node as its name."""
    leaves, _ = tree_flatten((node.args, node.kwargs))
    return [("node", a.name) if isinstance(a, fx.Node) else a for a in leaves]


def _target(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else \
        getattr(node.target, "__name__", str(node.target))


def _show(node: fx.Node) -> str:
    args = [a.name if isinstance(a, fx.Node) else a for a in node.args[1:]]
    return str(tuple(args))


def _zero_note(plan) -> str:
    zero = sorted(g for g, idx in plan.keep.items() if len(idx) == 0)
    return f" (the plan removes branches: groups {zero} at width 0)" if zero else ""


def _groups_at(graph: ChannelGraph, plan, name: str) -> list[int]:
    """The groups whose channels the plan changes at node `name`."""
    info = graph.info(name)
    ids = info.ids if info is not None else None
    if isinstance(ids, (tuple, list)):
        ids = next((i for i in ids if isinstance(i, torch.Tensor)), None)
    if not isinstance(ids, torch.Tensor):
        return sorted(plan.keep)
    groups, _ = graph.locate(np.asarray(ids.reshape(-1).numpy(), dtype=np.int64))
    return sorted({int(g) for g in np.unique(groups) if g >= 0 and int(g) in plan.keep})


def _random_inputs(graph: ChannelGraph) -> tuple:
    """Inputs of the analysed shapes and dtypes (integers in [0, 2): token ids exist)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for node in graph.module.graph.nodes:
        if node.op != "placeholder":
            continue
        v = graph.values.get(node.name)
        if not isinstance(v, torch.Tensor):
            raise UserError("in-place pruning: give `inputs` (the model takes non-tensor "
                            f"input '{node.name}')")
        if v.dtype.is_floating_point:
            out.append(torch.randn(tuple(v.shape), generator=gen).to(v.dtype))
        elif v.dtype == torch.bool:
            out.append(torch.ones(tuple(v.shape), dtype=torch.bool))
        else:
            out.append(torch.randint(0, 2, tuple(v.shape), generator=gen).to(v.dtype))
    return tuple(out)


__all__ = ["prune", "PruneResult", "RemovedBranch", "InPlaceError"]
