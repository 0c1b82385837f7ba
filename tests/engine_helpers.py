"""Helpers shared by the engine and cluster tests (their fixtures tiny_model and reference_parts are in conftest)."""

from __future__ import annotations

import time

from conftest import Runner


def greedy_reference(router, experts, prompt: list[int], n: int) -> list[int]:
    """Single-process model, one sequence: the whole prompt in one step, then one token per step."""
    runner = Runner(router, [experts], num_slots=1, num_kv_blocks=(len(prompt) + n) // 16 + 2)
    seq = runner.new_seq(0, len(prompt) + n)
    out = []
    logits = runner.step([(seq, prompt)])
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = runner.step([(seq, [out[-1]])])
    return out


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def wait_idle(engine, timeout=30.0):
    return wait_for(lambda: (s := engine.stats())["running"] == 0 and s["waiting"] == 0 and s, timeout)


def value(registry, name: str, **labels) -> float:
    """A prometheus_client sample's value (0 while the series does not exist yet)."""
    v = registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v
