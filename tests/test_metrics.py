"""Engine metrics through the prometheus_client backend: counters match the requests, expert tokens add up."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.sampling import SamplingParams
from cluster.metrics import FAMILIES, Metrics

from conftest import random_ids
from engine_helpers import value, wait_idle


@pytest.mark.parametrize("warmup, graphs", [(False, False), (True, False), (True, True)],
                         ids=["no-warmup", "warmup", "fixed-size-decode"])
def test_engine_metrics_count_what_was_served(tiny_model, warmup, graphs):
    """(With the warm-up on, its throwaway requests must not show up in any metric; with fixed-size decode steps, the
    padding rows must not count as expert tokens.)"""
    metrics = Metrics("prometheus")
    reg = metrics.registry
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=4, warmup=warmup, cuda_graphs=graphs)
    with Engine(cfg, metrics=metrics) as engine:
        assert (engine.warmup_s is not None) == warmup
        lengths = [(5, 7), (40, 3), (1, 10)]
        streams = [engine.submit(random_ids(p, 512, p), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                   for p, n in lengths]  # together: 3 decoding sequences, padded to 4 with graphs
        outs = [s.result() for s in streams]
        wait_idle(engine)
        layers = engine.model_config.num_hidden_layers
        steps = engine.profile.steps
    prompt = sum(p for p, _ in lengths)
    generated = sum(o.num_output_tokens for o in outs)
    assert value(reg, "m1serve_prompt_tokens_total") == prompt
    assert value(reg, "m1serve_generation_tokens_total") == generated == 20
    assert value(reg, "m1serve_requests_total", finish_reason="length") == 3
    # every token that went through the model (prompt + generated but the last) was routed to 2 experts per layer
    processed = prompt + generated - len(lengths)
    expert_total = sum(value(reg, "m1serve_expert_tokens_total", shard="0", expert=str(e)) for e in range(8))
    assert expert_total == 2 * processed * layers
    assert value(reg, "m1serve_time_to_first_token_seconds_count") == 3
    assert value(reg, "m1serve_inter_token_latency_seconds_count") == generated - 3
    assert value(reg, "m1serve_e2e_request_latency_seconds_count") == 3
    # one step-time sample per model step: the prefill, then decodes (read back in their step, or one step later)
    step_counts = {k: value(reg, "m1serve_engine_step_seconds_count", kind=k) for k in ("prefill", "decode", "ahead")}
    assert step_counts["prefill"] >= 1 and sum(step_counts.values()) == steps >= 10, step_counts
    assert (step_counts["ahead"] > 0) == graphs
    assert value(reg, "m1serve_state_slots_total") == 4
    assert value(reg, "m1serve_state_slots_used") == value(reg, "m1serve_num_requests_running") == 0
    assert value(reg, "m1serve_kv_cache_usage_ratio") == 0
    text = generate_latest(reg).decode()
    for f in FAMILIES:  # every family is exposed with its help text
        assert f"# HELP {f.name}" in text


def test_expert_tokens_are_labelled_with_the_expert_holder():
    """Each expert's `shard` label is the shard holding it, or "router" for the router's own share."""
    from cluster.engine.engine import expert_holder_labels

    assert expert_holder_labels(8, 0, False) == ["0"] * 8  # all in the router process: one holder
    assert expert_holder_labels(8, 2, False) == ["0"] * 4 + ["1"] * 4
    assert expert_holder_labels(8, 3, True) == ["router"] * 2 + ["0"] * 2 + ["1"] * 2 + ["2"] * 2
    metrics = Metrics("prometheus")
    import torch

    metrics.expert_tokens(torch.tensor([[1, 0, 2, 0, 0, 0, 3, 0]]), expert_holder_labels(8, 3, True))
    assert value(metrics.registry, "m1serve_expert_tokens_total", shard="router", expert="0") == 1
    assert value(metrics.registry, "m1serve_expert_tokens_total", shard="0", expert="2") == 2
    assert value(metrics.registry, "m1serve_expert_tokens_total", shard="2", expert="6") == 3


def test_zero_counter_increments_are_skipped(tiny_model, caplog):
    """Ray's Counter.inc raises on 0: the engine's per-step counters (bytes dispatched, tokens of a step whose
    sequences were all aborted, the last step read back after the graphed decode ran ahead) must never reach a
    backend as 0. A sink as strict as Ray's, under the engine's graphed decode path, sees no such call."""
    metrics = Metrics("prometheus")
    inner = metrics._sink

    class StrictSink:
        registry = inner.registry

        def record(self, name, value, labels):
            from cluster.metrics import BY_NAME

            assert value > 0 or BY_NAME[name].kind != "counter", f"{name} += {value}"
            inner.record(name, value, labels)

    metrics._sink = StrictSink()
    metrics.record("m1serve_generation_tokens", 0)  # skipped, not raised
    caplog.set_level("ERROR", logger="m1serve.engine")
    cfg = EngineConfig(model=str(tiny_model), max_num_seqs=4, cuda_graphs=True, expert_shards=1)
    with Engine(cfg, metrics=metrics) as engine:
        outs = [engine.submit(random_ids(9, 512, i), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
                for i in range(3)]
        assert all(o.result().finish_reason == "length" for o in outs)
        assert engine.counters["decode_steps_launched_ahead"] > 0
        wait_idle(engine)
        assert not engine.counters.get("requests_error")
    assert value(metrics.registry, "m1serve_generation_tokens_total") == 18
    assert "engine step failed" not in caplog.text
