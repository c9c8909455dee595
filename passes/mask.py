"""The mask reference: the original architecture with the dropped channels forced to zero.

It is what a slim model must equal: every value of the traced graph is computed as in the
original and then multiplied by the plan's keep mask of its channels; a node in a removed
branch yields zeros (so a residual add returns its identity path). Two ops need more than a
multiply, because zeros would change their statistics: LayerNorm over a pruned dim normalises
over the kept channels only, and attention over pruned heads drops those heads.

`verify(slim, reference, inputs)` runs both and says which output differs and by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from graphsearch.graph import ChannelGraph

from graphsearch.passes.plan import Keep, ResolvedPlan, resolve


class MaskedModel(nn.Module):
    """Runs the traced original with a keep plan applied as masks. Shares its parameters."""

    def __init__(self, graph: ChannelGraph, plan: ResolvedPlan) -> None:
        super().__init__()
        self.gm = graph.module
        self.plan = plan
        self._masks: dict[str, Any] = {}
        # Ops whose rule runs them differently under a plan (LayerNorm statistics over kept
        # channels, attention without the dropped heads): node -> (runner, keep).
        self._runners: dict[str, tuple] = {}
        batch = _analysed_batch(graph)
        for node in self.gm.graph.nodes:
            info = graph.info(node.name)
            if info is None or node.name in plan.dead:
                continue
            self._masks[node.name] = _per_sample(_masks_of(plan, info.ids),
                                                 graph.values.get(node.name), batch)
            if info.op is not None and info.op.mask is not None:
                special = info.op.mask(graph, plan, node, info)
                if special is not None:
                    self._runners[node.name] = special

    def forward(self, *args):
        return _MaskInterpreter(self).run(*args)


class _MaskInterpreter(fx.Interpreter):
    def __init__(self, owner: MaskedModel) -> None:
        super().__init__(owner.gm)
        self.owner = owner

    def run_node(self, n: fx.Node) -> Any:
        o = self.owner
        special = o._runners.get(n.name)
        if special is not None:
            runner, keep = special
            out = runner(self, n, keep)
        else:
            out = super().run_node(n)
        if n.name in o.plan.dead:
            return tree_map(lambda t: torch.zeros_like(t) if isinstance(t, torch.Tensor) else t,
                            out)
        return _apply_masks(out, o._masks.get(n.name))


def _masks_of(plan: ResolvedPlan, ids) -> Any:
    if isinstance(ids, torch.Tensor):
        return plan.kept(ids).float() if plan.changes(ids) else None
    if isinstance(ids, (tuple, list)):
        return tuple(_masks_of(plan, i) for i in ids)
    return None


@dataclass(frozen=True)
class _PerSample:
    """The mask of a value whose dim 0 holds the batch and channels together (DeBERTa's
    attention: `(batch * heads, ...)`): one sample's block, repeated for the batch it runs
    at."""

    block: torch.Tensor

    def at(self, size: int) -> torch.Tensor:
        return self.block.repeat(size // self.block.size(0), *(1,) * (self.block.dim() - 1))


def _analysed_batch(graph: ChannelGraph) -> int | None:
    """The batch the graph was analysed at (its first tensor input's dim 0)."""
    for node in graph.module.graph.nodes:
        v = graph.values.get(node.name) if node.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and v.dim():
            return v.size(0)
    return None


def _per_sample(masks: Any, value: Any, batch: int | None) -> Any:
    """A mask whose dim 0 varies over `batch` samples of `value` with one period per sample,
    as a `_PerSample` (it then follows the batch); any other as it is."""
    if isinstance(masks, tuple) and isinstance(value, (tuple, list)):
        return tuple(_per_sample(m, v, batch) for m, v in zip(masks, value))
    if not isinstance(masks, torch.Tensor) or not isinstance(value, torch.Tensor) or \
            not batch or masks.dim() != value.dim() or masks.dim() == 0 or \
            masks.size(0) == 1 or masks.size(0) != value.size(0) or masks.size(0) % batch:
        return masks
    block = masks[:masks.size(0) // batch]
    return _PerSample(block) if torch.equal(_PerSample(block).at(masks.size(0)), masks) \
        else masks


def _zeroed(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`out * mask` with the dropped positions exactly zero: a dropped head's statistic
    (`pow(0 + eps, -0.5)`, large or infinite) times 0 would otherwise give NaN there."""
    return (out * mask).masked_fill(mask == 0, 0)


def _apply_masks(out: Any, masks: Any) -> Any:
    if masks is None:
        return out
    if isinstance(out, torch.Tensor):
        if isinstance(masks, _PerSample):
            return _zeroed(out, masks.at(out.size(0))) if out.dim() else out
        return _zeroed(out, masks) if isinstance(masks, torch.Tensor) else out
    if isinstance(out, (tuple, list)) and isinstance(masks, tuple):
        return type(out)(_apply_masks(o, m) for o, m in zip(out, masks))
    return out


def mask(graph: ChannelGraph, keep: Keep | None) -> MaskedModel:
    """The reference for `slim(graph, keep)`: same architecture, dropped channels zeroed."""
    return MaskedModel(graph, resolve(graph, keep))


@dataclass
class Verification:
    ok: bool
    worst_output: int  # index of the output (flattened) with the largest relative error
    max_abs: float
    max_rel: float  # max |a - b| / max |b| over that output
    rtol: float
    message: str

    def __bool__(self) -> bool:
        return self.ok


def verify(module: nn.Module, reference: nn.Module, inputs: Sequence[torch.Tensor],
           rtol: float = 1e-5, atol: float = 1e-10) -> Verification:
    """Run both on `inputs` and compare every output, relative to the reference's scale;
    an output also passes when its largest difference is under `atol`: a plan that keeps
    almost nothing can leave outputs that cancel to ~1e-10 or less, where the float32
    rounding of their O(1) terms is a large share of the result (random_plans.md read
    2.5e-14 on an output of scale 6e-10 and called it a mismatch)."""
    with torch.no_grad():
        got, _ = tree_flatten(module(*inputs))
        want, _ = tree_flatten(reference(*inputs))
    got = [g for g in got if isinstance(g, torch.Tensor)]
    want = [w for w in want if isinstance(w, torch.Tensor)]
    if len(got) != len(want):
        return Verification(False, -1, math.inf, math.inf, rtol,
                            f"{len(got)} outputs, the reference has {len(want)}")
    worst, worst_abs, worst_rel = -1, 0.0, 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return Verification(False, i, math.inf, math.inf, rtol,
                                f"output {i} has shape {tuple(a.shape)}, the reference "
                                f"{tuple(b.shape)}")
        diff = (a.double() - b.double()).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(b.double().abs().max()) if b.numel() else 0.0
        rel = max_abs / scale if scale > 0 else max_abs
        if not math.isfinite(max_abs):
            rel = math.inf
        if max_abs <= atol:
            rel = 0.0
        if rel >= worst_rel:
            worst, worst_abs, worst_rel = i, max_abs, rel
    ok = worst_rel <= rtol
    msg = (f"outputs agree (largest relative difference {worst_rel:.2e} at output {worst})"
           if ok else f"output {worst} differs: max |diff| {worst_abs:.3e}, "
                      f"{worst_rel:.2e} of its scale (tolerance {rtol:.0e})")
    return Verification(ok, worst, worst_abs, worst_rel, rtol, msg)


__all__ = ["MaskedModel", "mask", "verify", "Verification"]
