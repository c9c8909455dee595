"""Building the channel graph from what the analysis found (`analysis.analyze` ends here).

The analysis leaves atoms tied into classes, the spaces that created them, the parameter
bindings and the MAC terms. From them this module builds, once per analysis:
- the groups: classes that some op created together (the output channels of one conv) form
  a group, found as the connected components of the channel spaces that share classes;
  their members (readable parameter names) and, per channel position, the nodes that really
  produce it (not a grouped conv carrying it on, nor a squeeze-excitation gate scaling it);
- the cost tables: every MAC or parameter term as a coefficient times the kept positions of
  at most two layouts, a layout's kept positions linear in the groups' kept fractions;
- the tables of the dead-branch simulation: which groups each node carries, its users, the
  channels an op keeps inside (attention heads).
`graph.ChannelGraph` holds the result and answers queries on it (costs, removals, tied
parameters, gate sites); it imports nothing of this module.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import networkx as nx
import numpy as np
import torch

from .atoms import sorted_counts, sorted_unique
from .graph import (BranchTables, ChannelGraph, ChannelGroup, CostTables, GroupIndex, NodeInfo,
                    Space)


def build_graph(traced: Any, ctx: Any, infos: list[NodeInfo], rules=None) -> ChannelGraph:
    """The channel graph of `traced` (the fx module, every node's value on meta, untraceable
    submodules, value reads, shape mode) from what the analysis found: `ctx` (its atoms,
    spaces, parameter bindings, MAC terms and rules) and `infos` (one `NodeInfo` per node)."""
    spaces_by_node: dict[str, list[Space]] = {}
    for space in ctx.spaces:
        spaces_by_node.setdefault(space.node, []).append(space)
    gates = gate_producers(infos, traced.values, spaces_by_node)
    index = build_groups(ctx.atoms, ctx.spaces, gates)
    params = getattr(ctx, "params", None)  # every name of every parameter, as the module has
    if params is None:
        params = dict(traced.module.named_parameters(remove_duplicate=False))
    add_members(index, traced.module, ctx.bindings, ctx.spaces, params)
    return ChannelGraph(
        module=traced.module, values=traced.values, untraceable=traced.untraceable,
        value_reads=traced.value_reads, shape_mode=traced.shape_mode,
        front_end=traced.front_end, static_batch=traced.static_batch, nodes=infos,
        rules=rules if rules is not None else ctx.rules, bindings=ctx.bindings,
        spaces_by_node=spaces_by_node, index=index,
        costs=build_cost_tables(index, traced.module, ctx.bindings, ctx.macs_terms, params),
        branches=build_branch_tables(index, infos, ctx.spaces))


# ---------------------------------------------------------------------- groups

def build_groups(atoms, spaces: list[Space], gates: set[str]) -> GroupIndex:
    """Groups from the atom table's classes; `gates`: nodes that only scale channels that
    something else produces (`gate_producers`)."""
    n = atoms.count
    root = atoms.find(np.arange(n))
    atom_space = np.zeros(n, dtype=np.int64)
    for i, sp in enumerate(spaces):
        atom_space[sp.atoms] = i
    # Two spaces are in one group when some class has atoms in both. The classes set apart
    # (`AtomTable.fix_apart`: a key/value head that every query head shares) link only the
    # kept parts of their spaces (space i's is node i + len(spaces)): the rest of a space
    # groups without them.
    link, nodes = atom_space, len(spaces)
    apart = atoms.apart()
    if apart.size:
        link = np.where(np.isin(root, apart), atom_space + len(spaces), atom_space)
        nodes = 2 * len(spaces)
    a, b = link, link[root]
    m = max(nodes, 1)  # pairs encoded as one integer: a 1-d unique is fast
    code = sorted_unique(a[a != b] * m + b[a != b])
    pairs = np.stack([code // m, code % m], axis=1)
    linked = nx.Graph()
    linked.add_nodes_from(range(nodes))
    linked.add_edges_from(map(tuple, pairs.tolist()))
    comp_of_space = np.zeros(nodes, dtype=np.int64)
    components = list(nx.connected_components(linked))
    for c, members in enumerate(components):
        comp_of_space[list(members)] = c
    classes = sorted_unique(root)  # sorted: a class is named by its oldest atom
    class_comp = comp_of_space[link[classes]]
    # Groups in order of their oldest channel; classes in order within a group.
    order = np.lexsort((classes, class_comp))
    classes, class_comp = classes[order], class_comp[order]
    starts = np.flatnonzero(np.r_[True, class_comp[1:] != class_comp[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(classes)]))
    bounds.sort(key=lambda se: classes[se[0]])
    class_group = np.zeros(n, dtype=np.int64)
    class_index = np.zeros(n, dtype=np.int64)
    for gid, (s0, s1) in enumerate(bounds):
        cls = classes[s0:s1]
        class_group[cls] = gid
        class_index[cls] = np.arange(len(cls))
    fixed = atoms.fixed_by(class_group)  # group -> why it cannot be pruned
    groups: list[ChannelGroup] = []
    for gid, (s0, s1) in enumerate(bounds):
        cls = classes[s0:s1]
        reasons = fixed.get(gid, ())
        comp = class_comp[s0]
        names = list(dict.fromkeys(spaces[i % len(spaces)].node
                                   for i in sorted(components[comp])))
        groups.append(ChannelGroup(
            id=gid, size=len(cls), prunable=not reasons,
            reason=_summarise(sorted(reasons)), members=[], spaces=names, classes=cls))
    atom_group, atom_index = class_group[root], class_index[root]
    # Channel positions (group offset + index) and the nodes that produce each of them.
    sizes = np.array([g.size for g in groups], dtype=np.int64)
    group_offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    space_nodes = list(dict.fromkeys(sp.node for sp in spaces))
    node_id = {name: i for i, name in enumerate(space_nodes)}
    space_node = np.array([node_id[sp.node] for sp in spaces], dtype=np.int64)
    position = group_offset[atom_group] + atom_index
    # A grouped conv's output channel is its input channel carried on, not a new one; a
    # gate (an SE block's last layer) only scales channels that something else produces.
    made = np.array([sp.kind != "grouped_conv" and sp.node not in gates
                     for sp in spaces])[atom_space]
    k = max(len(space_nodes), 1)
    code = sorted_unique(position[made] * k + space_node[atom_space][made])
    return GroupIndex(groups=groups, atom_group=atom_group, atom_index=atom_index, sizes=sizes,
                      group_offset=group_offset,
                      position_group=np.repeat(np.arange(len(groups)), sizes),
                      space_nodes=space_nodes, pair_pos=code // k, pair_node=code % k)


def gate_producers(nodes: list[NodeInfo], values: dict, producers: Iterable[str]) -> set[str]:
    """Of `producers`, the nodes whose output reaches the rest of the model only as a factor
    of a product of two tensors (through activations, scalar arithmetic and reshapes): the
    fc2 of a squeeze-excitation gate. A product's channel exists only where its other
    factor's does, so a gate never keeps a channel alive whose real producers were removed."""
    users: dict[str, list[NodeInfo]] = {}
    for info in nodes:
        for name in dict.fromkeys(info.inputs):
            users.setdefault(name, []).append(info)
    memo: dict[str, bool] = {}

    def numel(name: str) -> int:
        v = values.get(name)
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

    return {name for name in producers if only_gates(name)}


def add_members(index: GroupIndex, module: torch.nn.Module, bindings: dict,
                spaces: list[Space], params: dict | None = None) -> None:
    """Each group's readable members: `layer1.0.conv1.weight[out]`, `fc.weight[in] x49`,
    `<input x>`. `params`: `dict(module.named_parameters(remove_duplicate=False))`."""
    if params is None:
        params = dict(module.named_parameters(remove_duplicate=False))
    ranks = {name: len(p.shape) for name, p in params.items()}
    lines: list[tuple[str, int | None, int, np.ndarray]] = []  # (name, dim, rank, line)
    for name, b in bindings.items():
        rank = (ranks[name] if name in ranks else
                len(module.get_parameter(name).shape)) if not b.is_buffer else 1
        lines += [(name, d, rank, line) for d, line in sorted(b.dims.items())]
        if b.ids is not None:
            lines.append((name, None, rank, b.ids.reshape(-1).numpy()))
    named = [s for s in spaces if s.kind in ("input", "opaque", "pad")]
    # One lookup for every line and space, split back by position.
    arrays = [np.asarray(x[3], dtype=np.int64).reshape(-1) for x in lines] + \
        [np.asarray(s.atoms, dtype=np.int64).reshape(-1) for s in named]
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    located = index.locate_group(np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
    groups = index.groups
    labels = [set(g.members) for g in groups]

    def add(gid: int, label: str) -> None:
        if label not in labels[gid]:
            labels[gid].add(label)
            groups[gid].members.append(label)

    # (line, group) pairs with the number of the line's entries in that group, in order of
    # line then group: one count for all lines
    n_groups = max(len(groups), 1)
    owner = np.repeat(np.arange(len(arrays), dtype=np.int64), lens)
    has = located >= 0
    pairs, counts = sorted_counts(owner[has] * n_groups + located[has])
    for k, gid, count in zip((pairs // n_groups).tolist(), (pairs % n_groups).tolist(),
                             counts.tolist()):
        if k >= len(lines):  # a named space
            add(gid, f"<{named[k - len(lines)].kind} {named[k - len(lines)].node}>")
            continue
        name, d, rank, _ = lines[k]
        per_class = count / groups[gid].size
        label = name
        if d is not None and rank > 1:
            label += f"[{bindings[name].role(d)}]"
        if per_class > 1 and per_class == int(per_class):
            label += f" x{int(per_class)}"
        add(gid, label)


# ---------------------------------------------------------------------- cost tables

def build_cost_tables(index: GroupIndex, module: torch.nn.Module, bindings: dict,
                      macs_terms: list, params: dict | None = None) -> CostTables:
    """Every MAC term and every parameter as a cost term over at most two layouts.
    `params`: `dict(module.named_parameters(remove_duplicate=False))`."""
    layouts: list[tuple[np.ndarray, float]] = []
    terms: list[tuple[str, float, list[int], list[str]]] = []
    term_why: list[str] = []

    def add_layout(atoms: np.ndarray, mult: float) -> int:
        layouts.append((atoms, mult))
        return len(layouts) - 1

    for t in macs_terms:
        idx = [add_layout(a, m) for a, m in t.layouts]
        terms.append(("macs", t.coeff, idx, [t.node]))
        term_why.append(t.why)
    if params is None:
        params = dict(module.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}  # a tied weight's names (a graph reads either)
    first: list = []  # each parameter once, under its first name (`named_parameters()`)
    for name, p in params.items():
        if id(p) not in aliases:
            aliases[id(p)] = []
            first.append((name, p))
        aliases[id(p)].append(name)
    for name, p in first:
        b = next((bindings[n] for n in aliases[id(p)] if n in bindings), None)
        if b is None:
            terms.append(("params", float(p.numel()), [], []))
        elif b.ids is not None:
            idx = add_layout(b.ids.reshape(-1).numpy(), p.numel() / b.ids.numel())
            terms.append(("params", 1.0, [idx], b.nodes))
        else:
            lines = [b.dims[d] for d in sorted(b.dims)]
            coeff = p.numel() / math.prod(len(x) for x in lines)
            terms.append(("params", float(coeff), [add_layout(x, 1.0) for x in lines],
                          b.nodes))
    if any(len(t[2]) > 2 for t in terms):
        raise AssertionError("a cost term with more than two layouts")

    n_layouts, n_groups = len(layouts), len(index.groups)
    # All layouts at once: each position's layout, group and index in the group.
    mults = np.array([float(mult) for _, mult in layouts], dtype=float)
    parts = [np.asarray(atoms, dtype=np.int64).reshape(-1) for atoms, _ in layouts]
    lens = np.array([len(a) for a in parts], dtype=np.int64)
    layout_of = np.repeat(np.arange(n_layouts, dtype=np.int64), lens)
    groups, where = index.locate(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    valid = groups >= 0
    per_group = np.bincount(layout_of[valid] * n_groups + groups[valid],
                            minlength=n_layouts * n_groups).reshape(n_layouts, n_groups)
    if n_layouts:
        li = layout_of[valid]
        exact = ((index.group_offset[groups[valid]] + where[valid]).astype(np.int64), li,
                 mults[li])
    else:
        exact = (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    one = n_layouts  # index of the constant 1 appended to the counts
    kind = np.array([t[0] == "macs" for t in terms])
    coeff = np.array([t[1] for t in terms], dtype=float)
    return CostTables(
        c0=mults * np.bincount(layout_of[~valid], minlength=n_layouts),
        M=mults[:, None] * per_group, exact=exact, term_kind=kind, term_coeff=coeff,
        term_a=np.array([t[2][0] if len(t[2]) > 0 else one for t in terms], dtype=int),
        term_b=np.array([t[2][1] if len(t[2]) > 1 else one for t in terms], dtype=int),
        term_nodes=[t[3] for t in terms], term_why=term_why,
        macs_coeff=np.where(kind, coeff, 0.0), params_coeff=np.where(kind, 0.0, coeff))


# ---------------------------------------------------------------------- dead branches

def build_branch_tables(index: GroupIndex, nodes: list[NodeInfo],
                        spaces: list[Space]) -> BranchTables:
    """What the dead-branch simulation reads per node: its groups, whether it carries
    anything else, its users and the channels it keeps inside."""
    # Channels an op keeps inside (attention heads): with none left, the op is gone.
    internal: dict[str, frozenset] = {}
    for s in spaces:
        if s.kind == "heads":
            g = index.locate_group(s.atoms)
            internal[s.node] = internal.get(s.node, frozenset()) | \
                frozenset(sorted_unique(g[g >= 0]).tolist())
    users: dict[str, list[str]] = {}
    for info in nodes:
        for src in info.inputs:
            users.setdefault(src, []).append(info.name)
    node_groups: dict[str, frozenset] = {}
    node_other: dict[str, bool] = {}
    # Every node's ids in one lookup: (node, its tensors' atoms), and what is no tensor.
    owner, arrays, no_tensor = [], [], set()
    for k, info in enumerate(nodes):
        for ids in (info.ids if isinstance(info.ids, tuple) else (info.ids,)):
            if isinstance(ids, torch.Tensor):
                owner.append(k)
                arrays.append(ids.reshape(-1).numpy())
            else:
                no_tensor.add(k)
    n_groups = len(index.groups)
    lens = np.array([len(a) for a in arrays], dtype=np.int64)
    node_of = np.repeat(np.array(owner, dtype=np.int64), lens)
    g = index.locate_group(np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
    has = g >= 0
    pairs = sorted_unique(node_of[has] * (n_groups + 1) + g[has])
    carried: dict[int, list[int]] = {}
    for k, gid in zip((pairs // (n_groups + 1)).tolist(), (pairs % (n_groups + 1)).tolist()):
        carried.setdefault(k, []).append(gid)
    other = set(sorted_unique(node_of[~has]).tolist()) | no_tensor
    for k, info in enumerate(nodes):
        groups = frozenset(carried.get(k, ()))
        node_groups[info.name] = groups
        node_other[info.name] = k in other or not groups
    return BranchTables(internal=internal, users=users, node_groups=node_groups,
                        node_other=node_other)


def _summarise(reasons: Iterable[str], limit: int = 3) -> str:
    reasons = list(reasons)
    text = "; ".join(reasons[:limit])
    if len(reasons) > limit:
        text += f"; and {len(reasons) - limit} more"
    return text
