"""The router <-> expert-shard protocol over one torch.distributed process group (NCCL on GPU, gloo on CPU).

Rank 0 is the router; ranks 1..N are shards, shard i holding a contiguous range of experts of every layer. The
router may hold the first of N+1 equal ranges itself (`local`, router_experts): it computes them between sending the
rows and collecting the shards' answers, so they overlap the shards' compute and its GPU does not sit idle.
Every step the router broadcasts a header (operation, token count, graphed; while idle, a heartbeat header keeps the
group's timeouts from firing); then, at each MoE layer, one broadcast carries all the step's tokens' hidden states
plus their routing (int64 expert ids and fp32 weights as raw bytes in front of each row: 24 bytes at top-2) to every
shard, and one reduce sums the shards' [T, H] answers on the router. A shard computes only the (token, expert) pairs
of its own experts and answers zeros for the rest; each token has at most top_k non-zero partials, so the sum is
exact whatever order the backend adds them in (the router's share is its own experts' partial, or zeros).
Sizes are known from the header, so a step runs with no device-to-host sync on any rank and no copies besides
packing. Sending every shard every token costs the router's link no more than sending each shard only its tokens:
the broadcast and the reduce are rings in which the router sends and receives T rows once, where an all_to_all of
the routed rows moves about 1.3 T (3 shards, top-2) and needs each shard's count on the host first, a sync per layer.
On 4x H100 the round trip of a 16384-token layer took 1.8 ms this way, 0.84x a bare all_to_all_single of only the
routed rows and 2.8x faster than that count-exchange protocol (bench/results/gpu-cluster-h100x4-2026-11-28-*.md).

A step can also be marked `graphed` in its header (the router's decode steps at a fixed batch size): the shard then
runs all the step's layers from a CUDA graph, captured the first time it sees that token count and replayed
afterwards, as the router does on its side. The collectives captured on both sides are the same ones in the same
order, so they still meet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .step_graphs import StepGraphs

OP_STEP, OP_SHUTDOWN, OP_HEARTBEAT = 1, 2, 3
ROUTER_RANK = 0


class DispatchError(RuntimeError):
    """The group broke: a shard died, hung past the timeout, or a collective failed."""


def meta_columns(dtype: torch.dtype, top_k: int) -> int:
    """Columns (of the hidden dtype) in front of each row's hidden state: top_k int64 expert ids, then top_k fp32
    weights, padded to a multiple of 8 bytes so the ids can be read back as int64 in place."""
    return -(-12 * top_k // 8) * 8 // torch.empty((), dtype=dtype).element_size()


def pack_rows(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, H] hidden + [T, K] int64 ids + [T, K] fp32 weights -> [T, meta + H] in h's dtype, in one copy: the
    routing goes in as raw bytes (no casts)."""
    w = weights.float()
    if ids.shape[1] % 2:  # keep rows 8-byte aligned
        w = torch.nn.functional.pad(w, (0, 1))
    return torch.cat([ids.contiguous().view(h.dtype), w.view(h.dtype), h], dim=-1)


def unpack_rows(rows: torch.Tensor, hidden: int, top_k: int):
    """-> hidden [T, H], expert ids [T, K] (int64), weights [T, K] (fp32): all views into rows."""
    meta = rows[:, :rows.shape[1] - hidden]
    return rows[:, meta.shape[1]:], meta.view(torch.int64)[:, :top_k], meta.view(torch.float32)[:, 2 * top_k:3 * top_k]


def _check_alignment(hidden: int, dtype: torch.dtype) -> None:
    if hidden * torch.empty((), dtype=dtype).element_size() % 8:
        raise ValueError(f"hidden size {hidden} x {dtype} is not a multiple of 8 bytes: rows could not be unpacked "
                         "in place")


@dataclass
class StepTimes:
    """Seconds spent per part of the MoE path, summed over layers and steps (router side)."""

    dispatch: float = 0.0  # packing + the broadcast to the shards
    experts: float = 0.0  # the router's own experts, if any, then the reduce, which waits for the shards' compute and
    # sums their answers (the combine)
    layers: int = 0
    bytes_sent: int = 0
    samples: list[float] = field(default_factory=list)  # per-layer round trips, for histograms


class RouterDispatcher:
    """Router side: the `moe(layer, h, ids, weights)` callable the router model runs at each MoE layer."""

    def __init__(self, device, sync_timing: bool = False, local=None):
        """local: the router's own share of the experts (an ExpertPart holding the first of num_shards + 1 ranges),
        or None (the shards hold them all)."""
        self.local = local
        self.device = torch.device(device)
        self.sync_timing = sync_timing
        self.times = StepTimes()
        self.num_tokens = 0
        self.graphed = False
        # learned from eager steps, for the bytes of graphed ones (a replayed graph runs no Python to count them)
        self.layers_per_step = self._calls = self._row_bytes = 0

    def _time(self) -> float:
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin_step(self, num_tokens: int, graphed: bool = False) -> None:
        """graphed: this step's layers are captured in / replayed from a CUDA graph on GPU, on both sides."""
        if self._calls:
            self.layers_per_step, self._calls = self._calls, 0
        self.num_tokens, self.graphed = num_tokens, graphed
        if graphed:
            self.times.bytes_sent += num_tokens * self._row_bytes * self.layers_per_step
        self._send_header(OP_STEP, num_tokens, int(graphed))

    def _send_header(self, op: int, num_tokens: int = 0, graphed: int = 0) -> None:
        header = torch.tensor([op, num_tokens, graphed], dtype=torch.long)
        if self.device.type == "cuda":  # from pinned memory: a pageable copy would wait for the GPU to drain
            header = header.pin_memory().to(self.device, non_blocking=True)
        _collective(dist.broadcast, header, src=ROUTER_RANK)

    def shutdown(self) -> None:
        self._send_header(OP_SHUTDOWN)

    def heartbeat(self) -> None:
        """Sent while idle: the shards' wait for a header never hits the collective timeout, and a dead shard is
        noticed before the next request needs it."""
        self._send_header(OP_HEARTBEAT)

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        assert h.shape[0] == self.num_tokens, "begin_step was not called with this step's token count"
        if self.graphed:  # no timing (it would sync inside a capture), bytes counted by begin_step
            _collective(dist.broadcast, pack_rows(h, ids, weights), src=ROUTER_RANK)
            out = self._local_share(layer, h, ids, weights)
            _collective(dist.reduce, out, dst=ROUTER_RANK)
            return out
        self._calls += 1
        t0 = self._time()
        rows = pack_rows(h, ids, weights)
        self._row_bytes = rows.shape[1] * rows.element_size()
        self.times.bytes_sent += rows.numel() * rows.element_size()  # once: the broadcast is a ring
        _collective(dist.broadcast, rows, src=ROUTER_RANK)
        t1 = self._time()
        out = self._local_share(layer, h, ids, weights)  # the router's own share of the sum
        _collective(dist.reduce, out, dst=ROUTER_RANK)
        t2 = self._time()
        self.times.dispatch += t1 - t0
        self.times.experts += t2 - t1
        if self.device.type != "cuda" or self.sync_timing:  # unsynced GPU times would be launch times
            self.times.samples.append(t2 - t0)
        self.times.layers += 1
        return out

    def _local_share(self, layer: int, h, ids, weights) -> torch.Tensor:
        """The router's experts' weighted outputs for every token (zeros where none of its experts is routed)."""
        if self.local is None:
            return torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        return self.local.forward(layer, h, ids, weights)


class ShardWorker:
    """Shard side: follows the router's headers until told to shut down (or the group breaks)."""

    def __init__(self, experts, num_layers: int, hidden: int, top_k: int, dtype, device, observe_compute=None):
        self.experts, self.num_layers, self.hidden, self.top_k = experts, num_layers, hidden, top_k
        self.dtype, self.device = dtype, torch.device(device)
        _check_alignment(hidden, dtype)
        self.width = hidden + meta_columns(dtype, top_k)
        self.compute_seconds = 0.0
        self.tokens_computed = 0
        self.observe_compute = observe_compute  # called with each layer's compute seconds
        self.graphs = StepGraphs(self.device)  # token count -> the captured no-sync step
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # GPU layers not yet read back

    def serve(self) -> None:
        while True:
            header = torch.empty(3, dtype=torch.long, device=self.device)
            _collective(dist.broadcast, header, src=ROUTER_RANK)
            op, num_tokens, graphed = header.tolist()
            self._read_compute_times()  # the header's read waited for the previous step's work
            if op == OP_SHUTDOWN:
                self.graphs.clear()  # before the group is destroyed
                return
            if op == OP_HEARTBEAT:
                continue
            if graphed:  # first time at this size the router runs its side eagerly too, then both capture
                self.graphs(num_tokens, lambda: self._step(num_tokens, timed=False))
            else:
                self._step(num_tokens, timed=True)
            self.tokens_computed += num_tokens * self.num_layers

    def _step(self, num_tokens: int, timed: bool) -> None:
        """All the step's MoE layers. timed: each layer's expert compute is timed (not inside a CUDA-graph capture)."""
        for layer in range(self.num_layers):
            rows = torch.empty(num_tokens, self.width, dtype=self.dtype, device=self.device)
            _collective(dist.broadcast, rows, src=ROUTER_RANK)
            x, ids, weights = unpack_rows(rows, self.hidden, self.top_k)
            y = self._timed_forward(layer, x, ids, weights) if timed else self.experts.forward(layer, x, ids, weights)
            _collective(dist.reduce, y, dst=ROUTER_RANK)

    def _timed_forward(self, layer: int, x, ids, weights) -> torch.Tensor:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            y = self.experts.forward(layer, x, ids, weights)
            self._observe(time.perf_counter() - t0)
            return y
        # timed by events, read after the step: a host clock would time the launches
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = self.experts.forward(layer, x, ids, weights)
        end.record()
        self._timed.append((start, end))
        return y

    def _read_compute_times(self) -> None:
        for start, end in self._timed:
            end.synchronize()
            self._observe(start.elapsed_time(end) / 1e3)
        self._timed.clear()

    def _observe(self, seconds: float) -> None:
        self.compute_seconds += seconds
        if self.observe_compute is not None:
            self.observe_compute(seconds)


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DispatchError:
        raise
    except Exception as e:  # gloo/NCCL report dead peers and timeouts as RuntimeError (or DistBackendError)
        raise DispatchError(f"expert-shard group failed in {fn.__name__}: {e}") from e
