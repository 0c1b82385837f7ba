"""SwiGLU experts over tokens grouped by expert: Triton grouped GEMM on GPU, the reference elsewhere."""

from __future__ import annotations

from functools import lru_cache

import torch

from .reference import combine_pairs as combine_pairs_reference
from .reference import dequantize_int8, quantize_int8
from .reference import grouped_swiglu as grouped_swiglu_reference

try:
    import triton  # noqa: F401

    from .combine import combine_pairs_triton
    from .grouped import default_config, grouped_swiglu_counts, grouped_swiglu_grouped_mm
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


# Above this many rows per expert (bf16) the expert GEMMs are compute-bound and torch._grouped_mm (CUTLASS) is faster
# than our Triton tiles; at or below it (decode: weight streaming) ours is faster. On H100 ours is 1.1x faster at 64
# rows, the grouped_mm path 1.08x faster at 128 (bench/results/kernels-h100-2026-11-28.md). A power of two, as the
# Triton tile buckets' bounds are (grouped.default_config): the warm-up's halving step sizes then build every config.
GROUPED_MM_MIN_ROWS = 64


@lru_cache(maxsize=None)
def _has_grouped_mm(device: torch.device) -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device) >= (9, 0)


def _triton_ok(x, w13, w2, w13_scale) -> bool:
    weight_dtype = torch.int8 if w13_scale is not None else x.dtype
    return (HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w13.dtype == weight_dtype and w2.dtype == weight_dtype)


def expert_kernel(rows_per_expert: float, int8: bool, grouped_mm: bool = True) -> str | dict:
    """What the experts run on GPU when each gets about rows_per_expert rows: "grouped_mm" (bf16 weights, more than
    GROUPED_MM_MIN_ROWS rows, a torch and GPU that have it), else the Triton grouped kernel's tile config."""
    if not int8 and grouped_mm and rows_per_expert > GROUPED_MM_MIN_ROWS:
        return "grouped_mm"
    return default_config(rows_per_expert)


def grouped_swiglu_no_sync(x, counts: torch.Tensor, w13, w2, weights=None, w13_scale=None, w2_scale=None,
                           rows_per_expert: float | None = None):
    """SwiGLU experts over rows sorted by expert (contract: reference.grouped_swiglu), with the group sizes as a
    tensor [E] on x's device, of which x's first sum(counts) rows are; the rows after them are no expert's and their
    outputs are unspecified. On a bf16/fp16 CUDA tensor with matching (or int8) weights nothing is read back and the
    launches depend only on x's shape (CUDA-graph safe): the kernel expert_kernel picks for rows_per_expert (the
    rows an expert is expected to get; default: x's rows over the E experts). The reference elsewhere."""
    if _triton_ok(x, w13, w2, w13_scale):
        if rows_per_expert is None:
            rows_per_expert = x.shape[0] / counts.shape[0]
        kernel = expert_kernel(rows_per_expert, w13_scale is not None, _has_grouped_mm(x.device))
        if kernel == "grouped_mm":
            return grouped_swiglu_grouped_mm(x, counts, w13, w2, weights)
        return grouped_swiglu_counts(x, counts, w13, w2, weights, w13_scale, w2_scale, config=kernel)
    sizes = counts.tolist()
    n = sum(sizes)
    y = torch.zeros_like(x)
    y[:n] = grouped_swiglu_reference(x[:n], sizes, w13, w2, None if weights is None else weights[:n], w13_scale,
                                     w2_scale)
    return y


def combine_pairs(y, slot: torch.Tensor, num_rows: torch.Tensor):
    """Each token's expert outputs summed back in token order: out[t] = sum over k of y[slot[t, k]], counting only
    the rows below num_rows (a one-element tensor on y's device: the rows past it are no expert's here and may hold
    anything). The Triton kernel on GPU (one pass, no atomics, no host sync), the reference elsewhere."""
    if HAVE_TRITON and y.is_cuda:
        return combine_pairs_triton(y, slot, num_rows)
    return combine_pairs_reference(y, slot, num_rows)


__all__ = ["combine_pairs", "expert_kernel", "grouped_swiglu_no_sync", "grouped_swiglu_reference", "quantize_int8",
           "dequantize_int8"]
