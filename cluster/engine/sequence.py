"""One request as the engine tracks it, and what the engine streams back for it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from .sampling import SamplingParams, TokenLogprobs


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # generated in this step (all of them in a final non-streamed result)
    text: str  # text delta
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None  # in the first output of a request
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


Sink = Callable[[RequestOutput], None]


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs in order, the end from the last."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]
    return RequestOutput(last.request_id, [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
                         last.finished, last.finish_reason, last.error, [lp for o in outputs for lp in o.logprobs],
                         first.prompt_token_ids, last.num_prompt_tokens, last.num_output_tokens)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    stop_ids: set[int]
    detokenizer: object | None = None
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose lightning state / KV are computed
    text: str = ""  # generated text so far (stop strings are searched here)
    text_sent: int = 0  # characters of text already streamed
    sent_prompt: bool = False
    generator: torch.Generator | None = None
    guide: object | None = None  # guided.Guide: the grammar state of a guided request
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens
