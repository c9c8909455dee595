"""Small models written in the style of public model libraries (no dependency on them):
the patterns of issue 10 that the channel IR must cover. Used by tests/test_coverage.py and
benchmarks/coverage.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """Norm + activation in one module, calling F.batch_norm on its own parameters."""

    def __init__(self, c, act=True):
        super().__init__(c)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class OwnConv(nn.Module):
    """A convolution holding its own weight and calling F.conv2d."""

    def __init__(self, cin, cout, k=3, groups=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, k, k) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.groups, self.pad = groups, k // 2

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, self.pad, 1, self.groups)


class FunctionalNet(nn.Module):
    """Library-style blocks: BN+act subclass, functional conv (plain and depthwise),
    functional group norm and layer norm on owned parameters, functional linear."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.conv2 = OwnConv(c, 2 * c)
        self.dw = OwnConv(2 * c, 2 * c, groups=2 * c)
        self.gn_w = nn.Parameter(torch.rand(2 * c) + 0.5)
        self.gn_b = nn.Parameter(torch.randn(2 * c) * 0.1)
        self.conv3 = nn.Conv2d(2 * c, c, 1)
        self.bn3 = BatchNormAct2d(c, act=False)
        self.ln_w = nn.Parameter(torch.rand(c) + 0.5)
        self.ln_b = nn.Parameter(torch.randn(c) * 0.1)
        self.fc_w = nn.Parameter(torch.randn(classes, c) * 0.2)
        self.fc_b = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = F.relu(self.dw(self.conv2(x)))
        x = F.group_norm(x, 4, self.gn_w, self.gn_b)
        x = self.bn3(self.conv3(x))
        x = x.mean((2, 3))
        x = F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b)
        return F.linear(x, self.fc_w, self.fc_b)


class QkvAttention(nn.Module):
    """Attention written by hand in the common ViT style: qkv linear, reshape to
    (B, N, 3, heads, head_dim), permute, unbind(0)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TinyDeiT(nn.Module):
    def __init__(self, dim=16, heads=4, depth=2, classes=5, patch=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                n1=nn.LayerNorm(dim), attn=QkvAttention(dim, heads), n2=nn.LayerNorm(dim),
                fc1=nn.Linear(dim, 2 * dim), fc2=nn.Linear(2 * dim, dim))))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = x + b["attn"](b["n1"](x))
            x = x + b["fc2"](F.gelu(b["fc1"](b["n2"](x))))
        return self.head(self.norm(x)[:, 0])


class TextClassifier(nn.Module):
    """nn.Embedding + nn.TransformerEncoder (batch_first) + nn.Linear, on token ids."""

    def __init__(self, vocab=50, dim=16, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


class TinyDecoder(nn.Module):
    """nn.TransformerDecoder (pre-norm, batch_first) reading its own embeddings as memory."""

    def __init__(self, vocab=30, dim=16, heads=2, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 24, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.emb(x)
        return self.fc(self.dec(h, h))


class Gatekeeper(nn.Module):
    """Data-dependent Python control flow around a linear layer: fx cannot trace it."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class WithOpaque(nn.Module):
    def __init__(self, dim=12, classes=3):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(dim, dim), Gatekeeper(dim), nn.Linear(dim, 40)
        self.head = nn.Linear(40, classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(self.gate(self.fc1(x)))))


class EmbeddingMLP(nn.Module):
    """Embedding followed by a prunable MLP: the embedding width is a producer's."""

    def __init__(self, vocab=50, dim=12, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.emb(x)))).mean(1)


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """A public ShuffleNetV2 block (split, branch, concat, shuffle by view/transpose)."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class TinyShuffleNet(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(c), ShuffleUnit(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.units(self.stem(x)).mean((2, 3)))


class CachedBiasAttention(nn.Module):
    """LeViT-style attention: a learned bias per head and relative offset, gathered by an
    index buffer, and cached in a plain dict attribute in eval mode."""

    def __init__(self, dim, heads, key_dim, res):
        super().__init__()
        self.heads, self.key_dim, self.scale = heads, key_dim, key_dim ** -0.5
        self.qkv = nn.Linear(dim, heads * key_dim * 3)
        self.proj = nn.Linear(heads * key_dim, dim)
        pts = [(i, j) for i in range(res) for j in range(res)]
        offsets = sorted({(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in pts for b in pts})
        idx = [[offsets.index((abs(a[0] - b[0]), abs(a[1] - b[1]))) for b in pts] for a in pts]
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)) * 0.1)
        self.register_buffer("bias_idxs", torch.tensor(idx), persistent=False)
        self.bias_cache = {}

    def biases(self, device):
        if self.training:
            return self.attention_biases[:, self.bias_idxs]
        if str(device) not in self.bias_cache:
            self.bias_cache[str(device)] = self.attention_biases[:, self.bias_idxs]
        return self.bias_cache[str(device)]

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.biases(x.device)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class TinyLeViT(nn.Module):
    def __init__(self, dim=8, classes=3, res=3):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.attn = CachedBiasAttention(dim, 2, 4, res)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((x + self.attn(x)).mean(1))


class WindowBiasAttention(nn.Module):
    """Swin-style relative position bias: `table[index.view(-1)]`, one column per head,
    `index` a buffer of offsets between the tokens of a window (or `index_select`)."""

    def __init__(self, dim, heads, window, use_index_select=False):
        super().__init__()
        self.heads, self.use_index_select = heads, use_index_select
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()])  # (2, tokens)
        rel = (pos[:, :, None] - pos[:, None, :]) + window - 1
        self.register_buffer("index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_index_select:
            bias = torch.index_select(self.table, 0, self.index.view(-1))
        else:
            bias = self.table[self.index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = (q @ k.transpose(-2, -1)) * 0.5 + bias.unsqueeze(0)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


class TinySwin(nn.Module):
    def __init__(self, dim=8, classes=3, use_index_select=False):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, 2)
        self.attn = WindowBiasAttention(dim, 2, 2, use_index_select)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # one 2x2 window
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((x + self.attn(x)).mean(1))


class MobileViTStyleBlock(nn.Module):
    """MobileViT-style block: local convs, unfold into patches, a transformer over patches,
    fold back, fuse with the input. A Python `if` on sizes resizes a map that the patch size
    does not divide (plain fx cannot trace it: the block used to be one opaque leaf)."""

    def __init__(self, c, dim, heads=2, patch=2):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                   nn.SiLU(), nn.Conv2d(c, dim, 1, bias=False))
        self.n1, self.attn = nn.LayerNorm(dim), QkvAttention(dim, heads)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), \
            nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Conv2d(dim, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fusion = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        shortcut = x
        x = self.local(x)
        p = self.patch
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / p) * p, math.ceil(W / p) * p
        resized = False
        if new_h != H or new_w != W:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
            resized = True
        nh, nw = new_h // p, new_w // p
        # (B, C, H, W) -> (B * p * p, patches, C)
        x = x.reshape(B * C * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, p * p).transpose(1, 3).reshape(B * p * p, nh * nw, -1)
        x = x + self.attn(self.n1(x))
        x = x + self.fc2(F.silu(self.fc1(self.n2(x))))
        x = self.norm(x)
        x = x.contiguous().view(B, p * p, nh * nw, -1)
        x = x.transpose(1, 3).reshape(B * C * nh, nw, p, p)
        x = x.transpose(1, 2).reshape(B, C, nh * p, nw * p)
        if resized:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return self.fusion(torch.cat((shortcut, self.proj(x)), dim=1))


class TinyMobileViT(nn.Module):
    def __init__(self, c=6, dim=8, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.SiLU())
        self.block = MobileViTStyleBlock(c, dim)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class StdConv2d(nn.Conv2d):
    """BiT-style weight standardisation: each output row of the weight standardised over
    (in, kh, kw) by F.batch_norm in training mode, then F.conv2d."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """NF-Net-style scaled weight standardisation: a learned gain per output channel times a
    fixed scale (fan-in ** -0.5) as the batch norm's weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True,
                         momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TinyBiT(nn.Module):
    """Pre-activation ResNet with standardised convs (BiT): padded stem, one bottleneck
    with a projection shortcut, group norms."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem = nn.Sequential(StdConv2d(3, c, 3, 2, bias=False), nn.ConstantPad2d(1, 0.0),
                                  nn.MaxPool2d(3, 2))
        self.n1, self.conv1 = nn.GroupNorm(2, c), StdConv2d(c, c // 2, 1, bias=False)
        self.n2, self.conv2 = nn.GroupNorm(2, c // 2), StdConv2d(c // 2, c // 2, 3, padding=1,
                                                                  bias=False)
        self.n3, self.conv3 = nn.GroupNorm(2, c // 2), StdConv2d(c // 2, 2 * c, 1, bias=False)
        self.down = StdConv2d(c, 2 * c, 1, bias=False)
        self.norm, self.head = nn.GroupNorm(2, 2 * c), nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.stem(x)
        pre = F.relu(self.n1(x))
        y = self.conv1(pre)
        y = self.conv2(F.relu(self.n2(y)))
        y = self.conv3(F.relu(self.n3(y)))
        x = y + self.down(pre)
        return self.head(F.relu(self.norm(x)).mean((2, 3)))


class TinyNFNet(nn.Module):
    """Normaliser-free blocks: scaled standardised convs (one grouped), no norm layers."""

    def __init__(self, c=8, classes=3):
        super().__init__()
        self.stem = ScaledStdConv2d(3, c, 3, 2, 1)
        self.conv1 = ScaledStdConv2d(c, c, 1)
        self.conv2 = ScaledStdConv2d(c, c, 3, padding=1, groups=2)
        self.conv3 = ScaledStdConv2d(c, c, 1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return self.head((x + 0.2 * y).mean((2, 3)))


MODELS = {
    # name: (builder, example-inputs builder)
    "functional_net": (FunctionalNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "tiny_deit": (TinyDeiT, lambda: (torch.randn(2, 3, 16, 16),)),
    "text_classifier": (TextClassifier, lambda: (torch.randint(0, 50, (2, 7)),)),
    "tiny_decoder": (TinyDecoder, lambda: (torch.randint(0, 30, (2, 5)),)),
    "with_opaque": (WithOpaque, lambda: (torch.randn(2, 12),)),
    "embedding_mlp": (EmbeddingMLP, lambda: (torch.randint(0, 50, (2, 7)),)),
    "tiny_shufflenet": (TinyShuffleNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "tiny_levit": (TinyLeViT, lambda: (torch.randn(2, 3, 6, 6),)),
    "tiny_swin": (TinySwin, lambda: (torch.randn(2, 3, 4, 4),)),
    "tiny_mobilevit": (TinyMobileViT, lambda: (torch.randn(2, 3, 8, 8),)),
    "tiny_bit": (TinyBiT, lambda: (torch.randn(2, 3, 16, 16),)),
    "tiny_nfnet": (TinyNFNet, lambda: (torch.randn(2, 3, 8, 8),)),
}
