"""Loading the two halves of the model from a checkpoint folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .expert_part import ExpertPart
from .router_part import RouterPart

log = logging.getLogger("m1serve.loading")


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_router_part(path: str | Path, dtype=None, device="cpu") -> RouterPart:
    cfg = ModelConfig.from_file(path)
    ckpt = Checkpoint(path)
    t0 = time.monotonic()
    log.info("router part: loading %s", path)
    try:
        router = RouterPart(cfg, ckpt.load_router_part(cfg), dtype or default_dtype(device), device)
    finally:
        ckpt.close()
    log.info("router part: %.2f GB read in %.1fs", ckpt.bytes_read / 1e9, time.monotonic() - t0)
    return router


def load_expert_part(path: str | Path, first: int | None = None, last: int | None = None, dtype=None,
                     device="cpu", expert_dtype: str | None = None) -> ExpertPart:
    """expert_dtype "int8": weight-only int8 experts (per-output-channel scales), quantized while loading."""
    if expert_dtype not in (None, "int8"):
        raise ValueError(f"expert_dtype: {expert_dtype!r} is not supported (None or 'int8')")
    cfg = ModelConfig.from_file(path)
    first = 0 if first is None else first
    last = cfg.num_local_experts if last is None else last
    ckpt = Checkpoint(path)
    try:
        return ExpertPart.load(ckpt, cfg, first, last, dtype or default_dtype(device), device,
                               int8=expert_dtype == "int8")
    finally:
        ckpt.close()
