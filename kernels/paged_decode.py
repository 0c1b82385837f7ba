"""Triton decode attention over the paged KV cache: one query token per sequence, all sequences in one launch.

One program per (sequence, KV head) computes the G = heads / kv_heads query heads that share that KV head, walking
the sequence's context in tiles (tokens gathered through its block table) with an online softmax. It replaces the
per-sequence SDPA loop of kernels/attention.py for decode steps; that loop stays the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# stride_tb (the step's longest block table) changes from step to step: unspecialised, so it never recompiles
# mid-serving
@triton.jit(do_not_specialize=["stride_tb"])
def _decode_kernel(q, k_cache, v_cache, block_tables, context_lens, out, scale,
                   stride_tb, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, KVH: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)  # kv head
    ctx = tl.load(context_lens + b)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    row_ok = rows < G
    # q [B, H, D]: heads g*G .. g*G+G-1 share kv head g
    qh = tl.load(q + (b * KVH * G + g * G + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < ctx
        page = tl.load(block_tables + b * stride_tb + pos // PAGE, mask=ok, other=0)
        # flat [blocks * PAGE, KVH] row of this token and kv head; int64: a cache of ~1M blocks overflows int32
        row = (page.to(tl.int64) * PAGE + pos % PAGE) * KVH + g
        k = tl.load(k_cache + row[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_cache + row[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(qh, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    o = acc / l[:, None]
    tl.store(out + (b * KVH * G + g * G + rows[:, None]) * D + dims[None, :], o.to(out.dtype.element_ty),
             mask=row_ok[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           block_n: int = 64) -> torch.Tensor:
    """q [B, H, D] (one token per sequence, already in the cache at position context_len - 1), caches
    [blocks, page, KVH, D], block_tables [B, max_blocks] int, context_lens [B] int. Returns [B, H, D]."""
    B, H, D = q.shape
    KVH, page = k_cache.shape[2], k_cache.shape[1]
    G = H // KVH
    out = torch.empty_like(q)
    _decode_kernel[(B, KVH)](q.contiguous(), k_cache, v_cache, block_tables, context_lens, out, scale,
                             block_tables.stride(0), G=G, GP=max(16, triton.next_power_of_2(G)), D=D, PAGE=page,
                             BLOCK_N=block_n, KVH=KVH, num_warps=4)
    return out
