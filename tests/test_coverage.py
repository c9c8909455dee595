"""Issue 10's patterns from other libraries' model styles (tests/coverage_models.py): each on
the smallest model that shows it; slim == mask on a random half plan, slim params == the
cost model's, analysed MACs == a real count (torch's FLOP counter)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from graphsearch import analyze
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.gates import fold_gates, gated
from graphsearch.passes.slim import slim

import coverage_models as cm


def real_macs(model, inputs) -> float:
    counter = FlopCounterMode(display=False)
    # no_grad, or a fused attention kernel, would take paths the counter does not see
    with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    return counter.get_total_flops() / 2 / inputs[0].shape[0]


def half_plan(g, seed=0):
    rng = random.Random(seed)
    return {grp.id: sorted(rng.sample(range(grp.size), max(grp.min_width, grp.size // 2)))
            for grp in g.prunable_groups}


def check_all(model, inputs):
    """The three checks of the issue; returns the graph."""
    g = analyze(model, inputs)
    assert g.baseline.macs == pytest.approx(real_macs(model, inputs), rel=1e-9)
    keep = half_plan(g)
    assert keep, "nothing prunable"
    s = slim(g, keep)
    v = verify(s, mask(g, keep), inputs, rtol=1e-4)
    assert v, v.message
    assert sum(p.numel() for p in s.parameters()) == g.cost(keep).params
    assert real_macs(s, inputs) == pytest.approx(g.cost(keep).macs, rel=1e-9)
    return g


def build(name):
    torch.manual_seed(0)
    make, inputs = cm.MODELS[name]
    return make().eval(), inputs()


def names(g, rule):
    return [i.name for i in g.nodes if i.rule == rule]


def test_batchnorm_act_subclass_and_functional_ops_on_owned_parameters():
    """A BatchNorm2d subclass calling F.batch_norm (+ act), F.conv2d on the module's own weight
    (plain and depthwise), F.group_norm / F.layer_norm / F.linear on owned parameters: all get
    the known op's rule, every hidden width is prunable."""
    model, x = build("functional_net")
    g = check_all(model, x)
    assert len(names(g, "functional_batch_norm")) == 2
    assert len(names(g, "functional_conv")) == 2
    assert names(g, "group_norm") and names(g, "layer_norm") and names(g, "functional_linear")
    assert [grp.prunable for grp in g.groups] == [False, True, True, True, False]
    assert g.mac_share()["share"] == 1.0
    bn = next(grp for grp in g.groups if "bn1.weight" in grp.members)
    roles = {s.name: s.role for s in g.tied_parameters()[bn.id] if s.name.startswith("bn1.")}
    assert roles == {"bn1.weight": "gamma", "bn1.bias": "beta", "bn1.running_mean": "statistic",
                     "bn1.running_var": "statistic"}


def test_a_standardised_weight_is_refused_with_a_reason():
    class StdConv(torch.nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return torch.nn.functional.conv2d(x, w, self.bias, 1, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), StdConv(4, 5, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    g = analyze(Net().eval(), (torch.randn(1, 3, 6, 6),))
    grp = next(grp for grp in g.groups if "a.weight[out]" in grp.members)
    assert not grp.prunable and "computed weight" in grp.reason
    # its MACs are still counted: the real count, reported as not prunable
    assert g.baseline.macs == real_macs(Net().eval(), (torch.randn(1, 3, 6, 6),))
    share = g.mac_share()
    assert share["share"] == 0.0 and "computed weight" in share["reasons"][0][0]


def test_qkv_unbind_attention_slims_by_heads():
    """qkv linear, reshape (B, N, 3, heads, hd), permute, unbind(0): heads are the unit and
    the embedding width is free; sizes computed from x.shape follow the slim widths."""
    model, x = build("tiny_deit")
    g = check_all(model, x)
    heads = [grp for grp in g.groups if any("attn.qkv.weight[out]" in m for m in grp.members)]
    assert [grp.size for grp in heads] == [4, 4] and all(grp.prunable for grp in heads)
    embed = next(grp for grp in g.groups if "cls" in grp.members)
    assert embed.prunable and embed.size == 16


def test_embedding_width_is_prunable_like_a_producer():
    model, x = build("embedding_mlp")
    g = check_all(model, x)
    grp = next(grp for grp in g.groups if "emb.weight[out]" in grp.members)
    assert grp.prunable and grp.size == 12 and "fc1.weight[in]" in grp.members
    keep = {grp.id: [1, 5, 7]}
    assert slim(g, keep).emb.weight.shape == (50, 3)


def test_torch_transformer_encoder_and_decoder_layers_are_analysed():
    """nn.TransformerEncoder(Layer) / DecoderLayer (batch_first, post- and pre-norm) are traced
    through their plain computation: heads, the MLP hidden width and the model width (here
    the embedding's) are prunable groups; slim == mask and costs are exact."""
    model, x = build("text_classifier")
    g = check_all(model, x)
    sizes = {grp.size: grp for grp in g.groups if grp.prunable}
    assert set(sizes) == {16, 2, 32}  # model width, heads, MLP hidden
    assert "emb.weight[out]" in sizes[16].members
    assert any("self_attn.in_proj_weight[out]" in m for m in sizes[2].members)
    assert "enc.layers.0.linear1.weight[out]" in sizes[32].members
    model, x = build("tiny_decoder")
    g = check_all(model, x)
    assert sum(grp.prunable for grp in g.groups) == 7  # width, 2 x (2 attentions, MLP)


def test_an_opaque_module_is_costed_and_reported():
    """A submodule fx cannot trace: its MACs are counted for real (not 0) and reported as the
    share no plan can change, with the reason; the layers after it still prune."""
    model, x = build("with_opaque")
    with pytest.warns(UserWarning, match="submodule 'gate'"):
        g = analyze(model, x)
    assert g.baseline.macs == real_macs(model, x) == 12 * 12 * 2 + 12 * 40 + 40 * 3
    share = g.mac_share()
    assert share["reasons"][0][0].startswith("submodule 'gate' is opaque")
    assert share["prunable_macs"] == 12 * 40 + 40 * 3  # fc2 -> head: the 40 are prunable
    assert share["share"] == pytest.approx((12 * 40 + 40 * 3) / g.baseline.macs)


def test_channel_shuffle_by_view_transpose_is_exact():
    model, x = build("tiny_shufflenet")
    g = check_all(model, x)
    for seed in range(1, 6):  # more random plans: unequal halves across the shuffle
        keep = half_plan(g, seed)
        s = slim(g, keep)
        assert verify(s, mask(g, keep), x, rtol=1e-4)
        assert sum(p.numel() for p in s.parameters()) == g.cost(keep).params


def test_inspect_prints_the_prunable_share_and_the_reasons(tmp_path):
    src = Path(__file__).parent / "coverage_models.py"
    model_py = tmp_path / "model.py"
    model_py.write_text(src.read_text() + "\n\ndef build_model():\n    return WithOpaque()"
                        "\n\n\ndef example_inputs():\n    return (torch.randn(1, 12),)\n")
    out = subprocess.run([sys.executable, "-m", "graphsearch.cli", "inspect", str(model_py)],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("prunable"))
    assert "% of MACs" in line
    assert "not prunable: submodule 'gate' is opaque" in out


def test_a_slice_bound_computed_from_a_shape_is_followed():
    """Swin-style padding and cropping back: x[:, :h, :w] with h, w read from x.shape (a
    slice holding fx nodes) is a layout op like any slice."""

    class Crop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x):  # x: (B, H, W, C)
            h, w = x.shape[1], x.shape[2]
            y = torch.nn.functional.pad(self.a(x), (0, 0, 0, 1, 0, 1))
            return self.b(y[:, :h, :w, :].relu())

    model, x = Crop().eval(), (torch.randn(2, 3, 3, 4),)
    g = check_all(model, x)
    assert g.mac_share()["share"] == 1.0


def test_a_module_that_fails_to_trace_halfway_leaves_no_nodes_behind():
    """MobileViT-style: fx traces part of a block (conv, norm, a shape assert) before its
    data-dependent branch fails; the block becomes a leaf and the half-traced nodes go
    (they used to bind the leaf's own norm statistics to a prunable group: slim broke with a
    running-mean size error)."""

    class Block(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(c, c, 1), torch.nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            torch._assert(y.shape[1] == 6, "six channels")  # kept by fx: side-effectful
            return y if y.sum() > 0 else -y

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.block, self.head = torch.nn.Conv2d(3, 6, 1), Block(6), \
                torch.nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.head(self.block(torch.relu(self.conv0(x))))

    model, x = Net().eval(), (torch.randn(2, 3, 4, 4),)
    with pytest.warns(UserWarning, match="submodule 'block'"):
        g = analyze(model, x)
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == \
        ["conv0", "block", "head"]
    assert all(not grp.prunable for grp in g.groups)  # conv0's output feeds the opaque block
    assert g.baseline.macs == real_macs(model, x)


def test_tokens_folded_into_the_batch_dim_are_costed():
    """Swin-style windows: (B, H, W, C) -> (B * windows, tokens, C) before the attention's
    linear layers and matmuls; MACs per sample count every window."""

    class Windows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(4, 24), torch.nn.Linear(8, 4)

        def forward(self, x):  # (B, 4, 4, 4): four 2x2 windows
            B = x.shape[0]
            w = x.reshape(B, 2, 2, 2, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(B * 4, 4, 4)
            q, k, v = self.qkv(w).reshape(B * 4, 4, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            a = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v) + a @ v
            return self.proj(y.transpose(1, 2).reshape(B * 4, 4, 8)).reshape(B, -1).sum(1)

    model, x = Windows().eval(), (torch.randn(2, 4, 4, 4),)
    g = analyze(model, x)
    assert g.baseline.macs == real_macs(model, x)


def test_a_module_caching_a_traced_value_is_analysed_twice():
    """LeViT-style: in eval mode the attention caches `biases[:, idx]` in a dict attribute.
    Tracing stored an fx Proxy there; the next analysis of the same model read it back (fx:
    "Node add referenced nonexistent value"). The attribute is restored after tracing."""
    model, x = build("tiny_levit")
    analyze(model, x)
    assert model.attn.bias_cache == {}
    g = check_all(model, x)  # the second analysis of the same model
    heads = next(grp for grp in g.groups if any(m.startswith("attn.attention_biases") for m in grp.members))
    assert heads.prunable and heads.size == 2
    assert g.mac_share()["share"] == 1.0
    model(*x)
    assert set(model.attn.bias_cache) == {"cpu"}  # the model's own cache still works


@pytest.mark.parametrize("use_index_select", [False, True])
def test_a_relative_position_bias_lookup_follows_the_heads(use_index_select):
    """Swin-style `table[index.view(-1)]` (an integer index tensor over positions, values
    not known on meta tensors) used to be run on channel ids as if they were indices
    (IndexError), fixing the head count; the table's columns are the heads."""
    torch.manual_seed(0)
    model, x = cm.TinySwin(use_index_select=use_index_select).eval(), (torch.randn(2, 3, 4, 4),)
    g = check_all(model, x)
    assert [grp.prunable for grp in g.groups] == [False, True, True, False]  # in, width, heads, out
    heads = next(grp for grp in g.groups if any(m.startswith("attn.table") for m in grp.members))
    assert heads.prunable and heads.size == 2 and g.mac_share()["share"] == 1.0
    small = slim(g, {heads.id: [1]})
    assert small.attn.table.shape == (9, 1)
    assert verify(small, mask(g, {heads.id: [1]}), x, rtol=1e-4)


@pytest.mark.parametrize("size", [8, 10])  # 10: a 5x5 map, resized to 6x6 and back
def test_a_condition_on_sizes_follows_the_example_inputs(size):
    """MobileViT-style block with `if new_h != H: interpolate`: fx alone cannot trace the
    `if` (the block was one opaque leaf, 23.6% of mobilevit_xxs prunable); traced again with
    the example's sizes at hand, its convs, attention heads and MLP prune."""
    torch.manual_seed(0)
    model, x = cm.TinyMobileViT().eval(), (torch.randn(2, 3, size, size),)
    with pytest.warns(UserWarning, match="condition.*on tensor sizes in 'block'"):
        g = check_all(model, x)
    assert g.summary()["untraceable"] == {}
    assert ("interpolate" in str(g.module.code)) == (size == 10)
    assert g.mac_share()["share"] == 1.0
    members = {m for grp in g.prunable_groups for m in grp.members}
    for name in ("block.local.0.weight[out]", "block.fc1.weight[out]", "block.proj.0.weight[out]",
                 "block.fusion.weight[out]"):
        assert name in members
    assert any(m.startswith("block.attn.qkv.weight[out]") for m in members)


def test_a_condition_on_tensor_values_is_not_specialised():
    """Only sizes are followed: `if x.abs().sum().item() > 0` reads a value, and the module
    stays an opaque leaf (a trace following the example's branch would be wrong elsewhere)."""

    class ValueGate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[-1] == 4 and x.abs().sum().item() > 0:
                return self.fc(x)
            return x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b = torch.nn.Linear(3, 4), ValueGate(), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.gate(self.a(x)))

    with pytest.warns(UserWarning, match="submodule 'gate' could not be traced"):
        g = analyze(Net().eval(), (torch.randn(2, 3),))
    assert [n.target for n in g.module.graph.nodes if n.op == "call_module"] == ["a", "gate", "b"]


@pytest.mark.parametrize("name", ["tiny_bit", "tiny_nfnet"])
def test_weight_standardised_convs_prune(name):
    """BiT's StdConv2d / NF-Nets' ScaledStdConv2d standardise each output row of the weight
    in forward (F.batch_norm over weight.reshape(1, out, -1)): the chain is one
    standardised-conv node whose rule binds the parameter (nothing pruned before: a computed
    weight). Output rows are independent; pruned inputs: slim and the mask reference both
    standardise over the kept inputs."""
    model, x = build(name)
    g = check_all(model, x)
    assert g.mac_share()["share"] == 1.0
    assert all(grp.prunable for grp in g.groups[1:-1])
    assert len(names(g, "standardised_conv_rule")) == (5 if name == "tiny_bit" else 4)
    # a plan pruning conv1's outputs only (units of 2 channels by the group norm, of 4 by the
    # grouped conv2): a standardised conv after it (conv2, conv3) re-standardises its rows
    grp = next(grp for grp in g.groups if any(m.startswith("conv1.weight[std_out]")
                                              for m in grp.members))
    keep = {grp.id: [1]}
    small = slim(g, keep)
    assert verify(small, mask(g, keep), x, rtol=1e-4)
    if name == "tiny_bit":
        assert small.conv2.weight.shape[:2] == (4, 2)
    else:
        assert small.conv1.gain.shape[0] == 4 and small.conv2.weight.shape[:2] == (4, 4)
        assert small.conv3.weight.shape[:2] == (8, 4)


def test_a_zero_mask_is_not_the_standardised_reference():
    """Zeroing dropped input channels is not what the slim model computes (the statistics of
    each row change): the mask reference takes them over the kept inputs; a plain zero mask
    would disagree with slim."""
    model, x = build("tiny_bit")
    g = analyze(model, x)
    grp = next(grp for grp in g.groups if any(m.startswith("conv1.weight[std_out]")
                                              for m in grp.members))
    keep = {grp.id: [1]}
    small, ref = slim(g, keep), mask(g, keep)
    assert verify(small, ref, x, rtol=1e-4)
    plain = mask(g, keep)
    plain._runners.clear()  # zeros only
    assert not verify(small, plain, x, rtol=1e-4)


def test_a_boolean_mask_index_is_refused_with_a_reason():
    """Indexing with a boolean mask keeps positions chosen by values: not followed (the
    layout rule used to index the channel ids with the mask's own ids)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
            self.register_buffer("keep", torch.tensor([True, False, True, True]))

        def forward(self, x):
            return self.b(self.a(x)[:, self.keep].sum(1, keepdim=True).expand(-1, 4))

    g = analyze(Net().eval(), (torch.randn(2, 3),))
    grp = next(grp for grp in g.groups if "a.weight[out]" in grp.members)
    assert not grp.prunable and "boolean mask" in grp.reason


@pytest.mark.parametrize("name", ["tiny_bit", "tiny_nfnet"])
def test_gates_fold_exactly_into_standardised_convs(name):
    """A gate after a standardised conv cannot go into its weight rows (standardisation
    cancels any row scale): the rule names the rows `std_out`, and NF's gain `gamma`, so
    that folding a constant gate gives the gated model's output (or says it cannot)."""
    import copy

    model, x = build(name)
    g = analyze(model, x)
    torch.manual_seed(1)
    values = {grp.id: torch.rand(grp.size) + 0.5 for grp in g.prunable_groups}
    with torch.no_grad():
        want = gated(g, {gid: (lambda v=v: v) for gid, v in values.items()})(*x)
        folded = copy.deepcopy(g.module)
        unfolded = fold_gates(g, folded, values)
        got = folded(*x)
    if name == "tiny_nfnet":
        assert unfolded == []  # the gain and the bias hold every gate
    if not unfolded:
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
