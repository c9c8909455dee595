"""torch.nn's transformer layers: their forward picks a fused fast path with Python checks on
the input that fx cannot trace (the whole layer would be one opaque leaf). Their rules say
`trace_as`: the tracer follows the same computation written plainly (torch's own slow path),
so their attention, norms and MLP are the modules the other families know. A layer that fails
even so becomes an opaque leaf (no rule applies to the module itself).
"""

from __future__ import annotations

import torch.nn as nn

from .registry import Rule, unsupported


def _self_attention(m, x, mask, padding, causal):
    """A transformer layer's self-attention block (torch's `_sa_block`)."""
    x = m.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                    is_causal=causal)[0]
    return m.dropout1(x)


def _feed_forward(m, x, dropout):
    """A transformer layer's feed-forward block (torch's `_ff_block`)."""
    return dropout(m.linear2(m.dropout(m.activation(m.linear1(x)))))


def _encoder_layer(m, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    def sa(x):
        return _self_attention(m, x, src_mask, src_key_padding_mask, is_causal)

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + _feed_forward(m, m.norm2(x), m.dropout2)
    x = m.norm1(x + sa(x))
    return m.norm2(x + _feed_forward(m, x, m.dropout2))


def _decoder_layer(m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
    def sa(x):
        return _self_attention(m, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)

    def mha(x):
        x = m.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                             key_padding_mask=memory_key_padding_mask,
                             is_causal=memory_is_causal, need_weights=False)[0]
        return m.dropout2(x)

    x = tgt
    if m.norm_first:
        x = x + sa(m.norm1(x))
        x = x + mha(m.norm2(x))
        return x + _feed_forward(m, m.norm3(x), m.dropout3)
    x = m.norm1(x + sa(x))
    x = m.norm2(x + mha(x))
    return m.norm3(x + _feed_forward(m, x, m.dropout3))


def _encoder(m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                  is_causal=bool(is_causal))
    return m.norm(x) if m.norm is not None else x


def _decoder(m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    x = tgt
    for layer in m.layers:
        x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                  tgt_key_padding_mask=tgt_key_padding_mask,
                  memory_key_padding_mask=memory_key_padding_mask,
                  tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return m.norm(x) if m.norm is not None else x


def _traced_through(forward, *targets) -> Rule:
    """The rule of a module that the tracer traces through `forward` (never a node itself)."""
    return Rule("traced_through", unsupported, trace_as=forward, family="transformer",
                targets=targets)


RULES = (_traced_through(_encoder_layer, nn.TransformerEncoderLayer),
         _traced_through(_decoder_layer, nn.TransformerDecoderLayer),
         _traced_through(_encoder, nn.TransformerEncoder),
         _traced_through(_decoder, nn.TransformerDecoder))
