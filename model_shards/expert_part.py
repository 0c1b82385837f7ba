"""A contiguous range of experts [first, last) of every MoE layer: what one expert shard holds and computes."""

from __future__ import annotations

import logging
import time

import torch

from kernels.experts import combine_pairs, grouped_swiglu_no_sync, quantize_int8

from .checkpoint import Checkpoint
from .config import ModelConfig

log = logging.getLogger("m1serve.loading")


def expert_range(num_experts: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Deterministic contiguous split; the shard count must divide the expert count."""
    if num_shards <= 0 or num_experts % num_shards:
        raise ValueError(f"expert shards: {num_shards} does not divide the {num_experts} experts")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard index {shard} outside 0..{num_shards - 1}")
    per = num_experts // num_shards
    return shard * per, (shard + 1) * per


def shard_expert_range(num_experts: int, num_shards: int, shard: int, router_experts: bool = False) -> tuple[int, int]:
    """Expert shard `shard`'s experts. router_experts: the router's GPU holds a share too (the first of
    num_shards + 1 equal shares), so that e.g. 4 GPUs hold 8 experts each instead of the router's GPU holding none."""
    extra = int(router_experts)
    return expert_range(num_experts, num_shards + extra, shard + extra)


def router_expert_range(num_experts: int, num_shards: int) -> tuple[int, int]:
    """The router's share when it holds one (router_experts)."""
    return expert_range(num_experts, num_shards + 1, 0)


class ExpertPart:
    """Weights per layer: w13 [E_local, 2F, H], w2 [E_local, H, F], in the activation dtype, or int8 with
    per-output-channel scales (w13_scale [E_local, 2F], w2_scale [E_local, H]) for weight-only int8 experts."""

    def __init__(self, cfg: ModelConfig, first: int, last: int, w13: list[torch.Tensor], w2: list[torch.Tensor],
                 dtype: torch.dtype, w13_scale: list[torch.Tensor] | None = None,
                 w2_scale: list[torch.Tensor] | None = None):
        self.cfg, self.first, self.last, self.dtype = cfg, first, last, dtype
        self.w13, self.w2 = w13, w2
        self.w13_scale, self.w2_scale = w13_scale, w2_scale

    @classmethod
    def load(cls, ckpt: Checkpoint, cfg: ModelConfig, first: int, last: int, dtype=torch.float32, device="cpu",
             int8: bool = False):
        w13, w2, s13, s2 = [], [], [], []
        t0, step = time.monotonic(), max(1, cfg.num_hidden_layers // 10)
        for layer in range(cfg.num_hidden_layers):
            a, b = ckpt.load_experts(cfg, layer, first, last)
            if int8:  # quantized per layer as it is read, so the full-precision copy never exists on the device
                (a, sa), (b, sb) = quantize_int8(a), quantize_int8(b)
                s13.append(sa.to(device))
                s2.append(sb.to(device))
            w13.append(a.to(device=device, dtype=torch.int8 if int8 else dtype))
            w2.append(b.to(device=device, dtype=torch.int8 if int8 else dtype))
            if (layer + 1) % step == 0 or layer + 1 == cfg.num_hidden_layers:
                log.info("experts %d..%d: layer %d/%d loaded, %.2f GB read in %.1fs", first, last - 1, layer + 1,
                         cfg.num_hidden_layers, ckpt.bytes_read / 1e9, time.monotonic() - t0)
        return cls(cfg, first, last, w13, w2, dtype, s13 if int8 else None, s2 if int8 else None)

    @property
    def num_experts(self) -> int:
        return self.last - self.first

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids [T, K] global ids (those outside this shard are ignored); weights [T, K]. Returns
        [T, H]: for each token, the weighted sum of its experts that live on this shard.
        Nothing is read back from the device and every shape depends only on x's, so a whole step runs without a
        host sync (and decode steps can be captured in CUDA graphs): all T*K (token, expert) pairs are sorted, this
        shard's first, the kernels compute only those, and the combine reads only theirs."""
        T, K = expert_ids.shape
        E = self.num_experts
        local = expert_ids.flatten() - self.first
        local = torch.where((local >= 0) & (local < E), local, E)  # E: on another shard, sorted last
        order = torch.argsort(local, stable=True)
        counts = (local[:, None] == torch.arange(E, device=x.device)).sum(0)  # (bincount would read its max back)
        slot = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, device=x.device))  # pair -> its row
        scales = (self.w13_scale[layer], self.w2_scale[layer]) if self.w13_scale is not None else (None, None)
        y = grouped_swiglu_no_sync(x[order // K], counts, self.w13[layer], self.w2[layer], weights.flatten()[order],
                                   *scales, rows_per_expert=T * K / self.cfg.num_local_experts)
        return combine_pairs(y, slot.view(T, K), counts.sum().view(1))
