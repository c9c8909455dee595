"""One rule per op family: what the op ties together, what it costs, how slim rewrites it.

The registry (`registry.py`) says what a `Rule` is and maps module types, functions and
tensor methods to rules; each family module declares its rules, every piece of one rule side
by side (tie and cost, slim rewrite, mask reference, gate site, parameter roles):

    elementwise  activations, casts, dropout, add / sub / multiply, softmax
    pooling      pooling, resizing, padding, reductions over positions
    norm         batch, instance, group and layer norms
    conv         convolutions (plain, grouped, transposed, functional, weight-standardised)
    linear       linear layers, matmul between activations
    attention    scaled dot-product and multi-head attention (+ PrunedMultiheadAttention)
    embedding    embedding tables
    layout       concat, stack, view / reshape, permute, split, slicing, size queries
    aten         the ATen overloads of a `torch.export` graph (mostly the rules above)
    transformer  torch.nn's transformer layers, traced through their plain computation

Adding an op is adding one rule to its family's `RULES`. `default_rules()` builds a fresh
registry from the families on every call (no module-level registry: nothing another module
mutates); a user extends the one they pass to `analyze` with `rules.extend({MyBlock: rule})`.
"""

from __future__ import annotations

from . import (aten, attention, conv, elementwise, embedding, layout, linear, norm, pooling,
               transformer)
from .attention import PrunedMultiheadAttention, multihead_attention
from .conv import standardised_conv, weight_normed_conv
from .elementwise import ADD, SUB
from .layout import CAT
from .registry import (BLOCK, FULL, PASS, DeadInput, Rule, RuleConflict, Rules, arg, methods,
                       rule, target_name, unsupported)

FAMILIES = (elementwise, pooling, norm, conv, linear, attention, embedding, layout, transformer,
            aten)


def default_rules() -> Rules:
    """A fresh registry of the project's rules, safe to extend."""
    rules = Rules()
    for family in FAMILIES:
        rules.add(*family.RULES)
    return rules


__all__ = ["Rule", "Rules", "RuleConflict", "default_rules", "rule", "methods", "arg",
           "unsupported", "target_name", "FULL", "DeadInput", "PASS", "BLOCK", "ADD", "SUB", "CAT",
           "FAMILIES", "PrunedMultiheadAttention", "multihead_attention", "standardised_conv",
           "weight_normed_conv"]
