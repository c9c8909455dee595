"""Spatial ops: pooling, resizing, padding, reductions over positions.

Each channel maps to itself; a reduction over the channel dim consumes them (not prunable).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import FULL, methods, plain_meta, rule, set_arg, target_name

_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                 F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


def _spatial_meta(target, args, kwargs):
    """Adaptive average pooling of a row-major meta tensor with a batch dim: a row-major
    (N, C, *output_size) of its dtype, as torch's kernel gives (its decomposition through
    `mean` is most of a squeeze-excitation network's shape pass); None for anything else."""
    k = _ADAPTIVE_AVG.get(type(target) if isinstance(target, nn.Module) else target)
    if k is None or len(args) != (1 if isinstance(target, nn.Module) else 2) or kwargs:
        return None
    x = args[0]
    size = target.output_size if isinstance(target, nn.Module) else args[1]
    if not plain_meta(x) or x.dim() != k + 2 or not all(x.shape):
        return None
    if isinstance(size, int):
        size = (size,) * k
    if not isinstance(size, (tuple, list)) or len(size) != k or \
            not all(s is None or (type(s) is int and s > 0) for s in size):
        return None
    out = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(size))
    return torch.empty(tuple(x.shape[:2]) + out, dtype=x.dtype, device="meta")


@rule(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.ConstantPad2d, nn.CircularPad2d, nn.ZeroPad3d, nn.ConstantPad3d,
    nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
    F.upsample, torch.max_pool2d,
    edge="identity", pure=True, meta=_spatial_meta,
)
def channelwise_spatial(ctx, node):
    """Pooling, interpolation, spatial padding: each channel maps to itself (dim 1)."""
    return ctx.channel_ids(ctx.line(ctx.ids(node.args[0]), 1, node.args[0]), node)


def _rewrite_pad(rw, node, state):
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
    set_arg(node, 1, "pad", tuple(pads))


@rule(F.pad, edge="offset", slim=_rewrite_pad)
def pad(ctx, node):
    """Padding along spatial dims keeps channels; padded channels are new constant atoms."""
    x = node.args[0]
    pads = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    ids = ctx.ids(x)
    shape = ctx.shape(x)
    rank = len(shape)
    out = ids
    for i in range(len(pads) // 2):
        dim = rank - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        if (lo == 0 and hi == 0) or ids.size(dim) == 1:
            continue  # padding a dim that carries no channel identity changes nothing
        if lo < 0 or hi < 0:
            out = ctx.run_on_ids(node)  # cropping: a plain slice
            continue
        parts = [ctx.fresh_ids(lo, dim, rank, "pad"), out, ctx.fresh_ids(hi, dim, rank, "pad")]
        out = torch.cat([p for p in parts if p.size(dim)], dim)
    return out


@rule(torch.mean, torch.sum, torch.amax, torch.amin, *methods("mean", "sum", "amax", "amin"),
      edge="identity")
def reduce(ctx, node):
    """Reducing over spatial dims keeps channels; reducing over channels consumes them."""
    x = node.args[0]
    ids = ctx.ids(x)
    rank = len(ctx.shape(x))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        dims = tuple(range(rank))
    dims = sorted({d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))})
    if any(ids.size(d) > 1 for d in dims):
        ctx.fix(ids, f"{target_name(node)} over channels at '{node.name}'")
        return ctx.no_channels(node)
    out = ids
    for d in reversed(dims):
        out = out if keepdim else out.squeeze(d)
    return out


RULES = (channelwise_spatial, pad, reduce)
