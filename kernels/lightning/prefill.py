"""Triton lightning-attention prefill over a packed variable-length batch (same math as reference.lightning_prefill).

One program per (sequence, head, slice of BV value columns). It walks its sequence in chunks of C tokens, keeping the
fp32 state slice S [D, BV] in registers from the first token to the last, so q/k/v are read once, o is written once
and the state pool is touched once per sequence (read at the start, written at the end). Per chunk, rows i / cols j
0-based inside the chunk, m = tokens in the chunk:
    o = ((Q K^T) * D) V + (Q * lambda^(i+1)) S          D_ij = lambda^(i-j) for i >= j, else 0
    S = lambda^m S + (K * lambda^(m-1-j))^T V
Every decay is exp(-s * n) with n >= 0, so nothing overflows whatever the slope or chunk size.
The dots take bf16 operands with fp32 accumulation; S itself is never rounded (only its bf16 copy feeding q @ S).
DT is the dot operand dtype: q's dtype on GPU, fp32 under TRITON_INTERPRET=1 (the interpreter cannot multiply bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def dot_dtype(dtype):
    """Operand dtype for tl.dot: the input dtype, or fp32 under the interpreter (its bf16 dot is integer math)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


@triton.jit
def _prefill_kernel(q, k, v, o, slopes, pool,
                    seq_start, seq_len, seq_slot,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_ps, stride_ph,
                    D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DT: tl.constexpr):
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.program_id(2)
    start = tl.load(seq_start + i_n).to(tl.int64)
    n = tl.load(seq_len + i_n)
    slot = tl.load(seq_slot + i_n).to(tl.int64)
    s = tl.load(slopes + i_h).to(tl.float32)

    rk = tl.arange(0, D)
    rv = i_v * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)

    # A negative slot (padding) starts from zero and writes nothing back.
    # (the mask is built full-size: the interpreter rejects a scalar condition in a mask)
    has_slot = (rk[:, None] * 0 + rv[None, :] * 0 + slot) >= 0
    s_ptrs = pool + slot * stride_ps + i_h * stride_ph + rk[:, None] * D + rv[None, :]
    S = tl.load(s_ptrs, mask=has_slot, other=0.0)

    q_decay = tl.exp(-s * (rc + 1).to(tl.float32))
    diff = rc[:, None] - rc[None, :]
    intra_decay = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)

    q_base = q + start * stride_qt + i_h * stride_qh
    k_base = k + start * stride_kt + i_h * stride_kh
    v_base = v + start * stride_vt + i_h * stride_vh
    o_base = o + start * stride_ot + i_h * stride_oh
    for c0 in range(0, n, C):
        rows = c0 + rc
        row_ok = (rows < n)[:, None]
        qc = tl.load(q_base + rows[:, None] * stride_qt + rk[None, :], mask=row_ok, other=0.0).to(DT)
        kc = tl.load(k_base + rows[:, None] * stride_kt + rk[None, :], mask=row_ok, other=0.0).to(DT)
        vc = tl.load(v_base + rows[:, None] * stride_vt + rv[None, :], mask=row_ok, other=0.0).to(DT)

        scores = tl.dot(qc, tl.trans(kc)) * intra_decay
        oc = tl.dot(scores.to(DT), vc)
        oc = tl.dot((qc * q_decay[:, None]).to(DT), S.to(DT), oc)
        tl.store(o_base + rows[:, None] * stride_ot + rv[None, :], oc.to(o.dtype.element_ty), mask=row_ok)

        m = tl.minimum(n - c0, C)
        # rows past the end were loaded as 0; clamping keeps their (unused) exponent non-negative
        k_decay = tl.exp(-s * tl.maximum(m - 1 - rc, 0).to(tl.float32))
        kd = (kc * k_decay[:, None]).to(DT)
        S = S * tl.exp(-s * m.to(tl.float32))
        S = tl.dot(tl.trans(kd), vc, S)

    tl.store(s_ptrs, S, mask=has_slot)


def default_prefill_config(head_dim: int) -> dict:
    return dict(chunk=64, block_v=min(64, head_dim), num_warps=4, num_stages=2)


def lightning_prefill_varlen(q, k, v, slopes, state_pool, seq_lens: list[int], slot_ids, out=None, **config):
    """q/k/v [T, H, D] packed (lengths seq_lens, last dim contiguous), slopes [H], state_pool [slots, H, D, D] fp32,
    slot_ids [N] (LongTensor on q's device; -1 = no state). Updates the pool in place; returns o [T, H, D]."""
    T, H, D = q.shape
    cfg = default_prefill_config(D)
    cfg.update(config)
    out = torch.empty_like(q) if out is None else out
    N = len(seq_lens)
    if N == 0 or T == 0:
        return out
    assert sum(seq_lens) == T, "seq_lens must add up to the number of packed tokens"
    assert state_pool.dtype == torch.float32 and state_pool.stride(-1) == 1 and state_pool.stride(-2) == D
    for t in (q, k, v, out):
        assert t.stride(-1) == 1
    # Longest sequences first so the tail of the grid is made of short programs.
    order = sorted(range(N), key=lambda i: -seq_lens[i])
    starts = [0] * N
    acc = 0
    for i, n in enumerate(seq_lens):
        starts[i] = acc
        acc += n
    meta = torch.tensor([[starts[i] for i in order], [seq_lens[i] for i in order], order], dtype=torch.int32)
    meta = meta.to(q.device, non_blocking=True)
    slots = torch.as_tensor(slot_ids, device=q.device).to(torch.int32)[meta[2].long()]
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    BV = cfg["block_v"]
    grid = (triton.cdiv(D, BV), H, N)
    _prefill_kernel[grid](
        q, k, v, out, slopes, state_pool, meta[0], meta[1], slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        state_pool.stride(0), state_pool.stride(1),
        D=D, BV=BV, C=cfg["chunk"], DT=dot_dtype(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
