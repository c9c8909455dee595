"""The analysis' fast paths give what the plain code gave: fx arguments flattened like
pytree, unique by sorting like np.unique, no FLOP counter for Python arithmetic on sizes."""

from __future__ import annotations

import collections
import operator

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from graphsearch import analyze, zoo
from graphsearch.analysis import Context, _leaves
from graphsearch.atoms import sorted_counts, sorted_unique
from graphsearch.trace import trace

import coverage_models as cm


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["shufflenet_v2", "vit_tiny", "tiny_swin", "tiny_decoder"])
def test_leaves_are_pytrees_leaves_on_every_node(name):
    if name in zoo.MODELS:
        model, inputs = zoo.build(name), zoo.example_inputs(name)
    else:
        build, make = cm.MODELS[name]
        model, inputs = build(), make()
    gm = trace(model, inputs).module
    for n in gm.graph.nodes:
        tree = (n.args, n.kwargs)
        assert _same(_leaves(tree), tree_flatten(tree)[0]), n.format_node()


def test_leaves_are_pytrees_leaves_on_other_containers():
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    point = collections.namedtuple("point", "x y")
    trees = [
        (a, [b, (a, {"k": b, "j": [1, 2.0]})], {"s": slice(a, None, 2)}),
        (torch.Size([3, 4]), point(a, b), collections.OrderedDict(z=a, y=b), None, ...),
        (fx.immutable_collections.immutable_list([a, b]),
         fx.immutable_collections.immutable_dict(p=a, q=(b, torch.float32))),
        ([], {}, (), "text", torch.device("cpu")),
    ]
    for tree in trees:
        assert _same(_leaves(tree), tree_flatten(tree)[0]), tree


def test_unique_is_numpys():
    rng = np.random.default_rng(0)
    for x in [np.zeros(0, np.int64), np.array([5]), rng.integers(-3, 40, 200),
              rng.integers(0, 10**9, 5000), rng.integers(0, 4, (7, 9)),
              rng.integers(0, 3000, 500).astype(np.int32), np.array([0, 0, 7]),
              rng.random(50)]:
        want, got = np.unique(x), sorted_unique(x)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        (want, want_counts), (got, counts) = np.unique(x, return_counts=True), sorted_counts(x)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.array_equal(counts, want_counts)


class _SizesAndMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        half = x.size(1) // 2  # Python arithmetic on a size: no tensor
        return operator.matmul(x[:, :half * 2], self.w)  # an operator on tensors: MACs


def test_count_macs_skips_only_python_arithmetic():
    traced = trace(_SizesAndMatmul(), (torch.randn(4, 6),))
    ctx = Context(traced)
    nodes = {n.target: n for n in traced.module.graph.nodes if n.op == "call_function"}
    assert ctx.count_macs(nodes[operator.floordiv]) == 0.0
    assert ctx.count_macs(nodes[operator.matmul]) == 6 * 5  # per sample: one row @ (6, 5)


def test_the_analysis_of_a_sizes_model_still_counts_its_matmul():
    g = analyze(_SizesAndMatmul(), (torch.randn(4, 6),))
    assert g.baseline.macs == 6 * 5
