"""Attention: `F.scaled_dot_product_attention` and `nn.MultiheadAttention`, with the module a
pruned `nn.MultiheadAttention` becomes.

Heads are the unit: q, k and v of head h and the output of head h go together.
`nn.MultiheadAttention` assumes that its input width, its heads x head_dim and its output
width are one number (`embed_dim`); a pruned attention keeps fewer heads (same head_dim, so
the softmax scale does not change) and may have a narrower input or output. The slim pass
replaces a pruned `nn.MultiheadAttention` by `PrunedMultiheadAttention` (the rule's `fix`),
and the mask reference computes the original with the dropped heads zeroed (the rule's
`mask`); both use `multihead_attention` below, so they agree to rounding. The same rule
covers `PrunedMultiheadAttention`, so that a slim model analyses again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atoms import NO_ATOM
from .registry import arg, rule, unsupported


def multihead_attention(m: nn.Module, query, key, value, key_padding_mask=None,
                        need_weights: bool = True, attn_mask=None,
                        average_attn_weights: bool = True, is_causal: bool = False,
                        head_mask: torch.Tensor | None = None):
    """Attention with the weights of `m` (`in_proj_weight`, `in_proj_bias`, `out_proj`,
    `head_dim`, `batch_first`, `dropout`); `head_mask` (heads,) zeroes dropped heads."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if m.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    # From here on: (L, B, E).
    hd = m.head_dim
    w, b = m.in_proj_weight, m.in_proj_bias
    rows = w.shape[0] // 3
    heads = rows // hd
    bq, bk, bv = (None, None, None) if b is None else b.split(rows)
    wq, wk, wv = w.split(rows)
    length, batch = query.shape[0], query.shape[1]
    src = key.shape[0]

    def project(x, weight, bias, n):
        return F.linear(x, weight, bias).reshape(n, batch, heads, hd).permute(1, 2, 0, 3)

    q = project(query, wq, bq, length)
    k = project(key, wk, bk, src)
    v = project(value, wv, bv, src)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(length, src, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        if attn_mask.dim() != 2:
            raise ValueError("a pruned attention takes a 2-d attn_mask (L, S) only")
        scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool \
            else scores + kpm
    attn = scores.softmax(-1)
    dropped = F.dropout(attn, p=m.dropout, training=m.training) if m.dropout > 0 else attn
    out = dropped @ v  # (B, H, L, hd)
    if head_mask is not None:
        out = out * head_mask.reshape(1, -1, 1, 1)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, heads * hd)
    out = m.out_proj(out)
    if m.batch_first and batched:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1)
    weights = None
    if need_weights:
        if head_mask is not None:
            hm = head_mask.reshape(1, -1, 1, 1)
            weights = (attn * hm).sum(1) / hm.sum() if average_attn_weights else attn * hm
        else:
            weights = attn.mean(1) if average_attn_weights else attn
        if not batched:
            weights = weights.squeeze(0)
    return out, weights


class PrunedMultiheadAttention(nn.Module):
    """What a pruned `nn.MultiheadAttention` becomes: fewer heads, narrower in/out."""

    def __init__(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None,
                 out_proj: nn.Linear, head_dim: int, batch_first: bool, dropout: float) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(in_proj_weight.detach().clone())
        self.in_proj_bias = None if in_proj_bias is None else \
            nn.Parameter(in_proj_bias.detach().clone())
        self.out_proj = out_proj
        self.head_dim = head_dim
        self.batch_first = batch_first
        self.dropout = dropout
        self.num_heads = in_proj_weight.shape[0] // (3 * head_dim)

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> "PrunedMultiheadAttention":
        rows, cols = m.out_proj.weight.shape
        out = nn.Linear(cols, rows, bias=m.out_proj.bias is not None)
        out.weight = m.out_proj.weight
        if m.out_proj.bias is not None:
            out.bias = m.out_proj.bias
        pruned = cls(m.in_proj_weight, m.in_proj_bias, out, m.head_dim, m.batch_first,
                     m.dropout)
        pruned.train(m.training)
        return pruned

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        return multihead_attention(self, query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)

    def extra_repr(self) -> str:
        return (f"in={self.in_proj_weight.shape[1]}, heads={self.num_heads}, "
                f"head_dim={self.head_dim}, out={self.out_proj.out_features}")


@rule(F.scaled_dot_product_attention, edge="heads")
def sdpa(ctx, node):
    """Heads are the unit: q, k and v of head h, and the output of head h, go together.
    One key/value head broadcast to every query head (multi-query attention: Falcon) is
    kept, as a group of its own: the query heads are pruned alone, even where one fused
    projection makes q, k and v (Falcon's `query_key_value`)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    if len(ctx.shape(q)) < 3:
        return unsupported(ctx, node, why="attention without a head dimension")
    heads = [ctx.line(ctx.ids(t), -3, t) for t in (q, k, v)]  # (B, H, L, E): dim -3 is H
    for t, line in zip((k, v), heads[1:]):
        if len(ctx.shape(t)) >= 4 and ctx.shape(t)[-3] == 1 < ctx.shape(q)[-3]:
            ctx.fix_apart(line, "a key/value head shared by every query head (multi-query "
                                "attention) is kept")
        else:
            ctx.tie(heads[0], line)
    bias = arg(node, 3, "attn_mask")  # a bias per head (Swin's relative positions) goes too
    if bias is not None and ctx.ids(bias) is not None and len(ctx.shape(bias)) >= 3 and \
            ctx.shape(bias)[-3] == ctx.shape(q)[-3] > 1:
        ctx.tie(ctx.line(ctx.ids(bias), -3, bias), heads[0])
    line = ctx.find(heads[0])
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    per_head = ctx.channel_ids(line, None, dim=-3, rank=len(sq))
    lead = sq[0] / ctx.batch  # dim 0 per sample (windows x batch: > 1)
    ctx.macs(sk[-2] * lead, (per_head, sq[1:]))  # q k^T: every q element meets every key
    # attn @ v: every v element meets every query of each query head (one key/value head
    # broadcast to all of them: multi-query attention)
    ctx.macs(sq[-2] * lead, (per_head, (*sq[1:-2], *sv[-2:])))
    return per_head


def _fix_attention_any(rw, node, m) -> None:
    if isinstance(m, PrunedMultiheadAttention):
        m.num_heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
        m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    else:  # an nn.MultiheadAttention cannot hold fewer heads or a narrower in/out
        owner_name, _, attr = node.target.rpartition(".")
        setattr(rw.gm.get_submodule(owner_name), attr, PrunedMultiheadAttention.from_module(m))


def _mask_attention(graph, plan, node, info):
    """Attention over pruned heads: the reference drops those heads (not a zero mask)."""
    module = graph.module.get_submodule(node.target)
    heads = graph.internal_atoms(node.name, "heads")
    if heads is None or len(heads) != module.num_heads:
        return None
    heads = torch.from_numpy(heads)
    if not plan.changes(heads):
        return None
    return _run_masked_attention, plan.kept(heads).float()


def _run_masked_attention(interp, n, head_keep):
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    return multihead_attention(interp.fetch_attr(n.target), *args, head_mask=head_keep, **kwargs)


@rule(nn.MultiheadAttention, PrunedMultiheadAttention, name="multihead_attention", edge="heads",
      fix=_fix_attention_any, mask=_mask_attention, pure=True)
def multihead_attention_rule(ctx, node):
    """nn.MultiheadAttention: embed dims of q/k/v inputs, heads inside, fresh output dims."""
    m = ctx.module  # nn.MultiheadAttention, or the PrunedMultiheadAttention slim makes of it
    if not getattr(m, "_qkv_same_embed_dim", True):
        return unsupported(ctx, node, why="MultiheadAttention with kdim/vdim")
    inner = m.num_heads * m.head_dim  # rows of each of q, k, v
    out_dim = m.out_proj.out_features
    q, k, v = node.args[0], node.args[1], node.args[2]
    last = -1
    lines = [ctx.line(ctx.ids(t), last, t) for t in (q, k, v)]
    ctx.tie(lines[0], lines[1])
    ctx.tie(lines[0], lines[2])
    embed_in = ctx.find(lines[0])
    heads = ctx.fresh(m.num_heads, "heads")
    per_head = ctx.repeat(heads, m.head_dim)  # row r of a projection belongs to head r // hd
    qkv_rows = np.concatenate([per_head, per_head, per_head])
    ctx.bind(f"{node.target}.in_proj_weight", 0, qkv_rows)
    ctx.bind(f"{node.target}.in_proj_weight", 1, embed_in)
    if m.in_proj_bias is not None:
        ctx.bind(f"{node.target}.in_proj_bias", 0, qkv_rows)
    out = ctx.fresh(out_dim, "attention_out")
    ctx.bind(f"{node.target}.out_proj.weight", 0, out)
    ctx.bind(f"{node.target}.out_proj.weight", 1, per_head)
    if m.out_proj.bias is not None:
        ctx.bind(f"{node.target}.out_proj.bias", 0, out)
    if getattr(m, "bias_k", None) is not None or getattr(m, "bias_v", None) is not None:
        ctx.fix(embed_in, f"MultiheadAttention '{node.target}' with add_bias_kv")
    sq = ctx.shape(q)
    tokens = sq[1] if m.batch_first else sq[0]
    sk = ctx.shape(k)
    src = sk[1] if m.batch_first else sk[0]
    ctx.macs(tokens, embed_in, qkv_rows[:inner])                 # q projection
    ctx.macs(src, embed_in, qkv_rows[inner:])                    # k and v projections
    ctx.macs(tokens * src * 2, per_head)                         # q k^T and attn @ v
    ctx.macs(tokens, per_head, out)                              # output projection
    attn_out = ctx.channel_ids(out, None, dim=-1, rank=len(sq))
    weights = torch.full((1,) * len(ctx.shape_of_value(node, 1)), NO_ATOM) \
        if ctx.shape_of_value(node, 1) is not None else None
    return (attn_out, weights)


RULES = (sdpa, multihead_attention_rule)
