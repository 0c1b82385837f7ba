"""asyncio front of the engine for the API layers: `async for out in engine.stream(prompt, params)`.

A consumer that falls behind the engine (many streams on one event loop) gets the outputs that queued up meanwhile
merged into one: fewer, larger stream messages instead of a backlog that grows (as vLLM's output collector does).

Leaving the loop early (client disconnect, cancellation) aborts the request, which frees its state slot and KV
blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from .engine import Engine
from .engine_process import EngineProcess
from .sampling import SamplingParams
from .sequence import RequestOutput, merge_outputs


class AsyncEngine:
    def __init__(self, engine: Engine | EngineProcess, model_name: str):
        self.engine = engine
        self.model_name = model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def max_tokens_limit(self) -> int | None:
        return self.engine.config.max_tokens_per_request

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    async def stream(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validation errors (InvalidRequest), QueueFull and EngineUnavailable are raised at the first
        iteration, before anything is yielded."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or uuid.uuid4().hex
        self.engine.submit(prompt, params, request_id, sink=lambda out: loop.call_soon_threadsafe(outputs.put_nowait,
                                                                                                   out))
        finished = False
        try:
            while not finished:
                ready = [await outputs.get()]
                if isinstance(ready[0], Exception):  # an EngineProcess answers submit's errors through the sink
                    finished = True
                    raise ready[0]
                while not outputs.empty():
                    ready.append(outputs.get_nowait())
                out = merge_outputs(ready)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> RequestOutput:
        """The whole result at once (all token ids, the full text, every logprob)."""
        return merge_outputs([out async for out in self.stream(prompt, params, request_id)])
