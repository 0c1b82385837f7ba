"""SwiGLU experts over tokens grouped by expert: Triton grouped GEMM on GPU, the reference elsewhere."""

from __future__ import annotations

import torch

from .reference import dequantize_int8, quantize_int8
from .reference import grouped_swiglu as grouped_swiglu_reference

try:
    import triton  # noqa: F401

    from .grouped import grouped_swiglu_triton
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


def grouped_swiglu(x, group_sizes: list[int], w13, w2, weights=None, w13_scale=None, w2_scale=None):
    """x [N, H] sorted by expert; see reference.grouped_swiglu for the contract (scales: int8 weight-only experts).
    Runs the Triton grouped GEMM when x is a bf16/fp16 CUDA tensor with matching (or int8) weights, the reference
    otherwise."""
    weight_dtype = torch.int8 if w13_scale is not None else x.dtype
    if (HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w13.dtype == weight_dtype and w2.dtype == weight_dtype):
        return grouped_swiglu_triton(x, group_sizes, w13, w2, weights, w13_scale, w2_scale)
    return grouped_swiglu_reference(x, group_sizes, w13, w2, weights, w13_scale, w2_scale)


__all__ = ["grouped_swiglu", "grouped_swiglu_reference", "quantize_int8", "dequantize_int8"]
