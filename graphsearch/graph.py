"""The channel graph: coupled channel groups, their members, and the cost model.

Built from the analysis (`analysis.py`): atoms that ended up tied form *classes* (a channel a
plan keeps or drops); classes that some op created together (the output channels of one conv)
form a *group*, which networkx finds as the connected components of the channel spaces that
share classes. A group's index `i` is its i-th class in order of creation, so for a plain conv
group index `i` is output channel `i`.

The cost model is bilinear in the group widths: every MAC or parameter term is a coefficient
times the kept positions of at most two *layouts* (a weight's input line, a conv's output
line...), and a layout's kept positions are linear in the kept fraction of each group. So one
evaluation is one small matrix-vector product.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from .errors import PlanError
from .rules import DeadInput, Rule

Widths = Mapping[int, "int | Sequence[int]"]


# ---------------------------------------------------------------------- what the analysis finds

@dataclass
class Space:
    """Atoms created together: a conv's output channels, a model input, padded channels."""

    node: str
    kind: str
    atoms: np.ndarray


@dataclass
class Binding:
    """How a parameter (or buffer) is sliced: per dimension, the atom of every index."""

    name: str
    is_buffer: bool
    dims: dict[int, np.ndarray] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    ids: torch.Tensor | None = None  # a parameter used as an activation (class token, ...)
    nodes: list[str] = field(default_factory=list)


@dataclass
class MacTerm:
    coeff: float
    layouts: list[tuple[np.ndarray, float]]  # (atoms, multiplicity); MACs = coeff * prod(count)
    node: str
    why: str = ""  # an opaque op's MACs: why no plan changes them


@dataclass
class NodeInfo:
    """What the analysis found at one fx node (also kept on the node: `node.meta["channels"]`)."""

    name: str
    rule: str  # the rule's name ("conv", "layout", ...; "unsupported", "input", "output")
    edge: str
    dead: DeadInput  # what a removed input means (the rule's; PASS or BLOCK without one)
    inputs: list[str]  # producer nodes of tensor arguments, in argument order
    ids: Any  # tensor, tuple of tensors, or None
    op: Rule | None = None  # the rule itself (None for inputs, outputs, unsupported ops)



# ---------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def as_dict(self) -> dict:
        return {"macs": self.macs, "flops": self.flops, "params": self.params}


@dataclass
class ChannelGroup:
    id: int
    size: int
    prunable: bool
    reason: str  # why not prunable, in words ("" when prunable)
    members: list[str]  # e.g. "layer1.0.conv1.weight[out]", "fc.weight[in] x49"
    spaces: list[str] = field(default_factory=list)  # nodes whose channels are this group's
    classes: np.ndarray = field(default=None, repr=False)  # class representatives, in order
    # may reach width 0 (it only feeds a removable branch): worked out on first use, by the
    # graph's removal simulation (most analyses never ask)
    _removable: "bool | Callable[[], bool]" = field(default=False, repr=False, compare=False)

    @property
    def removable(self) -> bool:
        if callable(self._removable):
            self._removable = bool(self._removable())
        return self._removable

    @removable.setter
    def removable(self, value: bool) -> None:
        self._removable = value

    @property
    def min_width(self) -> int:
        return 0 if self.removable else 1

    def to_dict(self) -> dict:
        d = {"id": self.id, "size": self.size, "prunable": self.prunable, "reason": self.reason,
             "members": list(self.members), "removable": self.removable,
             "spaces": list(self.spaces), "min_width": self.min_width}
        return d


@dataclass
class Removal:
    dead: frozenset  # fx nodes that go
    zero_groups: frozenset  # groups that keep no channel
    dropped: np.ndarray | None  # per channel position: orphaned by the removed nodes
    alive_terms: np.ndarray | None = field(default=None, repr=False)  # cost terms kept


@dataclass(frozen=True)
class TiedSlice:
    """Positions `positions` along `dim` of parameter `name` are the group's channels
    `channels` (one channel may own several positions: a flatten into a linear layer)."""

    name: str
    dim: int
    positions: np.ndarray
    channels: np.ndarray
    role: str = ""  # "out" (producer rows), "in" (consumer columns), "gamma", "beta", "statistic"
    is_buffer: bool = False


@dataclass(frozen=True)
class TermLayout:
    """A channel layout of a cost term: its kept count is
    `const + sum(mult * kept[groups[i], index[i]])` (const: channels no group owns)."""

    const: float
    groups: np.ndarray
    index: np.ndarray
    mult: np.ndarray


@dataclass(frozen=True)
class ChannelMacTerm:
    """One conv/linear/matmul op: MACs = coeff * product of its layouts' kept counts (two
    layouts, in and out; one for a depthwise conv, whose in and out channels coincide)."""

    coeff: float
    layouts: tuple[TermLayout, ...]
    nodes: tuple[str, ...]


_NO_REMOVAL = Removal(frozenset(), frozenset(), None)


class ChannelGraph:
    def __init__(self, traced: Any, ctx: Any, infos: list[NodeInfo], rules=None) -> None:
        """Built by the analysis (`analysis.analyze`) from what it found: `traced` (the fx
        module, every node's value on meta, untraceable submodules, value reads, shape mode),
        `ctx` (its atoms, spaces, parameter bindings, MAC terms and rules) and `infos` (one
        `NodeInfo` per fx node). The graph imports neither: it is the data they leave."""
        self.module = traced.module
        self.values = traced.values
        self.untraceable = traced.untraceable
        self.value_reads = traced.value_reads  # node -> who reads tensor values (trace.py)
        self.shape_mode = traced.shape_mode
        self.nodes = infos
        self.rules = rules if rules is not None else ctx.rules
        self._info = {i.name: i for i in infos}
        self._atoms = ctx.atoms
        self._bindings = ctx.bindings
        self._spaces_by_node: dict[str, list] = {}
        for space in ctx.spaces:
            self._spaces_by_node.setdefault(space.node, []).append(space)
        self._build_groups(ctx)
        self._build_cost_tables(ctx)
        self._build_dead_tables(ctx)
        for g in self.groups:
            g.removable = (lambda gid=g.id: self._simulate(frozenset([gid]))[0]) \
                if g.prunable else False
        self._nx: nx.MultiDiGraph | None = None  # built on first use (`nx`)
        self.baseline = self.cost()

    # ------------------------------------------------------------------ groups
    def _build_groups(self, ctx) -> None:
        n = self._atoms.count
        root = self._atoms.find(np.arange(n))
        atom_space = np.zeros(n, dtype=np.int64)
        for i, sp in enumerate(ctx.spaces):
            atom_space[sp.atoms] = i
        # Two spaces are in one group when some class has atoms in both.
        a, b = atom_space, atom_space[root]
        m = max(len(ctx.spaces), 1)  # pairs encoded as one integer: a 1-d unique is fast
        code = _unique(a[a != b] * m + b[a != b])
        pairs = np.stack([code // m, code % m], axis=1)
        spaces = nx.Graph()
        spaces.add_nodes_from(range(len(ctx.spaces)))
        spaces.add_edges_from(map(tuple, pairs.tolist()))
        comp_of_space = np.zeros(len(ctx.spaces), dtype=np.int64)
        components = list(nx.connected_components(spaces))
        for c, members in enumerate(components):
            comp_of_space[list(members)] = c
        classes = _unique(root)  # sorted: a class is named by its oldest atom
        class_comp = comp_of_space[atom_space[classes]]
        # Groups in order of their oldest channel; classes in order within a group.
        order = np.lexsort((classes, class_comp))
        classes, class_comp = classes[order], class_comp[order]
        starts = np.flatnonzero(np.r_[True, class_comp[1:] != class_comp[:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], len(classes)]))
        bounds.sort(key=lambda se: classes[se[0]])
        fixed = self._atoms.fixed_reasons()

        self._atom_group = np.full(n, -1, dtype=np.int64)
        self._atom_index = np.full(n, -1, dtype=np.int64)
        class_group = np.zeros(n, dtype=np.int64)
        class_index = np.zeros(n, dtype=np.int64)
        self.groups: list[ChannelGroup] = []
        for gid, (s0, s1) in enumerate(bounds):
            cls = classes[s0:s1]
            class_group[cls] = gid
            class_index[cls] = np.arange(len(cls))
            reasons: list[str] = []
            for c in set(cls.tolist()) & fixed.keys():
                reasons += [r for r in fixed[c] if r not in reasons]
            comp = class_comp[s0]
            names = list(dict.fromkeys(ctx.spaces[i].node for i in sorted(components[comp])))
            self.groups.append(ChannelGroup(
                id=gid, size=len(cls), prunable=not reasons,
                reason=_summarise(sorted(reasons)), members=[], spaces=names, classes=cls))
        self._atom_group = class_group[root]
        self._atom_index = class_index[root]
        # Channel positions (group offset + index) and the nodes that produce each of them.
        self._sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        self._group_offset = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self._position_group = np.repeat(np.arange(len(self.groups)), self._sizes)
        self._space_nodes = list(dict.fromkeys(sp.node for sp in ctx.spaces))
        node_id = {name: i for i, name in enumerate(self._space_nodes)}
        space_node = np.array([node_id[sp.node] for sp in ctx.spaces], dtype=np.int64)
        position = self._group_offset[self._atom_group] + self._atom_index
        # A grouped conv's output channel is its input channel carried on, not a new one; a
        # gate (an SE block's last layer) only scales channels that something else produces.
        gates = self._gate_producers()
        made = np.array([sp.kind != "grouped_conv" and sp.node not in gates
                         for sp in ctx.spaces])[atom_space]
        k = max(len(self._space_nodes), 1)
        code = _unique(position[made] * k + space_node[atom_space][made])
        self._pair_pos, self._pair_node = code // k, code % k
        self._members(ctx)

    def _gate_producers(self) -> set[str]:
        """Nodes whose output reaches the rest of the model only as a factor of a product of
        two tensors (through activations, scalar arithmetic and reshapes): the fc2 of a
        squeeze-excitation gate. A product's channel exists only where its other factor's
        does, so a gate never keeps a channel alive whose real producers were removed."""
        users: dict[str, list[NodeInfo]] = {}
        for info in self.nodes:
            for name in dict.fromkeys(info.inputs):
                users.setdefault(name, []).append(info)
        memo: dict[str, bool] = {}

        def numel(name: str) -> int:
            v = self.values.get(name)
            return int(v.numel()) if isinstance(v, torch.Tensor) else -1

        def scales(u: NodeInfo, name: str) -> bool:
            # a product where this operand is broadcast over the other (B,C,1,1 x B,C,H,W),
            # not a gated linear unit, whose two factors are both real producers
            others = [i for i in dict.fromkeys(u.inputs) if i != name]
            return u.op is not None and u.op.flow == "scale" and bool(others) and \
                0 <= numel(name) < min(numel(i) for i in others)

        def only_gates(name: str) -> bool:
            if name not in memo:
                memo[name] = False  # a cycle (none in fx) or no users: not a gate
                outs = users.get(name, [])
                memo[name] = bool(outs) and all(
                    scales(u, name)
                    or (u.op is not None and u.op.flow in ("pass", "scale") and
                        len(set(u.inputs)) == 1 and only_gates(u.name))
                    for u in outs)
            return memo[name]

        return {name for name in self._spaces_by_node if only_gates(name)}

    def _locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group id, index in group) of each atom; group -1 where there is no atom."""
        atoms = np.asarray(atoms, dtype=np.int64)
        valid = atoms >= 0
        safe = np.where(valid, atoms, 0)
        return (np.where(valid, self._atom_group[safe], -1),
                np.where(valid, self._atom_index[safe], -1))

    def _members(self, ctx) -> None:
        ranks = {name: len(p.shape) for name, p in
                 self.module.named_parameters(remove_duplicate=False)}
        lines: list[tuple[str, int | None, int, np.ndarray]] = []  # (name, dim, rank, line)
        for name, b in ctx.bindings.items():
            rank = (ranks[name] if name in ranks else
                    len(self.module.get_parameter(name).shape)) if not b.is_buffer else 1
            lines += [(name, d, rank, line) for d, line in sorted(b.dims.items())]
            if b.ids is not None:
                lines.append((name, None, rank, b.ids.reshape(-1).numpy()))
        spaces = [s for s in ctx.spaces if s.kind in ("input", "opaque", "pad")]
        # One lookup for every line and space, split back by position.
        arrays = [np.asarray(x[3], dtype=np.int64).reshape(-1) for x in lines] + \
            [np.asarray(s.atoms, dtype=np.int64).reshape(-1) for s in spaces]
        ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        located, _ = self._locate(np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
        pieces = np.split(located, ends[:-1]) if arrays else []
        labels = [set(g.members) for g in self.groups]

        def add(gid: int, label: str) -> None:
            if label not in labels[gid]:
                labels[gid].add(label)
                self.groups[gid].members.append(label)

        for (name, d, rank, _), groups in zip(lines, pieces):
            counts = np.bincount(groups[groups >= 0])
            for gid in np.flatnonzero(counts).tolist():
                per_class = counts[gid] / self.groups[gid].size
                label = name
                if d is not None and rank > 1:
                    default = ("out", "in")[d] if d < 2 else f"dim{d}"
                    label += f"[{ctx.bindings[name].roles.get(d, default)}]"
                if per_class > 1 and per_class == int(per_class):
                    label += f" x{int(per_class)}"
                add(gid, label)
        for s, groups in zip(spaces, pieces[len(lines):]):
            for gid in _unique(groups[groups >= 0]).tolist():
                add(gid, f"<{s.kind} {s.node}>")

    # ------------------------------------------------------------------ cost tables
    def _build_cost_tables(self, ctx) -> None:
        layouts: list[tuple[np.ndarray, float]] = []
        terms: list[tuple[str, float, list[int], list[str]]] = []
        self._term_why: list[str] = []

        def add_layout(atoms: np.ndarray, mult: float) -> int:
            layouts.append((atoms, mult))
            return len(layouts) - 1

        for t in ctx.macs_terms:
            idx = [add_layout(a, m) for a, m in t.layouts]
            terms.append(("macs", t.coeff, idx, [t.node]))
            self._term_why.append(t.why)
        for name, p in self.module.named_parameters():
            b = ctx.bindings.get(name)
            if b is None:
                terms.append(("params", float(p.numel()), [], []))
            elif b.ids is not None:
                idx = add_layout(b.ids.reshape(-1).numpy(), p.numel() / b.ids.numel())
                terms.append(("params", 1.0, [idx], b.nodes))
            else:
                lines = [b.dims[d] for d in sorted(b.dims)]
                coeff = p.numel() / np.prod([len(x) for x in lines])
                terms.append(("params", float(coeff), [add_layout(x, 1.0) for x in lines],
                              b.nodes))
        if any(len(t[2]) > 2 for t in terms):
            raise AssertionError("a cost term with more than two layouts")

        n_layouts, n_groups = len(layouts), len(self.groups)
        self._group_offset = np.concatenate([[0], np.cumsum([g.size for g in self.groups])])
        # All layouts at once: each position's layout, group and index in the group.
        mults = np.array([float(mult) for _, mult in layouts], dtype=float)
        parts = [np.asarray(atoms, dtype=np.int64).reshape(-1) for atoms, _ in layouts]
        lens = np.array([len(a) for a in parts], dtype=np.int64)
        layout_of = np.repeat(np.arange(n_layouts, dtype=np.int64), lens)
        groups, index = self._locate(np.concatenate(parts) if parts else np.zeros(0, np.int64))
        valid = groups >= 0
        self._c0 = mults * np.bincount(layout_of[~valid], minlength=n_layouts)
        per_group = np.bincount(layout_of[valid] * n_groups + groups[valid],
                                minlength=n_layouts * n_groups).reshape(n_layouts, n_groups)
        self._M = mults[:, None] * per_group
        if n_layouts:
            li = layout_of[valid]
            self._exact = ((self._group_offset[groups[valid]] + index[valid]).astype(np.int64),
                           li, mults[li])
        else:
            self._exact = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
        one = n_layouts  # index of the constant 1 appended to the counts
        self._term_kind = np.array([t[0] == "macs" for t in terms])
        self._term_coeff = np.array([t[1] for t in terms], dtype=float)
        self._term_a = np.array([t[2][0] if len(t[2]) > 0 else one for t in terms], dtype=int)
        self._term_b = np.array([t[2][1] if len(t[2]) > 1 else one for t in terms], dtype=int)
        self._term_nodes = [t[3] for t in terms]
        self._macs_coeff = np.where(self._term_kind, self._term_coeff, 0.0)
        self._params_coeff = np.where(self._term_kind, 0.0, self._term_coeff)

    # ------------------------------------------------------------------ dead branches
    def _build_dead_tables(self, ctx) -> None:
        self._sim_cache: dict[frozenset, tuple[bool, frozenset, str]] = {}
        self._removal_cache: dict[tuple, tuple[frozenset, frozenset]] = {}
        self._positions: dict[str, np.ndarray] | None = None
        self._tied: dict[int, list[TiedSlice]] | None = None
        # Channels an op keeps inside (attention heads): with none left, the op is gone.
        self._internal: dict[str, frozenset] = {}
        for s in ctx.spaces:
            if s.kind == "heads":
                g, _ = self._locate(s.atoms)
                self._internal[s.node] = self._internal.get(s.node, frozenset()) | \
                    frozenset(_unique(g[g >= 0]).tolist())
        self._users: dict[str, list[str]] = {}
        for info in self.nodes:
            for src in info.inputs:
                self._users.setdefault(src, []).append(info.name)
        self._node_groups: dict[str, frozenset] = {}
        self._node_other: dict[str, bool] = {}
        # Every node's ids in one lookup: (node, its tensors' atoms), and what is no tensor.
        owner, arrays, no_tensor = [], [], set()
        for k, info in enumerate(self.nodes):
            for ids in (info.ids if isinstance(info.ids, tuple) else (info.ids,)):
                if isinstance(ids, torch.Tensor):
                    owner.append(k)
                    arrays.append(ids.reshape(-1).numpy())
                else:
                    no_tensor.add(k)
        lens = np.array([len(a) for a in arrays], dtype=np.int64)
        node_of = np.repeat(np.array(owner, dtype=np.int64), lens)
        g, _ = self._locate(np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
        has = g >= 0
        pairs = _unique(node_of[has] * (len(self.groups) + 1) + g[has])
        node_groups: dict[int, list[int]] = {}
        for k, gid in zip((pairs // (len(self.groups) + 1)).tolist(),
                          (pairs % (len(self.groups) + 1)).tolist()):
            node_groups.setdefault(k, []).append(gid)
        other = set(_unique(node_of[~has]).tolist()) | no_tensor
        for k, info in enumerate(self.nodes):
            groups = frozenset(node_groups.get(k, ()))
            self._node_groups[info.name] = groups
            self._node_other[info.name] = k in other or not groups

    def _simulate(self, zero: frozenset, empty: frozenset = frozenset()
                  ) -> tuple[bool, frozenset, str]:
        """Which nodes die when the groups in `zero` keep no channel and the nodes in `empty`
        keep none of theirs; is that allowed?"""
        key = (zero, empty)
        if key not in self._sim_cache:
            self._sim_cache[key] = self._propagate_death(zero, empty)
        return self._sim_cache[key]

    def _propagate_death(self, zero: frozenset, empty_nodes: frozenset
                         ) -> tuple[bool, frozenset, str]:
        dead: set[str] = set()
        touched = self._node_groups
        for info in self.nodes:
            ins = [i in dead for i in info.inputs]
            internal = self._internal.get(info.name, frozenset())
            if not any(ins) and touched[info.name].isdisjoint(zero) and \
                    internal.isdisjoint(zero) and info.name not in empty_nodes:
                continue  # the common case: nothing of this node is affected
            empty = info.name in empty_nodes or \
                (not self._node_other[info.name] and touched[info.name] <= zero) or \
                bool(internal and internal <= zero)
            meaning = info.dead  # what the op's rule says a removed input means
            if meaning.drops:
                if meaning.first_stays and ins[0] and not all(ins):
                    return False, frozenset(), f"'{info.name}' would lose its first operand"
                is_dead = all(ins) or empty
            elif meaning.blocks:
                if any(ins):
                    what = "the model output" if info.rule == "output" else f"'{info.name}'"
                    return False, frozenset(), f"{what} would lose an input"
                is_dead = empty
            else:
                is_dead = any(ins) or empty
            if is_dead:
                dead.add(info.name)
        # What is left feeding only removed nodes is unused, and goes with them.
        for info in reversed(self.nodes):
            users = self._users.get(info.name)
            if users and info.name not in dead and all(u in dead for u in users):
                dead.add(info.name)
        return True, frozenset(dead), ""

    def dead_nodes(self, widths: Widths) -> frozenset:
        """Nodes removed by the plan (branches whose channels are all dropped)."""
        return self.removal(widths).dead

    def zero_groups(self, widths: Widths) -> frozenset:
        """Groups that keep nothing under the plan: those set to 0 and those whose every
        producer sits in a removed branch (the last conv of an Inception branch whose first
        conv went to width 0)."""
        return self.removal(widths).zero_groups

    def removal(self, widths: Widths) -> "Removal":
        """What a plan removes: dead nodes, groups left empty, and orphaned channels (kept by
        the plan, but produced only inside removed branches, so they vanish with them)."""
        zero = frozenset(g for g, w in widths.items() if _width(w) == 0)
        kept = self._kept_positions(widths)
        empty = self._empty_nodes(~kept, ~kept) if kept is not None else frozenset()
        if not zero and not empty:
            return _NO_REMOVAL
        asked = (zero, empty)
        if asked not in self._removal_cache:
            while True:
                ok, dead, why = self._simulate(zero, empty)
                if not ok:
                    what = f"groups {sorted(asked[0])}" if asked[0] else "the plan"
                    if asked[1]:
                        what += f" (it empties {', '.join(sorted(asked[1])[:3])})"
                    raise PlanError(f"{what} cannot go to width 0: {why}")
                dropped = self._orphans(dead)
                gone = dropped if kept is None else dropped | ~kept
                per_group = np.bincount(self._position_group[gone], minlength=len(self.groups))
                implied = zero | frozenset(np.flatnonzero(per_group == self._sizes).tolist())
                more = empty | self._empty_nodes(gone, gone)
                if implied == zero and more == empty:
                    break
                zero, empty = implied, more
            self._removal_cache[asked] = Removal(dead, zero, dropped)
        return self._removal_cache[asked]

    def _kept_positions(self, widths: Widths) -> np.ndarray | None:
        """Kept flag of every channel position, from kept-index lists (None: counts only)."""
        lists = {g: w for g, w in widths.items() if not isinstance(w, (int, np.integer))}
        if not lists:
            return None
        kept = np.ones(int(self._group_offset[-1]), dtype=bool)
        for gid, w in lists.items():
            off, size = self._group_offset[gid], self.groups[gid].size
            kept[off:off + size] = False
            kept[off + np.asarray(list(w), dtype=np.int64)] = True
        return kept

    def _node_positions(self) -> dict[str, np.ndarray]:
        if self._positions is None:
            self._positions = {}
            for info in self.nodes:
                if isinstance(info.ids, torch.Tensor) and info.ids.numel():
                    g, i = self._locate(info.ids.reshape(-1).numpy())
                    if (g >= 0).all():
                        self._positions[info.name] = self._group_offset[g] + i
        return self._positions

    def _empty_nodes(self, dropped: np.ndarray, changed: np.ndarray) -> frozenset:
        """Nodes whose every channel position is dropped (a conv whose channels all lie in
        the dropped part of a group it shares with others through a shuffle)."""
        if not changed.any():
            return frozenset()
        return frozenset(name for name, pos in self._node_positions().items()
                         if dropped[pos].all())

    def _orphans(self, dead: frozenset) -> np.ndarray:
        """Positions all of whose producing nodes are dead."""
        dead_ids = np.array([n in dead for n in self._space_nodes], dtype=bool)
        alive = np.bincount(self._pair_pos, weights=~dead_ids[self._pair_node],
                            minlength=int(self._group_offset[-1]))
        return alive == 0

    # ------------------------------------------------------------------ cost
    def fractions(self, widths: Widths | None) -> np.ndarray:
        f = np.ones(len(self.groups))
        for gid, w in (widths or {}).items():
            f[gid] = _width(w) / max(self.groups[gid].size, 1)
        return f

    def check(self, widths: Widths) -> None:
        """Raise PlanError if a width or index set is out of range or touches a fixed group."""
        for gid, w in widths.items():
            if not 0 <= gid < len(self.groups):
                raise PlanError(f"there is no group {gid} (groups are 0..{len(self.groups) - 1})")
            g = self.groups[gid]
            n = _width(w)
            if not isinstance(w, (int, np.integer)):
                idx = np.asarray(list(w), dtype=np.int64)
                if idx.size and (idx.min() < 0 or idx.max() >= g.size or
                                 len(_unique(idx)) != idx.size):
                    raise PlanError(f"group {gid}: kept indices must be distinct, in 0..{g.size - 1}")
            if n == g.size:
                continue
            if not g.prunable:
                raise PlanError(f"group {gid} is not prunable: {g.reason}")
            if not g.min_width <= n <= g.size:
                raise PlanError(f"group {gid}: width {n} is outside {g.min_width}..{g.size}")
        self.dead_nodes(widths)

    def cost(self, widths: Widths | None = None) -> Cost:
        """MACs and params of the model slimmed to `widths` (group id -> kept count or indices).

        With kept counts, a layout that holds only part of a group (a split after a concat)
        is costed as if the kept channels were spread evenly; with kept indices it is exact.
        """
        widths = dict(widths or {})
        removal = self.removal(widths)
        # Index lists anywhere (even only empty ones) select the exact path: the orphaned
        # channels are then the very positions the removal found, not an even share.
        exact = any(not isinstance(w, (int, np.integer)) for w in widths.values())
        for gid in removal.zero_groups:
            widths[gid] = [] if exact else 0
        if exact:
            counts = self._exact_counts(widths, removal.dropped)
        else:
            f = self.fractions(widths)
            if removal.dropped is not None and removal.dropped.any():
                lost = np.bincount(self._position_group[removal.dropped],
                                   minlength=len(self.groups))
                f = f * (1 - lost / np.maximum(self._sizes, 1))
            counts = self._c0 + self._M @ f
        ext = np.append(counts, 1.0)
        per_term = ext[self._term_a] * ext[self._term_b]
        if removal.dead:
            if removal.alive_terms is None:
                removal.alive_terms = np.array(
                    [not nodes or any(n not in removal.dead for n in nodes)
                     for nodes in self._term_nodes])
            per_term = per_term * removal.alive_terms
        return Cost(macs=int(round(per_term @ self._macs_coeff)),
                    params=int(round(per_term @ self._params_coeff)))

    def _exact_counts(self, widths: Widths, dropped: np.ndarray | None = None) -> np.ndarray:
        kept = np.ones(int(self._group_offset[-1]))
        for gid, w in widths.items():
            off, size = self._group_offset[gid], self.groups[gid].size
            if isinstance(w, (int, np.integer)):
                mask = np.zeros(size)
                mask[: int(w)] = 1.0  # a count means "the first w channels"
            else:
                mask = np.zeros(size)
                mask[np.asarray(list(w), dtype=np.int64)] = 1.0
            kept[off:off + size] = mask
        if dropped is not None:
            kept[dropped] = 0.0
        gi, li, mult = self._exact
        return self._c0 + np.bincount(li, weights=mult * kept[gi], minlength=len(self._c0))

    def mac_terms(self) -> list[ChannelMacTerm]:
        """The MAC terms of the cost model, channel by channel (MorphNet's regulariser)."""
        gi, li, mult = self._exact
        one = len(self._c0)
        offsets = np.asarray(self._group_offset, dtype=np.int64)
        position_group = np.asarray(self._position_group, dtype=np.int64)
        out = []
        for k in np.flatnonzero(self._term_kind):
            layouts = []
            for lay in (int(self._term_a[k]), int(self._term_b[k])):
                if lay == one:
                    continue
                sel = li == lay
                pos = gi[sel]
                grp = position_group[pos]
                layouts.append(TermLayout(float(self._c0[lay]), grp, pos - offsets[grp],
                                      np.asarray(mult[sel], dtype=float)))
            out.append(ChannelMacTerm(float(self._term_coeff[k]), tuple(layouts),
                               tuple(self._term_nodes[k])))
        return out

    # ------------------------------------------------------------------ parameters by channel
    def tied_parameters(self) -> dict[int, list["TiedSlice"]]:
        """For every group, the parameter slices tied to its channels: producers' output rows,
        norm parameters and statistics, consumers' input columns (a method's `theta_c`)."""
        if self._tied is None:
            self._tied = {g.id: [] for g in self.groups}
            for name, b in self._bindings.items():
                for dim, line in sorted(b.dims.items()):
                    # the rule that bound it says its role (a norm's gamma, beta, statistics)
                    role = b.roles.get(dim, ("out", "in")[dim] if dim < 2 else f"dim{dim}")
                    groups, index = self._locate(line)
                    for gid in _unique(groups[groups >= 0]).tolist():
                        at = np.flatnonzero(groups == gid)
                        self._tied[gid].append(TiedSlice(name, dim, at, index[at], role,
                                                         b.is_buffer))
        return self._tied

    # ------------------------------------------------------------------ what can be pruned
    def mac_share(self, top: int = 5) -> dict:
        """How much of the baseline's MACs some plan can change, and why the rest cannot.

        A MAC term (one conv, linear, matmul, or an opaque op's real count) is prunable when
        one of its channel layouts holds a prunable group's channel. Returns `macs`,
        `prunable_macs`, `share` and `reasons`: [(reason, MACs)] for the rest, largest first
        (a group's reason, or the opaque op's)."""
        counts = np.append(self._c0 + self._M @ np.ones(len(self.groups)), 1.0)
        per_term = counts[self._term_a] * counts[self._term_b] * self._macs_coeff
        prunable = np.array([g.prunable for g in self.groups], dtype=float)
        touches = np.append(self._M @ prunable > 0, False)
        free = touches[self._term_a] | touches[self._term_b]
        total = float(per_term.sum())
        reasons: dict[str, float] = {}
        for k in np.flatnonzero(self._term_kind & ~free):
            why = self._term_why[k] if k < len(self._term_why) else ""
            if not why:
                # the output layout first: why the op's own channels are fixed
                for lay in (int(self._term_b[k]), int(self._term_a[k])):
                    if lay < len(self._c0):
                        hit = np.flatnonzero(self._M[lay])
                        if hit.size:
                            why = self.groups[int(hit[0])].reason
                            break
            why = why or "channels no group owns (constants)"
            reasons[why] = reasons.get(why, 0.0) + float(per_term[k])
        kept = float(per_term[free].sum())
        ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
        return {"macs": int(round(total)), "prunable_macs": int(round(kept)),
                "share": kept / total if total > 0 else 0.0,
                "reasons": [(r, int(round(m))) for r, m in ranked[:top]],
                "more_reasons": max(0, len(ranked) - top)}

    # ------------------------------------------------------------------ public API for passes
    @property
    def bindings(self) -> dict:
        """Parameter name -> `analysis.Binding` (how each dim is sliced by channel)."""
        return self._bindings

    def info(self, node: str) -> NodeInfo | None:
        """What the analysis found at fx node `node` (its rule, channel ids, inputs)."""
        return self._info.get(node)

    def rule(self, node: str):
        """The `rules.Rule` applied at fx node `node` (None: input, output, unsupported)."""
        info = self._info.get(node)
        return info.op if info is not None else None

    def internal_atoms(self, node: str, kind: str) -> np.ndarray | None:
        """Atoms an op keeps inside (kind "heads": an attention's heads), or None."""
        for space in self._spaces_by_node.get(node, ()):
            if space.kind == kind:
                return space.atoms
        return None

    @property
    def channel_count(self) -> int:
        """Channel positions over all groups (group offset + index runs over 0..count-1)."""
        return int(self._group_offset[-1])

    def group_offset(self, gid) -> "int | np.ndarray":
        """Position of channel 0 of group `gid` (an array of group ids gives an array)."""
        return self._group_offset[gid]

    # ------------------------------------------------------------------ gates
    def gate_sites(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """fx node -> (group of every output position, index in group) where per-channel
        gates apply: the output of each op whose rule says gate="producer", moved onto the
        norm that directly follows it (rule gate="norm": BN rescales away what precedes it)."""
        users: dict[str, list[str]] = {}
        for info in self.nodes:
            for src in info.inputs:
                users.setdefault(src, []).append(info.name)
        sites = {}
        for info in self.nodes:
            if info.op is None or info.op.gate != "producer" or \
                    not isinstance(info.ids, torch.Tensor):
                continue
            at = info.name
            nxt = users.get(at, [])
            if len(nxt) == 1 and self._info[nxt[0]].op is not None and \
                    self._info[nxt[0]].op.gate == "norm":
                at = nxt[0]
            ids = self._info[at].ids
            groups, index = self.locate(ids.reshape(-1).numpy())
            sites[at] = (groups.reshape(tuple(ids.shape)), index.reshape(tuple(ids.shape)))
        return sites

    # ------------------------------------------------------------------ views
    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, node: str) -> list[int]:
        """Groups whose channels appear in the output of fx node `node`."""
        return sorted(self._node_groups.get(node, ()))

    def locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group id, index within group) of each atom of an ids array; -1 for no channel."""
        return self._locate(np.asarray(atoms, dtype=np.int64).reshape(-1))

    @property
    def nx(self) -> nx.MultiDiGraph:
        """The fx nodes as a networkx graph: each node's rule, shape and groups; edges from
        producer to consumer, with the rule's edge kind (built on first use)."""
        if self._nx is None:
            self._nx = self._build_nx()
        return self._nx

    def _build_nx(self) -> nx.MultiDiGraph:
        g = nx.MultiDiGraph()
        kinds = {i.name: i for i in self.nodes}
        for info in self.nodes:
            v = self.values.get(info.name)
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
            g.add_node(info.name, rule=info.rule, shape=shape,
                       groups=sorted(self._node_groups[info.name]))
        for info in self.nodes:
            for src in info.inputs:
                if src in kinds:
                    g.add_edge(src, info.name, kind=info.edge)
        return g

    def summary(self) -> dict:
        c = self.baseline
        return {
            "groups": len(self.groups),
            "prunable": len(self.prunable_groups),
            "removable": sum(g.removable for g in self.groups),
            "prunable_channels": int(sum(g.size for g in self.prunable_groups)),
            "prunable_mac_share": round(self.mac_share()["share"], 6),
            **c.as_dict(),
            "shape_mode": self.shape_mode,
            "untraceable": dict(self.untraceable),
            "value_reads": sorted(set(self.value_reads.values())),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "groups": [g.to_dict() for g in self.groups]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def _unique(x) -> np.ndarray:
    """`np.unique(x)` by sorting (numpy's hash-based unique is several times slower on the
    few-thousand-entry integer arrays of a graph)."""
    s = np.sort(np.asarray(x).reshape(-1))
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if s.size else s


def _width(w) -> int:
    return int(w) if isinstance(w, (int, np.integer)) else len(list(w))


def _summarise(reasons: Iterable[str], limit: int = 3) -> str:
    reasons = list(reasons)
    text = "; ".join(reasons[:limit])
    if len(reasons) > limit:
        text += f"; and {len(reasons) - limit} more"
    return text
