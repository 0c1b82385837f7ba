"""Small helpers the Triton kernels share."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton.language as tl


def dot_dtype(dtype):
    """Operand dtype for tl.dot: the input dtype, or fp32 under the interpreter (its bf16 dot is integer math)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stands in for the interpreter on CPU)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
