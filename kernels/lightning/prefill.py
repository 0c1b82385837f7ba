"""Triton lightning-attention prefill over a packed variable-length batch (same math as reference.lightning_prefill).

One program per (sequence, head, slice of BV value columns). It walks its sequence in chunks of C tokens, keeping the
fp32 state slice S [D, BV] in registers from the first token to the last, so q/k/v are read once, o is written once
and the state pool is touched once per sequence (read at the start, written at the end); with very few programs
(e.g. one sequence at 8 heads) long sequences are cut into segments first (see lightning_prefill_varlen). Per chunk,
rows i / cols j
0-based inside the chunk, m = tokens in the chunk:
    o = ((Q K^T) * D) V + lambda^(i+1) * (Q S)          D_ij = lambda^(i-j) for i >= j, else 0
    S = lambda^m S + K^T (V * lambda^(m-1-j))
Every decay is exp(-s * n) with n >= 0, so nothing overflows whatever the slope or chunk size.
The dots take bf16 operands with fp32 accumulation; S itself is never rounded (only its bf16 copy feeding q @ S).
DT is the dot operand dtype: q's dtype on GPU, fp32 under TRITON_INTERPRET=1 (the interpreter cannot multiply bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_utils import dot_dtype, int32_rows, sm_count


@triton.jit
def _prefill_kernel(q, k, v, o, slopes, pool,
                    seq_start, seq_len, seq_slot,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_ps, stride_ph,
                    D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DT: tl.constexpr,
                    STORE_STATE: tl.constexpr):
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

        m = tl.minimum(n - c0, C)
        # rows past the end were loaded as 0; clamping keeps their (unused) exponent non-negative
        k_decay = tl.exp(-s * tl.maximum(m - 1 - rc, 0).to(tl.float32))
        # The dots that do not need S are issued first and S's own update is a plain add at the end (17-20% faster
        # on H100 than accumulating k^T v into the decayed S). The decays go where they cost least: the k-side one on
        # the [C, BV] v tile instead of the [C, D] k tile, the q-side one on the fp32 [C, BV] product as a row scale
        # (not on a bf16 copy of q): 21-27% faster on H200 (bench/results/kernels-tune-h200-2026-11-27-r2.json).
        kv = tl.dot(tl.trans(kc), (vc * k_decay[:, None]).to(DT))
        scores = tl.dot(qc, tl.trans(kc)) * intra_decay
        oc = tl.dot(qc, S.to(DT)) * q_decay[:, None]
        oc = tl.dot(scores.to(DT), vc, oc)
        S = S * tl.exp(-s * m.to(tl.float32)) + kv
        tl.store(o_base + rows[:, None] * stride_ot + rv[None, :], oc.to(o.dtype.element_ty), mask=row_ok)

    if STORE_STATE:
        tl.store(s_ptrs, S, mask=has_slot)


@triton.jit
def _segment_state_kernel(k, v, slopes, ws, seg_start, seg_len,
                          stride_kt, stride_kh, stride_vt, stride_vh, stride_ws, stride_wh,
                          D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DT: tl.constexpr):
    """U = sum_j lambda^(n-1-j) k_j^T v_j over one segment (its state contribution from a zero start) -> ws."""
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_w = tl.program_id(2)
    start = tl.load(seg_start + i_w).to(tl.int64)
    n = tl.load(seg_len + i_w)
    s = tl.load(slopes + i_h).to(tl.float32)
    rk = tl.arange(0, D)
    rv = i_v * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    k_base = k + start * stride_kt + i_h * stride_kh
    v_base = v + start * stride_vt + i_h * stride_vh
    U = tl.zeros([D, BV], dtype=tl.float32)
    for c0 in range(0, n, C):
        rows = c0 + rc
        row_ok = (rows < n)[:, None]
        kc = tl.load(k_base + rows[:, None] * stride_kt + rk[None, :], mask=row_ok, other=0.0).to(DT)
        vc = tl.load(v_base + rows[:, None] * stride_vt + rv[None, :], mask=row_ok, other=0.0).to(DT)
        m = tl.minimum(n - c0, C)
        k_decay = tl.exp(-s * tl.maximum(m - 1 - rc, 0).to(tl.float32))
        U = U * tl.exp(-s * m.to(tl.float32))
        U = tl.dot(tl.trans(kc), (vc * k_decay[:, None]).to(DT), U)
    tl.store(ws + tl.cast(i_w, tl.int64) * stride_ws + i_h * stride_wh + rk[:, None] * D + rv[None, :], U)


@triton.jit
def _segment_scan_kernel(slopes, pool, ws, seq_slot, seq_first, seq_count, seg_len,
                         stride_ps, stride_ph, stride_ws, stride_wh,
                         D: tl.constexpr, BV: tl.constexpr):
    """Per sequence, in segment order: ws[g] <- state at the start of segment g; pool[slot] <- final state."""
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.program_id(2)
    slot = tl.load(seq_slot + i_n).to(tl.int64)
    first = tl.load(seq_first + i_n)
    count = tl.load(seq_count + i_n)
    s = tl.load(slopes + i_h).to(tl.float32)
    rk = tl.arange(0, D)
    rv = i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * D + rv[None, :]
    has_slot = (rk[:, None] * 0 + rv[None, :] * 0 + slot) >= 0
    s_ptrs = pool + slot * stride_ps + i_h * stride_ph + tile
    S = tl.load(s_ptrs, mask=has_slot, other=0.0)
    for g in range(first, first + count):
        w_ptrs = ws + tl.cast(g, tl.int64) * stride_ws + i_h * stride_wh + tile
        U = tl.load(w_ptrs)
        tl.store(w_ptrs, S)
        S = S * tl.exp(-s * tl.load(seg_len + g).to(tl.float32)) + U
    tl.store(s_ptrs, S, mask=has_slot)


def default_prefill_config(head_dim: int) -> dict:
    # segment=None: split long sequences when there are too few (sequence, head, value-slice) programs to fill the
    # GPU; 0: never; L > 0: always, into segments of L tokens (a multiple of the chunk).
    # num_stages=None: 2 when the programs fill the GPU several times over (packed batches), else 3.
    # Picked from --tune sweeps on H100 (bench/results/kernels-tune-h100-2026-11-27.json).
    return dict(chunk=64, block_v=min(head_dim, 64), num_warps=4, num_stages=None, segment=None)


def _segment_length(seq_lens, H, NV, C, sms) -> int:
    """Tokens per segment, or 0 to run one program per (sequence, head, value slice).

    Measured on H200 with 64 heads (128-256 programs for one sequence), segmenting was 30-40% slower than not:
    the extra k/v pass costs more than the added parallelism gains. So only split when the programs would leave
    most SMs idle (e.g. 8 heads per GPU under TP8), aiming at about 2 programs per SM."""
    programs = len(seq_lens) * H * NV
    if programs >= sms // 2:
        return 0
    L = sum(seq_lens) * H * NV // (2 * sms)
    L = max(1024, (L + C - 1) // C * C)
    return L if max(seq_lens) > L else 0


def lightning_prefill_varlen(q, k, v, slopes, state_pool, seq_lens: list[int], slot_ids, out=None, **config):
    """q/k/v [T, H, D] packed (lengths seq_lens, last dim contiguous), slopes [H], state_pool [slots, H, D, D] fp32,
    slot_ids [N] (LongTensor on q's device; -1 = no state). Updates the pool in place; returns o [T, H, D].

    Very few long sequences leave most SMs idle (one program walks a whole sequence), so they are cut into segments:
    a first pass computes each segment's state contribution from k/v alone, a tiny scan turns those into each
    segment's start state (and the final state), and the main kernel then runs all segments in parallel. That
    reads k/v twice but keeps every SM busy."""
    T, H, D = q.shape
    cfg = default_prefill_config(D)
    unknown = set(config) - set(cfg)
    if unknown:
        raise TypeError(f"unknown prefill config keys: {sorted(unknown)}")
    cfg.update(config)
    out = torch.empty_like(q) if out is None else out
    N = len(seq_lens)
    if N == 0 or T == 0:
        return out
    assert sum(seq_lens) == T, "seq_lens must add up to the number of packed tokens"
    assert state_pool.dtype == torch.float32 and state_pool.stride(-1) == 1 and state_pool.stride(-2) == D
    for t in (q, k, v, out):
        assert t.stride(-1) == 1
    C, BV = cfg["chunk"], cfg["block_v"]
    NV = triton.cdiv(D, BV)
    stages = cfg["num_stages"] or (2 if N * H * NV >= 4 * sm_count(q.device) else 3)
    seg = cfg["segment"]
    if seg is None:
        seg = _segment_length(seq_lens, H, NV, C, sm_count(q.device))
    elif seg:
        seg = (seg + C - 1) // C * C
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    slot_ids = torch.as_tensor(slot_ids, device=q.device).to(torch.int32)
    DT = dot_dtype(q.dtype)
    launch = dict(num_warps=cfg["num_warps"], num_stages=stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1))
    starts, acc = [], 0
    for n in seq_lens:
        starts.append(acc)
        acc += n

    if not seg:
        # Longest sequences first so the tail of the grid is made of short programs.
        order = sorted(range(N), key=lambda i: -seq_lens[i])
        meta = int32_rows([[starts[i] for i in order], [seq_lens[i] for i in order], order], q.device)
        _prefill_kernel[(NV, H, N)](
            q, k, v, out, slopes, state_pool, meta[0], meta[1], slot_ids[meta[2].long()], *strides,
            state_pool.stride(0), state_pool.stride(1), D=D, BV=BV, C=C, DT=DT, STORE_STATE=True, **launch)
        return out

    seg_start, seg_len, first, count = [], [], [], []
    for st, n in zip(starts, seq_lens):
        first.append(len(seg_start))
        for a in range(st, st + n, seg):
            seg_start.append(a)
            seg_len.append(min(seg, st + n - a))
        count.append(len(seg_start) - first[-1])
    W = len(seg_start)
    segs = int32_rows([seg_start, seg_len, list(range(W))], q.device)
    seqs = int32_rows([first, count], q.device)
    ws = torch.empty(W, H, D, D, device=q.device, dtype=torch.float32)
    _segment_state_kernel[(NV, H, W)](
        k, v, slopes, ws, segs[0], segs[1], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ws.stride(0), ws.stride(1), D=D, BV=BV, C=C, DT=DT, **launch)
    _segment_scan_kernel[(NV, H, N)](
        slopes, state_pool, ws, slot_ids, seqs[0], seqs[1], segs[1], state_pool.stride(0), state_pool.stride(1),
        ws.stride(0), ws.stride(1), D=D, BV=BV, num_warps=4)
    _prefill_kernel[(NV, H, W)](
        q, k, v, out, slopes, ws, segs[0], segs[1], segs[2], *strides,
        ws.stride(0), ws.stride(1), D=D, BV=BV, C=C, DT=DT, STORE_STATE=False, **launch)
    return out
