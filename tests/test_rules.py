"""One test per op rule, each on a tiny model (a few channels, 8x8 inputs).

Every test pins which groups exist (size, prunable, removable, reason, members) and checks
`g.cost(widths)` against a hand-built smaller model: params counted with `sum(p.numel())`
of that model, MACs from the textbook formula (out positions x kernel x in x out).
"""

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphsearch import Cost, PlanError, analyze
from graphsearch.export_trace import export_trace
from graphsearch.passes.mask import mask, verify
from graphsearch.passes.slim import slim

HW = 64  # positions of an 8x8 map


def run(model, *shape, inputs=None):
    return analyze(model.eval(), inputs if inputs is not None else (torch.randn(*shape),))


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def group(g, member):
    """The single group that lists `member`."""
    hits = [grp for grp in g.groups if member in grp.members]
    assert len(hits) == 1, (member, [grp.members for grp in hits])
    return hits[0]


def table(g):
    return [(grp.size, grp.prunable, grp.removable) for grp in g.groups]


def assert_cost(g, widths, macs, small):
    g.check(widths)
    assert g.cost(widths) == Cost(macs=macs, params=nparams(small))


def conv(cin, cout, k=1, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


class Chain(nn.Module):
    """conv1 (2 -> mid) -> op -> conv2 (mid -> 3), all 1x1; a module class `op` gets `mid`."""

    def __init__(self, op, mid=4):
        super().__init__()
        self.conv1 = conv(2, mid)
        self.op = op(mid) if isinstance(op, type) else op
        self.conv2 = conv(mid, 3)

    def forward(self, x):
        return self.conv2(self.op(self.conv1(x)))


# --------------------------------------------------------------------------- conv / linear

CONVS = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


class ConvNet(nn.Module):
    def __init__(self, d, mid=4):
        super().__init__()
        conv_cls, bn_cls = CONVS[d]
        self.conv1 = conv_cls(2, mid, 3, padding=1)
        self.bn = bn_cls(mid)
        self.act = nn.ReLU()
        self.conv2 = conv_cls(mid, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_nd(d):
    g = run(ConvNet(d), 1, 2, *[8] * d)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    assert sorted(g.groups[1].members) == sorted([
        "conv1.weight[out]", "conv1.bias", "bn.weight", "bn.bias", "bn.running_mean",
        "bn.running_var", "conv2.weight[in]"])
    assert g.groups[0].members == ["conv1.weight[in]", "<input x>"]
    assert g.groups[2].members == ["conv2.weight[out]"]
    positions, k = 8 ** d, 3 ** d

    def macs(mid):
        return positions * k * (2 * mid + mid * 3)

    assert g.cost() == Cost(macs(4), nparams(ConvNet(d)))
    assert_cost(g, {1: 2}, macs(2), ConvNet(d, mid=2))
    assert_cost(g, {1: [0, 3]}, macs(2), ConvNet(d, mid=2))


class Deconv(nn.Module):
    def __init__(self, a=4, b=6):
        super().__init__()
        self.conv1 = conv(2, a, 3)
        self.up = nn.ConvTranspose2d(a, b, 2, stride=2)  # 8x8 -> 16x16
        self.conv2 = conv(b, 3)

    def forward(self, x):
        return self.conv2(self.up(self.conv1(x)))


def test_conv_transpose():
    g = run(Deconv(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (6, True, False), (3, False, False)]
    # The transposed weight is (in, out, k, k): dim 0 follows the input channels.
    assert g.groups[1].members == ["conv1.weight[out]", "conv1.bias", "up.weight[in]"]
    assert g.groups[2].members == ["up.weight[out]", "up.bias", "conv2.weight[in]"]

    def macs(a, b):  # a transposed conv costs in-positions x k x in x out
        return HW * 9 * 2 * a + HW * 4 * a * b + 256 * b * 3

    assert g.cost() == Cost(macs(4, 6), nparams(Deconv()))
    assert_cost(g, {1: 3, 2: 2}, macs(3, 2), Deconv(3, 2))


class Grouped(nn.Module):
    def __init__(self, blocks=4, per_in=2, per_out=2):
        super().__init__()
        self.conv1 = conv(2, blocks * per_in)
        self.gconv = conv(blocks * per_in, blocks * per_out, 3, groups=blocks)
        self.conv2 = conv(blocks * per_out, 3)

    def forward(self, x):
        return self.conv2(self.gconv(self.conv1(x)))


@pytest.mark.parametrize("per_in,per_out", [(2, 2), (1, 1), (1, 2)],
                         ids=["grouped", "depthwise", "depthwise_x2"])
def test_grouped_and_depthwise_conv(per_in, per_out):
    """Block k of the input feeds only output block k: a block is one unit, in and out."""
    g = run(Grouped(4, per_in, per_out), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]

    def x(n):
        return f" x{n}" if n > 1 else ""

    assert sorted(g.groups[1].members) == sorted([
        f"conv1.weight[out]{x(per_in)}", f"conv1.bias{x(per_in)}",
        f"gconv.weight[out]{x(per_out)}", f"gconv.bias{x(per_out)}",
        f"conv2.weight[in]{x(per_out)}"])

    def macs(blocks):
        return HW * (2 * blocks * per_in + 9 * per_in * blocks * per_out + blocks * per_out * 3)

    assert g.cost() == Cost(macs(4), nparams(Grouped(4, per_in, per_out)))
    assert_cost(g, {1: 1}, macs(1), Grouped(1, per_in, per_out))
    assert_cost(g, {1: [1, 3]}, macs(2), Grouped(2, per_in, per_out))


class MLP(nn.Module):
    def __init__(self, hidden=5):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("shape", [(1, 6), (1, 4, 6)], ids=["vector", "tokens"])
def test_linear(shape):
    g = run(MLP(), *shape)
    assert [grp.size for grp in g.groups][1:] == [5, 3]
    hidden = group(g, "fc1.weight[out]")
    assert (hidden.prunable, hidden.removable) == (True, False)
    assert hidden.members == ["fc1.weight[out]", "fc1.bias", "fc2.weight[in]"]
    assert g.groups[-1].reason == "model output"
    tokens = shape[1] if len(shape) == 3 else 1
    assert g.cost() == Cost(tokens * (6 * 5 + 5 * 3), nparams(MLP()))
    assert_cost(g, {hidden.id: 2}, tokens * (6 * 2 + 2 * 3), MLP(2))


class ParamLinear(nn.Module):
    """F.linear with parameters, then x @ W with a parameter W of shape (in, out)."""

    def __init__(self, hidden=5):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, 6))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, 3))

    def forward(self, x):
        return F.relu(F.linear(x, self.w1, self.b1)) @ self.w2


def test_functional_linear_and_parameter_matmul():
    g = run(ParamLinear(), 1, 4, 6)
    hidden = group(g, "w1[out]")
    assert hidden.size == 5 and hidden.prunable
    assert hidden.members == ["w1[out]", "b1", "w2[in]"]  # w2 is (in, out)
    assert g.groups[-1].members == ["w2[out]"] and g.groups[-1].reason == "model output"
    assert_cost(g, {hidden.id: 2}, 4 * (6 * 2 + 2 * 3), ParamLinear(2))


class TransposedLinear(nn.Module):
    """Linear layers written as `x @ W.T` on weights of shape (out, in) (Falcon's
    FalconLinear), in three spellings."""

    def __init__(self, hidden=5, how="T"):
        super().__init__()
        self.how = how
        self.w1, self.b1 = nn.Parameter(torch.randn(hidden, 6)), nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(3, hidden))

    def t(self, w):
        return w.T if self.how == "T" else w.t() if self.how == "t" else w.transpose(0, 1)

    def forward(self, x):
        return F.relu(x @ self.t(self.w1) + self.b1) @ self.t(self.w2)


@pytest.mark.parametrize("how", ["T", "t", "transpose"])
@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_a_product_with_a_transposed_weight_is_a_linear_layer(front_end, how):
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 6),)
    net = TransposedLinear(how=how).eval()
    traced = net if front_end == "fx" else export_trace(net, x).module
    g = analyze(traced, x)
    targets = {n.target for n in g.module.graph.nodes if n.op == "call_function"}
    assert targets & {F.linear, torch.ops.aten.linear.default}
    hidden = group(g, "w1[out]")
    assert hidden.size == 5 and hidden.prunable
    assert hidden.members == ["w1[out]", "b1", "w2[in]"]
    assert g.cost() == Cost(4 * (6 * 5 + 5 * 3), nparams(net))
    assert_cost(g, {hidden.id: 2}, 4 * (6 * 2 + 2 * 3), TransposedLinear(2))
    keep = {hidden.id: [0, 3]}
    v = verify(slim(g, keep), mask(g, keep), (torch.randn(3, 4, 6),))
    assert v.ok, v.message


class WeightNormed(nn.Module):
    """A weight-normed convolution (`weight_norm`: v normalised over every dim but `dim`,
    times g) on a residual stream: wav2vec2's positional convolution (grouped, dim 2)."""

    def __init__(self, c=8, groups=2, dim=2):
        super().__init__()
        self.inp, self.out = nn.Conv1d(3, c, 1), nn.Conv1d(c, 2, 1)
        self.conv = nn.utils.parametrizations.weight_norm(
            nn.Conv1d(c, c, 3, padding=1, groups=groups), name="weight", dim=dim)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + F.gelu(self.conv(h)))


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("groups, dim", [(2, 2), (1, 0)])
def test_a_weight_normed_convolution_is_pruned_on_its_parameters(front_end, groups, dim):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 10),)
    net = WeightNormed(groups=groups, dim=dim).eval()
    g = analyze(net if front_end == "fx" else export_trace(net, x).module, x)
    v = "conv.parametrizations.weight.original1"
    hidden = group(g, f"{v}[std_out]" + (" x4" if groups > 1 else ""))
    assert hidden.prunable and hidden.size == 8 // (4 if groups > 1 else 1)
    if dim == 0:  # g scales the output rows: it goes with them
        assert "conv.parametrizations.weight.original0[gamma]" in hidden.members
    keep = {hidden.id: [1] if groups > 1 else [0, 2, 5, 6]}
    s = slim(g, keep)
    # the slim model normalises its kept weight, and so does the reference
    check = verify(s, mask(g, keep), (torch.randn(3, 3, 10),))
    assert check.ok, check.message
    assert nparams(s) == g.cost(keep).params == nparams(WeightNormed(4, 1, dim))
    assert g.cost(keep).macs == 10 * (3 * 4 + 4 * 4 * 3 + 4 * 2)  # 4 channels, one group


# --------------------------------------------------------------------------- attention


class QKV(nn.Module):
    """softmax(q k^T) v with a choice of matmul and of transpose."""

    def __init__(self, op=torch.matmul, kt="transpose", qk=5, v=4):
        super().__init__()
        self.op, self.kt = op, kt
        self.q, self.k, self.v = nn.Linear(6, qk), nn.Linear(6, qk), nn.Linear(6, v)
        self.proj = nn.Linear(v, 3)

    def forward(self, x):
        k = self.k(x)
        k = k.transpose(1, 2) if self.kt == "transpose" else k.mT if self.kt == "mT" \
            else k.permute(0, 2, 1)
        scores = self.op(self.q(x), k).softmax(-1)
        return self.proj(self.op(scores, self.v(x)))


@pytest.mark.parametrize("op,kt", [(torch.matmul, "transpose"), (operator.matmul, "transpose"),
                                   (torch.bmm, "permute"), (operator.matmul, "mT")],
                         ids=["torch.matmul", "operator.matmul", "torch.bmm", "mT"])
def test_matmul(op, kt):
    g = run(QKV(op, kt), 1, 4, 6)
    qk, v = group(g, "q.weight[out]"), group(g, "v.weight[out]")
    # q and k meet in q @ k^T: channel i of q is channel i of k.
    assert sorted(qk.members) == ["k.bias", "k.weight[out]", "q.bias", "q.weight[out]"]
    assert v.members == ["v.weight[out]", "v.bias", "proj.weight[in]"]
    assert (qk.size, qk.prunable, qk.removable) == (5, True, False)
    assert (v.size, v.prunable) == (4, True)
    assert len(g.groups) == 4

    def macs(a, b, t=4):
        return t * 6 * (2 * a + b) + t * t * (a + b) + t * b * 3

    assert g.cost() == Cost(macs(5, 4), nparams(QKV()))
    assert_cost(g, {qk.id: 2, v.id: 3}, macs(2, 3), QKV(qk=2, v=3))


class MHA(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


def _attention_macs(t, dim, heads, head_dim):
    inner = heads * head_dim
    return (t * 6 * dim            # embed
            + t * dim * 3 * inner  # q, k, v projections
            + 2 * t * t * inner    # q k^T and attn @ v
            + t * inner * dim      # output projection
            + t * dim * 3)         # head


def test_multihead_attention():
    g = run(MHA(), 1, 4, 6)
    embed, heads = group(g, "embed.weight[out]"), group(g, "attn.in_proj_weight[out] x12")
    assert table(g)[1:] == [(8, True, False), (2, True, True), (3, False, False)]
    assert embed.members == ["embed.weight[out]", "embed.bias", "attn.in_proj_weight[in]",
                             "attn.out_proj.weight[out]", "attn.out_proj.bias", "head.weight[in]"]
    # A head is 4 rows of each of q, k, v and 4 input columns of the output projection.
    assert heads.members == ["attn.in_proj_weight[out] x12", "attn.in_proj_bias x12",
                             "attn.out_proj.weight[in] x4"]
    assert g.cost() == Cost(_attention_macs(4, 8, 2, 4), nparams(MHA()))
    # One head of 4 dims in a 4-dim embedding is exactly nn.MultiheadAttention(4, 1).
    assert_cost(g, {embed.id: 4, heads.id: 1}, _attention_macs(4, 4, 1, 4), MHA(4, 1))
    # No heads at all: the residual keeps the block, the attention (with its biases) is gone.
    assert g.dead_nodes({heads.id: 0}) == {"attn", "getitem"}
    assert g.cost({heads.id: 0}) == Cost(4 * 6 * 8 + 4 * 8 * 3, nparams(MHA()) - nparams(MHA().attn))


class SDPA(nn.Module):
    def __init__(self, dim=8, heads=2, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.head(h + self.proj(a.transpose(1, 2).flatten(2)))


def test_scaled_dot_product_attention_heads():
    g = run(SDPA(), 1, 4, 6)
    assert table(g)[1:] == [(8, True, False), (2, True, True), (3, False, False)]
    heads = group(g, "qkv.weight[out] x12")
    assert heads.members == ["qkv.weight[out] x12", "qkv.bias x12", "proj.weight[in] x4"]
    assert g.cost() == Cost(_attention_macs(4, 8, 2, 4), nparams(SDPA()))
    assert_cost(g, {heads.id: 1}, _attention_macs(4, 8, 1, 4), SDPA(heads=1))
    assert_cost(g, {1: 5, heads.id: 1}, _attention_macs(4, 5, 1, 4), SDPA(dim=5, heads=1))


class SharedKeyValue(nn.Module):
    """Multi-query attention: one key/value head broadcast to every query head (Falcon)."""

    def __init__(self, heads=4, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.out = nn.Linear(6, heads * head_dim), nn.Linear(heads * head_dim, 3)
        self.k, self.v = nn.Linear(6, head_dim), nn.Linear(6, head_dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (f(x).view(b, t, 1, self.head_dim).transpose(1, 2) for f in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


def test_one_key_value_head_shared_by_every_query_head():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net, x = SharedKeyValue().eval(), (torch.randn(2, 5, 6),)
    g = analyze(net, x)
    heads = group(g, "q.weight[out] x4")
    assert heads.size == 4 and heads.prunable  # the query heads, alone
    for name in ("k", "v"):
        shared = group(g, f"{name}.weight[out] x4")
        assert not shared.prunable and "multi-query" in shared.reason
    counter = FlopCounterMode(display=False)
    with counter:
        net(*x)
    # attn @ v counts every query head, not the one value head
    assert g.cost().macs == counter.get_total_flops() / 2 / 2
    keep = {heads.id: [1, 2]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 5, 6),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(SharedKeyValue(heads=2))
    # per sample: q, k, v and out projections of 5 tokens, q k^T and attn @ v of 2 heads
    assert g.cost(keep).macs == 5 * (6 * 8 + 6 * 4 + 6 * 4 + 8 * 3) + 2 * (2 * 5 * 5 * 4)


class FusedSharedKeyValue(nn.Module):
    """Falcon-7B's multi-query attention: one fused projection makes every query head and
    the one key/value head they share, picked by index lists (`x[..., [-2], :]`)."""

    def __init__(self, heads=4, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(6, (heads + 2) * head_dim)
        self.out = nn.Linear(heads * head_dim, 3)

    def forward(self, x):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, self.heads + 2, self.head_dim)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        a = F.scaled_dot_product_attention(*(y.transpose(1, 2) for y in (q, k, v)))
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


def _query_heads_pruned_around_the_kept_key_value_head(g, two_heads: nn.Module):
    """The 4 query heads of a fused projection are one prunable group, its shared key/value
    head another that is kept (multi-query); 2 of the query heads kept slim to the mask
    reference and to the parameters of the same module built with 2 heads. The slim model."""
    heads, shared = [grp for grp in g.groups if "qkv.weight[out] x4" in grp.members]
    assert heads.size == 4 and heads.prunable and "out.weight[in] x4" in heads.members
    assert shared.size == 2 and not shared.prunable and "multi-query" in shared.reason
    keep = {heads.id: [0, 3]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 5, 6),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(two_heads)
    return s


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_a_fused_projection_keeps_its_shared_key_value_head_apart(front_end):
    """The key/value head is kept as a group of its own; the query heads that the same
    projection makes stay prunable. Exported, the index lists are constants the graph holds:
    they pick their positions (not any position of the dim: that tied every head)."""
    torch.manual_seed(0)
    net, x = FusedSharedKeyValue().eval(), (torch.randn(2, 5, 6),)
    g = analyze(net if front_end == "fx" else export_trace(net, x).module, x)
    s = _query_heads_pruned_around_the_kept_key_value_head(g, FusedSharedKeyValue(heads=2))
    # no scatter back to the full layout: the index constants hold the slim positions
    assert not [n for n in s.graph.nodes if n.op == "call_module" and "slim_" in n.target]


class RepeatedSharedKeyValue(nn.Module):
    """Falcon-7B's multi-query attention as transformers 5.25 writes it: the fused
    projection split by sizes, and the one key/value head repeated to every query head
    before the attention (`repeat_kv`: a new dim, expanded, merged into the head dim)."""

    def __init__(self, heads=4, head_dim=4, merge="reshape"):
        super().__init__()
        self.heads, self.head_dim, self.merge = heads, head_dim, merge
        self.qkv = nn.Linear(6, (heads + 2) * head_dim)
        self.out = nn.Linear(heads * head_dim, 3)

    def repeat(self, y):
        b, _, t, e = y.shape
        y = y[:, :, None].expand(b, 1, self.heads, t, e)
        return y.reshape(b, self.heads, t, e) if self.merge == "reshape" else y.flatten(1, 2)

    def forward(self, x):
        fused = self.qkv(x).view(*x.shape[:-1], -1, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in fused.split([self.heads, 1, 1], dim=-2))
        a = F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v))
        return self.out(a.transpose(1, 2).reshape(*x.shape[:-1], -1))


@pytest.mark.parametrize("merge", ["reshape", "flatten"])
def test_a_key_value_head_repeated_to_every_query_head_is_kept_apart(merge):
    """Exported, the repeated key/value head reaches the attention as the one head that it
    broadcasts (its repeat count, the query heads', is no channel of the key): it is kept,
    the query heads stay prunable, and the slim model repeats nothing (followed through the
    repeat, every query head was tied to the key/value head: one unit, all or nothing)."""
    torch.manual_seed(0)
    net, x = RepeatedSharedKeyValue(merge=merge).eval(), (torch.randn(2, 5, 6),)
    g = analyze(export_trace(net, x).module, x)
    s = _query_heads_pruned_around_the_kept_key_value_head(g, RepeatedSharedKeyValue(heads=2))
    assert not [n for n in s.graph.nodes if n.target is torch.ops.aten.expand.default]


class InterleavedQKV(nn.Module):
    """Falcon's attention without multi-query as transformers 5.25 writes it: q, k and v
    of each head side by side in one projection, `unflatten(-2, (heads, 3)).unbind(-2)`."""

    def __init__(self, heads=4, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(6, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, 3)

    def forward(self, x):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, -1, self.head_dim)
        q, k, v = fused.unflatten(-2, (self.heads, 3)).unbind(-2)
        a = F.scaled_dot_product_attention(*(y.transpose(1, 2) for y in (q, k, v)))
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_an_unflattened_projection_prunes_whole_heads(front_end):
    """`unflatten` splits a dim on both front ends (exported, `aten.unflatten` had no rule:
    nothing it touched was prunable); its literal head count follows the plan."""
    torch.manual_seed(0)
    net, x = InterleavedQKV().eval(), (torch.randn(2, 5, 6),)
    g = analyze(net if front_end == "fx" else export_trace(net, x).module, x)
    aten_unflatten = [n for n in g.module.graph.nodes if n.target is torch.ops.aten.unflatten.int]
    assert bool(aten_unflatten) == (front_end == "export")  # (fx: the method)
    heads = group(g, "qkv.weight[out] x12")
    assert heads.size == 4 and heads.prunable and "out.weight[in] x4" in heads.members
    keep = {heads.id: [1, 2]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 5, 6),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(InterleavedQKV(heads=2))


class BatchTimesHeads(nn.Module):
    """DeBERTa's attention: the heads folded into the batch dim, `(batch * heads, t, hd)`."""

    def __init__(self, dim=8, heads=2, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        h = self.embed(x)
        b, t = x.shape[:2]
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2).reshape(-1, t, self.head_dim)
                   for f in (self.q, self.k, self.v))
        a = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        return self.proj(a.view(b, self.heads, t, -1).transpose(1, 2).reshape(b, t, -1))


def test_heads_folded_into_the_batch_follow_the_batch_in_the_reference():

    torch.manual_seed(0)
    g = run(BatchTimesHeads(), 2, 4, 6)  # analysed at batch 2, checked at batch 3
    heads = group(g, "q.weight[out] x4")
    keep = {heads.id: [1]}
    v = verify(slim(g, keep), mask(g, keep), (torch.randn(3, 4, 6),))
    assert v.ok, v.message


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("norm,unit,members", [
    (nn.BatchNorm2d, 1, ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"]),
    (lambda c: nn.InstanceNorm2d(c, affine=True), 1, ["norm.weight", "norm.bias"]),
    (lambda c: nn.GroupNorm(c // 2, c), 2, ["norm.weight x2", "norm.bias x2"]),
], ids=["batch", "instance", "group"])
def test_channel_norms(norm, unit, members):
    class Net(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.conv1, self.norm, self.conv2 = conv(2, c, 3), norm(c), conv(c, 3)

        def forward(self, x):
            return self.conv2(F.relu(self.norm(self.conv1(x))))

    g = run(Net(), 1, 2, 8, 8)
    # GroupNorm statistics span a norm group: its 2 channels are pruned as one unit.
    assert table(g) == [(2, False, False), (8 // unit, True, False), (3, False, False)]
    x = f" x{unit}" if unit > 1 else ""
    assert sorted(g.groups[1].members) == sorted(
        [f"conv1.weight[out]{x}", f"conv1.bias{x}", f"conv2.weight[in]{x}"] + members)
    assert_cost(g, {1: 3}, HW * (9 * 2 + 3) * 3 * unit, Net(3 * unit))


class TensorBatchNorm(nn.Module):
    """torch.batch_norm: the ATen signature, weight and bias before the running statistics."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.conv2 = conv(2, c, 3), conv(c, 3)
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        n = self.norm
        y = torch.batch_norm(self.conv1(x), n.weight, n.bias, n.running_mean, n.running_var,
                             False, 0.1, 1e-5, False)
        return self.conv2(y)


def test_torch_batch_norm_binds_its_parameters_by_the_aten_signature():
    g = run(TensorBatchNorm(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (8, True, False), (3, False, False)]
    roles = {t.name: t.role for t in g.tied_parameters()[1]}
    assert {k: v for k, v in roles.items() if k.startswith("norm.")} == {
        "norm.weight": "gamma", "norm.bias": "beta", "norm.running_mean": "statistic",
        "norm.running_var": "statistic"}


class ResidualPool(nn.Module):
    """What torch.export makes of a ResNet block: aten.batch_norm, an in-place residual add
    (`y += x`), and a global mean before a LayerNorm."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = conv(2, c, 3), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = conv(c, c, 3), nn.BatchNorm2d(c)
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, 3)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        y = self.bn2(self.conv2(x))
        y += x
        return self.fc(self.norm(y.relu().mean((-2, -1))))


def test_aten_batch_norm_in_place_add_and_a_global_mean_before_a_layer_norm():

    torch.manual_seed(0)
    net = ResidualPool().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = (torch.randn(2, 2, 8, 8),)
    exported = export_trace(net, x).module  # ATen ops, analysed as they are
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert {aten.batch_norm.default, aten.add_.Tensor, aten.mean.dim} <= targets
    g = analyze(exported, x)
    assert table(g) == [(2, False, False), (8, True, False), (3, False, False)]
    keep = {1: [0, 2, 5]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 2, 8, 8),))  # the mean's mask: no 0 / 0
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(ResidualPool(3))


class TokenNorm(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, c), nn.LayerNorm(c), nn.Linear(c, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_layer_norm():
    g = run(TokenNorm(), 1, 4, 6)
    c = group(g, "norm.weight")
    assert c.size == 8 and c.prunable
    assert c.members == ["fc1.weight[out]", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight[in]"]
    assert_cost(g, {c.id: 5}, 4 * (6 * 5 + 5 * 3), TokenNorm(5))


def test_layer_norm_over_several_dims_is_not_prunable():
    g = run(Chain(nn.LayerNorm([4, 8, 8])), 1, 2, 8, 8)
    c = group(g, "conv1.weight[out]")
    assert not c.prunable and c.reason == "LayerNorm over several dims at 'op'"
    assert "conv2.weight[in]" in c.members
    with pytest.raises(PlanError, match="not prunable: LayerNorm over several dims"):
        g.check({c.id: 2})


# --------------------------------------------------------------------------- channelwise ops


CHANNELWISE = {  # id: (op or factory of the channel count, output side of an 8x8 input)
    "ReLU": (nn.ReLU(), 8), "ReLU6": (nn.ReLU6(), 8), "GELU": (nn.GELU(), 8),
    "SiLU": (nn.SiLU(), 8), "Hardswish": (nn.Hardswish(), 8), "LeakyReLU": (nn.LeakyReLU(0.1), 8),
    "ELU": (nn.ELU(), 8), "Sigmoid": (nn.Sigmoid(), 8), "Tanh": (nn.Tanh(), 8),
    "Mish": (nn.Mish(), 8), "F.relu": (F.relu, 8), "torch.sigmoid": (torch.sigmoid, 8),
    "torch.tanh": (torch.tanh, 8), "clamp": (lambda x: x.clamp(0, 6), 8), "PReLU": (nn.PReLU, 8),
    "Dropout": (nn.Dropout(0.5), 8), "Dropout2d": (nn.Dropout2d(0.5), 8),
    "F.dropout": (lambda x: F.dropout(x, 0.5), 8),
    "MaxPool2d": (nn.MaxPool2d(2), 4), "AvgPool2d": (nn.AvgPool2d(2), 4),
    "F.max_pool2d": (lambda x: F.max_pool2d(x, 2), 4),
    "F.avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 1, 1), 8),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d(1), 1),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d((2, 2)), 2),
    "F.adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 1), 1),
    "Upsample": (nn.Upsample(scale_factor=2), 16),
    "interpolate_bilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), 16),
    "interpolate_size": (lambda x: F.interpolate(x, size=(4, 4)), 4),
    "F.pad": (lambda x: F.pad(x, (1, 1, 1, 1)), 10), "ZeroPad2d": (nn.ZeroPad2d(2), 12),
}


@pytest.mark.parametrize("op,side", list(CHANNELWISE.values()), ids=list(CHANNELWISE))
def test_channelwise_ops(op, side):
    """Activations, dropout, pooling (adaptive too), interpolation, spatial padding."""
    g = run(Chain(op), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    extra = ["op.weight"] if op is nn.PReLU else []
    assert sorted(g.groups[1].members) == sorted(
        ["conv1.weight[out]", "conv1.bias", "conv2.weight[in]"] + extra)

    def macs(c):
        return HW * 2 * c + side * side * c * 3

    assert g.cost() == Cost(macs(4), nparams(Chain(op)))
    assert_cost(g, {1: 2}, macs(2), Chain(op, mid=2))


class PadChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = conv(2, 4), conv(7, 3)

    def forward(self, x):
        return self.conv2(F.pad(self.conv1(x), (0, 0, 0, 0, 1, 2)))


def test_channel_padding_adds_constant_channels():
    g = run(PadChannels(), 1, 2, 8, 8)
    # conv2 reads 1 + 4 + 2 channels; the padded ones are groups of their own.
    assert table(g) == [(2, False, False), (4, True, False), (1, True, True), (2, True, True),
                        (3, False, False)]
    assert g.groups[2].members == ["conv2.weight[in]", "<pad pad>"]
    assert g.cost() == Cost(HW * (2 * 4 + 7 * 3), nparams(conv(2, 4)) + nparams(conv(7, 3)))
    assert g.cost({2: 0, 3: 0}) == Cost(HW * (2 * 4 + 4 * 3), nparams(Chain(None)))


# --------------------------------------------------------------------------- merges


class SE(nn.Module):
    def __init__(self, c=4, r=2):
        super().__init__()
        self.conv = conv(2, c, 3)
        self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)
        self.head = conv(c, 3)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.head(x * gate[:, :, None, None])


def test_squeeze_excitation_gate():
    g = run(SE(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (2, True, False), (3, False, False)]
    # The gate's channels are the feature map's: fc2's outputs prune with the conv.
    assert g.groups[1].members == ["conv.weight[out]", "conv.bias", "fc1.weight[in]",
                                   "fc2.weight[out]", "fc2.bias", "head.weight[in]"]
    assert g.groups[2].members == ["fc1.weight[out]", "fc1.bias", "fc2.weight[in]"]

    def macs(c, r):
        return HW * 9 * 2 * c + c * r + r * c + HW * c * 3

    assert g.cost() == Cost(macs(4, 2), nparams(SE()))
    assert_cost(g, {1: 3, 2: 1}, macs(3, 1), SE(3, 1))
    with pytest.raises(PlanError, match="'mul' would lose an input"):
        g.dead_nodes({2: 0})  # a gate cannot be removed: x * sigmoid(bias) is not x
    with pytest.raises(PlanError, match="width 0 is outside 1..2"):
        g.check({2: 0})


class Merge(nn.Module):
    """add, sub, div and mul by a constant, and a broadcast (1, C, 1, 1) parameter."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b, self.c, self.d = (conv(2, c) for _ in range(4))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.head = conv(c, 3)

    def forward(self, x):
        y = self.a(x) + self.b(x) - self.c(x)
        y = y / (torch.sigmoid(self.d(x)) + 1.0)
        return self.head(2 * y + self.bias)


def test_elementwise_merges_tie_channels():
    g = run(Merge(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    assert sorted(g.groups[1].members) == sorted(
        [f"{n}.{p}" for n in "abcd" for p in ("weight[out]", "bias")] + ["bias", "head.weight[in]"])
    assert_cost(g, {1: 2}, HW * (4 * 2 * 2 + 2 * 3), Merge(2))


ALIASES = {  # torch's other names of mul, sub and div: the same rules own them
    "torch.multiply": torch.multiply, "Tensor.multiply": lambda a, b: a.multiply(b),
    "torch.subtract": torch.subtract, "Tensor.subtract": lambda a, b: a.subtract(b),
    "torch.divide": torch.divide, "torch.true_divide": torch.true_divide,
    "Tensor.true_divide": lambda a, b: a.true_divide(b),
}


class AliasMerge(nn.Module):
    """Gemma 3n's `torch.multiply(first_prediction, per_layer_input)`, and the other aliases."""

    def __init__(self, op, c=4):
        super().__init__()
        self.op = op
        self.a, self.b, self.head = conv(2, c), conv(2, c), conv(c, 3)

    def forward(self, x):
        return self.head(self.op(self.a(x), torch.sigmoid(self.b(x)) + 1.0))


@pytest.mark.parametrize("front_end", ["fx", "export"])
@pytest.mark.parametrize("alias", list(ALIASES))
def test_aliases_of_mul_sub_and_div_tie_channels(alias, front_end):
    net, x = AliasMerge(ALIASES[alias]).eval(), (torch.randn(1, 2, 8, 8),)
    g = analyze(net if front_end == "fx" else export_trace(net, x).module, x)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    assert {"a.weight[out]", "b.weight[out]", "head.weight[in]"} <= set(g.groups[1].members)
    keep = {1: [0, 2]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(2, 2, 8, 8),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(AliasMerge(ALIASES[alias], 2))


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.sa, self.head = conv(2, 4), conv(4, 1), conv(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head(y * torch.sigmoid(self.sa(y)))


def test_broadcast_across_channels_is_not_prunable():
    g = run(SpatialGate(), 1, 2, 8, 8)
    y, attn = group(g, "conv.weight[out]"), group(g, "sa.weight[out]")
    assert y.prunable and y.size == 4 and "head.weight[in]" in y.members
    # A (1, 1, 8, 8) map multiplied into every channel has no channel to follow.
    assert (attn.size, attn.prunable) == (1, False)
    assert attn.reason == "broadcast across channels at 'mul'"


class Residual(nn.Module):
    def __init__(self, merge="add", c=4, mid=3, branch=True):
        super().__init__()
        self.merge, self.branch = merge, branch
        self.stem = conv(2, c, 3)
        if branch:
            self.conv1, self.bn1 = conv(c, mid, 3, bias=False), nn.BatchNorm2d(mid)
            self.conv2, self.bn2 = conv(mid, c, 3, bias=False), nn.BatchNorm2d(c)
        self.head = conv(c, 3)

    def forward(self, x):
        h = self.stem(x)
        if self.branch:
            b = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
            h = h + b if self.merge == "add" else h - b if self.merge == "sub" else b - h
        return self.head(h)


@pytest.mark.parametrize("merge", ["add", "sub"])
def test_residual_branch_removable(merge):
    g = run(Residual(merge), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, True, True), (3, False, False)]
    trunk, mid = g.groups[1], g.groups[2]
    assert {"stem.weight[out]", "conv2.weight[out]", "bn2.weight", "head.weight[in]"} <= \
        set(trunk.members)
    assert mid.min_width == 0 and trunk.min_width == 1
    assert g.dead_nodes({mid.id: 0}) == {"conv1", "bn1", "relu", "conv2", "bn2"}
    # Without the branch the model is the stem and the head.
    assert_cost(g, {mid.id: 0}, HW * (9 * 2 * 4 + 4 * 3), Residual(branch=False))

    def macs(c, m):
        return HW * (9 * 2 * c + 9 * c * m * 2 + c * 3)

    assert_cost(g, {trunk.id: 2, mid.id: 1}, macs(2, 1), Residual(merge, 2, 1))


def test_branch_minus_trunk_branch_not_removable():
    g = run(Residual("rsub"), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, True, False), (3, False, False)]
    with pytest.raises(PlanError, match="'sub' would lose its first operand"):
        g.dead_nodes({2: 0})


# --------------------------------------------------------------------------- concat, split


class Cat(nn.Module):
    def __init__(self, sizes=(3, 5, 2), nested=False):
        super().__init__()
        self.nested = nested
        self.convs = nn.ModuleList(conv(2, s) for s in sizes if s)
        self.head = conv(sum(sizes), 3)

    def forward(self, x):
        outs = [c(x) for c in self.convs]
        if self.nested:
            return self.head(torch.cat([torch.cat(outs[:2], 1), outs[2]], dim=1))
        return self.head(torch.cat(outs, 1))


@pytest.mark.parametrize("nested", [False, True], ids=["cat", "cat_of_cat"])
def test_concat(nested):
    g = run(Cat(nested=nested), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (3, True, True), (5, True, True), (2, True, True),
                        (3, False, False)]
    for i in range(3):
        assert g.groups[1 + i].members == [f"convs.{i}.weight[out]", f"convs.{i}.bias",
                                           "head.weight[in]"]

    def macs(*sizes):
        return HW * 5 * sum(sizes)

    assert g.cost() == Cost(macs(3, 5, 2), nparams(Cat()))
    assert_cost(g, {1: 2, 2: 0, 3: 1}, macs(2, 1), Cat((2, 0, 1)))
    assert_cost(g, {1: [0, 2], 2: [], 3: [1]}, macs(2, 1), Cat((2, 0, 1)))
    assert g.dead_nodes({2: 0}) == {"convs_1"}
    with pytest.raises(PlanError, match="model output would lose an input"):
        g.check({1: 0, 2: 0, 3: 0})


class CatSplit(nn.Module):
    def __init__(self, a=3, b=5, p=4, q=4):
        super().__init__()
        self.a, self.b = conv(2, a), conv(2, b)
        self.p, self.q = conv(p, 3), conv(q, 3)

    def forward(self, x):
        parts = torch.cat([self.a(x), self.b(x)], 1).split(4, dim=1)
        return self.p(parts[0]) + self.q(parts[1])


def test_split_after_concat():
    g = run(CatSplit(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (3, True, True), (5, True, True), (3, False, False)]
    assert g.groups[1].members == ["a.weight[out]", "a.bias", "p.weight[in]"]
    # b's first channel lands in the first part: b feeds both p and q.
    assert g.groups[2].members == ["b.weight[out]", "b.bias", "p.weight[in]", "q.weight[in]"]
    # Kept indices are exact: a keeps 0, 2 and b keeps 0 (-> p) and 3, 4 (-> q).
    assert_cost(g, {1: [0, 2], 2: [0, 3, 4]}, HW * (2 * 5 + 3 * 3 + 2 * 3), CatSplit(2, 3, 3, 2))
    assert_cost(g, {2: [1, 2, 3, 4]}, HW * (2 * 7 + 3 * 3 + 4 * 3), CatSplit(3, 4, 3, 4))


class Chunk(nn.Module):
    def __init__(self, c=8, p=4, q=4):
        super().__init__()
        self.conv = conv(2, c)
        self.p, self.q = conv(p, 3), conv(q, 3)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.p(a) + self.q(b)


def test_chunk():
    g = run(Chunk(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (8, True, False), (3, False, False)]
    assert g.groups[1].members == ["conv.weight[out]", "conv.bias", "p.weight[in]", "q.weight[in]"]
    assert_cost(g, {1: [0, 1, 5]}, HW * (2 * 3 + 2 * 3 + 1 * 3), Chunk(3, 2, 1))
    # A count is spread evenly over both halves.
    assert_cost(g, {1: 4}, HW * (2 * 4 + 2 * 3 + 2 * 3), Chunk(4, 2, 2))


class StemChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.p, self.q = conv(2, 4), conv(4, 4), conv(2, 3), conv(2, 3)

    def forward(self, x):
        a, b = self.mid(F.relu(self.stem(x))).chunk(2, dim=1)
        return self.p(a) + self.q(b)


def test_chunk_of_a_removed_stem_dies_with_it():
    """Regression: the pieces of a dead chunk stayed alive (their producer, a tuple, was not
    recorded as an input), so a stem feeding a chunk looked removable (ShuffleNetV2's stem)."""
    g = run(StemChunk(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (4, True, False), (3, False, False)]
    with pytest.raises(PlanError, match="model output would lose an input"):
        g.dead_nodes({1: 0})
    assert g.nx.has_edge("chunk", "getitem") and g.nx.has_edge("chunk", "getitem_1")


class Slice(nn.Module):
    def __init__(self, c=8, k=4):
        super().__init__()
        self.conv, self.head = conv(2, c), conv(k, 3)

    def forward(self, x):
        return self.head(self.conv(x)[:, 2:6, 1:7, 1:7])


def test_getitem_slices():
    g = run(Slice(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (8, True, False), (3, False, False)]
    # Channels 2..5 reach the head; kept 0, 2, 3, 7 leave it two.
    assert_cost(g, {1: [0, 2, 3, 7]}, HW * 2 * 4 + 36 * 2 * 3, Slice(4, 2))
    assert g.cost() == Cost(HW * 2 * 8 + 36 * 4 * 3, nparams(Slice()))



class PartialRotary(nn.Module):
    """Attention whose queries and keys are split at a rotary dim into a rotated part and a
    part passed through, which is empty where the rotary dim is the head's (Phi-3)."""

    def __init__(self, heads=4, hd=4, rotary=4):
        super().__init__()
        self.heads, self.hd, self.rotary = heads, hd, rotary
        self.qkv, self.out = nn.Linear(6, 3 * heads * hd), nn.Linear(heads * hd, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[..., :self.rotary] * 2, q[..., self.rotary:]], dim=-1)
        k = torch.cat([k[..., :self.rotary] * 2, k[..., self.rotary:]], dim=-1)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_an_empty_slice_keeps_the_heads_of_its_other_dims(front_end):
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 6),)
    net = PartialRotary().eval()
    g = analyze(net if front_end == "fx" else export_trace(net, x).module, x)
    assert g.front_end == "fx"
    heads = group(g, "qkv.weight[out] x12")
    assert heads.size == 4 and heads.prunable  # whole heads (q, k, v of each)
    keep = {heads.id: [1, 3]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 5, 6),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(PartialRotary(heads=2))

# --------------------------------------------------------------------------- layout ops


class FlattenFC(nn.Module):
    def __init__(self, fn, c=4):
        super().__init__()
        self.fn = fn
        self.conv = conv(2, c, 3)
        self.fc = nn.Linear(c * HW, 3)

    def forward(self, x):
        return self.fc(self.fn(F.relu(self.conv(x))))


@pytest.mark.parametrize("fn", [
    lambda y: y.flatten(1), lambda y: torch.flatten(y, 1), lambda y: y.view(y.size(0), -1),
    lambda y: y.reshape(1, -1), nn.Flatten()], ids=["flatten", "torch.flatten", "view", "reshape",
                                                    "nn.Flatten"])
def test_flatten_into_linear(fn):
    g = run(FlattenFC(fn), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    # Each channel owns 64 consecutive inputs of the linear layer.
    assert g.groups[1].members == ["conv.weight[out]", "conv.bias", "fc.weight[in] x64"]
    assert_cost(g, {1: 2}, HW * 9 * 2 * 2 + 2 * HW * 3, FlattenFC(fn, 2))
    assert_cost(g, {1: [1, 3]}, HW * 9 * 2 * 2 + 2 * HW * 3, FlattenFC(fn, 2))


class ChannelLast(nn.Module):
    def __init__(self, how="permute", c=4, d=5):
        super().__init__()
        self.how = how
        self.conv1, self.fc, self.conv2 = conv(2, c), nn.Linear(c, d), conv(d, 3)

    def forward(self, x):
        y = self.conv1(x)
        if self.how == "permute":
            return self.conv2(self.fc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.conv2(self.fc(y.transpose(1, 3)).transpose(1, 3))


@pytest.mark.parametrize("how", ["permute", "transpose"])
def test_permute_transpose(how):
    g = run(ChannelLast(how), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (5, True, False), (3, False, False)]
    assert g.groups[1].members == ["conv1.weight[out]", "conv1.bias", "fc.weight[in]"]
    assert g.groups[2].members == ["fc.weight[out]", "fc.bias", "conv2.weight[in]"]
    assert_cost(g, {1: 3, 2: 2}, HW * (2 * 3 + 3 * 2 + 2 * 3), ChannelLast(how, 3, 2))


def shuffle(x, groups=2):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


@pytest.mark.parametrize("op", [shuffle, nn.ChannelShuffle(2)], ids=["view_transpose_view",
                                                                     "nn.ChannelShuffle"])
def test_channel_shuffle(op):
    g = run(Chain(op, mid=8), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (8, True, False), (3, False, False)]
    into_conv2 = next(i for i in g.nodes if i.name == "conv2").inputs[0]
    ids = next(i for i in g.nodes if i.name == into_conv2).ids
    groups, index = g.locate(ids)
    assert groups.tolist() == [1] * 8 and index.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert_cost(g, {1: [0, 1, 5]}, HW * 3 * 5, Chain(op, mid=3))


class PixelShuffleNet(nn.Module):
    def __init__(self, c=2):
        super().__init__()
        self.conv1, self.ps, self.conv2 = conv(2, 4 * c), nn.PixelShuffle(2), conv(c, 3)

    def forward(self, x):
        return self.conv2(self.ps(self.conv1(x)))


def test_pixel_shuffle():
    g = run(PixelShuffleNet(), 1, 2, 8, 8)
    # 4 input channels make one output channel: they are pruned together.
    assert table(g) == [(2, False, False), (2, True, False), (3, False, False)]
    assert g.groups[1].members == ["conv1.weight[out] x4", "conv1.bias x4", "conv2.weight[in]"]
    assert g.cost() == Cost(HW * 2 * 8 + 256 * 2 * 3, nparams(PixelShuffleNet()))
    assert_cost(g, {1: 1}, HW * 2 * 4 + 256 * 1 * 3, PixelShuffleNet(1))


@pytest.mark.parametrize("fn", [
    lambda y: y.mean((2, 3)), lambda y: y.sum(dim=(-1, -2)), lambda y: torch.mean(y, dim=[2, 3]),
    lambda y: y.mean((2, 3), keepdim=True).flatten(1), lambda y: y.amax((2, 3))],
    ids=["mean", "sum", "torch.mean", "keepdim", "amax"])
def test_reduce_over_spatial_dims(fn):
    class Net(nn.Module):
        def __init__(self, c=4):
            super().__init__()
            self.conv, self.fc = conv(2, c, 3), nn.Linear(c, 3)

        def forward(self, x):
            return self.fc(fn(self.conv(x)))

    g = run(Net(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (4, True, False), (3, False, False)]
    assert g.groups[1].members == ["conv.weight[out]", "conv.bias", "fc.weight[in]"]
    assert_cost(g, {1: 1}, HW * 9 * 2 + 3, Net(1))


def test_reduce_over_channels_is_not_prunable():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = conv(2, 4), conv(1, 3)

        def forward(self, x):
            return self.conv2(self.conv1(x).sum(1, keepdim=True))

    g = run(Net(), 1, 2, 8, 8)
    c = group(g, "conv1.weight[out]")
    assert not c.prunable and c.reason == "method .sum() over channels at 'sum_1'"


# --------------------------------------------------------------------------- model boundary


class TwoInOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fx_, self.fy, self.out = nn.Linear(6, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, y):
        h = F.relu(self.fx_(x) + self.fy(y))
        return self.out(h), h


def test_model_inputs_and_outputs_are_never_prunable():
    g = run(TwoInOut(), inputs=(torch.randn(1, 6), torch.randn(1, 4)))
    assert [(grp.size, grp.prunable, grp.reason) for grp in g.groups] == [
        (6, False, "model input 'x'"), (4, False, "model input 'y'"), (5, False, "model output"),
        (3, False, "model output")]
    with pytest.raises(PlanError, match="group 2 is not prunable: model output"):
        g.check({2: 4})
    g.check({2: 5})  # keeping everything is always fine


class AddInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = conv(2, 2, 3), conv(2, 3)

    def forward(self, x):
        return self.conv2(x + self.conv1(x))


def test_input_tied_through_a_residual_is_not_prunable():
    g = run(AddInput(), 1, 2, 8, 8)
    assert table(g) == [(2, False, False), (3, False, False)]
    assert g.groups[0].reason == "model input 'x'"
    assert sorted(g.groups[0].members) == ["<input x>", "conv1.bias", "conv1.weight[in]",
                                           "conv1.weight[out]", "conv2.weight[in]"]


# --------------------------------------------------------------------------- what is not seen


def channel_rank(x):
    return x.argsort(dim=1).float()


torch.fx.wrap("channel_rank")  # fx records a call to it instead of tracing through


@pytest.mark.parametrize("op,name", [
    (lambda y: torch.sort(y, dim=1)[0], "torch.sort"),
    (lambda y: channel_rank(y), "test_rules.channel_rank"),
    (lambda y: torch.fft.fft(y, dim=1).abs(), "fft_fft"),
], ids=["torch.sort", "fx.wrap", "torch.fft"])
def test_unsupported_op_stops_pruning_and_says_why(op, name):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = conv(2, 4), conv(4, 5), conv(5, 3)

        def forward(self, x):
            return self.conv3(F.relu(self.conv2(op(self.conv1(x)))))

    g = run(Net(), 1, 2, 8, 8)  # does not raise
    before, after = group(g, "conv1.weight[out]"), group(g, "conv2.weight[in]")
    for grp in (before, after):
        assert not grp.prunable
        assert grp.reason.startswith("no rule for ") and name in grp.reason and "(at '" in grp.reason
    # Past the op everything is visible again.
    assert group(g, "conv2.weight[out]").prunable
    assert g.cost() == Cost(HW * (2 * 4 + 4 * 5 + 5 * 3), nparams(Net()))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return F.relu(x)
        return -x


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gate, self.conv2, self.conv3 = conv(2, 4), DataDependent(), conv(4, 5), \
            conv(5, 3)

    def forward(self, x):
        return self.conv3(self.conv2(self.gate(self.conv1(x))))


def test_untraceable_submodule_becomes_an_opaque_leaf():
    with pytest.warns(UserWarning, match="submodule 'gate' could not be traced by torch.fx"):
        g = run(WithLeaf(), 1, 2, 8, 8)
    assert list(g.untraceable) == ["gate"]
    assert g.summary()["untraceable"] == g.untraceable
    assert [i.rule for i in g.nodes if i.name == "gate"] == ["unsupported"]
    for member in ("conv1.weight[out]", "conv2.weight[in]"):
        grp = group(g, member)
        assert not grp.prunable and grp.reason.startswith("submodule 'gate' is opaque (fx: ")
    assert group(g, "conv2.weight[out]").prunable
    assert g.cost() == Cost(HW * (2 * 4 + 4 * 5 + 5 * 3), nparams(WithLeaf()))


# --------------------------------------------------------------------------- the registry


class ChannelScale(nn.Module):
    """A user's block: per-channel scale, with Python control flow that fx cannot trace."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx keeps it as an opaque leaf
            return x * self.scale.view(1, -1, 1, 1)
        return x * self.scale.view(1, -1, 1, 1) * 2


def channel_scale(ctx, node):
    line = ctx.line(ctx.ids(node.args[0]), 1, node.args[0])
    ctx.bind(f"{node.target}.scale", 0, line, role="gamma")
    return ctx.channel_ids(line, node)


class WithUserBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.gate, self.conv2 = conv(2, 4), ChannelScale(4), conv(4, 3)

    def forward(self, x):
        return self.conv2(self.gate(self.conv1(x)))


def test_a_user_registered_rule_is_used_for_their_module():
    from graphsearch.passes.mask import mask, verify
    from graphsearch.passes.slim import slim
    from graphsearch.rules import Rule, default_rules

    torch.manual_seed(0)
    model = WithUserBlock().eval()
    x = torch.rand(1, 2, 8, 8)
    with pytest.warns(UserWarning, match="submodule 'gate'"):
        plain = analyze(model, (x,))
    assert not group(plain, "conv1.weight[out]").prunable  # no rule: opaque
    rules = default_rules().extend({ChannelScale: Rule("channel_scale", channel_scale)})
    g = analyze(model, (x,), rules=rules)
    mid = group(g, "conv1.weight[out]")
    assert mid.prunable and "gate.scale" in mid.members
    assert [i.rule for i in g.nodes if i.name == "gate"] == ["channel_scale"]
    keep = {mid.id: [0, 2]}
    s = slim(g, keep)
    assert s.gate.scale.shape == (2,)
    assert verify(s, mask(g, keep), (x,))
    assert sum(p.numel() for p in s.parameters()) == g.cost(keep).params
    # the project's default rules were not changed by the user's extension
    assert ChannelScale not in default_rules()


def test_a_conflicting_registration_is_refused():
    from graphsearch.load import UserError
    from graphsearch.rules import Rule, RuleConflict, default_rules

    rules = default_rules()
    mine = Rule("channel_scale", channel_scale)
    with pytest.raises(RuleConflict, match=r"module type torch\.nn\.modules\.conv\.Conv2d "
                                           r"already has the rule 'conv'"):
        rules.extend({nn.Conv2d: mine})
    assert issubclass(RuleConflict, UserError)  # the CLI prints it in one line
    rules.extend({ChannelScale: mine})
    rules.extend({ChannelScale: mine})  # the same rule again: nothing to refuse
    with pytest.raises(RuleConflict, match="ChannelScale already has the rule 'channel_scale'"):
        rules.extend({ChannelScale: Rule("other", channel_scale, edge="mix")})
    with pytest.raises(RuleConflict, match="must be a Rule or a function"):
        rules.extend({WithUserBlock: 3})


def test_a_subclass_that_keeps_forward_gets_its_base_rule():
    """A library's own Conv2d subclass (a different __init__, the same forward) is one node
    with the conv rule, not a traced-into F.conv2d."""

    class MyConv(nn.Conv2d):
        def __init__(self, cin, cout):
            super().__init__(cin, cout, 3, padding=1, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = MyConv(2, 4), MyConv(4, 3)

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x)))

    g = run(Net(), 1, 2, 8, 8)
    assert [i.rule for i in g.nodes if i.name in ("conv1", "conv2")] == ["conv", "conv"]
    assert group(g, "conv1.weight[out]").prunable


# --------------------------------------------------------------------------- the families


def test_default_rules_are_built_fresh_from_the_families():
    from graphsearch import rules as R

    a, b = R.default_rules(), R.default_rules()
    assert a is not b and a.get(nn.Conv2d) is b.get(nn.Conv2d)  # rules are shared constants
    a.extend({ChannelScale: R.Rule("channel_scale", channel_scale)})
    assert ChannelScale not in b and ChannelScale not in R.default_rules()
    for family in R.FAMILIES:
        short = family.__name__.rpartition(".")[2]
        for r in family.RULES:
            # an ATen overload with a torch function's arguments has that function's rule,
            # and so its family (aten.conv2d is a convolution to the methods)
            assert r.targets and r.family in ((short,) if short != "aten" else
                                              [f.__name__.rpartition(".")[2]
                                               for f in R.FAMILIES]), r.name
            assert all(a.get(t) is r for t in r.targets)
    aten = torch.ops.aten
    assert a.get(aten.conv2d.default).family == "conv"
    assert a.get(aten.linear.default).tie is a.get(F.linear).tie
    assert a.get(aten.embedding.default).family == "aten"  # its own: the table comes first
    # the attention module a slim model holds is analysed like the one it replaces
    assert a.get(R.PrunedMultiheadAttention) is a.get(nn.MultiheadAttention)


def test_what_other_modules_decided_by_type_is_a_rule_field():
    from graphsearch import rules as R
    from graphsearch.rules import Rule, default_rules

    rules = default_rules()
    assert rules.get(nn.Conv2d).latency == "conv" and rules.get(nn.Linear).latency == "linear"
    assert rules.get(nn.ConvTranspose2d).latency == "" and rules.get(F.linear).latency == ""
    assert rules.get(nn.Identity).identity and not rules.get(nn.ReLU).identity
    assert rules.get(nn.Identity).name == rules.get(nn.GELU).name == "elementwise_unary"
    for cls in (nn.Conv2d, nn.ConvTranspose1d, nn.Linear, nn.MultiheadAttention, nn.MaxPool2d,
                nn.AdaptiveAvgPool2d, nn.Upsample, nn.Flatten, nn.Unflatten, nn.PixelShuffle):
        assert rules.get(cls).pure, cls
    assert not rules.get(nn.BatchNorm2d).pure  # train mode writes its running statistics
    # ESNAC's "is it a convolution" is the family, not a substring of a rule's name
    assert {r.family for r in (rules.get(nn.Conv2d), rules.get(F.conv2d))} == {"conv"}
    assert Rule("my_conv_block", channel_scale).family == ""
    assert Rule("aten_conv", channel_scale, family="conv").family == "conv"  # another front end
    # what a removed input means: the rule's, with slim's rewrite beside it
    assert rules.get(operator.add).dead is R.ADD and rules.get(torch.cat).dead is R.CAT
    assert R.SUB.drops and R.SUB.first_stays and R.CAT.rewrite is not None
    assert rules.get(operator.mul).dead is R.BLOCK and rules.get(nn.Conv2d).dead is R.PASS
    # the tracer's questions: a shape query, a pure call, a module traced through, a fusion
    assert rules.reads_metadata("call_method", "size", (None,))
    assert rules.reads_metadata("call_function", getattr, (None, "shape"))
    assert not rules.reads_metadata("call_function", getattr, (None, "data"))
    assert not rules.reads_metadata("call_method", "sum", (None,))
    assert rules.pure_call("call_function", torch.relu) and rules.pure_call("call_method", "view")
    assert not rules.pure_call("call_function", operator.setitem)
    assert not rules.pure_call("call_function", torch.relu_)
    assert not rules.pure_call("call_method", "item") and not rules.pure_call("call_method", "add_")
    assert rules.traced_as(nn.TransformerEncoderLayer(8, 2)) is not None
    assert rules.get(F.conv2d).fuse is not None and rules.get(nn.Conv2d).fuse is None
    # adaptive BN's modules: those whose rule has running statistics, and that track them
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.SyncBatchNorm(4), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    assert rules.with_running_statistics(net) == [net[0], net[2]]


class _ValueGated(nn.Module):
    """A block whose forward fx cannot trace (a condition on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(torch.relu(self.a(x)))
        return x


def test_a_rule_may_have_the_tracer_follow_a_plain_forward():
    """`Rule.trace_as` (torch's transformer layers): a block fx cannot trace is followed
    through the plain computation its rule gives, so its inner conv's channels prune; without
    it the block is an opaque leaf."""
    from graphsearch import rules as R

    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), _ValueGated(), nn.Conv2d(4, 2, 1))

    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="could not be traced"):
        opaque = analyze(model(), (x,))
    assert "1" in opaque.untraceable and len(opaque.prunable_groups) == 0
    rules = R.default_rules().extend({_ValueGated: R.Rule(
        "value_gated", R.unsupported, trace_as=lambda m, x: m.b(torch.relu(m.a(x))))})
    g = analyze(model(), (x,), rules)
    assert g.untraceable == {} and [grp.size for grp in g.prunable_groups] == [4, 6, 4]


# --------------------------------------------------------------------------- ATen: baddbmm, computed operands

class AlibiAttention(nn.Module):
    """BLOOM's attention in small: heads folded into the batch dim, the scores as
    `bias.baddbmm(q, k^T, beta, alpha)`; `bias` "alibi": ALiBi's per-head slopes times
    positions, computed from the head count and tiled over the batch (`repeat`); "causal":
    a causal mask, the same for every head."""

    def __init__(self, hidden=16, heads=4, mlp=32, bias="alibi"):
        super().__init__()
        self.heads, self.hd, self.bias = heads, hidden // heads, bias
        self.qkv, self.out = nn.Linear(hidden, 3 * heads * 4), nn.Linear(heads * 4, hidden)
        self.up, self.down = nn.Linear(hidden, mlp), nn.Linear(mlp, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        if self.bias == "alibi":
            slopes = torch.pow(0.5, torch.arange(1, 1 + self.heads, dtype=x.dtype))
            bias = (slopes[:, None, None] * torch.arange(s, dtype=x.dtype)).repeat(b, 1, 1)
        else:
            bias = torch.full((s, s), -1e4, dtype=x.dtype).triu(1)[None]
        q, k, v = self.qkv(x).view(b, s, -1, 3, 4).unbind(3)
        q, k, v = (t.transpose(1, 2).reshape(-1, s, 4) for t in (q, k, v))
        scores = bias.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=0.5)
        att = torch.bmm(scores.softmax(-1), v).view(b, -1, s, 4)
        x = x + self.out(att.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("bias", ["alibi", "causal"])
def test_baddbmm_is_a_product_and_a_sum_and_a_computed_bias_keeps_the_heads(bias):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 16),)
    net = AlibiAttention(bias=bias).eval()
    g = analyze(export_trace(net, x).module, x)
    heads, mlp = group(g, "qkv.weight[out] x12"), group(g, "up.weight[out]")
    assert heads.size == 4 and mlp.size == 32 and mlp.prunable
    with FlopCounterMode(display=False) as counter:
        net(*x)
    assert g.baseline.macs == counter.get_total_flops() / 2 / 2  # (per sample)
    if bias == "alibi":  # ALiBi's bias is per head, computed: no plan can slice it
        assert not heads.prunable
        assert "a tensor computed in the forward ('repeat', no parameter) meets channels" \
            in heads.reason
        keep = {mlp.id: list(range(0, 32, 3))}
    else:  # the same for every head: whole heads go
        assert heads.prunable
        keep = {heads.id: [0, 3], mlp.id: list(range(0, 32, 3))}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(2, 5, 16),))  # (the export fixed the batch)
    assert v.ok, v.message
    small = AlibiAttention(heads=2 if bias == "causal" else 4, mlp=11, bias=bias)
    assert nparams(s) == g.cost(keep).params == nparams(small)


class BaddbmmScores(nn.Module):
    """Attention scores as `mask.baddbmm(q, k^T, beta, alpha)` (BLOOM's spelling, or
    `torch.baddbmm`), the heads folded into the batch dim, the mask an input."""

    def __init__(self, hidden=16, heads=4, hd=4, how="method"):
        super().__init__()
        self.hd, self.how = hd, how
        self.qkv, self.out = nn.Linear(hidden, 3 * heads * hd), nn.Linear(heads * hd, hidden)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, -1, 3, self.hd).unbind(3)
        q, k, v = (t.transpose(1, 2).reshape(-1, s, self.hd) for t in (q, k, v))
        if self.how == "method":
            scores = mask.baddbmm(q, k.transpose(1, 2), beta=0.5, alpha=0.25)
        elif self.how == "function":
            scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=0.25)
        else:  # beta 0: the input is ignored, nan and all
            scores = torch.baddbmm(mask * float("nan"), q, k.transpose(1, 2), beta=0)
        att = torch.bmm(scores.softmax(-1), v).view(b, -1, s, self.hd)
        return self.out(att.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("how", ["method", "function", "beta 0"])
def test_baddbmm_in_an_fx_graph_is_a_product_and_a_sum(how):
    """The fx front end's baddbmm rule, as the ATen one: the tracer rewrites it (`fuse`)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = BaddbmmScores(how=how).eval()
    x = (torch.randn(2, 5, 16), torch.randn(1, 5, 5))
    g = analyze(net, x)
    assert g.front_end == "fx"
    assert not any("baddbmm" in n.name for n in g.module.graph.nodes)
    heads = group(g, "qkv.weight[out] x12")
    assert heads.size == 4 and heads.prunable  # (unsupported before: "no rule for baddbmm")
    with FlopCounterMode(display=False) as counter:
        net(*x)
    assert g.baseline.macs == counter.get_total_flops() / 2 / 2  # (per sample)
    keep = {heads.id: [0, 3]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(3, 5, 16), torch.randn(1, 5, 5)))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(BaddbmmScores(heads=2))
    assert torch.allclose(g.module(*x), net(*x), atol=1e-6)  # the rewrite computes the same
    assert not net(*x).isnan().any()


def test_a_tensor_made_from_sizes_keeps_the_channels_it_meets():
    class ArangeAdded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(h + torch.arange(6, dtype=h.dtype) * 0.5)

    x = (torch.randn(2, 4),)
    g = analyze(export_trace(ArangeAdded(), x).module, x)  # (fx: arange has no rule)
    hidden = group(g, "a.weight[out]")
    assert not hidden.prunable
    assert "a tensor computed in the forward ('mul', no parameter) meets channels along dim 1 " \
           "at 'add'" in hidden.reason


# --------------------------------------------------------------------------- ATen: a statistic per head

class HeadNormed(nn.Module):
    """Gemma 3n's per-head RMSNorm in small: q (batch, positions, heads, head_dim) times
    `pow(mean(q^2 over head_dim) + eps, -0.5)`, a statistic per head broadcast along
    head_dim. `stat_of="other"`: the statistic of another projection `k`, broadcast across
    q's head dims, which a plan may cut one by one."""

    def __init__(self, hidden=8, heads=4, hd=4, stat_of="self"):
        super().__init__()
        self.heads, self.hd, self.stat_of = heads, hd, stat_of
        self.q, self.o = nn.Linear(hidden, heads * hd), nn.Linear(heads * hd, hidden)
        if stat_of == "other":
            self.k = nn.Linear(hidden, heads * hd)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd)
        src = q if self.stat_of == "self" else self.k(x).view(b, s, self.heads, self.hd)
        q = q * torch.pow(src.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        return x + self.o(q.reshape(b, s, -1))


def test_a_statistic_per_head_broadcast_along_its_head_keeps_the_heads_prunable():
    """The mean over head_dim ties each head's dims into one unit; its statistic, broadcast
    back along head_dim, meets that unit only, so whole heads stay prunable (Gemma 3n's
    q_norm / k_norm / v_norm; before, every broadcast across a dim of varying ids was
    refused, even one whose ids were all one head's)."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8),)
    net = HeadNormed().eval()
    g = analyze(export_trace(net, x).module, x)
    heads = group(g, "q.weight[out] x4")
    assert (heads.size, heads.prunable) == (4, True), heads.reason
    assert "o.weight[in] x4" in heads.members
    keep = {heads.id: [0, 2]}
    s = slim(g, keep)
    v = verify(s, mask(g, keep), (torch.randn(2, 5, 8),))
    assert v.ok, v.message
    assert nparams(s) == g.cost(keep).params == nparams(HeadNormed(heads=2))


def test_a_statistic_per_head_broadcast_across_dims_a_plan_may_cut_is_refused():
    """The same statistic (of `k`'s heads) broadcast across q's head dims, each its own
    channel: a plan that cuts inside a head leaves the statistic whole, but one that drops a
    head of k would leave q's dims without their factor. k's heads stay, with the reason;
    q's dims stay prunable one by one."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8),)
    net = HeadNormed(stat_of="other").eval()
    g = analyze(export_trace(net, x).module, x)
    k, q = group(g, "k.weight[out] x4"), group(g, "q.weight[out]")
    assert (k.size, k.prunable) == (4, False)
    assert "broadcast across channels at 'mul'" in k.reason
    assert "'pow_2' (channels along dim 2) is broadcast along dim 3, where another " \
           "operand's channels are not one unit (a plan may cut them apart)" in k.reason
    assert (q.size, q.prunable) == (16, True) and "o.weight[in]" in q.members
    keep = {q.id: list(range(0, 16, 2))}  # dims 0 and 2 of every head (the view's layout)
    v = verify(slim(g, keep), mask(g, keep), (torch.randn(2, 5, 8),))
    assert v.ok, v.message
