"""Lightning attention: Triton kernels on GPU, the plain-PyTorch reference elsewhere (same contract)."""

from __future__ import annotations

import torch

from .reference import lightning_attention as lightning_attention_reference

try:
    import triton  # noqa: F401

    from .decode import lightning_decode_pool
    from .prefill import lightning_prefill_varlen
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


def _triton_ok(q, state_pool) -> bool:
    D = q.shape[-1]
    return (HAVE_TRITON and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and state_pool.dtype == torch.float32 and 16 <= D <= 256 and D & (D - 1) == 0)


def lightning_attention(q, k, v, slopes, state_pool, seq_lens: list[int], slot_ids, block_size: int = 256):
    """Packed variable-length lightning attention; see reference.lightning_attention for the contract.

    On CUDA (bf16/fp16 q/k/v, fp32 pool) this runs the Triton kernels: the chunking inside them is their own, so
    `block_size` only matters to the reference (results are the same up to rounding)."""
    if not _triton_ok(q, state_pool):
        return lightning_attention_reference(q, k, v, slopes, state_pool, seq_lens, slot_ids, block_size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if all(n == 1 for n in seq_lens):
        return lightning_decode_pool(q, k, v, slopes, state_pool, slot_ids)
    return lightning_prefill_varlen(q, k, v, slopes, state_pool, seq_lens, slot_ids)


__all__ = ["lightning_attention", "lightning_attention_reference"]
