"""The router <-> expert-shard protocol over one torch.distributed process group (NCCL on GPU, gloo on CPU).

Rank 0 is the router; ranks 1..N are shards, shard i holding a contiguous range of experts of every layer.
Every step the router broadcasts a header (operation, token count, dispatch mode; while idle, a heartbeat header
keeps the group's timeouts from firing); then, at each MoE layer, one
all_to_all_single carries each routed token's hidden state plus its routing (expert ids and weights packed as 16
extra bytes per row) to the shards, and a second one brings the weighted expert outputs back.

Two dispatch modes give the same result:
- padded: every shard gets a fixed [T, H] buffer (rows of tokens routed elsewhere carry no experts and cost the
  shard nothing). Sizes are known from the header, so there is no device-to-host sync per layer: the choice for
  decode-sized steps, where latency, not bytes, is the cost.
- exact: the router first sends each shard its token count (one tiny all_to_all plus a sync), then only the routed
  rows. For prefill-sized steps, where bytes dominate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

OP_STEP, OP_SHUTDOWN, OP_HEARTBEAT = 1, 2, 3
MODE_PADDED, MODE_EXACT = 0, 1
ROUTER_RANK = 0
META_BYTES_PER_EXPERT = 8  # one fp32 id + one fp32 weight per chosen expert


class DispatchError(RuntimeError):
    """The group broke: a shard died, hung past the timeout, or a collective failed."""


def meta_columns(dtype: torch.dtype, top_k: int) -> int:
    return top_k * META_BYTES_PER_EXPERT // torch.empty((), dtype=dtype).element_size()


def pack_rows(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, H] hidden + [T, K] expert ids + [T, K] weights -> [T, H + meta] in h's dtype (the meta bytes are fp32)."""
    meta = torch.cat([ids.float(), weights.float()], dim=-1).contiguous()
    return torch.cat([h, meta.view(h.dtype)], dim=-1)


def unpack_rows(rows: torch.Tensor, hidden: int, top_k: int):
    meta = rows[:, hidden:].contiguous().view(torch.float32)
    return rows[:, :hidden], meta[:, :top_k].long(), meta[:, top_k:]


@dataclass
class StepTimes:
    """Seconds spent per part of the MoE path, summed over layers and steps (router side)."""

    dispatch: float = 0.0  # packing + the all_to_all to the shards
    experts: float = 0.0  # waiting for the shards' answer (their expert compute + the all_to_all back)
    combine: float = 0.0  # summing the answers with the routing weights applied
    layers: int = 0
    bytes_sent: int = 0
    samples: list[float] = field(default_factory=list)  # per-layer round trips, for histograms


class RouterDispatcher:
    """Router side: the `moe(layer, h, ids, weights)` callable the router model runs at each MoE layer."""

    def __init__(self, num_shards: int, num_experts: int, hidden: int, top_k: int, device, padded_max_rows: int = 512,
                 sync_timing: bool = False):
        self.num_shards, self.hidden, self.top_k = num_shards, hidden, top_k
        self.experts_per_shard = num_experts // num_shards
        self.device = torch.device(device)
        self.padded_max_rows = padded_max_rows
        self.sync_timing = sync_timing
        self.times = StepTimes()
        self.mode = MODE_PADDED
        self.num_tokens = 0

    def _time(self) -> float:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin_step(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.mode = MODE_PADDED if num_tokens * self.num_shards <= self.padded_max_rows else MODE_EXACT
        header = torch.tensor([OP_STEP, num_tokens, self.mode, 0], dtype=torch.long, device=self.device)
        _collective(dist.broadcast, header, src=ROUTER_RANK)

    def shutdown(self) -> None:
        header = torch.tensor([OP_SHUTDOWN, 0, 0, 0], dtype=torch.long, device=self.device)
        _collective(dist.broadcast, header, src=ROUTER_RANK)

    def heartbeat(self) -> None:
        """Sent while idle: the shards' wait for a header never hits the collective timeout, and a dead shard is
        noticed before the next request needs it."""
        header = torch.tensor([OP_HEARTBEAT, 0, 0, 0], dtype=torch.long, device=self.device)
        _collective(dist.broadcast, header, src=ROUTER_RANK)

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, N = h.shape[0], self.num_shards
        assert T == self.num_tokens, "begin_step was not called with this step's token count"
        t0 = self._time()
        rows = pack_rows(h, ids, weights)
        shard_of = ids // self.experts_per_shard  # [T, K]
        if self.mode == MODE_PADDED:
            send = rows.repeat(N, 1)
            in_splits, out_splits = [0] + [T] * N, [0] + [T] * N
            token_index = None
        else:
            routed = torch.stack([(shard_of == s).any(-1) for s in range(N)])  # [N, T]
            shard_idx, token_index = routed.nonzero(as_tuple=True)  # grouped by shard, token order within
            counts = torch.zeros(N + 1, dtype=torch.long, device=h.device)
            counts[1:] = routed.sum(-1)
            _collective(dist.all_to_all_single, torch.empty_like(counts), counts)
            counts_host = counts.tolist()
            send, in_splits, out_splits = rows[token_index], counts_host, counts_host
        self.times.bytes_sent += send.numel() * send.element_size()
        recv_rows = h.new_empty(sum(out_splits), h.shape[1])
        # forward: router -> shards (router receives nothing); backward: shards -> router (router sends nothing)
        _collective(dist.all_to_all_single, rows.new_empty(0, rows.shape[1]), send, [0] * (N + 1), in_splits)
        t2 = self._time()
        _collective(dist.all_to_all_single, recv_rows, h.new_empty(0, h.shape[1]), out_splits, [0] * (N + 1))
        t3 = self._time()
        if token_index is None:
            out = recv_rows.view(N, T, -1).sum(0)
        else:
            out = torch.zeros_like(h).index_add_(0, token_index, recv_rows)
        t4 = self._time()
        self.times.dispatch += t2 - t0
        self.times.experts += t3 - t2
        self.times.combine += t4 - t3
        if self.device.type != "cuda" or self.sync_timing:  # unsynced GPU times would be launch times
            self.times.samples.append(t4 - t0)
        self.times.layers += 1
        return out



class ShardWorker:
    """Shard side: follows the router's headers until told to shut down (or the group breaks)."""

    def __init__(self, experts, num_layers: int, hidden: int, top_k: int, dtype, device, observe_compute=None):
        self.experts, self.num_layers, self.hidden, self.top_k = experts, num_layers, hidden, top_k
        self.dtype, self.device = dtype, torch.device(device)
        self.width = hidden + meta_columns(dtype, top_k)
        self.world = dist.get_world_size()
        self.compute_seconds = 0.0
        self.tokens_computed = 0
        self.observe_compute = observe_compute  # called with each layer's compute seconds

    def serve(self) -> None:
        while True:
            header = torch.empty(4, dtype=torch.long, device=self.device)
            _collective(dist.broadcast, header, src=ROUTER_RANK)
            op, num_tokens, mode, _ = header.tolist()
            if op == OP_SHUTDOWN:
                return
            if op == OP_HEARTBEAT:
                continue
            for layer in range(self.num_layers):
                self._layer(layer, num_tokens, mode)

    def _layer(self, layer: int, num_tokens: int, mode: int) -> None:
        W = self.world
        if mode == MODE_EXACT:
            counts = torch.zeros(W, dtype=torch.long, device=self.device)
            _collective(dist.all_to_all_single, counts, torch.zeros_like(counts))
            n = int(counts[ROUTER_RANK])
        else:
            n = num_tokens
        rows = torch.empty(n, self.width, dtype=self.dtype, device=self.device)
        empty = rows.new_empty(0, self.width)
        _collective(dist.all_to_all_single, rows, empty, [n] + [0] * (W - 1), [0] * W)
        t0 = time.perf_counter()
        x, ids, weights = unpack_rows(rows, self.hidden, self.top_k)
        y = self.experts.forward(layer, x, ids, weights.to(self.dtype))
        seconds = time.perf_counter() - t0
        self.compute_seconds += seconds
        if self.observe_compute is not None:
            self.observe_compute(seconds)
        self.tokens_computed += n
        _collective(dist.all_to_all_single, x.new_empty(0, self.hidden), y, [0] * W, [n] + [0] * (W - 1))


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DispatchError:
        raise
    except Exception as e:  # gloo/NCCL report dead peers and timeouts as RuntimeError (or DistBackendError)
        raise DispatchError(f"expert-shard group failed in {fn.__name__}: {e}") from e
