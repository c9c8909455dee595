"""Convolutions: nn.ConvNd, transposed, functional, and weight-standardised ones.

A convolution produces fresh channels (its output rows); a grouped one ties input block k to
output block k, so whole groups are pruned together.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .registry import arg, plain_meta, plain_parameter, rule, set_arg, unsupported


def _conv_module_macs(ctx, node, line_in, line_out, transposed: bool):
    m = ctx.module
    out_shape = ctx.shape(node)
    in_shape = ctx.shape(node.args[0])
    spatial = math.prod(in_shape[2:]) if transposed else math.prod(out_shape[2:])
    k = math.prod(m.kernel_size)
    if m.groups == 1:
        ctx.macs(spatial * k, line_in, line_out)
    else:
        # Grouped: each output channel reads (in / groups) inputs (a transposed conv: each
        # input channel writes (out / groups) outputs); groups are pruned whole.
        if transposed:
            ctx.macs(spatial * k * (m.out_channels // m.groups), line_in)
        else:
            ctx.macs(spatial * k * (m.in_channels // m.groups), line_out)


def _conv_module(ctx, node, transposed: bool):
    """nn.ConvNd and nn.ConvTransposeNd: fresh output channels, the input's channels bound
    to the weight's other dim."""
    m = ctx.module
    x = node.args[0]
    line_in = ctx.line(ctx.ids(x), 1, x)
    # A grouped conv's outputs are tied to their inputs: "derived", not new channels.
    kind = "conv_transpose" if transposed else "conv"
    out = ctx.fresh(m.out_channels, kind if m.groups == 1 else "grouped_conv")
    if m.groups > 1:
        # Channel block k of the input feeds only output block k: tie each block into a unit
        # (for a depthwise conv, input channel c is output channel c).
        ctx.tie_group_blocks(line_in, out, m.groups)
        out = ctx.find(out)
        line_in = ctx.find(line_in)
    weight = f"{node.target}.weight"
    if transposed:  # weight is (in, out / groups, k...)
        ctx.bind(weight, 0, line_in, role="in")
        if m.groups == 1:
            ctx.bind(weight, 1, out, role="out")
    else:  # (out, in / groups, k...)
        ctx.bind(weight, 0, out)
        if m.groups == 1:
            ctx.bind(weight, 1, line_in)
    if m.bias is not None:
        ctx.bind(f"{node.target}.bias", 0, out)
    _conv_module_macs(ctx, node, line_in, out, transposed)
    return ctx.channel_ids(out, node)


def _fix_conv(rw, node, m: nn.modules.conv._ConvNd) -> None:
    old = rw.original(node.target)
    w = m.weight
    if m.transposed:  # (in, out / groups, k...)
        m.groups = old.groups * w.shape[0] // old.in_channels if old.groups > 1 else 1
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:  # (out, in / groups, k...)
        m.groups = old.groups * w.shape[0] // old.out_channels if old.groups > 1 else 1
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _conv_meta(m, args, kwargs):
    """nn.ConvNd (zero padding) of a row-major meta tensor with a batch dim, with parameters
    of its dtype (`plain_parameter`): a row-major (N, out, *spatial) of that dtype, as torch's
    kernel gives (keying a conv for the shape memo, then its kernel, was most of the shape
    pass of a convolutional network); None for anything else (the kernel runs)."""
    if len(args) != 1 or kwargs or m.padding_mode != "zeros":
        return None
    x, w, b = args[0], m.weight, m.bias
    k = w.dim() - 2
    if not (plain_meta(x) and plain_parameter(w)) or x.dim() != k + 2 or not all(x.shape) or \
            not all(w.shape) or w.dtype != x.dtype or x.shape[1] != w.shape[1] * m.groups or \
            w.shape[0] % m.groups:
        return None
    if b is not None and (not plain_parameter(b) or b.dtype != x.dtype or
                          tuple(b.shape) != (w.shape[0],)):
        return None
    stride, dilation, padding = tuple(m.stride), tuple(m.dilation), m.padding
    if padding == "valid":
        padding = (0,) * k
    if padding == "same":
        if any(s != 1 for s in stride):
            return None
        spatial = tuple(x.shape[2:])
    else:
        if not len(padding) == len(stride) == len(dilation) == k:
            return None
        spatial = tuple((n + 2 * p - d * (kw - 1) - 1) // s + 1 for n, kw, p, s, d in
                        zip(x.shape[2:], w.shape[2:], padding, stride, dilation))
    if not all(n > 0 for n in spatial):
        return None  # (the kernel's error)
    return torch.empty((x.shape[0], w.shape[0]) + spatial, dtype=x.dtype, device="meta")


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, edge="mix", gate="producer", fix=_fix_conv, pure=True,
      latency="conv", meta=_conv_meta)
def conv(ctx, node):
    return _conv_module(ctx, node, transposed=False)


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, edge="mix", gate="producer",
      fix=_fix_conv, pure=True)
def conv_transpose(ctx, node):
    return _conv_module(ctx, node, transposed=True)


def _fix_groups_at(pos: int):
    """The `fix` of a functional convolution whose literal `groups` is argument `pos`: it
    follows the slim output width (a grouped conv loses whole groups)."""

    def fix(rw, node, m) -> None:
        groups = arg(node, pos, "groups", 1)
        if isinstance(groups, int) and groups != 1:
            set_arg(node, pos, "groups", groups * rw.slim_width(node, 1) // rw.shape(node)[1])

    return fix


_fix_functional_conv = _fix_groups_at(6)  # F.conv2d(x, weight, bias, stride, padding, ...)


def _conv_on_owned_weight(ctx, node, x, w, wname, bname, groups):
    """nn.Conv2d's rule for a functional conv on parameters: the output channels' atoms."""
    wshape = ctx.shape(w)
    line_in = ctx.line(ctx.ids(x), 1, x)
    out = ctx.fresh(wshape[0], "conv" if groups == 1 else "grouped_conv")
    if groups > 1:
        ctx.tie_group_blocks(line_in, out, groups)
        out, line_in = ctx.find(out), ctx.find(line_in)
    ctx.bind(wname, 0, out)
    if groups == 1:
        ctx.bind(wname, 1, line_in)
    if bname:
        ctx.bind(bname, 0, out)
    spatial, k = math.prod(ctx.shape(node)[2:]), math.prod(wshape[2:])
    if groups == 1:
        ctx.macs(spatial * k, line_in, out)
    else:
        ctx.macs(spatial * k * wshape[1], out)
    return out


_CONV_DEFAULTS = (None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups


def _fuse_computed_weight(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """The tracer's rewrite at a functional conv (`Rule.fuse`) whose weight a known chain
    computes from parameters: standardised (`_fuse_standardised_weight`) or weight-normed
    (`_fuse_weight_norm`). True if it rewrote `conv`."""
    return _fuse_standardised_weight(gm, conv) or _fuse_weight_norm(gm, conv)


def _fuse_weight_norm(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """`conv(x, _weight_norm(v, g, dim), ...)` on parameters v and g (weight-normed
    convolutions, `nn.utils.parametrizations.weight_norm`: wav2vec2's and HuBERT's positional
    convolution) becomes one `weight_normed_conv` node, whose rule knows v's channels."""
    w = arg(conv, 1, "weight")
    if not (isinstance(w, fx.Node) and w.op == "call_function" and len(w.users) == 1 and
            w.target in (torch._weight_norm, torch.ops.aten._weight_norm.default) and
            len(w.args) >= 2 and
            all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args[:2])):
        return False
    v, g, dim = w.args[0], w.args[1], arg(w, 2, "dim", 0)
    if not isinstance(dim, int):
        return False
    rest = [conv.args[i] if len(conv.args) > i else
            conv.kwargs.get(("bias", "stride", "padding", "dilation", "groups")[i - 2],
                            _CONV_DEFAULTS[i - 2]) for i in range(2, 7)]
    with gm.graph.inserting_before(conv):
        new = gm.graph.call_function(weight_normed_conv, (conv.args[0], v, g, dim, *rest))
    new.meta.update(conv.meta)
    conv.replace_all_uses_with(new)
    gm.graph.erase_node(conv)
    return True


def _fuse_standardised_weight(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """Weight-standardised convolutions (BiT's StdConv2d, NF-Nets' ScaledStdConv2d) compute
    their weight in forward, `F.batch_norm(w.reshape(1, out, -1), None, None, gain,
    training=True)` reshaped back, into `F.conv2d`. Such a chain on a parameter becomes one
    `standardised_conv` node, whose rule knows the parameter's channels (the chain alone is
    a computed weight: nothing around it pruned). True if it rewrote `conv`."""
    found = _standardised_weight(gm, arg(conv, 1, "weight"))
    if found is None:
        return False
    param, gain, eps = found
    rest = [conv.args[i] if len(conv.args) > i else
            conv.kwargs.get(("bias", "stride", "padding", "dilation", "groups")[i - 2],
                            _CONV_DEFAULTS[i - 2]) for i in range(2, 7)]
    with gm.graph.inserting_before(conv):
        new = gm.graph.call_function(
            standardised_conv, (conv.args[0], param, rest[0], gain, eps, *rest[1:]))
    conv.replace_all_uses_with(new)
    gm.graph.erase_node(conv)
    return True


def _standardised_weight(gm, w):
    """(parameter node, gain node or None, eps) if `w` is a standardised parameter."""
    def method(n, *names):
        return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names

    if not method(w, "reshape_as", "view_as") or len(w.users) != 1:
        return None
    bn = w.args[0]
    if not (isinstance(bn, fx.Node) and bn.op == "call_function" and
            bn.target is torch.nn.functional.batch_norm and len(bn.users) == 1):
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
    a = dict(zip(names, bn.args))
    a.update(bn.kwargs)
    flat = a.get("input")
    if a.get("running_mean") is not None or a.get("running_var") is not None or \
            a.get("bias") is not None or a.get("training") is not True or \
            not method(flat, "reshape", "view") or len(flat.users) != 1:
        return None
    param = flat.args[0]
    sizes = flat.args[1] if len(flat.args) == 2 and isinstance(flat.args[1], (tuple, list)) \
        else flat.args[1:]
    if not (isinstance(param, fx.Node) and param.op == "get_attr" and
            isinstance(w.args[1], fx.Node) and w.args[1].target == param.target):
        return None
    try:
        value = functools.reduce(getattr, param.target.split("."), gm)
    except AttributeError:
        return None
    if not isinstance(value, torch.nn.Parameter) or value.dim() < 3 or \
            tuple(sizes) != (1, value.shape[0], -1):
        return None
    return param, a.get("weight"), a.get("eps", 1e-5)


@rule(F.conv1d, F.conv2d, F.conv3d, edge="mix", gate="producer", fix=_fix_functional_conv,
      fuse=_fuse_computed_weight)
def functional_conv(ctx, node):
    """F.conv2d on a weight the model owns (a conv subclass with its own forward): the rule
    of nn.Conv2d. A computed weight (standardised, re-parametrised) is not followed."""
    x = node.args[0]
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None:
        return unsupported(ctx, node, why="a convolution with a computed weight (standardised "
                                          "or re-parametrised): its channels are not followed")
    if (b is not None and bname is None) or not isinstance(groups, int):
        return unsupported(ctx, node, why="a convolution with a computed bias or groups")
    return ctx.channel_ids(_conv_on_owned_weight(ctx, node, x, w, wname, bname, groups), node)


def standardised_conv(x, weight, bias=None, gain=None, eps=1e-5, stride=1, padding=0,
                      dilation=1, groups=1):
    """A convolution whose weight is standardised per output channel (zero mean, unit
    variance over its inputs and kernel positions, times `gain`): weight-standardised
    ResNets (BiT) and NF-Nets. The tracer puts it in place of the pattern those models write
    (`F.batch_norm` over `weight.reshape(1, out, -1)` in training mode, then `F.conv2d`), so
    that one rule sees the convolution and the parameter it owns."""
    w = weight.reshape(weight.shape[0], -1)
    mean = w.mean(1, keepdim=True)
    w = (w - mean) * torch.rsqrt(((w - mean) ** 2).mean(1, keepdim=True) + eps)
    if gain is not None:
        w = w * gain.reshape(-1, 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return conv(x, w.reshape(weight.shape), bias, stride, padding, dilation, groups)


_fix_standardised_conv = _fix_groups_at(8)  # standardised_conv(x, weight, bias, gain, eps, ...)


def _mask_standardised_conv(graph, plan, node, info):
    """Pruned inputs of a standardised conv: the slim model standardises each row over the
    kept inputs (its weight has no others), and so does the reference."""
    if arg(node, 8, "groups", 1) != 1:
        return None  # a grouped conv keeps or drops whole blocks: its rows stay whole
    x = graph.info(node.args[0].name)
    if x is None or not isinstance(x.ids, torch.Tensor) or x.ids.dim() < 2:
        return None
    line = x.ids.movedim(1, 0).reshape(x.ids.size(1), -1)[:, 0]
    if not plan.changes(line):
        return None
    return _run_masked_standardised_conv, torch.from_numpy(
        np.flatnonzero(plan.kept(line).numpy()))


def _run_masked_standardised_conv(interp, n, kept):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x, weight = args[0], args[1]
    if x.size(1) != weight.size(1) or len(kept) == weight.size(1):
        return standardised_conv(*args, **kwargs)
    return standardised_conv(x.index_select(1, kept), weight.index_select(1, kept), *args[2:],
                             **kwargs)


def _scaled_parameter(ctx, n):
    """The parameter behind `(p * constant).view(-1)` (NF-Nets' gain times a fixed scale)."""
    while isinstance(n, fx.Node) and ctx.param_name(n) is None:
        nodes = [a for a in n.args if isinstance(a, fx.Node)]
        numbers = [a for a in n.args if not isinstance(a, fx.Node)]
        scale = n.target in (operator.mul, operator.truediv, "mul", "div") and \
            all(isinstance(a, (int, float)) for a in numbers)
        shape = n.op == "call_method" and n.target in ("view", "reshape", "flatten")
        if len(nodes) != 1 or not (scale or shape):
            return None
        n = nodes[0]
    name = ctx.param_name(n)
    shape = ctx.shape(n) if name is not None else ()
    return name if shape and math.prod(shape) == shape[0] else None  # one value per row


@rule(standardised_conv, edge="mix", gate="producer", fix=_fix_standardised_conv,
      mask=_mask_standardised_conv)
def standardised_conv_rule(ctx, node):
    """The conv rule on the parameter before standardisation; `gain` follows the output
    channels. Rows are standardised one by one, so output channels prune exactly; pruned
    inputs change each row's statistics: slim and the mask reference both take them over
    the kept inputs (the pruned model is defined so)."""
    x = node.args[0]
    w, b, gain = arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 3, "gain")
    groups = arg(node, 8, "groups", 1)
    wname, bname = ctx.param_name(w), ctx.param_name(b)
    if wname is None or (b is not None and bname is None) or not isinstance(groups, int):
        return unsupported(ctx, node, why="a standardised convolution on a computed weight, "
                                          "bias or groups")
    out = _conv_on_owned_weight(ctx, node, x, w, wname, bname, groups)
    # Scaling a row before standardisation changes nothing: the rows are no "out" slice that
    # a gate folds into or a norm penalty shrinks; the gain is the layer's gamma.
    ctx.bind(wname, 0, out, role="std_out")
    if gain is not None:
        ctx.tie(ctx.line(ctx.ids(gain), 0, gain), out)
        out = ctx.find(out)
        gname = _scaled_parameter(ctx, gain)
        if gname is not None and ctx.shape(gain)[0] == len(out):
            ctx.bind(gname, 0, out, role="gamma")
    return ctx.channel_ids(out, node)


def weight_normed_conv(x, v, g, dim, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A convolution whose weight is `v` normalised over every dim but `dim`, times `g`
    (`torch._weight_norm`: `nn.utils.parametrizations.weight_norm`). The tracer puts it in
    place of that pattern (`_fuse_weight_norm`) so that one rule sees the convolution and
    the parameters it owns."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[v.dim() - 3]
    return conv(x, torch._weight_norm(v, g, dim), bias, stride, padding, dilation, groups)


_fix_weight_normed_conv = _fix_groups_at(8)  # weight_normed_conv(x, v, g, dim, bias, ...)


def _mask_weight_normed_conv(graph, plan, node, info):
    """Pruned channels of a weight-normed conv: the slim model normalises its kept weight
    (it has no other), so the reference runs the conv on the kept channels alone (the
    pruned model is defined so, as a standardised conv's is)."""
    x = graph.info(node.args[0].name)
    if x is None or not isinstance(x.ids, torch.Tensor) or x.ids.dim() < 2 or \
            not isinstance(info.ids, torch.Tensor) or info.ids.dim() < 2:
        return None
    line_in = x.ids.movedim(1, 0).reshape(x.ids.size(1), -1)[:, 0]
    line_out = info.ids.movedim(1, 0).reshape(info.ids.size(1), -1)[:, 0]
    if not plan.changes(line_in) and not plan.changes(line_out):
        return None
    kept = [torch.from_numpy(np.flatnonzero(plan.kept(line).numpy())) for line in
            (line_in, line_out)]
    return _run_masked_weight_normed_conv, tuple(kept)


def _run_masked_weight_normed_conv(interp, n, kept):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    names = ("x", "v", "g", "dim", "bias", "stride", "padding", "dilation", "groups")
    a = {**dict(zip(names, args)), **kwargs}
    x, v, g, dim, groups = a["x"], a["v"], a["g"], a["dim"] % a["v"].dim(), a.get("groups", 1)
    kept_in, kept_out = kept
    out_full = v.shape[0]
    if x.size(1) != v.size(1) * groups:
        return weight_normed_conv(*args, **kwargs)  # (channels not laid out as analysed)
    if len(kept_in) < x.size(1):
        x = x.index_select(1, kept_in.to(x.device))
    v = v.index_select(0, kept_out.to(v.device))
    if groups == 1:
        v = v.index_select(1, kept_in.to(v.device))
    for d, idx in ((0, kept_out), (1, kept_in if groups == 1 else None)):
        if d == dim and idx is not None and g.size(d) > 1:
            g = g.index_select(d, idx.to(g.device))
    bias = a.get("bias")
    if bias is not None:
        bias = bias.index_select(0, kept_out.to(bias.device))
    groups = groups * len(kept_out) // out_full if groups > 1 else 1
    out = weight_normed_conv(x, v, g, a["dim"], bias, a.get("stride", 1), a.get("padding", 0),
                             a.get("dilation", 1), groups)
    full = out.new_zeros((out.shape[0], out_full, *out.shape[2:]))
    return full.index_copy(1, kept_out.to(out.device), out)


@rule(weight_normed_conv, edge="mix", gate="producer", fix=_fix_weight_normed_conv,
      mask=_mask_weight_normed_conv)
def weight_normed_conv_rule(ctx, node):
    """The conv rule on `v`; `g` follows the channels of the dim it scales (the output rows
    for `dim` 0). Pruned channels change the norm of every slice that spans them: slim and
    the mask reference both take it over the kept channels."""
    x, v, g, dim = node.args[:4]
    b, groups = arg(node, 4, "bias"), arg(node, 8, "groups", 1)
    vname, gname, bname = ctx.param_name(v), ctx.param_name(g), ctx.param_name(b)
    if vname is None or gname is None or (b is not None and bname is None) or \
            not isinstance(groups, int) or not isinstance(dim, int):
        return unsupported(ctx, node, why="a weight-normed convolution on a computed weight, "
                                          "bias or groups")
    out = _conv_on_owned_weight(ctx, node, x, v, vname, bname, groups)
    # a row of v is scaled away by the norm where the norm is per row: no "out" slice that a
    # gate folds into; g is then the layer's gamma
    dim = dim % len(ctx.shape(v))
    ctx.bind(vname, 0, out, role="std_out")
    gshape = ctx.shape(g)
    if dim == 0 and gshape[0] == len(out):
        ctx.bind(gname, 0, out, role="gamma")
    elif dim == 1 and groups == 1 and gshape[1] > 1:
        ctx.bind(gname, 1, ctx.find(ctx.line(ctx.ids(x), 1, x)))
    return ctx.channel_ids(out, node)


RULES = (conv, conv_transpose, functional_conv, standardised_conv_rule, weight_normed_conv_rule)
