"""Plain-PyTorch SwiGLU experts over tokens grouped by expert: the reference for the grouped-GEMM kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w [..., out, in]: returns (int8 weights, fp32 scales [..., out])."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def grouped_swiglu(x, group_sizes: list[int], w13, w2, weights=None, w13_scale=None, w2_scale=None):
    """x [N, H] sorted by expert, group_sizes[e] rows for local expert e, w13 [E, 2F, H] (w1 gate rows first,
    then w3 up rows), w2 [E, H, F]. Returns [N, H] = w2(silu(w1 x) * w3 x), times weights [N] if given.
    With scales, w13/w2 are int8 weight-only (per output channel, see quantize_int8)."""
    out = torch.empty_like(x)
    ffn = w2.shape[-1]
    start = 0
    for e, n in enumerate(group_sizes):
        if n:
            xe = x[start:start + n]
            a = w13[e] if w13_scale is None else dequantize_int8(w13[e], w13_scale[e], x.dtype)
            b = w2[e] if w2_scale is None else dequantize_int8(w2[e], w2_scale[e], x.dtype)
            h = xe @ a.T
            out[start:start + n] = (F.silu(h[:, :ffn]) * h[:, ffn:]) @ b.T
        start += n
    if weights is not None:
        out = out * weights[:, None].to(out.dtype)
    return out


def combine_pairs(y, slot: torch.Tensor, num_rows: torch.Tensor):
    """out[t] = sum over k of y[slot[t, k]] for the slots below num_rows (a one-element tensor; the rows of y past it
    may hold anything), summed in fp32. slot [T, K] int64; y [R, H]. Returns [T, H] in y's dtype."""
    T, K = slot.shape
    rows = y[slot.flatten()].view(T, K, y.shape[1])
    return torch.where((slot < num_rows)[..., None], rows.float(), 0.0).sum(1).to(y.dtype)
