"""Plain-PyTorch SwiGLU experts over tokens grouped by expert: the reference for the grouped-GEMM kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(x, group_sizes: list[int], w13, w2, weights=None):
    """x [N, H] sorted by expert, group_sizes[e] rows for local expert e, w13 [E, 2F, H] (w1 gate rows first,
    then w3 up rows), w2 [E, H, F]. Returns [N, H] = w2(silu(w1 x) * w3 x), times weights [N] if given."""
    out = torch.empty_like(x)
    ffn = w2.shape[-1]
    start = 0
    for e, n in enumerate(group_sizes):
        if n:
            xe = x[start:start + n]
            h = xe @ w13[e].T
            out[start:start + n] = (F.silu(h[:, :ffn]) * h[:, ffn:]) @ w2[e].T
        start += n
    if weights is not None:
        out = out * weights[:, None].to(out.dtype)
    return out
