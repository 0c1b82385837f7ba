"""Triton decode attention over the paged KV cache: one query token per sequence, all sequences in one launch.

One program per (sequence, KV head, split) computes the G = heads / kv_heads query heads that share that KV head over
its split of the sequence's context, walking it in tiles (tokens gathered through the block table) with an online
softmax. With one split (large batches: sequences x KV heads already fill the GPU) the program writes the output;
with several (small batches at long context: 8 programs for one sequence would leave most SMs idle and read 128K
tokens of KV one tile at a time) each split writes its max, denominator and unnormalised output, and `_merge` folds
them (flash-decoding). The number of splits depends on the batch size only, so a CUDA graph captures one launch
shape whatever the contexts. It replaces the per-sequence SDPA loop of kernels/attention.py for decode steps; that
loop stays the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32


# stride_tb (the step's longest block table) changes from step to step: unspecialised, so it never recompiles
# mid-serving
@triton.jit(do_not_specialize=["stride_tb"])
def _decode_kernel(q, k_cache, v_cache, block_tables, context_lens, out, part_m, part_l, part_o, scale,
                   stride_tb, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, KVH: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)  # kv head
    s = tl.program_id(2)  # split of the context
    ctx = tl.load(context_lens + b)
    tiles = tl.cdiv(ctx, BLOCK_N)
    per = tl.cdiv(tiles, SPLITS)
    first = s * per * BLOCK_N
    last = tl.minimum((s + 1) * per * BLOCK_N, ctx)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    row_ok = rows < G
    # q [B, H, D]: heads g*G .. g*G+G-1 share kv head g
    qh = tl.load(q + (b * KVH * G + g * G + rows[:, None]) * D + dims[None, :], mask=row_ok[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(first, last, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < last
        page = tl.load(block_tables + b * stride_tb + pos // PAGE, mask=ok, other=0)
        # flat [blocks * PAGE, KVH] row of this token and kv head; int64: a cache of ~1M blocks overflows int32
        row = (page.to(tl.int64) * PAGE + pos % PAGE) * KVH + g
        k = tl.load(k_cache + row[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_cache + row[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        s_ = tl.dot(qh, tl.trans(k)).to(tl.float32) * scale
        s_ = tl.where(ok[None, :], s_, float("-inf"))
        m_new = tl.maximum(m, tl.max(s_, 1))
        p = tl.exp(s_ - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    if SPLITS == 1:
        o = acc / l[:, None]
        tl.store(out + (b * KVH * G + g * G + rows[:, None]) * D + dims[None, :], o.to(out.dtype.element_ty),
                 mask=row_ok[:, None])
    else:  # an empty split leaves m = -inf, l = 0, acc = 0: it weighs nothing in the merge
        part = (b * KVH + g) * SPLITS + s
        tl.store(part_m + part * GP + rows, m)
        tl.store(part_l + part * GP + rows, l)
        tl.store(part_o + (part * GP + rows[:, None]) * D + dims[None, :], acc)


def _merge(part_m: torch.Tensor, part_l: torch.Tensor, part_o: torch.Tensor, G: int, dtype) -> torch.Tensor:
    """[B, KVH, S, GP] maxima and denominators, [B, KVH, S, GP, D] unnormalised outputs -> [B, KVH * G, D]."""
    top = part_m.amax(2, keepdim=True)  # split 0 always holds a token: finite
    w = torch.exp(part_m - top)
    o = (part_o * w[..., None]).sum(2) / (part_l * w).sum(2)[..., None]
    return o[:, :, :G].flatten(1, 2).to(dtype)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) so that the launch has up to about two programs per SM (1 at large batch),
    rounded down to a power of two. SPLITS is a compile-time constant, so every distinct value is a kernel compile:
    powers of two are the values the decode steps at the CUDA-graph sizes (1, 2, 4, 8, 16, ...) already compile in
    the engine's warm-up. Any count (a mixed step's 3 or 5 decoding sequences gave 11 or 6 on 132 SMs) compiled
    inside users' requests the first time it came up."""
    fit = 2 * _sm_count(device) // (batch * kv_heads)
    return min(MAX_SPLITS, 1 << (fit.bit_length() - 1)) if fit > 1 else 1


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           block_n: int = 64, splits: int | None = None) -> torch.Tensor:
    """q [B, H, D] (one token per sequence, already in the cache at position context_len - 1), caches
    [blocks, page, KVH, D], block_tables [B, max_blocks] int, context_lens [B] int. Returns [B, H, D].
    splits: of each context (default: num_splits)."""
    B, H, D = q.shape
    KVH, page = k_cache.shape[2], k_cache.shape[1]
    G = H // KVH
    GP = max(16, triton.next_power_of_2(G))
    S = splits or num_splits(B, KVH, q.device)
    out = torch.empty_like(q)
    part_m = part_l = part_o = out  # unused with one split
    if S > 1:
        part_m = torch.empty(B, KVH, S, GP, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(B, KVH, S, GP, D, dtype=torch.float32, device=q.device)
    _decode_kernel[(B, KVH, S)](q.contiguous(), k_cache, v_cache, block_tables, context_lens, out, part_m, part_l,
                                part_o, scale, block_tables.stride(0), G=G, GP=GP, D=D, PAGE=page, BLOCK_N=block_n,
                                KVH=KVH, SPLITS=S, num_warps=4)
    return out if S == 1 else _merge(part_m, part_l, part_o, G, q.dtype)
