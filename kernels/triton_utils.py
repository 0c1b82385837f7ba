"""Small helpers the Triton kernels share."""

from __future__ import annotations

import logging
import os
import time
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


def log_kernel_builds(logger: logging.Logger) -> bool:
    """Logs each Triton kernel variant this process builds (compiled, or loaded from Triton's disk cache) on its
    first launch, with how long that took. After a server's warm-up every such line is a variant the warm-up missed,
    built inside some user's request. Returns False where this Triton has no hooks for it."""
    try:
        from triton import knobs
    except ImportError:
        return False
    started: dict = {}

    def before(**hook) -> bool:
        started[hook["key"]] = time.perf_counter()
        return False  # not handled here: build it

    def after(**hook) -> None:
        t0 = started.pop(hook["key"], None)
        took = "" if t0 is None else f" in {(time.perf_counter() - t0) * 1e3:.0f} ms"
        logger.info("triton kernel built%s: %s", took, " ".join(hook["repr"].split()))  # its arguments span lines

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
    return True


def int32_rows(rows: list[list[int]], device) -> torch.Tensor:
    """Equal-length int lists as one int32 tensor on `device`, each row starting 16-byte aligned. Triton specializes
    pointer arguments on 16-byte alignment: rows packed back to back would start at offsets that depend on their
    length (a batch's sequence count), and a length not seen in the warm-up would compile another kernel variant
    inside a user's request."""
    n = len(rows[0]) if rows else 0
    out = torch.zeros(len(rows), -(-n // 4) * 4, dtype=torch.int32)
    if n:
        out[:, :n] = torch.tensor(rows, dtype=torch.int32)
    return out.to(device, non_blocking=True)
