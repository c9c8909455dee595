"""Element-wise ops: activations, casts, dropout, arithmetic merges, softmax.

Channel i of the output is channel i of the input (`edge="identity"`); a merge of several
operands (add, multiply) ties the positions that meet. What a merge does with an operand
that a plan removes is its `dead` field: a residual add drops it, a product cannot lose one.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PlanError
from .registry import BLOCK, DeadInput, Rule, methods, plain_meta, rule

# binary ops whose result has the operands' broadcast shape and dtype (not in place)
_BROADCAST = frozenset({operator.mul, operator.add, operator.sub, operator.truediv, torch.mul,
                        torch.add, torch.sub, torch.div, "mul", "add", "sub", "div",
                        "__mul__", "__rmul__", "__add__", "__radd__", "__truediv__",
                        torch.multiply, torch.subtract, torch.divide, torch.true_divide,
                        "multiply", "subtract", "divide", "true_divide"})


def _broadcast_meta(target, args, kwargs):
    """`a * b` (+, -, /) of two row-major meta tensors of one dtype: a row-major tensor of
    their broadcast shape, as torch's kernel gives; None for anything else (a scalar
    operand, keywords such as `alpha`, mixed dtypes, any other layout)."""
    try:
        if target not in _BROADCAST:
            return None
    except TypeError:  # an unhashable target
        return None
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if not (plain_meta(a) and plain_meta(b)) or a.dtype != b.dtype:
        return None
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:  # not broadcastable: the kernel raises its own error
        return None
    return torch.empty(shape, dtype=a.dtype, device="meta")


@rule(
    nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.sigmoid, torch.tanh, torch.exp, torch.abs,
    torch.neg, torch.clamp, operator.neg, torch.square, torch.sqrt,
    *methods("sigmoid", "tanh", "exp", "abs", "neg", "clamp", "clamp_",
             "contiguous", "float", "half", "double", "to", "type_as", "detach", "clone",
             "sqrt", "square", "pow", "sigmoid_", "hardtanh_", "type"),
    edge="identity", slim="free", flow="pass", same_shape=True,
)
def elementwise_unary(ctx, node):
    """Activations, dropout, casts: channel i out is channel i in."""
    return ctx.ids(node.args[0])


# nn.Identity: the same rule (and name) as the other unary ops, and it returns its input
# unchanged, which the slim pass reads through (`Rule.identity`).
identity = Rule("elementwise_unary", elementwise_unary.tie, edge="identity", slim="free",
                flow="pass", same_shape=True, identity=True, targets=(nn.Identity,))


@rule(nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, *methods("relu", "relu_"),
      edge="identity", slim="free", flow="pass", same_shape=True, idempotent=True)
def relu(ctx, node):
    """ReLU: channel i out is channel i in. Idempotent: the slim pass drops a ReLU of a ReLU's
    output, which a removed residual branch leaves (relu(x + branch) with x a ReLU output)."""
    return ctx.ids(node.args[0])


def _fix_prelu(rw, node, m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


@rule(nn.PReLU, edge="identity", fix=_fix_prelu)
def prelu(ctx, node):
    x = ctx.ids(node.args[0])
    m = ctx.module
    if m.num_parameters > 1:
        ctx.bind(f"{node.target}.weight", 0, ctx.line(x, 1, node.args[0]))
    return x


def _keep_live_operand(gm, graph, plan, node, gone) -> None:
    """Slim: an add (or sub) whose other operand was removed becomes its live operand."""
    alive = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.name not in gone]
    if len(alive) != 1 or (graph.rule(node.name).dead.first_stays and
                           alive[0] is not node.args[0]):
        raise PlanError(f"'{node.name}' cannot drop its removed operand")
    node.replace_all_uses_with(alive[0])
    gone.add(node.name)


ADD = DeadInput("add", drops=True, rewrite=_keep_live_operand)
SUB = DeadInput("sub", drops=True, first_stays=True, rewrite=_keep_live_operand)


@rule(operator.add, torch.add, *methods("add", "add_", "__add__", "__radd__"),
      edge="identity", dead=ADD, flow="pass", meta=_broadcast_meta)
def add(ctx, node):
    return ctx.elementwise(node)


# torch.subtract, torch.multiply, torch.divide, torch.true_divide: torch's aliases of
# sub, mul and div (`torch.multiply(a, b)` in Gemma 3n), the same rule
@rule(operator.sub, torch.sub, torch.subtract, *methods("sub", "sub_", "subtract", "subtract_"),
      edge="identity", dead=SUB, flow="pass", meta=_broadcast_meta)
def sub(ctx, node):
    return ctx.elementwise(node)


@rule(operator.mul, torch.mul, torch.multiply, operator.truediv, torch.div, torch.divide,
      torch.true_divide, torch.where, torch.maximum, torch.minimum,
      *methods("mul", "mul_", "multiply", "multiply_", "div", "div_", "divide", "divide_",
               "true_divide", "true_divide_", "__mul__", "__rmul__", "__truediv__",
               "masked_fill", "expand_as"),
      edge="identity", dead=BLOCK, flow="scale", meta=_broadcast_meta)
def multiply(ctx, node):
    """Broadcasting multiply: an SE gate (B, C, 1, 1) ties its C channels to the feature map."""
    return ctx.elementwise(node)


@rule(F.softmax, F.log_softmax, torch.softmax, nn.Softmax, nn.LogSoftmax,
      *methods("softmax", "log_softmax"), edge="identity")
def softmax(ctx, node):
    x = node.args[0]
    ids = ctx.ids(x)
    dim = ctx.module.dim if ctx.module is not None else (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
    if dim is None or ids.size(dim) > 1:
        ctx.fix(ids, f"softmax over channels at '{node.name}'")
    return ids


RULES = (elementwise_unary, identity, relu, prelu, add, sub, multiply, softmax)
