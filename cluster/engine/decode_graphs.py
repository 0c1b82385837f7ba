"""Decode steps at fixed batch sizes, captured in CUDA graphs: the router's Python runs once per step, not once per
kernel (a decode step of the real model is ~30 kernels and 2 collectives per layer, each costing the host more
than the GPU).

A step of n one-token sequences is padded to the next captured size B with rows that use the cache's scratch slot
and block. Its inputs are copied into that size's static buffers, the shards are told (a `graphed` header) and the
graph is replayed: the shards replay theirs, with the same collectives. The first step at a size runs eagerly (that
is the real step, and it compiles what needs compiling) and is captured afterwards. On CPU there are no graphs: the
same padded, no-host-sync path runs eagerly every time, which is what the CPU tests check.

`launch` can also take the input tokens as a device tensor (the previous step's samples, not yet read back):
the engine then launches step k+1 before it reads step k's tokens, and the host's per-token work (appending,
detokenizing, streaming) overlaps the GPU's next step instead of adding to it. `PendingTokens` carries them.
"""

from __future__ import annotations

import torch

from model_shards.batch import ForwardBatch, ModelCache, SeqChunk

from ..dispatch import DispatchError
from ..step_graphs import StepGraphs, wait_for_gpu
from .sampling import SamplingParams, sample_on_device


def graph_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 64 and of 32 beyond, and max_batch: a step is padded by at most 7
    rows up to 64 sequences and 31 beyond (one graph per size is captured, so sizes are few)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    b = 8
    while b < max_batch:
        sizes.append(b)
        b += 8 if b < 64 else 32
    return sizes + [max_batch]


class _Inputs:
    """One size's static buffers: [B, 6 + max_blocks] int64 on the device, columns token, position, slot, KV row,
    context length, real (1) or padding (0), then the block table; the ForwardBatch views into it."""

    def __init__(self, B: int, max_blocks: int, device: torch.device):
        self.device = torch.zeros(B, 6 + max_blocks, dtype=torch.long, device=device)
        # two host buffers, used in turn: a step's copy may still be queued while the next step's inputs are written
        self.staging = [torch.zeros(B * (6 + max_blocks), dtype=torch.long, pin_memory=device.type == "cuda")
                        for _ in range(2)]
        self.turn = 0
        self.last_token_rows = torch.arange(B, device=device)
        self.context_lens = [1] * B  # host copy: only the CPU path reads it

    def batch(self) -> ForwardBatch:
        """Views of the buffer (called inside the capture: the copies made contiguous are part of the graph)."""
        d, B = self.device, self.device.shape[0]
        return ForwardBatch(input_ids=d[:, 0].contiguous(), positions=d[:, 1].contiguous(), seq_lens=[1] * B,
                            context_lens=self.context_lens, slot_ids=d[:, 2].contiguous(), block_tables=d[:, 6:],
                            slot_mapping=d[:, 3].contiguous(), last_token_rows=self.last_token_rows,
                            decode_context_lens=d[:, 4].to(torch.int32))


class DecodeGraphs:
    def __init__(self, model, cache: ModelCache, experts, moe, max_batch: int, max_model_len: int, device,
                 step_timeout_s: float):
        self.model, self.cache, self.experts, self.moe = model, cache, experts, moe
        self.device = torch.device(device)
        self.sizes = graph_sizes(max_batch)
        self.max_blocks = -(-max_model_len // cache.kv_block_size)
        self.step_timeout_s = step_timeout_s
        self.graphs = StepGraphs(self.device)
        self.inputs: dict[int, _Inputs] = {}
        self.real_rows: torch.Tensor | None = None  # [B] of the step being run: 1 = a sequence, 0 = padding

    def fits(self, chunks: list[SeqChunk]) -> bool:
        return len(chunks) <= self.sizes[-1] and all(len(c.token_ids) == 1 and c.start > 0 for c in chunks)

    def clear(self) -> None:
        """Drops the graphs (they hold the old group's collectives: called when the shard group is re-formed)."""
        self.graphs.clear()

    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Logits [n, V] of the n one-token sequences."""
        logits = self.launch(chunks)
        self.wait()
        return logits

    def launch(self, chunks: list[SeqChunk], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Queues the step and returns its logits [n, V] without waiting for them. tokens: the input ids as a device
        tensor [n], in place of the chunks' (placeholder) ones."""
        n = len(chunks)
        B = next(s for s in self.sizes if s >= n)
        inputs = self._load(chunks, B)
        if tokens is not None:
            inputs.device[:n, 0].copy_(tokens)
        self.experts.begin_step(B, graphed=True)
        return self.graphs(B, lambda: self._forward(inputs))[:n]

    def _forward(self, inputs: _Inputs) -> torch.Tensor:
        self.real_rows = inputs.device[:, 5].contiguous()
        try:
            return self.model(inputs.batch(), self.cache, self.moe)
        finally:
            self.real_rows = None

    def _load(self, chunks: list[SeqChunk], B: int) -> _Inputs:
        """Writes this step's inputs into size B's static buffers with one host-to-device copy (of the block
        tables' columns in use: the kernels never read past a sequence's context)."""
        if B not in self.inputs:
            self.inputs[B] = _Inputs(B, self.max_blocks, self.device)
        inputs, bs = self.inputs[B], self.cache.kv_block_size
        pad = SeqChunk([0], 0, self.cache.scratch_slot, [self.cache.scratch_block])
        chunks = chunks + [pad] * (B - len(chunks))
        width = max(len(c.block_table) for c in chunks)
        rows = []
        for c in chunks:
            pos = c.start + len(c.token_ids) - 1
            rows.append([c.token_ids[-1], pos, c.slot, c.block_table[pos // bs] * bs + pos % bs, pos + 1,
                         int(c is not pad)] + c.block_table + [0] * (width - len(c.block_table)))
        staging = inputs.staging[inputs.turn][:B * (6 + width)].view(B, 6 + width)
        inputs.turn ^= 1
        staging.copy_(torch.tensor(rows, dtype=torch.long))
        inputs.device[:, :6 + width].copy_(staging, non_blocking=True)
        inputs.context_lens[:] = [c.start + 1 for c in chunks]
        return inputs

    def wait(self, done: torch.cuda.Event | None = None) -> None:
        """Waits for the work queued so far (or up to `done`) with a deadline (see wait_for_gpu)."""
        if not wait_for_gpu(self.device, self.step_timeout_s, done):
            raise DispatchError(f"a graphed decode step did not finish within {self.step_timeout_s}s")


class PendingTokens:
    """The tokens of a launched step, drawn on the device (argmax or sample_on_device): there at once (the next
    step's inputs), on the host when result() returns (it waits for this step only, not for steps queued after it)."""

    def __init__(self, logits: torch.Tensor, params: list[SamplingParams], graphs: DecodeGraphs):
        self.graphs = graphs
        self.device = sample_on_device(logits, params)
        self.host = torch.empty(self.device.shape, dtype=self.device.dtype, pin_memory=self.device.is_cuda)
        self.host.copy_(self.device, non_blocking=True)
        self.done = None
        if self.device.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def result(self) -> list[int]:
        if self.done is not None:
            self.graphs.wait(self.done)
        return self.host.tolist()
