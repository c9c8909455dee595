"""Normalisation: batch, instance, group and layer norms, as modules and as functions.

Per-channel statistics and affine parameters are sliced with the channel (roles gamma, beta,
statistic); a per-channel gate moves onto a norm that follows its producer (`gate="norm"`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import arg, plain_meta, rule, set_arg, unsupported


_NORM_ROLES = {"weight": "gamma", "bias": "beta", "running_mean": "statistic",
               "running_var": "statistic"}


def _fix_batch_norm_module(rw, node, m) -> None:
    if m is not None:
        m.num_features = rw.slim_width(node.args[0], 1)


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
      nn.InstanceNorm2d, nn.InstanceNorm3d, edge="identity", fix=_fix_batch_norm_module,
      gate="norm", roles=_NORM_ROLES, same_shape=True)
def batch_norm(ctx, node):
    """Per-channel statistics and affine parameters, all sliced with the channel."""
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(ctx.module, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", 0, line, role=_NORM_ROLES[name])
    return ctx.channel_ids(line, node)


_F_BATCH_NORM_ARGS = (("running_mean", 1, "statistic"), ("running_var", 2, "statistic"),
                      ("weight", 3, "gamma"), ("bias", 4, "beta"))
# torch.batch_norm and the ATen op (a torch.export graph's) put the affine parameters first
_ATEN_BATCH_NORM_ARGS = (("weight", 1, "gamma"), ("bias", 2, "beta"),
                         ("running_mean", 3, "statistic"), ("running_var", 4, "statistic"))


def _batch_norm_on(ctx, node, positions):
    """The per-channel parameters found at `positions` (name, position, role), bound to the
    input's channel line."""
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    for key, pos, role in positions:
        value = arg(node, pos, key)
        if value is None:
            continue
        name = ctx.param_name(value)
        if name is None:
            return unsupported(ctx, node, why=f"batch_norm with a computed {key}")
        ctx.bind(name, 0, line, role=role)
    return ctx.channel_ids(line, node)


@rule(F.batch_norm, F.instance_norm, edge="identity", gate="norm", roles=_NORM_ROLES)
def functional_batch_norm(ctx, node):
    """F.batch_norm on parameters the model owns (a norm + activation module that calls it):
    the same per-channel statistics and affine parameters as nn.BatchNorm2d."""
    return _batch_norm_on(ctx, node, _F_BATCH_NORM_ARGS)


@rule(torch.batch_norm, torch.instance_norm, edge="identity", gate="norm", roles=_NORM_ROLES)
def tensor_batch_norm(ctx, node):
    """torch.batch_norm / torch.instance_norm (the ATen signature: weight and bias before
    the running statistics): F.batch_norm's rule."""
    return _batch_norm_on(ctx, node, _ATEN_BATCH_NORM_ARGS)


def _fix_group_norm(rw, node, m: nn.GroupNorm) -> None:
    old = rw.original(node.target)
    m.num_channels = rw.slim_width(node.args[0], 1)
    m.num_groups = m.num_channels // (old.num_channels // old.num_groups)


def _fix_functional_group_norm(rw, node) -> None:
    """F.group_norm's literal num_groups follows its input's slim channel count (the rule
    ties whole norm groups, so the group size is unchanged)."""
    x = node.args[0]
    given = arg(node, 1, "num_groups")
    if isinstance(given, int):
        set_arg(node, 1, "num_groups", given * rw.slim_width(x, 1) // rw.shape(x)[1])


def _fix_group_norm_any(rw, node, m) -> None:
    if m is None:
        _fix_functional_group_norm(rw, node)
    else:
        _fix_group_norm(rw, node, m)


@rule(nn.GroupNorm, F.group_norm, torch.group_norm, edge="identity", fix=_fix_group_norm_any,
      gate="norm", roles=_NORM_ROLES, same_shape=True)
def group_norm(ctx, node):
    """Statistics are per group of channels: a whole norm group is pruned as one unit."""
    m = ctx.module
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    groups = m.num_groups if m is not None else \
        (node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups"))
    if not isinstance(groups, int):
        ctx.fix(line, f"group_norm with a computed number of groups at '{node.name}'")
        return ctx.channel_ids(line, node)
    ctx.tie_blocks(line, groups)
    line = ctx.find(line)
    if m is not None:
        if m.affine:
            ctx.bind(f"{node.target}.weight", 0, line, role="gamma")
            ctx.bind(f"{node.target}.bias", 0, line, role="beta")
    else:
        _bind_functional_affine(ctx, node, line)
    return ctx.channel_ids(line, node)


def _bind_functional_affine(ctx, node, line) -> None:
    """weight and bias of F.layer_norm / F.group_norm (args 2 and 3): gamma and beta."""
    for pos, key, role in ((2, "weight", "gamma"), (3, "bias", "beta")):
        arg = node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
        if ctx.param_name(arg):
            ctx.bind(ctx.param_name(arg), 0, line, role=role)


def _fix_layer_norm(rw, node, m: nn.LayerNorm) -> None:
    m.normalized_shape = (rw.slim_width(node.args[0], -1),)


def _fix_functional_layer_norm(rw, node) -> None:
    """F.layer_norm's literal normalized_shape follows its input's slim sizes."""
    x = node.args[0]
    given = arg(node, 1, "normalized_shape")
    if given is None:
        return
    rank = len(rw.shape(x))
    k = 1 if isinstance(given, int) else len(given)
    set_arg(node, 1, "normalized_shape", tuple(rw.slim_width(x, d) for d in range(rank - k, rank)))


def _fix_layer_norm_any(rw, node, m) -> None:
    if m is None:
        _fix_functional_layer_norm(rw, node)
    else:
        _fix_layer_norm(rw, node, m)


def _mask_layer_norm(graph, plan, node, info):
    """LayerNorm over a pruned dim: the reference normalises over the kept channels only."""
    ids = info.ids  # output channels are the normalised dim
    if not plan.changes(ids):
        return None
    line = ids.reshape(-1) if ids.dim() else ids
    return _run_masked_layer_norm, plan.kept(line).float()


def _run_masked_layer_norm(interp, n, keep):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x = args[0]
    if n.op == "call_module":
        m = interp.fetch_attr(n.target)
        weight, bias, eps = m.weight, m.bias, m.eps
    else:
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(-1, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")


def _layer_norm_meta(target, args, kwargs):
    """F.layer_norm / torch.layer_norm of a meta tensor, row-major or not contiguous at all,
    with meta affine parameters of its dtype and shape: a row-major tensor of the input's
    shape and dtype, as torch's kernel gives (its Python decomposition normalises a
    contiguous copy: most of a ConvNeXt's shape pass); None for anything else. (nn.LayerNorm
    passes its input on: `same_shape`.)"""
    if isinstance(target, nn.Module):
        return None
    names = _LAYER_NORM_ARGS if target is torch.layer_norm else _LAYER_NORM_ARGS[:5]
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return None
    call = dict(zip(names, args), **kwargs)
    x, shape = call.get("input"), call.get("normalized_shape")
    if type(x) is not torch.Tensor or not x.is_meta or x.requires_grad or \
            x.layout != torch.strided or not x.is_floating_point() or \
            not isinstance(shape, (tuple, list, torch.Size)) or \
            not all(type(n) is int for n in shape) or not 0 < len(shape) <= x.dim() or \
            tuple(x.shape[x.dim() - len(shape):]) != tuple(shape):
        return None
    if x.is_contiguous() and not plain_meta(x):  # (odd strides on a size-1 dim, kept)
        return None
    for p in (call.get("weight"), call.get("bias")):
        if p is not None and not (plain_meta(p) and p.dtype == x.dtype and
                                  tuple(p.shape) == tuple(shape)):
            return None
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


@rule(nn.LayerNorm, F.layer_norm, torch.layer_norm, edge="identity", fix=_fix_layer_norm_any,
      gate="norm", roles=_NORM_ROLES, same_shape=True, mask=_mask_layer_norm,
      meta=_layer_norm_meta)
def layer_norm(ctx, node):
    """LayerNorm over the last dim: prunable, the statistics then cover the kept channels."""
    x = node.args[0]
    shape = ctx.module.normalized_shape if ctx.module is not None else node.args[1]
    ids = ctx.ids(x)
    if len(tuple(shape)) != 1:
        ctx.fix(ids, f"LayerNorm over several dims at '{node.name}'")
        return ids
    line = ctx.line(ids, -1, x)
    if ctx.module is not None:
        for name in ("weight", "bias"):
            if getattr(ctx.module, name, None) is not None:
                ctx.bind(f"{node.target}.{name}", 0, line, role=_NORM_ROLES[name])
    else:
        _bind_functional_affine(ctx, node, line)
    return ctx.channel_ids(line, node, dim=-1)


RULES = (batch_norm, functional_batch_norm, tensor_batch_norm, group_norm, layer_norm)
