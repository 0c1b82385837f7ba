"""SwiGLU experts over tokens grouped by expert: Triton grouped GEMM on GPU, the reference elsewhere."""

from __future__ import annotations

import torch

from .reference import grouped_swiglu as grouped_swiglu_reference

try:
    import triton  # noqa: F401

    from .grouped import dequantize_int8, grouped_swiglu_triton, quantize_int8
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


def grouped_swiglu(x, group_sizes: list[int], w13, w2, weights=None):
    """x [N, H] sorted by expert; see reference.grouped_swiglu for the contract. Runs the Triton grouped GEMM when
    x and the weights are bf16/fp16 CUDA tensors, the reference otherwise."""
    if (HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w13.dtype == x.dtype and w2.dtype == x.dtype):
        return grouped_swiglu_triton(x, group_sizes, w13, w2, weights)
    return grouped_swiglu_reference(x, group_sizes, w13, w2, weights)


__all__ = ["grouped_swiglu", "grouped_swiglu_reference"]
