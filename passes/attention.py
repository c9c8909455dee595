"""Multi-head attention that survives pruning.

`nn.MultiheadAttention` assumes that its input width, its heads x head_dim and its output
width are one number (`embed_dim`); a pruned attention keeps fewer heads (same head_dim, so
the softmax scale does not change) and may have a narrower input or output. The slim pass
replaces a pruned `nn.MultiheadAttention` by `PrunedMultiheadAttention`, and the mask
reference computes the original with the dropped heads zeroed; both use
`multihead_attention` below, so they agree to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
