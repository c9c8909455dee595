"""A small Vision Transformer (Dosovitskiy et al., 2021) for 32x32 images.

Patch 4 (8x8 = 64 patches + cls token = 65 tokens), pre-norm blocks, GELU MLP,
learned positional embedding, linear head on the cls token.

vit_small (dim 192, depth 6, heads 3): 2,693,578 params, 182.85 M MACs.
vit_tiny  (dim 48,  depth 2, heads 3):    62,650 params,   4.55 M MACs.
MACs (1x3x32x32) count the patch conv, every linear layer (q/k/v and output
projections, MLP, head) and the two attention matmuls (QK^T and AV).
"""

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._init import init_weights

__all__ = ["SelfAttention", "MHASelfAttention", "Block", "VisionTransformer", "vit_small", "vit_tiny"]

AttentionKind = Literal["mha", "sdpa"]


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention``.

    The fused qkv projection uses the same (3 * dim, dim) layout as
    ``nn.MultiheadAttention.in_proj_weight`` so weights can be copied across.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # (B, N, 3 * dim) -> (3, B, heads, N, head_dim); unflatten avoids reading
        # tensor sizes, which keeps the torch.fx graph free of size() nodes.
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class MHASelfAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (a leaf module for torch.fx)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: AttentionKind) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "mha":
            self.attn: nn.Module = MHASelfAttention(dim, num_heads)
        elif attention == "sdpa":
            self.attn = SelfAttention(dim, num_heads)
        else:
            raise ValueError(f"attention must be 'mha' or 'sdpa', got {attention!r}")
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        attention: AttentionKind = "mha",
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(num_classes: int = 10, attention: AttentionKind = "mha") -> VisionTransformer:
    """ViT for 32x32 (dim 192, depth 6, heads 3): 2,693,578 params, 182.85 M MACs."""
    return VisionTransformer(dim=192, depth=6, num_heads=3, num_classes=num_classes, attention=attention)


def vit_tiny(num_classes: int = 10, attention: AttentionKind = "mha") -> VisionTransformer:
    """Test-sized ViT for 32x32 (dim 48, depth 2, heads 3): 62,650 params, 4.55 M MACs."""
    return VisionTransformer(dim=48, depth=2, num_heads=3, num_classes=num_classes, attention=attention)
