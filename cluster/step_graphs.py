"""CUDA graphs of a step, one per key (a size, or a size and a layer): the first call with a key runs the step (its
result is that call's answer) and then captures it; later calls replay the capture. Used by the router's decode
steps, the router's MoE layers of small eager steps, and the shards' matching steps. On CPU every call simply runs
the step."""

from __future__ import annotations

import time
from typing import Callable, Hashable

import torch


class StepGraphs:
    def __init__(self, device):
        self.device = torch.device(device)
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[Hashable, object] = {}  # what each capture returned: its buffers hold a replay's result
        self.pool = None  # one memory pool for all keys (their graphs never run at the same time)
        self.stream = None

    def __call__(self, key: Hashable, step: Callable[[], object]):
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return self.outputs[key]
        result = step()  # the capture below only records: this call's answer is the eager run's
        if self.device.type == "cuda":
            self.graphs[key], self.outputs[key] = self._capture(step)
        return result

    def _capture(self, step):
        # torch.cuda.graph would also run gc.collect() and empty_cache() before each capture: tens of ms in a large
        # process, and the router captures one graph per MoE layer and size
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)  # the capture stream must not start before the work queued so far
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                output = step()
            finally:
                graph.capture_end()
        return graph, output

    def clear(self) -> None:
        """Drops the captures: they hold the collectives of the group they were captured in, and a captured
        collective still alive can hang that group's teardown."""
        self.graphs.clear()
        self.outputs.clear()


def wait_for_gpu(device: torch.device, timeout_s: float, done: torch.cuda.Event | None = None) -> bool:
    """Waits for the work queued so far on the device (or up to `done`); False if it did not finish within
    timeout_s. A collective replayed from a graph has no watchdog: a dead peer would otherwise hang the next read of
    the GPU."""
    if device.type != "cuda":
        return True
    if done is None:
        done = torch.cuda.Event()
        done.record()
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0)
    return True
