"""bench-engine: decode throughput at several concurrencies, measured in one run, with a per-step breakdown."""

from __future__ import annotations

import random
import threading
import time

from .engine.engine import Engine, EngineConfig
from .engine.sampling import SamplingParams

PARTS = ("attention", "gate", "moe", "lm_head", "sampling")


def _one_level(engine: Engine, concurrency: int, prompt_len: int, max_tokens: int) -> dict:
    rng = random.Random(concurrency)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first_token, done = {}, {}
    all_done = threading.Event()

    def sink_for(request_id):
        def sink(out):  # runs on the engine thread: timestamps are exact
            first_token.setdefault(request_id, time.perf_counter())
            if out.finished:
                done[request_id] = time.perf_counter()
                if len(done) == concurrency:
                    all_done.set()
        return sink

    before = dict(engine.profile.seconds), engine.profile.steps, engine.profile.tokens
    dispatcher = engine.experts.dispatcher
    times_before = vars(dispatcher.times).copy() if dispatcher else None
    t0 = time.perf_counter()
    for i in range(concurrency):
        engine.submit([rng.randrange(vocab) for _ in range(prompt_len)], params, f"bench-{concurrency}-{i}",
                      sink_for(f"bench-{concurrency}-{i}"))
    all_done.wait()
    t_end = max(done.values())
    decode_start = max(first_token.values())
    decode_tokens = concurrency * (max_tokens - 1)
    seconds = {k: engine.profile.seconds[k] - before[0].get(k, 0.0) for k in PARTS}
    steps = engine.profile.steps - before[1]
    row = {"concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens,
           "wall_s": t_end - t0, "output_tokens": concurrency * max_tokens,
           "throughput_tok_s": concurrency * max_tokens / (t_end - t0),
           "decode_tok_s": decode_tokens / max(t_end - decode_start, 1e-9), "steps": steps,
           "ms_per_step": {k: 1e3 * v / max(steps, 1) for k, v in seconds.items()}}
    if dispatcher is not None:
        t = vars(dispatcher.times)
        row["ms_per_step"].update({f"moe.{k}": 1e3 * (t[k] - times_before[k]) / max(steps, 1)
                                   for k in ("dispatch", "experts")})
    return row


def run_bench(config: EngineConfig, concurrency: list[int], prompt_len: int, max_tokens: int) -> dict:
    with Engine(config) as engine:
        _one_level(engine, 1, prompt_len, 4)  # warm-up
        rows = [_one_level(engine, c, prompt_len, max_tokens) for c in concurrency]
    base = rows[0]["decode_tok_s"]
    print(f"{'conc':>5} {'decode tok/s':>13} {'x vs first':>10} {'tok/s (all)':>12} {'steps':>6}  ms/step breakdown")
    for r in rows:
        parts = " ".join(f"{k}={v:.2f}" for k, v in r["ms_per_step"].items())
        print(f"{r['concurrency']:>5} {r['decode_tok_s']:>13.1f} {r['decode_tok_s'] / base:>10.2f} "
              f"{r['throughput_tok_s']:>12.1f} {r['steps']:>6}  {parts}")
    return {"config": {k: v for k, v in vars(config).items()}, "rows": rows}
