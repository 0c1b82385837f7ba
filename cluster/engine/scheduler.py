"""Continuous batching: which tokens of which sequences the next step computes.

Every step, running sequences get their next token(s) first (decodes cost one token each), then unfinished
prompts continue in chunks, then waiting requests are admitted while state slots, KV blocks and the token budget
last. Prefill is chunked by the budget, so a long prompt never stalls the decodes of others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from model_shards.batch import SeqChunk

from .cache_manager import CacheManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    chunk: SeqChunk
    samples: bool  # this chunk reaches the end of the sequence's tokens: sample the next one


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        """The next schedule() would admit a waiting request."""
        return (bool(self.waiting) and len(self.running) < self.max_num_seqs
                and self.cache.can_fit_now(self.waiting[0].max_total_tokens))

    def schedule(self) -> tuple[list[ScheduledChunk], list[Sequence]]:
        """Returns this step's chunks and the sequences newly admitted (whose state slots must be zeroed)."""
        budget = self.max_num_batched_tokens
        plan: list[ScheduledChunk] = []
        # decodes first, then continuing prefills
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_cached > 1):
            if budget == 0:
                break
            budget -= self._add_chunk(plan, seq, budget)
        admitted = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.cache.can_fit_now(seq.max_total_tokens):
                break  # FIFO: the head waits for memory rather than being overtaken forever
            self.waiting.popleft()
            seq.slot, seq.blocks = self.cache.allocate(seq.max_total_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            budget -= self._add_chunk(plan, seq, budget)
        return plan, admitted

    def _add_chunk(self, plan: list[ScheduledChunk], seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_cached, budget)
        ids = seq.all_ids[seq.num_cached: seq.num_cached + n]
        plan.append(ScheduledChunk(seq, SeqChunk(ids, seq.num_cached, seq.slot, seq.blocks),
                                   samples=seq.num_cached + n == seq.num_tokens))
        return n

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence wherever it is and frees everything it holds at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot, seq.blocks)
            seq.slot, seq.blocks = -1, []
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
