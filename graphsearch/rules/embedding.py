"""Embedding tables: a lookup whose output width (weight dim 1) is fresh channels."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .registry import arg, rule, unsupported


def _fix_embedding(rw, node, m) -> None:
    if m is not None:
        m.embedding_dim = m.weight.shape[1]


@rule(nn.Embedding, F.embedding, edge="mix", gate="producer", fix=_fix_embedding)
def embedding(ctx, node):
    """A lookup table: its output width (weight dim 1) is fresh channels, like a producer's;
    the token ids it reads carry none."""
    if ctx.module is not None:
        wname, dim = f"{node.target}.weight", ctx.module.embedding_dim
    else:
        wname = ctx.param_name(arg(node, 1, "weight"))
        if wname is None:
            return unsupported(ctx, node, why="an embedding with a computed table")
        dim = ctx.shape(arg(node, 1, "weight"))[1]
    out = ctx.fresh(dim, "embedding")
    ctx.bind(wname, 1, out, role="out")
    return ctx.channel_ids(out, node, dim=-1)


RULES = (embedding,)
