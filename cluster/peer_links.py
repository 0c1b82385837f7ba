"""Buffers the router and its shards write into each other's GPU memory directly (torch symmetric memory, over
NVLink), for MoE layers of up to PEER_MAX_TOKENS tokens: there the ring broadcast and reduce of dispatch.py cost
more in latency (each row passes every rank in turn) than in bytes.

Per layer the router writes every token's routing, and the hidden state of the tokens routed to a shard, into that
shard's inbox; a barrier; each shard computes its own experts and writes the rows of its tokens into its slot of the
router's answers; a barrier; the router sums each token's answers from the slots of the shards it went to. Both
barriers are GPU kernels (no host sync, capturable in CUDA graphs like the collectives they replace). The second one
also guards the next layer: the router writes a shard's inbox again only once that shard has answered.

Every rank holds one buffer of the same size: a shard uses it as its inbox [PEER_MAX_TOKENS, row width], the router
as its answers [shards, PEER_MAX_TOKENS, hidden]."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger("m1serve.shards")

PEER_MAX_TOKENS = 4096


class PeerLinks:
    def __init__(self, rank: int, buffers: list[torch.Tensor], barrier: Callable[[], None],
                 ranges: list[tuple[int, int]], hidden: int, width: int, max_tokens: int = PEER_MAX_TOKENS):
        """buffers[r]: rank r's buffer as this rank sees it (flat, at least buffer_elements long); barrier: waits
        until every rank has called it, after the writes each issued before; ranges[r]: the experts [first, last)
        rank r holds (the router's may be empty)."""
        self.rank, self.buffers, self.barrier = rank, buffers, barrier
        self.hidden, self.width, self.max_tokens = hidden, width, max_tokens
        self.num_shards = len(buffers) - 1
        sizes = {last - first for first, last in ranges[1:]}
        if len(sizes) != 1:
            raise ValueError(f"shards must hold equal expert ranges, got {ranges[1:]}")
        self.per = sizes.pop()
        self.first = ranges[1][0]  # shard s holds [first + s * per, first + (s + 1) * per)
        if any(ranges[1 + s] != self.shard_range(s) for s in range(self.num_shards)):
            raise ValueError(f"shards' expert ranges are not contiguous in rank order: {ranges[1:]}")

    def shard_range(self, shard: int) -> tuple[int, int]:
        lo = self.first + shard * self.per
        return lo, lo + self.per

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def inbox(self, rank: int, num_tokens: int) -> torch.Tensor:
        """Shard `rank`'s inbox rows [num_tokens, width] (in another GPU's memory unless rank is this one)."""
        return self.buffers[rank][:self.max_tokens * self.width].view(self.max_tokens, self.width)[:num_tokens]

    def answers(self) -> torch.Tensor:
        """The router's answer slots [shards, max_tokens, hidden] (the router's own buffer on the router)."""
        return self.buffers[0][:self.num_shards * self.max_tokens * self.hidden].view(
            self.num_shards, self.max_tokens, self.hidden)


def buffer_elements(num_shards: int, hidden: int, width: int, max_tokens: int = PEER_MAX_TOKENS) -> int:
    return max(max_tokens * width, num_shards * max_tokens * hidden)


def open_peer_links(rank: int, world: int, device: torch.device, dtype: torch.dtype, hidden: int, width: int,
                    expert_range: tuple[int, int]) -> PeerLinks | None:
    """Collective over the group just formed: every rank's buffer mapped into every other's, or None on every rank
    (the ring collectives then carry all steps) unless all ranks are GPUs of one host that can reach each other's
    memory. M1SERVE_PEER_LINKS=0 turns them off."""
    usable = device.type == "cuda" and os.environ.get("M1SERVE_PEER_LINKS", "1") != "0"
    if usable:
        usable = all(torch.cuda.can_device_access_peer(device, torch.device("cuda", i))
                     for i in range(torch.cuda.device_count()) if i != device.index)
    seen: list = [None] * world
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(seen, (socket.gethostname(), usable, tuple(expert_range)))
    if not all(u for _, u, _ in seen) or len({h for h, _, _ in seen}) != 1:
        if rank == 0 and device.type == "cuda":
            log.info("peer links off (ranks on several hosts, no peer access, or M1SERVE_PEER_LINKS=0): "
                     "every MoE layer uses the ring broadcast and reduce")
        return None
    import torch.distributed._symmetric_memory as symm_mem

    n = buffer_elements(world - 1, hidden, width)
    buf = symm_mem.empty(n, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    buffers = [buf if r == rank else handle.get_buffer(r, (n,), dtype) for r in range(world)]
    return PeerLinks(rank, buffers, handle.barrier, [r for _, _, r in seen], hidden, width)
