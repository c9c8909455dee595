"""The attention module a pruned `nn.MultiheadAttention` becomes, where the passes and saved
models name it: it lives next to the attention rule (`graphsearch.rules.attention`)."""

from graphsearch.rules.attention import PrunedMultiheadAttention, multihead_attention

__all__ = ["PrunedMultiheadAttention", "multihead_attention"]
