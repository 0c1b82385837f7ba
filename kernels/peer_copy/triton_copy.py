"""Triton: the row copies of the router <-> shard direct writes (reference.py has their contract). One program per
(row, destination, column block), so a row not routed to a shard costs its routing columns only and every
destination is written at once; the destinations may be other GPUs' memory (symmetric-memory buffers), which the
stores then write over NVLink."""

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
def _copy_rows_kernel(src, dst, dst_offsets, ids, W, meta, first, per, stride_src, stride_dst, stride_ids,
                      K: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Program (row t, destination d, column block): destination d is dst + dst_offsets[d] (another allocation,
    addressed from dst: one launch serves every destination). ALIGNED: the offsets are multiples of 16 elements,
    which the compiler cannot know of a loaded value; told, and given strides and counts that are multiples of 16
    too, it emits 16-byte stores instead of 2-byte ones (tests/test_kernels_triton.py checks the PTX)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1)
    lo = first + d * per
    n = tl.where(_is_routed(ids, t, stride_ids, lo, lo + per, K), W, meta)
    offset = tl.load(dst_offsets + d)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    out = dst + offset + t * stride_dst
    tl.store(out + cols, tl.load(src + t * stride_src + cols, mask=ok), mask=ok)


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


_OFFSETS: dict[tuple, tuple[torch.Tensor, bool]] = {}


def _offsets(dsts: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Each destination's start in elements from the first's, on the device, and whether all are multiples of 16:
    made once per set of buffers (the first call at a size runs eagerly, before any CUDA-graph capture)."""
    key = tuple(d.data_ptr() for d in dsts) + (dsts[0].device, dsts[0].element_size())
    if key not in _OFFSETS:
        gaps = [d.data_ptr() - dsts[0].data_ptr() for d in dsts]
        assert all(g % dsts[0].element_size() == 0 for g in gaps)
        gaps = [g // dsts[0].element_size() for g in gaps]
        _OFFSETS[key] = torch.tensor(gaps, device=dsts[0].device), all(g % 16 == 0 for g in gaps)
    return _OFFSETS[key]


def send_rows_triton(src, dsts: list[torch.Tensor], ids, first: int, per: int, meta: int) -> None:
    T, W = src.shape
    if T == 0:
        return
    assert src.stride(1) == 1 and ids.stride(1) == 1 and all(d.stride() == dsts[0].stride() for d in dsts)
    assert dsts[0].stride(1) == 1 and all(d.dtype == src.dtype for d in dsts)
    offsets, aligned = _offsets(dsts)
    BLOCK = 1024
    _copy_rows_kernel[(T, len(dsts), triton.cdiv(W, BLOCK))](
        src, dsts[0], offsets, ids, W, meta, first, per, src.stride(0), dsts[0].stride(0), ids.stride(0),
        K=ids.shape[1], BLOCK=BLOCK, ALIGNED=aligned, num_warps=4)


def send_answer_triton(y, dst, ids, lo: int, hi: int) -> None:
    """send_rows with one destination and no routing columns: only the rows routed to [lo, hi) are copied."""
    send_rows_triton(y, [dst], ids, lo, hi - lo, 0)


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
