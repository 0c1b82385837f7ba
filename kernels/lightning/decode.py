"""Triton lightning-attention decode: one token per sequence, the state updated in place in the pool by slot index.

One program per (sequence, head, slice of BV value columns) reads its fp32 state slice [D, BV] once and writes it
once: S = lambda S + k^T v, o = q S (same math as reference.lightning_decode). Pure bandwidth: 8 bytes of state
traffic per 2 FLOPs. Slot id -1 marks a padded row: its state is neither read nor written and its output is zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q, k, v, o, slopes, pool, slots,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
                   stride_ps, stride_ph,
                   D: tl.constexpr, BV: tl.constexpr):
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2)
    slot = tl.load(slots + i_b).to(tl.int64)
    rk = tl.arange(0, D)
    rv = i_v * BV + tl.arange(0, BV)
    s = tl.load(slopes + i_h).to(tl.float32)

    qv = tl.load(q + i_b * stride_qb + i_h * stride_qh + rk).to(tl.float32)
    kv = tl.load(k + i_b * stride_kb + i_h * stride_kh + rk).to(tl.float32)
    vv = tl.load(v + i_b * stride_vb + i_h * stride_vh + rv).to(tl.float32)
    s_ptrs = pool + slot * stride_ps + i_h * stride_ph + rk[:, None] * D + rv[None, :]
    # (the mask is built full-size: the interpreter rejects a scalar condition in a mask)
    mask = (rk[:, None] * 0 + rv[None, :] * 0 + slot) >= 0
    S = tl.load(s_ptrs, mask=mask, other=0.0)
    S = tl.where(mask, S * tl.exp(-s) + kv[:, None] * vv[None, :], 0.0)
    tl.store(s_ptrs, S, mask=mask)
    out = tl.sum(qv[:, None] * S, axis=0)
    tl.store(o + i_b * stride_ob + i_h * stride_oh + rv, out.to(o.dtype.element_ty))


def default_decode_config(head_dim: int) -> dict:
    return dict(block_v=min(64, head_dim), num_warps=4)


def lightning_decode_pool(q, k, v, slopes, state_pool, slot_ids, out=None, **config):
    """q/k/v [B, H, D] (one token per sequence), state_pool [slots, H, D, D] fp32, slot_ids [B] on q's device
    (-1 = padding). Updates the pool in place; returns o [B, H, D] (zeros for padded rows)."""
    B, H, D = q.shape
    cfg = default_decode_config(D)
    cfg.update(config)
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    assert state_pool.dtype == torch.float32 and state_pool.stride(-1) == 1 and state_pool.stride(-2) == D
    for t in (q, k, v, out):
        assert t.stride(-1) == 1
    slots = torch.as_tensor(slot_ids, device=q.device)
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    BV = cfg["block_v"]
    grid = (triton.cdiv(D, BV), H, B)
    _decode_kernel[grid](
        q, k, v, out, slopes, state_pool, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        state_pool.stride(0), state_pool.stride(1),
        D=D, BV=BV, num_warps=cfg["num_warps"])
    return out
