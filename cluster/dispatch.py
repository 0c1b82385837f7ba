"""The router <-> expert-shard protocol over one torch.distributed process group (NCCL on GPU, gloo on CPU).

Rank 0 is the router; ranks 1..N are shards, shard i holding a contiguous range of experts of every layer. The
router may hold the first of N+1 equal ranges itself (`local`, router_experts): it computes them between sending the
rows and collecting the shards' answers, so they overlap the shards' compute and its GPU does not sit idle.
Every step the router broadcasts a header (operation, token count, graphed; while idle, a heartbeat header keeps the
group's timeouts from firing); then, at each MoE layer, one broadcast carries all the step's tokens' hidden states
plus their routing (int64 expert ids and fp32 weights as raw bytes in front of each row, padded to 16 columns: 32
bytes at top-2 in bf16) to every shard, and one reduce sums the shards' [T, H] answers on the router. A shard
computes only the (token, expert) pairs of its own experts and answers zeros for the rest; each token has at most
top_k non-zero partials, so the sum is exact whatever order the backend adds them in (the router's share is its own
experts' partial, or zeros).
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

Eager steps of at most LAYER_GRAPH_MAX_TOKENS tokens (short prompts, small mixed steps) are padded to the next power
of two and sent as `graphed` too: the shards replay their step at that size, and the router, whose attention between
the MoE layers stays eager, replays one graph per MoE layer (the broadcast, its own experts, the reduce) from static
buffers. Its host work per layer is then a copy into the buffer and a replay instead of ~20 launches and two c10d
calls, which cost more than the GPU time of a small layer. Padding rows route to expert -1, which no one holds.

On GPUs of one host, steps of up to peer_links.PEER_MAX_TOKENS tokens (after padding) skip the rings: the router
writes each shard's tokens into that shard's memory and the shards write their answers into the router's, with a GPU
barrier between (cluster/peer_links.py). The header says the token count, so both sides pick the same path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kernels.peer_copy import send_answer, send_rows, sum_answers

from .peer_links import PeerLinks
from .step_graphs import StepGraphs, wait_for_gpu

OP_STEP, OP_SHUTDOWN, OP_HEARTBEAT = 1, 2, 3
ROUTER_RANK = 0
LAYER_GRAPH_MAX_TOKENS = 2048  # at 4096 tokens the graphs gained nothing at 80 layers (bench/results/dispatch-h200x4-*)
PADDING_EXPERT = -1


class DispatchError(RuntimeError):
    """The group broke: a shard died, hung past the timeout, or a collective failed."""


def meta_columns(dtype: torch.dtype, top_k: int) -> int:
    """Columns (of the hidden dtype) in front of each row's hidden state: top_k int64 expert ids, then top_k fp32
    weights, then padding up to a multiple of 16 columns. The ids read back as int64 in place, and with a hidden size
    that is a multiple of 16 every row and its hidden state start 16-column aligned, which the peer-copy kernels
    need for 16-byte accesses."""
    return -(-12 * top_k // (16 * torch.empty((), dtype=dtype).element_size())) * 16


def row_width(hidden: int, dtype: torch.dtype, top_k: int) -> int:
    """Columns of a packed row: the routing, then the hidden state."""
    return hidden + meta_columns(dtype, top_k)


def pack_rows(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[T, H] hidden + [T, K] int64 ids + [T, K] fp32 weights -> [T, meta + H] in h's dtype (into out if given), in
    one copy: the routing goes in as raw bytes (no casts). The padding after it repeats the weights where they fit
    it: no one reads it, and zeros would cost a launch per layer."""
    routing = [ids.contiguous().view(h.dtype), weights.float().view(h.dtype)]
    pad = meta_columns(h.dtype, ids.shape[1]) - sum(r.shape[1] for r in routing)
    if pad % routing[1].shape[1] == 0:  # e.g. top-2 in bf16: 8 id columns, 4 weight columns, 4 padding
        routing += [routing[1]] * (pad // routing[1].shape[1])
    else:
        routing.append(h.new_zeros(h.shape[0], pad))
    return torch.cat([*routing, h], dim=-1, out=out)


def layer_graph_tokens(num_tokens: int) -> int | None:
    """The padded size whose per-layer graphs an eager step of num_tokens replays, or None (run eagerly)."""
    if num_tokens > LAYER_GRAPH_MAX_TOKENS:
        return None
    return 1 << (num_tokens - 1).bit_length()


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

    dispatch: float = 0.0  # packing + the broadcast to the shards (a layer replayed from a graph: the packing only)
    experts: float = 0.0  # the router's own experts, if any, then the reduce, which waits for the shards' compute and
    # sums their answers (the combine); a layer replayed from a graph: the whole replay
    layers: int = 0
    bytes_sent: int = 0  # the step's rows once per layer (what the ring broadcast sends over the router's link; the
    # direct writes send each shard only its tokens' hidden states, not counted apart: that would need a host sync)
    samples: list[float] = field(default_factory=list)  # per-layer round trips, for histograms


class RouterDispatcher:
    """Router side: the `moe(layer, h, ids, weights)` callable the router model runs at each MoE layer."""

    def __init__(self, device, sync_timing: bool = False, local=None, layer_graphs: bool | None = None,
                 timeout_s: float = 30.0):
        """local: the router's own share of the experts (an ExpertPart holding the first of num_shards + 1 ranges),
        or None (the shards hold them all). layer_graphs: small eager steps padded and replayed from per-layer
        graphs (None: on GPU only; on CPU, True runs the same padded path eagerly, what the CPU tests check).
        timeout_s: how long finish_step waits for a step whose layers were replayed."""
        self.local = local
        self.device = torch.device(device)
        self.sync_timing = sync_timing
        self.layer_graphs = self.device.type == "cuda" if layer_graphs is None else layer_graphs
        self.timeout_s = timeout_s
        self.times = StepTimes()
        self.num_tokens = 0
        self.graphed = False
        self.padded_tokens: int | None = None  # this step's size in the per-layer graphs, or None (eager)
        self.graphs = StepGraphs(self.device)  # (padded size, layer) -> the captured layer
        self.links: PeerLinks | None = None  # set by the group once formed, if its ranks can write to each other
        self.direct = False  # this step's layers go through the links
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # padded size -> static (rows, out)
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
        self.padded_tokens = None if graphed or not self.layer_graphs else layer_graph_tokens(num_tokens)
        if graphed:
            self.times.bytes_sent += num_tokens * self._row_bytes * self.layers_per_step
        self.direct = self.links is not None and self.links.fits(self.padded_tokens or num_tokens)
        self._send_header(OP_STEP, self.padded_tokens or num_tokens, int(graphed or self.padded_tokens is not None))

    def finish_step(self) -> None:
        """Called after the step's last MoE layer: waits for a step that replayed per-layer graphs, with a deadline
        (their collectives have no watchdog)."""
        if self.padded_tokens is not None and not wait_for_gpu(self.device, self.timeout_s):
            raise DispatchError(f"a step's MoE layers did not finish within {self.timeout_s}s")

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

    def clear_graphs(self) -> None:
        """Before the group is torn down (see StepGraphs.clear)."""
        self.graphs.clear()

    def __call__(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        assert h.shape[0] == self.num_tokens, "begin_step was not called with this step's token count"
        if self.graphed:  # no timing (it would sync inside a capture), bytes counted by begin_step
            return self._layer(layer, pack_rows(h, ids, weights), h.shape[1], ids.shape[1])
        self._calls += 1
        hidden, top_k = h.shape[1], ids.shape[1]
        t0 = self._time()
        if self.padded_tokens is None:
            rows = pack_rows(h, ids, weights)
            self._send(rows, hidden, top_k)
            t1 = self._time()
            out = self._sum_answers(layer, rows, hidden, top_k)
        else:  # one replay: the packing is all that can be timed apart
            rows, out = self._buffers(h, ids)
            pack_rows(h, ids, weights, out=rows[:self.num_tokens])
            if self.num_tokens < self.padded_tokens:  # (their hidden states may be stale: no one reads them)
                unpack_rows(rows[self.num_tokens:], hidden, top_k)[1].fill_(PADDING_EXPERT)
            t1 = self._time()
            self.graphs((self.padded_tokens, layer), lambda: self._layer(layer, rows, hidden, top_k, out))
            out = out[:self.num_tokens]
        t2 = self._time()
        self._row_bytes = rows.shape[1] * rows.element_size()
        self.times.bytes_sent += rows.numel() * rows.element_size()  # once: the broadcast is a ring
        self.times.dispatch += t1 - t0
        self.times.experts += t2 - t1
        if self.device.type != "cuda" or self.sync_timing:  # unsynced GPU times would be launch times
            self.times.samples.append(t2 - t0)
        self.times.layers += 1
        return out

    def _layer(self, layer: int, rows: torch.Tensor, hidden: int, top_k: int, out: torch.Tensor | None = None):
        self._send(rows, hidden, top_k)
        return self._sum_answers(layer, rows, hidden, top_k, out)

    def _send(self, rows: torch.Tensor, hidden: int, top_k: int) -> None:
        """Every shard gets the rows: by the ring broadcast, or written into its inbox (the routing of every row,
        the hidden state of its own tokens only)."""
        if not self.direct:
            _collective(dist.broadcast, rows, src=ROUTER_RANK)
            return
        ids, links = unpack_rows(rows, hidden, top_k)[1], self.links
        inboxes = [links.inbox(s + 1, rows.shape[0]) for s in range(links.num_shards)]
        send_rows(rows, inboxes, ids, links.first, links.per, rows.shape[1] - hidden)
        _collective(links.barrier)

    def _sum_answers(self, layer: int, rows: torch.Tensor, hidden: int, top_k: int, out: torch.Tensor | None = None):
        """The shards' answers summed into the router's own share (its experts' weighted outputs, zeros where none
        of them is routed), in `out` if given (a static buffer)."""
        x, ids, weights = unpack_rows(rows, hidden, top_k)
        share = None if self.local is None else self.local.forward(layer, x, ids, weights)
        links = self.links
        if self.direct:  # the answers are in once every shard has reached the barrier
            _collective(links.barrier)
            return sum_answers(share, links.answers(), ids, links.first, links.per, links.num_shards, out)
        if share is None:
            out = rows.new_zeros(rows.shape[0], hidden) if out is None else out.zero_()
        else:
            out = share if out is None else out.copy_(share)
        _collective(dist.reduce, out, dst=ROUTER_RANK)
        return out

    def _buffers(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded size's static rows and output, made the first time it is seen."""
        if self.padded_tokens not in self.buffers:
            width = row_width(h.shape[1], h.dtype, ids.shape[1])
            self.buffers[self.padded_tokens] = (h.new_zeros(self.padded_tokens, width),
                                                h.new_zeros(self.padded_tokens, h.shape[1]))
        return self.buffers[self.padded_tokens]


class ShardWorker:
    """Shard side: follows the router's headers until told to shut down (or the group breaks)."""

    def __init__(self, experts, num_layers: int, hidden: int, top_k: int, dtype, device, observe_compute=None,
                 links: PeerLinks | None = None):
        """links: the direct writes' buffers, if the group opened them (steps of up to links.max_tokens use them)."""
        self.experts, self.num_layers, self.hidden, self.top_k = experts, num_layers, hidden, top_k
        self.dtype, self.device, self.links = dtype, torch.device(device), links
        _check_alignment(hidden, dtype)
        self.width = row_width(hidden, dtype, top_k)
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
        links = self.links if self.links is not None and self.links.fits(num_tokens) else None
        for layer in range(self.num_layers):
            if links is not None:  # the router has written this layer's rows once it reaches the barrier
                _collective(links.barrier)
                rows = links.inbox(links.rank, num_tokens)
            else:
                rows = torch.empty(num_tokens, self.width, dtype=self.dtype, device=self.device)
                _collective(dist.broadcast, rows, src=ROUTER_RANK)
            x, ids, weights = unpack_rows(rows, self.hidden, self.top_k)
            y = self._timed_forward(layer, x, ids, weights) if timed else self.experts.forward(layer, x, ids, weights)
            if links is not None:
                shard = links.rank - 1
                send_answer(y, links.answers()[shard], ids, *links.shard_range(shard))
                _collective(links.barrier)
            else:
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
