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

PEER_MAX_TOKENS = 2048  # at 4096 the rings were faster (bench/results/dispatch-h200x4-2026-11-28-peer-links.md)


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


_rendezvous_done = 0  # symmetric-memory rendezvous this process has joined


def open_peer_links(rank: int, world: int, device: torch.device, dtype: torch.dtype, hidden: int, width: int,
                    expert_range: tuple[int, int]) -> PeerLinks | None:
    """Collective over the group just formed: every rank's buffer mapped into every other's, or None on every rank
    (the ring collectives then carry all steps). Links need every rank to be a GPU of one host that can reach the
    others' memory, and to open them for the first time in its process: a group re-formed after a failure mixes
    fresh processes with ones that joined a rendezvous before, whose symmetric-memory state we do not rely on
    lining up, so it runs on the rings. M1SERVE_PEER_LINKS=0 turns them off."""
    global _rendezvous_done
    seen: list = [None] * world
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(seen, (socket.gethostname(), _usable(device), device.index, tuple(expert_range)))
    if not links_agreed([r[:3] for r in seen]):
        if rank == 0 and device.type == "cuda":
            log.info("peer links off (%s): every MoE layer uses the ring broadcast and reduce",
                     "ranks on several hosts or seeing only their own GPU, no peer access, M1SERVE_PEER_LINKS=0 or "
                     "a re-formed group")
        return None
    _rendezvous_done += 1
    n = buffer_elements(world - 1, hidden, width)
    mapped = _all_ranks(world, device, "mapping the other ranks' buffers", lambda: _map_buffers(rank, world, device,
                                                                                               dtype, n))
    if mapped is None or _all_ranks(world, device, "writing into the others' buffers",
                                    lambda: _check_writes(rank, world, *mapped)) is None:
        return None
    if rank == 0:
        log.info("peer links on: %d shards, MoE layers of up to %d tokens written directly", world - 1,
                 PEER_MAX_TOKENS)
    return PeerLinks(rank, mapped[0], mapped[1], [r[3] for r in seen], hidden, width)


def _all_ranks(world: int, device: torch.device, what: str, fn):
    """fn()'s result if it succeeded on every rank, else None on every rank (the rings then carry all layers)."""
    try:
        result, error = fn(), None
    except Exception as e:  # e.g. a process that cannot map another GPU's memory
        result, error = None, f"{type(e).__name__}: {e}"
    errors: list = [None] * world
    with torch.cuda.device(device):
        dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        log.warning("peer links off, %s failed (%s): the rings carry every MoE layer", what, "; ".join(failed))
        return None
    return result


def _map_buffers(rank: int, world: int, device: torch.device, dtype: torch.dtype, n: int):
    """This rank's symmetric buffer and its views of the others' (all world of them), and the barrier."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(n, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
    return [buf if r == rank else handle.get_buffer(r, (n,), dtype) for r in range(world)], handle.barrier


def _check_writes(rank: int, world: int, buffers: list[torch.Tensor], barrier) -> bool:
    """Every rank writes its number into everyone's buffer and reads back the others'."""
    own = buffers[rank]
    own[:world].zero_()
    barrier()
    for b in buffers:
        b[rank].fill_(rank + 1)
    barrier()
    seen = own[:world].tolist()
    barrier()  # nobody writes into a buffer again before its owner has read it
    if seen != list(range(1, world + 1)):
        raise RuntimeError(f"rank {rank} read {seen} back")
    return True


def _usable(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("M1SERVE_PEER_LINKS", "1") == "0" or _rendezvous_done:
        return False
    return all(torch.cuda.can_device_access_peer(device, torch.device("cuda", i))
               for i in range(torch.cuda.device_count()) if i != device.index)


def links_agreed(ranks: list[tuple[str, bool, int | None]]) -> bool:
    """Every rank (hostname, usable, device index) can use links, all are on one host, and each names a different
    GPU: processes that each see only their own GPU (as cuda:0) cannot map each other's memory."""
    return (all(ok for _, ok, _ in ranks) and len({host for host, _, _ in ranks}) == 1
            and len({index for _, _, index in ranks}) == len(ranks))
