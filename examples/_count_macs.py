"""Verification tool (not shipped API): count params and MACs of every zoo model.

Run ``python examples/_count_macs.py [names...]``. Also checks torch.fx tracing.
"""

import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.fx
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphsearch.zoo import MODELS, build, example_inputs  # noqa: E402
from graphsearch.zoo.vit import SelfAttention  # noqa: E402

# Figures published for the reference implementations (or, for the CIFAR
# ResNet-32 / ResNet-50, reported by the study we reproduce: FLOPs / 2).
PUBLISHED: dict[str, tuple[int | None, float | None]] = {
    "resnet20": (None, None),
    "resnet32": (487_754, 144.37e6 / 2),
    "resnet56": (None, None),
    "resnet50_cifar": (769_476, 223.95e6 / 2),
    "resnet50": (25_557_032, 4.089e9),
    "inception_v3": (23_834_568, 5.713e9),
    "mobilenet_v2": (3_504_872, 0.301e9),
    "densenet121": (7_978_856, 2.834e9),
    "shufflenet_v2": (2_278_604, 0.145e9),
    "vit_small": (None, None),
    "vit_tiny": (None, None),
}

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Counter:
    """MACs per sample, split by kind: conv, linear, attn_proj, attn_matmul.

    nn.MultiheadAttention runs its projections through a functional kernel, so
    its in/out projections are counted from its weights (``attn_proj``) and
    never reach the nn.Linear hook. Attention score (QK^T) and mixing (AV)
    matmuls are ``attn_matmul`` for both attention implementations.
    """
    macs: Counter = Counter()
    batch = inputs[0].shape[0]

    def hook(module: nn.Module, args, output) -> None:
        if isinstance(module, _CONVS):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs["conv"] += output.numel() // batch * per_out
        elif isinstance(module, nn.Linear):
            macs["linear"] += output.numel() // batch * module.in_features
        elif isinstance(module, nn.MultiheadAttention):
            query, key = args[0], args[1]
            assert module.batch_first
            q_len, kv_len, dim = query.shape[1], key.shape[1], module.embed_dim
            macs["attn_proj"] += (q_len + 2 * kv_len) * dim * dim + q_len * dim * dim
            macs["attn_matmul"] += 2 * q_len * kv_len * dim
        elif isinstance(module, SelfAttention):
            tokens = args[0].shape[1]
            macs["attn_matmul"] += 2 * tokens * tokens * module.num_heads * module.head_dim

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def fx_matches(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        return torch.equal(model(*inputs), traced(*inputs))


def _fmt(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def main(names: list[str]) -> None:
    header = (f"{'model':<15} {'params':>11} {'published':>11} {'MACs (M)':>10} "
              f"{'published':>10} {'registry':>8} {'fx':>3}  breakdown")
    print(header)
    print("-" * len(header))
    for name in names:
        entry = MODELS[name]
        model = build(name)
        inputs = example_inputs(name)
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, inputs)
        total = sum(macs.values())
        pub_params, pub_macs = PUBLISHED[name]
        registry_ok = params == entry.params and total == entry.macs
        breakdown = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(macs.items()))
        print(f"{name:<15} {params:>11,} {_fmt(pub_params, 1, 0):>11} {total / 1e6:>10.2f} "
              f"{_fmt(pub_macs, 1e6, 2):>10} {'ok' if registry_ok else 'DIFF':>8} "
              f"{'ok' if fx_matches(model, inputs) else 'BAD':>3}  {breakdown}")
        if not registry_ok:
            print(f"  registry says params={entry.params:,} macs={entry.macs:,}; counted macs={total:,}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
