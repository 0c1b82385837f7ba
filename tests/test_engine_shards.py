"""The engine with experts in separate shard processes over gloo: same tokens as one process, and failures that
surface as errors within the collective timeout, followed by a re-formed group."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.sampling import SamplingParams

from conftest import random_ids
from engine_helpers import greedy_reference, wait_for, wait_idle

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = [300, 1, 45, 130, 9]  # > 256 and > one 96-token chunk included


@pytest.fixture(scope="module")
def expected(reference_parts):
    prompts = [random_ids(n, 512, seed=100 + n) for n in PROMPT_LENGTHS]
    return prompts, [greedy_reference(*reference_parts, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("shards, warmup, graphs, router_experts",
                         [(1, False, False, False), (2, False, False, False), (4, False, False, False),
                          (2, True, False, False), (2, False, True, False), (3, False, False, True),
                          (1, False, True, True), (1, True, True, True)],
                         ids=["1shard", "2shards", "4shards", "2shards-after-warmup", "2shards-fixed-size-decode",
                              "router+3shards", "router+1shard-fixed-size-decode", "router+1shard-graphs-after-warmup"])
def test_sharded_greedy_matches_single_process(tiny_model, expected, shards, warmup, graphs, router_experts):
    """(fixed-size decode: the decode steps the GPU replays from CUDA graphs, here run eagerly: padded batches and
    `graphed` headers; and small eager steps' MoE layers padded to powers of two, as the GPU replays them too.
    router_experts: the router computes the first of shards + 1 equal shares of the experts itself.)"""
    prompts, want = expected
    cfg = EngineConfig(model=str(tiny_model), expert_shards=shards, max_num_seqs=8, max_num_batched_tokens=96,
                       collective_timeout_s=60, warmup=warmup,
                       cuda_graphs=graphs, router_experts=router_experts)
    with Engine(cfg) as engine:
        if warmup and graphs:  # the warm-up padded a step to each MoE layer graph size: none is new in serving
            assert sorted(engine.experts.dispatcher.buffers) == [1, 2, 4, 8, 16, 32, 64, 128]
        local = engine.experts.dispatcher.local
        assert (local.first, local.last) == (0, 8 // (shards + 1)) if router_experts else local is None
        assert (engine.warmup_s is not None) == warmup
        streams = []
        for i, p in enumerate(prompts):
            streams.append(engine.submit(p, GREEDY))
            if i == 1:  # the first two are decoding when the others arrive
                next(iter(streams[1]))
        got = [s.result() for s in streams]
        assert [g.token_ids for g in got] == want
        s = wait_idle(engine)
        assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0
        times = engine.experts.dispatcher.times
        assert times.layers > 0 and times.bytes_sent > 0
        if graphs:  # batches of 5, 4, ... one-token sequences ran at the padded sizes 8 and 4
            assert {4, 8} <= set(engine.graphs.inputs)
            # and the eager steps' MoE layers ran padded (the path the GPU replays from per-layer graphs): the
            # 96-token chunks of the 300-token prompt at 128
            assert 128 in engine.experts.dispatcher.buffers
        else:
            assert not engine.experts.dispatcher.buffers


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_shard_failure_fails_requests_within_timeout_then_recovers(tiny_model, how):
    timeout = 6.0
    cfg = EngineConfig(model=str(tiny_model), expert_shards=2, max_num_seqs=4, collective_timeout_s=timeout)
    with Engine(cfg) as engine:
        ok = engine.generate([1, 2, 3], GREEDY)
        assert ok.num_output_tokens == GREEDY.max_tokens
        long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        streams = [engine.submit(random_ids(20, 512, i), long) for i in range(2)]
        for s in streams:
            next(iter(s))
        victim = engine.experts.procs[1].pid
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        try:
            finals = [s.result() for s in streams]
            elapsed = time.monotonic() - t0
        finally:
            if how == "stall":
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert all(f.finish_reason == "error" and "shard" in f.error for f in finals), finals
        assert all(f.num_output_tokens < 2000 for f in finals)
        assert elapsed < timeout + 10, elapsed
        # the group is re-formed with a new shard process, and new requests succeed again
        wait_for(lambda: engine.healthy and engine.counters["group_restarts"] == 1, timeout=60)
        assert engine.experts.procs[1].pid != victim
        again = engine.generate([1, 2, 3], GREEDY)
        assert again.finish_reason == "length" and again.token_ids == ok.token_ids
        s = wait_idle(engine)
        assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0


def test_idle_group_stays_formed_past_the_collective_timeout(tiny_model):
    """While idle the router sends heartbeats, so the shards' wait for the next step never times out."""
    cfg = EngineConfig(model=str(tiny_model), expert_shards=2, collective_timeout_s=2.0)
    with Engine(cfg) as engine:
        first = engine.generate([1, 2, 3], GREEDY)
        time.sleep(7)
        again = engine.generate([1, 2, 3], GREEDY)
        assert again.finish_reason == "length" and again.token_ids == first.token_ids
        assert engine.counters["group_restarts"] == 0 and engine.healthy
