"""What one forward step computes: packed tokens of several sequences, and where their caches live."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class SeqChunk:
    """The tokens of one sequence in this step: token_ids at positions start .. start+len-1."""

    token_ids: list[int]
    start: int  # tokens of this sequence already in its caches
    slot: int  # its lightning state slot
    block_table: list[int]  # its KV cache blocks (covering start + len tokens)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] packed
    positions: torch.Tensor  # [T]
    seq_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens per sequence once this step is done
    slot_ids: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [T] flat KV cache row of each new token
    last_token_rows: torch.Tensor  # [B] row of each sequence's last token in the packed batch
    # a decode-only step's context lengths on the device [B] int32: the attention then reads no host list (set by the
    # CUDA-graph runner, whose steps must not depend on host values)
    decode_context_lens: torch.Tensor | None = None

    @classmethod
    def build(cls, chunks: list[SeqChunk], kv_block_size: int, device) -> "ForwardBatch":
        lens = [len(c.token_ids) for c in chunks]
        if 0 in lens:
            raise ValueError("a sequence chunk needs at least one token")
        for c, n in zip(chunks, lens):
            if len(c.block_table) * kv_block_size < c.start + n:
                raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold {c.start + n} tokens")
        width = max(len(c.block_table) for c in chunks)
        tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in chunks], dtype=torch.long)
        # per-token columns as whole-batch tensor ops: a 16K-token prefill step would otherwise loop in Python per token
        counts = torch.tensor(lens)
        seq = torch.repeat_interleave(torch.arange(len(chunks)), counts)  # each token's sequence
        ends = counts.cumsum(0)
        positions = torch.tensor([c.start for c in chunks])[seq] + torch.arange(int(ends[-1])) - (ends - counts)[seq]
        slot_mapping = tables[seq, positions // kv_block_size] * kv_block_size + positions % kv_block_size
        ids = [t for c in chunks for t in c.token_ids]

        def t(x):
            return torch.as_tensor(x, dtype=torch.long).to(device)

        return cls(input_ids=t(ids), positions=t(positions), seq_lens=lens,
                   context_lens=[c.start + m for c, m in zip(chunks, lens)], slot_ids=t([c.slot for c in chunks]),
                   block_tables=t(tables), slot_mapping=t(slot_mapping), last_token_rows=t(ends - 1))


class ModelCache:
    """Preallocated per-sequence caches: one fp32 lightning state per lightning layer and slot, and paged KV
    blocks for the softmax layers. Which slot / blocks a sequence owns is the scheduler's business.

    One more slot and one more KV block than asked for (`scratch_slot`, `scratch_block`) belong to no sequence: the
    padding rows of fixed-size decode steps write there."""

    def __init__(self, cfg: ModelConfig, num_slots: int, num_kv_blocks: int, kv_block_size: int, dtype, device):
        n_lin, n_full = len(cfg.linear_layers), len(cfg.full_layers)
        H, D = cfg.num_attention_heads, cfg.head_dim
        self.kv_block_size = kv_block_size
        self.scratch_slot, self.scratch_block = num_slots, num_kv_blocks
        self.lightning = torch.zeros(n_lin, num_slots + 1, H, D, D, dtype=torch.float32, device=device)
        kv_shape = (n_full, num_kv_blocks + 1, kv_block_size, cfg.num_key_value_heads, D)
        self.k = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.v = torch.zeros(kv_shape, dtype=dtype, device=device)
        self._index = {layer: i for i, layer in enumerate(cfg.linear_layers)}
        self._index.update({layer: i for i, layer in enumerate(cfg.full_layers)})

    def state_pool(self, layer: int) -> torch.Tensor:
        return self.lightning[self._index[layer]]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        return self.k[i], self.v[i]

    def reset_slot(self, slot: int) -> None:
        self.lightning[:, slot].zero_()

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig) -> int:
        return len(cfg.linear_layers) * cfg.num_attention_heads * cfg.head_dim * cfg.head_dim * 4

    @staticmethod
    def bytes_per_kv_block(cfg: ModelConfig, kv_block_size: int, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * len(cfg.full_layers) * kv_block_size * cfg.num_key_value_heads * cfg.head_dim * elem
