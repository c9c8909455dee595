"""The channel graph: coupled channel groups, their members, and the cost model, as data
and the queries on it (costs, removed branches, tied parameters, gate sites).

Built by `build.build_graph` from what the analysis found (`analysis.py`): atoms that ended
up tied form *classes* (a channel a plan keeps or drops); classes that some op created
together (the output channels of one conv) form a *group*. A group's index `i` is its i-th
class in order of creation, so for a plain conv group index `i` is output channel `i`. This
module imports neither the analysis nor the builder.

The cost model is bilinear in the group widths: every MAC or parameter term is a coefficient
times the kept positions of at most two *layouts* (a weight's input line, a conv's output
line...), and a layout's kept positions are linear in the kept fraction of each group. So one
evaluation is one small matrix-vector product.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from .atoms import sorted_unique
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

    def role(self, dim: int) -> str:
        """What dimension `dim` is to its channels: the binding rule's role ("gamma",
        "statistic"...), else "out" for dim 0, "in" for dim 1."""
        return self.roles.get(dim, ("out", "in")[dim] if dim < 2 else f"dim{dim}")


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


@dataclass
class GroupIndex:
    """Where every atom and channel position lives. A channel *position* is a group's offset
    plus the channel's index in the group; `pair_pos`/`pair_node` list (position, node) for
    the nodes that really produce each position (indices into `space_nodes`)."""

    groups: list[ChannelGroup]
    atom_group: np.ndarray  # per atom: its group (-1: none)
    atom_index: np.ndarray  # per atom: its index in the group
    sizes: np.ndarray
    group_offset: np.ndarray  # len(groups) + 1
    position_group: np.ndarray
    space_nodes: list[str]
    pair_pos: np.ndarray
    pair_node: np.ndarray

    def __post_init__(self) -> None:
        # one entry more, -1, where NO_ATOM (-1) lands: a lookup is one gather, no mask
        self._group_or_none = np.append(self.atom_group, -1)
        self._index_or_none = np.append(self.atom_index, -1)

    def _atoms(self, atoms) -> np.ndarray:
        atoms = np.asarray(atoms, dtype=np.int64)
        if atoms.size and atoms.min() < -1:  # (none expected: an atom or NO_ATOM)
            atoms = np.maximum(atoms, -1)
        return atoms

    def locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group id, index in group) of each atom; group -1 where there is no atom."""
        atoms = self._atoms(atoms)
        return self._group_or_none[atoms], self._index_or_none[atoms]

    def locate_group(self, atoms: np.ndarray) -> np.ndarray:
        """The group id of each atom (`locate`'s first half); -1 where there is no atom."""
        return self._group_or_none[self._atoms(atoms)]


@dataclass
class CostTables:
    """The cost model: term k costs `coeff[k] * count[a[k]] * count[b[k]]`, a layout's count
    being `c0 + M @ fractions` (index len(c0): the constant 1); `exact` = (position, layout,
    multiplicity) of every owned position, for kept-index plans."""

    c0: np.ndarray
    M: np.ndarray
    exact: tuple[np.ndarray, np.ndarray, np.ndarray]
    term_kind: np.ndarray  # True: a MAC term, False: parameters
    term_coeff: np.ndarray
    term_a: np.ndarray
    term_b: np.ndarray
    term_nodes: list[list[str]]
    term_why: list[str]  # an opaque op's MACs: why no plan changes them
    macs_coeff: np.ndarray
    params_coeff: np.ndarray


@dataclass
class BranchTables:
    """What the dead-branch simulation reads per fx node."""

    internal: dict[str, frozenset]  # groups an op keeps inside (attention heads)
    users: dict[str, list[str]]
    node_groups: dict[str, frozenset]  # groups in the node's output
    node_other: dict[str, bool]  # it carries something no group owns (or nothing)


_NO_REMOVAL = Removal(frozenset(), frozenset(), None)


class ChannelGraph:
    def __init__(self, *, module: Any, values: dict, untraceable: dict, value_reads: dict,
                 shape_mode: str, front_end: str, static_batch: str, nodes: list[NodeInfo],
                 rules: Any, bindings: dict,
                 spaces_by_node: dict[str, list[Space]], index: GroupIndex,
                 costs: CostTables, branches: BranchTables) -> None:
        """The data `build.build_graph` leaves: the traced module, every node's value on meta,
        untraceable submodules, value reads and shape mode (`trace.Traced`); what the
        analysis found per node and per parameter; the groups, cost and branch tables."""
        self.module = module
        self.values = values
        self.untraceable = untraceable
        self.value_reads = value_reads  # node -> who reads tensor values (trace.py)
        self.shape_mode = shape_mode
        self.front_end = front_end  # "fx" or "export" (graphsearch.export_trace)
        self.static_batch = static_batch  # why the graph fixes the batch ("" if not)
        self.nodes = nodes
        self.rules = rules
        self._info = {i.name: i for i in nodes}
        self._bindings = bindings
        self._spaces_by_node = spaces_by_node
        self._index = index
        self.groups: list[ChannelGroup] = index.groups
        self._sizes, self._group_offset = index.sizes, index.group_offset
        self._position_group, self._space_nodes = index.position_group, index.space_nodes
        self._pair_pos, self._pair_node = index.pair_pos, index.pair_node
        c = costs
        self._c0, self._M, self._exact, self._term_why = c.c0, c.M, c.exact, c.term_why
        self._term_kind, self._term_coeff, self._term_nodes = c.term_kind, c.term_coeff, \
            c.term_nodes
        self._term_a, self._term_b = c.term_a, c.term_b
        self._macs_coeff, self._params_coeff = c.macs_coeff, c.params_coeff
        self._internal, self._users = branches.internal, branches.users
        self._node_groups, self._node_other = branches.node_groups, branches.node_other
        # caches of the queries
        self._sim_cache: dict[frozenset, tuple[bool, frozenset, str]] = {}
        self._removal_cache: dict[tuple, Removal] = {}
        self._positions: dict[str, np.ndarray] | None = None
        self._parts: dict | None = None
        self._tied: dict[int, list[TiedSlice]] | None = None
        for g in self.groups:
            g.removable = (lambda gid=g.id: self._simulate(frozenset([gid]))[0]) \
                if g.prunable else False
        self._nx: nx.MultiDiGraph | None = None  # built on first use (`nx`)
        self.baseline = self.cost()

    def _locate(self, atoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._index.locate(atoms)

    # ------------------------------------------------------------------ dead branches
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
        # the fixed point below depends on the kept positions, not only on the first
        # (zero, empty): two plans emptying the same group can orphan different channels
        asked = (zero, empty, None if kept is None else np.packbits(kept).tobytes())
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

    def parts(self, gid: int) -> list[np.ndarray]:
        """The channels (indices in group `gid`) of each node that carries a strict part of
        the group and nothing else (the halves of a channel split, a concat's branches)."""
        if getattr(self, "_parts", None) is None:  # (a graph cached before this field)
            self._parts = {}
            for pos in self._node_positions().values():
                g = np.unique(self._position_group[pos])
                if len(g) != 1:
                    continue
                g = int(g[0])
                local = np.unique(pos - self._group_offset[g])
                if 0 < len(local) < self.groups[g].size:
                    self._parts.setdefault(g, {})[local.tobytes()] = local
            self._parts = {g: list(v.values()) for g, v in self._parts.items()}
        return self._parts.get(gid, [])

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
                                 len(sorted_unique(idx)) != idx.size):
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
                    role = b.role(dim)
                    groups, index = self._locate(line)
                    for gid in sorted_unique(groups[groups >= 0]).tolist():
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


def _width(w) -> int:
    return int(w) if isinstance(w, (int, np.integer)) else len(list(w))
