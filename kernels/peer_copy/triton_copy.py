"""Triton: the row copies of the router <-> shard direct writes (reference.py has their contract). One program per
row, so a row not routed to the shard costs its routing columns only; the destinations may be another GPU's memory
(a symmetric-memory buffer), which the stores then write over NVLink."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _is_routed(ids, t, stride_ids, lo, hi, K: tl.constexpr):
    hit = False
    for k in tl.static_range(K):
        e = tl.load(ids + t * stride_ids + k)
        hit = hit | ((e >= lo) & (e < hi))
    return hit


@triton.jit
def _copy_rows_kernel(src, dst, ids, W, meta, lo, hi, stride_src, stride_dst, stride_ids, K: tl.constexpr,
                      BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.where(_is_routed(ids, t, stride_ids, lo, hi, K), W, meta)
    for c in range(0, n, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        ok = cols < n
        tl.store(dst + t * stride_dst + cols, tl.load(src + t * stride_src + cols, mask=ok), mask=ok)


@triton.jit
def _sum_answers_kernel(share, answers, ids, out, H, N, stride_share, stride_shard, stride_ans, stride_ids,
                        stride_out, first, per, K: tl.constexpr, BLOCK: tl.constexpr, HAS_SHARE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_SHARE:
        acc += tl.load(share + t * stride_share + cols, mask=ok, other=0.0).to(tl.float32)
    for s in range(N):
        lo = first + s * per
        if _is_routed(ids, t, stride_ids, lo, lo + per, K):
            acc += tl.load(answers + s * stride_shard + t * stride_ans + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + t * stride_out + cols, acc.to(out.dtype.element_ty), mask=ok)


def _copy_rows(src, dst, ids, lo: int, hi: int, meta: int) -> None:
    T, W = src.shape
    if T == 0:
        return
    assert src.stride(1) == 1 and dst.stride(1) == 1 and ids.stride(1) == 1
    _copy_rows_kernel[(T,)](src, dst, ids, W, meta, lo, hi, src.stride(0), dst.stride(0), ids.stride(0),
                            K=ids.shape[1], BLOCK=1024, num_warps=4)


def send_rows_triton(rows, dst, ids, lo: int, hi: int, meta: int) -> None:
    _copy_rows(rows, dst, ids, lo, hi, meta)


def send_answer_triton(y, dst, ids, lo: int, hi: int) -> None:
    _copy_rows(y, dst, ids, lo, hi, 0)


def sum_answers_triton(share, answers, ids, first: int, per: int, num_shards: int, out=None):
    """sum_answers for shards of `per` experts each, the first starting at expert `first`; share None: zeros."""
    T, H = ids.shape[0], answers.shape[2]
    out = answers.new_empty(T, H) if out is None else out
    if T == 0:
        return out
    has_share = share is not None
    share = share if has_share else out
    assert share.stride(1) == 1 and answers.stride(2) == 1 and out.stride(1) == 1 and ids.stride(1) == 1
    BLOCK = min(2048, triton.next_power_of_2(H))
    _sum_answers_kernel[(T, triton.cdiv(H, BLOCK))](
        share, answers, ids, out, H, num_shards, share.stride(0), answers.stride(0), answers.stride(1),
        ids.stride(0), out.stride(0), first, per, K=ids.shape[1], BLOCK=BLOCK, HAS_SHARE=has_share, num_warps=4)
    return out
