"""The engine with experts in-process: scheduling, chunked prefill, sampling, limits, cache bookkeeping."""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.engine.decode_graphs import graph_sizes
from cluster.engine.engine import Engine, EngineConfig, QueueFull
from cluster.engine.sampling import InvalidRequest, SamplingParams

from conftest import Runner, random_ids
from engine_helpers import greedy_reference, wait_for, wait_idle


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_num_batched_tokens=96,
                             max_model_len=1024, max_queue_len=64)) as e:
        yield e


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = [1, 7, 300, 40, 129]  # > 256 and > one 96-token chunk included


def test_mixed_batch_arriving_at_different_times_matches_single_process_model(engine, reference_parts):
    prompts = [random_ids(n, 512, seed=n) for n in PROMPT_LENGTHS]
    streams = []
    for i, p in enumerate(prompts):
        streams.append(engine.submit(p, GREEDY))
        if i == 2:  # let the first ones start decoding before the rest arrive
            next(iter(streams[0]))
    results = [s.result() for s in streams]
    for p, r in zip(prompts, results):
        assert r.finish_reason == "length" and r.num_output_tokens == GREEDY.max_tokens
        assert r.prompt_token_ids == p
        assert r.token_ids == greedy_reference(*reference_parts, p, GREEDY.max_tokens)
    s = wait_idle(engine)
    assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0


def test_fixed_size_decode_steps_match_single_process_model(tiny_model, reference_parts):
    """The decode path the GPU replays from CUDA graphs (padded to fixed sizes, scratch slot and KV block for the
    padding, no host sync in the experts), run eagerly on CPU: the same tokens, and the scratch slot never handed
    to a sequence."""
    prompts = [random_ids(n, 512, seed=n) for n in PROMPT_LENGTHS]
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=8, max_num_batched_tokens=96, max_model_len=1024,
                       cuda_graphs=True)
    with Engine(cfg) as e:
        assert e.graphs.sizes == [1, 2, 4, 8]
        assert graph_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100]
        streams = []
        for i, p in enumerate(prompts):
            streams.append(e.submit(p, GREEDY))
            if i == 2:
                next(iter(streams[0]))
        results = [s.result() for s in streams]
        for p, r in zip(prompts, results):
            assert r.token_ids == greedy_reference(*reference_parts, p, GREEDY.max_tokens)
        assert {4, 8} <= set(e.graphs.inputs)  # 5 and 3 decoding sequences were padded
        assert e.cache.scratch_slot == e.cache_manager.slots.total
        assert e.cache.scratch_block == e.cache_manager.blocks.total
        s = wait_idle(e)
        assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0


def test_warmup_leaves_no_trace(tiny_model, reference_parts, monkeypatch):
    """The warm-up's throwaway requests run to the end, free everything, reset the counters, and a request after it
    gives the single-process model's tokens (no state left in the reused slots). Its steps cover the shapes serving
    needs kernels for: halving prefill sizes, a full step, a mixed prefill + decode step, batched decodes."""
    from cluster.engine.scheduler import Scheduler

    steps, schedule = [], Scheduler.schedule

    def spy(self):
        plan, admitted = schedule(self)
        if plan:
            steps.append((sum(len(c.chunk.token_ids) for c in plan), len(plan)))
        return plan, admitted

    monkeypatch.setattr(Scheduler, "schedule", spy)
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_num_batched_tokens=96, max_model_len=1024,
                             warmup=True)) as e:
        assert e.warmup_s is not None and e.warmup_s > 0
        warm = list(steps)
        assert [n for n, _ in warm[:6]] == [48, 1, 24, 1, 12, 1]  # each halving prompt, then its one decode
        assert warm[6:] == [(96, 1), (1 + 3 * 8, 4), (3, 3)]  # full step; its decode + 3 new prompts; 3 decodes
        s = e.stats()
        assert s["running"] == s["waiting"] == s["slots_used"] == s["kv_blocks_used"] == 0
        assert not e.counters and e.profile.steps == 0
        prompt = random_ids(130, 512, seed=3)
        assert e.generate(prompt, GREEDY).token_ids == greedy_reference(*reference_parts, prompt, GREEDY.max_tokens)
    steps.clear()  # prompts shorter than a step: the step's sizes are still reached, with several prompts
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=4, max_num_batched_tokens=96, max_model_len=50,
                             warmup=True)) as e:
        assert steps[:6] == [(48, 1), (1, 1), (24, 1), (1, 1), (12, 1), (1, 1)]
        assert steps[6:] == [(96, 2), (2 + 2 * 8, 4), (2, 2)]
        assert not e.counters
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=20, max_num_batched_tokens=96, max_model_len=50,
                             warmup=True, cuda_graphs=True)) as e:  # a decode step at every graph size
        assert e.graphs.sizes == [1, 2, 4, 8, 16, 20] and set(e.graphs.inputs) == set(e.graphs.sizes)
        assert not e.counters and e.stats()["slots_used"] == 0
    with Engine(EngineConfig(model=str(tiny_model))) as e:  # on CPU it is off unless asked for
        assert e.warmup_s is None


def test_slow_steps_are_logged(engine, monkeypatch, caplog):
    import cluster.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "SLOW_STEP_S", 0.0)
    with caplog.at_level("WARNING", logger="m1serve.engine"):
        engine.generate(random_ids(5, 512, 9), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert any("a step of 5 tokens (1 sequences) took" in r.getMessage() for r in caplog.records), caplog.text


def test_continuous_batching_steps_are_shared(tiny_model):
    """16 concurrent decodes take about as many steps as one: they share each step (real batching)."""
    with Engine(EngineConfig(model=str(tiny_model), max_num_seqs=16, max_num_batched_tokens=512)) as e:
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        e.generate(random_ids(8, 512, 1), params)
        one = e.profile.steps
        streams = [e.submit(random_ids(8, 512, i), params) for i in range(16)]
        outs = [s.result() for s in streams]
        sixteen = e.profile.steps - one
    assert all(o.num_output_tokens == 20 for o in outs)
    assert one == 20 and sixteen <= 2 * 20, (one, sixteen)


def test_prefill_is_chunked_and_decodes_continue(engine):
    """A long prompt arriving while another sequence decodes must not stall it: the decode gets a token in
    every step while the prompt is processed in budget-sized chunks."""
    steps_before = engine.profile.steps
    short = engine.submit(random_ids(4, 512, 3), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    it = iter(short)
    next(it)
    long = engine.submit(random_ids(700, 512, 4), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    long.result()
    rest = list(it)
    assert rest[-1].finished and rest[-1].num_output_tokens == 40
    # 700 tokens at 96 per step need >= 8 steps; the short one decoded during them
    assert engine.profile.steps - steps_before >= 8


def test_seeded_sampling_is_reproducible_and_greedy_equivalents(engine):
    prompt = random_ids(10, 512, 5)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a, b = engine.generate(prompt, p), engine.generate(prompt, p)
    assert a.token_ids == b.token_ids
    c = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    assert c.token_ids != a.token_ids  # 10 tokens over a 512 vocab: equal only by a ~impossible accident
    greedy = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    top1 = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3, ignore_eos=True))
    tiny_p = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3,
                                                    ignore_eos=True))
    assert greedy.token_ids == top1.token_ids == tiny_p.token_ids


def test_logprobs_match_log_softmax(engine, reference_parts):
    prompt = random_ids(20, 512, 6)
    out = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=3, ignore_eos=True))
    runner = Runner(*reference_parts[:1], [reference_parts[1]], num_slots=1)
    ref = torch.log_softmax(runner.prefill(prompt)[-1], -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(ref.argmax())
    assert lp.logprob == pytest.approx(ref.max().item(), abs=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)


def test_stop_token_min_tokens_and_stop_strings(engine):
    prompt = random_ids(10, 512, 7)
    free = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    stopped = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok],
                                                     ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    # min_tokens: the stop token is masked until min_tokens are out
    held = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok],
                                                  min_tokens=first + 2, ignore_eos=True))
    assert len(held.token_ids) >= first + 2 and stop_tok not in held.token_ids[: first + 1]
    # stop string: the text ends right before it, and the streamed deltas add up to the same text
    text = free.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    if needle.strip() and "\ufffd" not in needle:
        params = SamplingParams(max_tokens=12, temperature=0.0, stop=[needle], ignore_eos=True)
        streamed = "".join(o.text for o in engine.submit(prompt, params))
        out = engine.generate(prompt, params)
        assert out.finish_reason == "stop" and out.text == text[: text.index(needle)] == streamed


def test_text_prompt_and_eos(engine):
    out = engine.generate("Hello there", SamplingParams(max_tokens=5, temperature=0.0))
    assert out.prompt_token_ids == engine.tokenizer.encode("Hello there")
    assert out.finish_reason in ("stop", "length") and 1 <= out.num_output_tokens <= 5


@pytest.mark.parametrize("params, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=0), "top_k"), (dict(seed=-5), "seed"), (dict(stop=[""]), "stop"), (dict(logprobs=99), "logprobs"),
    (dict(min_tokens=50, max_tokens=5), "min_tokens"), (dict(max_tokens=5000), "max_tokens"),
])
def test_invalid_sampling_params_name_the_field(engine, params, field):
    with pytest.raises(InvalidRequest) as e:
        engine.submit([1, 2, 3], SamplingParams(**params))
    assert e.value.param == field and field in str(e.value)


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([1, 99999], "outside the vocabulary"),
                                             ("x" * 0, "empty"), (3, "string or a list")])
def test_invalid_prompts(engine, prompt, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(prompt, SamplingParams(max_tokens=1))


def test_prompt_longer_than_context_is_rejected(engine):
    with pytest.raises(InvalidRequest, match="maximum context length is 1024"):
        engine.submit(random_ids(1020, 512, 1), SamplingParams(max_tokens=10))


def test_abort_frees_everything_and_queue_limit(tiny_model):
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=2, max_num_batched_tokens=64, max_queue_len=3)
    with Engine(cfg) as e:
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        running = [e.submit(random_ids(30, 512, i), long) for i in range(2)]
        for s in running:
            next(iter(s))  # both admitted and decoding
        waiting = [e.submit(random_ids(30, 512, 10 + i), long) for i in range(3)]
        with pytest.raises(QueueFull):
            e.submit([1, 2], long)
        s = wait_for(lambda: e.stats()["waiting"] == 3 and e.stats())
        assert s["slots_used"] == 2 and s["kv_blocks_used"] > 0
        for st in running + waiting:
            st.abort()
        finals = [st.result() for st in running + waiting]
        assert all(f.finish_reason == "abort" for f in finals)
        s = wait_idle(e)
        assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0
        # and the engine still serves
        assert e.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)) \
            .num_output_tokens == 3


def test_queue_limit_counts_requests_not_aborts(tiny_model):
    """What max_queue_len counts: requests waiting or on their way to the engine thread. Aborts on their way (a
    client that went away) are not requests: before, four of them in the inbox during a long step made the next
    request a 429 (the reliability soak test's dropping client)."""
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=2, max_queue_len=2)
    e = Engine(cfg, start=False)  # no engine thread: everything stays in the inbox
    try:
        params = SamplingParams(max_tokens=4)
        for i in range(5):
            e.abort(f"gone-{i}")
        streams = [e.submit([1, 2, 3], params) for _ in range(2)]
        with pytest.raises(QueueFull, match="2 requests are queued"):
            e.submit([1, 2, 3], params)
        assert e._inbox.qsize() == 7 and len(streams) == 2
    finally:
        e.experts.close()
    with Engine(cfg) as e:  # the engine thread takes them: the count goes back to zero
        for i in range(5):
            e.abort(f"gone-{i}")
        out = [e.submit([1, 2, 3], params) for _ in range(2)]
        assert all(s.result().num_output_tokens == 4 for s in out)
        assert e._arriving == 0 and e.generate([1, 2], params).num_output_tokens == 4


def test_request_waits_for_memory_instead_of_failing(tiny_model):
    """Two requests that cannot both fit run one after the other; one that can never fit is rejected. (The budget
    also holds the cache's scratch slot and KV block, which no request gets.)"""
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=4, max_model_len=4096, kv_block_size=16,
                       cache_memory_gb=((4 + 1) * 7 * 8 * 32 * 32 * 4 + (40 + 1) * 2 * 16 * 2 * 32 * 4) / 2**30)
    with Engine(cfg) as e:
        assert e.cache_manager.blocks.total == 40  # 640 tokens of KV
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        a, b = e.submit(random_ids(300, 512, 1), params), e.submit(random_ids(300, 512, 2), params)
        outs = [a.result(), b.result()]
        assert [o.num_output_tokens for o in outs] == [100, 100]
        with pytest.raises(InvalidRequest, match="can never fit"):
            e.submit(random_ids(600, 512, 3), params)


def test_sink_errors_and_threads(engine):
    """Outputs can go to a callback (the async API uses it); a failing callback aborts only its request."""
    got, done = [], threading.Event()

    def sink(out):
        got.append(out)
        if out.finished:
            done.set()

    engine.submit([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), sink=sink)
    assert done.wait(10) and sum(len(o.token_ids) for o in got) == 4

    def bad_sink(out):
        raise RuntimeError("client went away")

    engine.submit([1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True), sink=bad_sink)
    assert engine.generate([4, 5], SamplingParams(max_tokens=2, temperature=0.0)).num_output_tokens >= 1
    s = wait_idle(engine)
    assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0


def test_int8_experts_stay_close_to_full_precision(tiny_model, reference_parts):
    """Weight-only int8 experts (per-output-channel scales) change logits by well under a percent."""
    from model_shards.loading import load_expert_part

    router, experts = reference_parts
    int8 = load_expert_part(tiny_model, dtype=torch.float32, expert_dtype="int8")
    assert int8.w13[0].dtype == torch.int8 and int8.w13_scale[0].shape == int8.w13[0].shape[:2]
    prompt = random_ids(300, 512, 11)
    full = Runner(router, [experts], num_slots=1).prefill(prompt)
    quant = Runner(router, [int8], num_slots=1).prefill(prompt)
    rel = ((quant - full).norm() / full.norm()).item()
    assert 0 < rel < 2e-2, rel
    assert (quant.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_router_experts_needs_shards(tiny_model):
    with pytest.raises(ValueError, match="router_experts needs expert shards"):
        Engine(EngineConfig(model=str(tiny_model), router_experts=True), start=False)


def test_step_tokens_default_by_device_and_keep_an_explicit_value(tiny_model):
    from cluster.engine.engine import STEP_TOKENS

    default = Engine(EngineConfig(model=str(tiny_model)), start=False)
    assert default.config.max_num_batched_tokens == STEP_TOKENS["cpu"] == 256
    assert default.scheduler.max_num_batched_tokens == 256
    assert STEP_TOKENS["cuda"] > STEP_TOKENS["cpu"]
    chosen = Engine(EngineConfig(model=str(tiny_model), max_num_batched_tokens=48), start=False)
    assert chosen.config.max_num_batched_tokens == chosen.scheduler.max_num_batched_tokens == 48


def test_async_stream_merges_what_a_slow_consumer_missed(engine):
    """A consumer that falls behind gets the outputs that queued up meanwhile as one: same tokens, fewer messages."""
    import asyncio

    from cluster.engine.async_engine import AsyncEngine

    want = engine.generate([5, 6, 7], GREEDY).token_ids

    async def consume():
        stream = AsyncEngine(engine, "tiny").stream([5, 6, 7], GREEDY)
        first = await stream.__anext__()
        wait_idle(engine)  # blocks the loop: the engine finishes the request while nobody reads
        rest = [out async for out in stream]
        return first, rest

    first, rest = asyncio.run(consume())
    assert len(first.token_ids) == 1 and first.prompt_token_ids == [5, 6, 7]
    assert len(rest) == 1 and rest[0].finished and rest[0].finish_reason == "length"
    assert first.token_ids + rest[0].token_ids == want
    assert rest[0].num_output_tokens == GREEDY.max_tokens


def test_decode_steps_launched_ahead_keep_tokens_finishes_and_aborts(tiny_model, reference_parts):
    """Greedy decode steps are launched one ahead of reading back the previous step's tokens (the next step's inputs
    come from the device): same tokens as the model, length and stop-token finishes at the right token (the row
    computed past a stop token is dropped), aborts and late arrivals handled, everything freed at the end."""
    prompts = [random_ids(n, 512, seed=200 + n) for n in (9, 21, 17, 5)]
    refs = [greedy_reference(*reference_parts, p, 12) for p in prompts]
    stop = next(t for i, t in enumerate(refs[1]) if i >= 3 and t not in refs[1][:i])  # a token first seen at i >= 3
    cut = refs[1].index(stop) + 1
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=1024, cuda_graphs=True)
    with Engine(cfg) as e:
        long = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
        victim = e.submit(random_ids(12, 512, seed=1), long)
        streams = [e.submit(prompts[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)),
                   e.submit(prompts[1], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop],
                                                       ignore_eos=True)),
                   e.submit(prompts[2], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))]
        next(iter(streams[2]))
        streams.append(e.submit(prompts[3], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)))
        outs = [s.result() for s in streams]
        victim.abort()
        aborted = victim.result()
        assert e.counters["decode_steps_launched_ahead"] > 0
        s = wait_idle(e)
        assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0
    assert outs[0].token_ids == refs[0][:3] and outs[0].finish_reason == "length"
    assert outs[1].token_ids == refs[1][:cut] and outs[1].finish_reason == "stop"
    assert outs[2].token_ids == refs[2] and outs[2].finish_reason == "length"
    assert outs[3].token_ids == refs[3][:7] and outs[3].finish_reason == "length"
    assert aborted.finish_reason == "abort" and 0 < aborted.num_output_tokens < 1000


def test_sampled_requests_also_run_ahead_and_seeded_ones_stay_reproducible(tiny_model):
    """Unseeded sampled requests are drawn on the device, so their decode steps are launched ahead too; a seeded
    request in the same batch (its own generator: the plain path) gives the same tokens as alone."""
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=1024, cuda_graphs=True)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    with Engine(cfg) as e:
        alone = e.generate(random_ids(6, 512, seed=3), seeded).token_ids
        before = e.counters["decode_steps_launched_ahead"]
        sampled = [e.submit(random_ids(9, 512, seed=i), SamplingParams(max_tokens=n, temperature=0.8, top_k=50,
                                                                        ignore_eos=True))
                   for i, n in enumerate((5, 12, 9))]
        outs = [s.result() for s in sampled]
        ahead = e.counters["decode_steps_launched_ahead"] - before
        mixed = [e.submit(random_ids(6, 512, seed=3), seeded), e.submit(random_ids(9, 512, seed=4), GREEDY)]
        together = mixed[0].result().token_ids
        mixed[1].result()
        s = wait_idle(e)
    assert [o.num_output_tokens for o in outs] == [5, 12, 9] and all(o.finish_reason == "length" for o in outs)
    assert ahead > 0
    assert together == alone
    assert s["slots_used"] == 0 and s["kv_blocks_used"] == 0
