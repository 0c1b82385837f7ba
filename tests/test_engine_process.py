"""The engine in its own process (what the Router replica runs): the same tokens as the in-process engine, the
client's errors raised at the stream's first iteration, metrics forwarded to the parent's registry, shards gathered by
a rendezvous each time the group forms (also after a shard dies), and no stream left hanging when the process dies."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal

import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine import Engine, EngineConfig, EngineUnavailable
from cluster.engine.engine_process import EngineProcess
from cluster.engine.sampling import InvalidRequest, SamplingParams
from cluster.metrics import Metrics
from cluster.shard_group import _shard_process_main, master_store

from conftest import random_ids
from engine_helpers import value, wait_for

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [random_ids(n, 512, seed=300 + n) for n in (40, 3, 130)]


def _config(model, **kw) -> EngineConfig:
    return EngineConfig(model=str(model), max_num_seqs=4, max_num_batched_tokens=64, **kw)


async def _collect(engine, prompt, params, request_id=None):
    return [out async for out in engine.stream(prompt, params, request_id)]


def _generate_all(aengine: AsyncEngine, prompts, params=GREEDY):
    async def run():
        return await asyncio.gather(*[aengine.generate(p, params) for p in prompts])

    return asyncio.run(run())


@pytest.fixture(scope="module")
def expected(tiny_model):
    with Engine(_config(tiny_model)) as engine:
        return [engine.generate(p, GREEDY).token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def served(tiny_model):
    metrics = Metrics("prometheus")
    engine = EngineProcess(_config(tiny_model), metrics)
    yield engine, metrics
    engine.shutdown()


def test_same_tokens_as_the_in_process_engine_and_metrics_reach_the_parent(served, expected):
    engine, metrics = served
    before = value(metrics.registry, "m1serve_generation_tokens_total")
    outs = _generate_all(AsyncEngine(engine, "tiny"), PROMPTS)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" and o.num_prompt_tokens == len(p) for o, p in zip(outs, PROMPTS))
    # the engine records in the child; the parent's registry gets the records
    wait_for(lambda: value(metrics.registry, "m1serve_generation_tokens_total") - before == 3 * GREEDY.max_tokens)
    assert value(metrics.registry, "m1serve_requests_total", finish_reason="length") >= 3
    stats = engine.stats()
    assert stats["running"] == 0 and stats["slots_used"] == 0 and stats["healthy"]


def test_bad_requests_raise_at_the_first_iteration(served):
    engine, _ = served
    aengine = AsyncEngine(engine, "tiny")
    with pytest.raises(InvalidRequest, match="token id 9999 is outside the vocabulary") as info:
        asyncio.run(_collect(aengine, [1, 9999], GREEDY))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="maximum context length"):
        asyncio.run(_collect(aengine, [1, 2], SamplingParams(max_tokens=10**6)))
    assert engine.healthy  # and the engine still serves
    assert asyncio.run(aengine.generate(PROMPTS[1], GREEDY)).num_output_tokens == GREEDY.max_tokens


def test_leaving_a_stream_early_aborts_the_request(served):
    engine, _ = served

    async def run():
        stream = AsyncEngine(engine, "tiny").stream(PROMPTS[0], SamplingParams(max_tokens=3000, temperature=0.0,
                                                                              ignore_eos=True))
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(run())
    assert not first.finished and first.token_ids
    wait_for(lambda: (s := engine.stats())["running"] == 0 and s["slots_used"] == 0)
    assert engine.stats()["requests_abort"] >= 1


class ProcessRendezvous:
    """Gathers shard processes for the engine's group the way the Router replica gathers shard deployments: a fresh
    store and fresh shards each time the group forms."""

    def __init__(self, model, num_shards: int):
        self.model, self.num_shards = str(model), num_shards
        self.procs: list[mp.Process] = []
        self.rounds = 0

    def __call__(self) -> tuple[str, int]:
        self.close()
        self.store = master_store(self.num_shards + 1, 60)
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_shard_process_main, daemon=True,
                                  args=(self.model, i, self.num_shards, self.store.port, "cpu", torch.float32, 6.0,
                                        60.0))
                      for i in range(self.num_shards)]
        for p in self.procs:
            p.start()
        self.rounds += 1
        return "127.0.0.1", self.store.port

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.join()


def test_shards_gathered_by_rendezvous_and_again_after_one_dies(tiny_model, expected):
    rendezvous = ProcessRendezvous(tiny_model, 2)
    engine = EngineProcess(_config(tiny_model, expert_shards=2, collective_timeout_s=6.0), rendezvous=rendezvous)
    try:
        aengine = AsyncEngine(engine, "tiny")
        assert [o.token_ids for o in _generate_all(aengine, PROMPTS)] == expected
        assert rendezvous.rounds == 1

        async def killed_mid_stream():
            stream = aengine.stream(PROMPTS[0], SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True))
            outs = [await anext(stream)]
            os.kill(rendezvous.procs[1].pid, signal.SIGKILL)
            outs += [out async for out in stream]
            return outs[-1]

        last = asyncio.run(killed_mid_stream())
        assert last.finish_reason == "error" and "shard" in last.error
        wait_for(lambda: engine.healthy and rendezvous.rounds == 2, timeout=60)
        assert [o.token_ids for o in _generate_all(aengine, PROMPTS[:1])] == expected[:1]
        assert engine.stats()["group_restarts"] == 1
    finally:
        engine.shutdown()
        rendezvous.close()


def test_a_dead_engine_process_ends_its_streams_and_refuses_new_ones(tiny_model):
    engine = EngineProcess(_config(tiny_model))
    aengine = AsyncEngine(engine, "tiny")

    async def killed_mid_stream():
        stream = aengine.stream(PROMPTS[0], SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True))
        outs = [await anext(stream)]
        os.kill(engine._proc.pid, signal.SIGKILL)
        outs += [out async for out in stream]
        return outs[-1]

    try:
        last = asyncio.run(asyncio.wait_for(killed_mid_stream(), 30))
        assert last.finished and last.finish_reason == "error" and "engine process exited" in last.error
        wait_for(lambda: not engine.alive)
        assert not engine.healthy and engine.error == "the engine process exited"
        with pytest.raises(EngineUnavailable, match="engine process exited"):
            asyncio.run(_collect(aengine, [1, 2], GREEDY))
    finally:
        engine.shutdown()


def test_shutdown_drains_and_returns_the_last_stats(tiny_model):
    engine = EngineProcess(_config(tiny_model))
    stream_done = []
    engine.submit(PROMPTS[1], GREEDY, "drained", stream_done.append)
    stats = engine.shutdown(drain_timeout_s=30)
    assert stream_done[-1].finished and stream_done[-1].finish_reason == "length"
    assert stats["requests_length"] == 1 and stats["running"] == 0
    assert not engine.alive and engine._proc.exitcode == 0


def test_a_build_failure_is_raised_in_the_parent(tiny_model):
    with pytest.raises(RuntimeError, match="failed to start(.|\n)*router_experts needs expert shards"):
        EngineProcess(_config(tiny_model, router_experts=True))
