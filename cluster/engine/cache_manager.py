"""Who owns which lightning state slot and which KV blocks. Pure bookkeeping: the tensors are in ModelCache."""

from __future__ import annotations


class FreeList:
    def __init__(self, n: int, what: str):
        self.total, self.what = n, what
        self._free = list(range(n - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.total - len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of {self.what}: asked for {n}, {len(self._free)} free")
        taken = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return taken

    def give_back(self, items: list[int]) -> None:
        self._free.extend(reversed(items))


class CacheManager:
    """One state slot per running sequence, and KV blocks for prompt + max_tokens reserved at admission, so a
    running sequence never runs out mid-generation (softmax KV is small next to the lightning state)."""

    def __init__(self, num_slots: int, num_kv_blocks: int, kv_block_size: int):
        self.slots = FreeList(num_slots, "lightning state slots")
        self.blocks = FreeList(num_kv_blocks, "KV cache blocks")
        self.kv_block_size = kv_block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kv_block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.blocks.total

    def can_fit_now(self, num_tokens: int) -> bool:
        return self.slots.num_free >= 1 and self.blocks.num_free >= self.blocks_needed(num_tokens)

    def allocate(self, num_tokens: int) -> tuple[int, list[int]]:
        return self.slots.take(1)[0], self.blocks.take(self.blocks_needed(num_tokens))

    def free(self, slot: int, blocks: list[int]) -> None:
        self.slots.give_back([slot])
        self.blocks.give_back(blocks)

    @property
    def all_free(self) -> bool:
        return self.slots.num_used == 0 and self.blocks.num_used == 0
