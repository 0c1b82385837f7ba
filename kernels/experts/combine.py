"""Triton: each token's expert outputs summed back into token order (reference.combine_pairs). One program per
(token, column block) reads the token's K rows and writes its one row: no atomics (index_add_ on bf16 serialises on
them) and no host sync, since which rows count comes from a count on the device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(y, slot, num_rows, out, H, stride_y, stride_o, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    n = tl.load(num_rows)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        s = tl.load(slot + t * K + k)
        if s < n:
            acc += tl.load(y + s * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + t * stride_o + cols, acc.to(out.dtype.element_ty), mask=ok)


def combine_pairs_triton(y, slot: torch.Tensor, num_rows: torch.Tensor):
    T, K = slot.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T == 0:
        return out
    assert y.stride(1) == 1
    BLOCK = min(2048, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, BLOCK))](y, slot.contiguous(), num_rows, out, H, y.stride(0), out.stride(0),
                                               K=K, BLOCK=BLOCK, num_warps=4)
    return out
