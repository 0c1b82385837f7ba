"""CUDA graphs of a step, one per size: the first call at a size runs the step (its result is that call's answer)
and then captures it; later calls replay the capture. Used by the router's decode steps and the shards' matching
steps. On CPU every call simply runs the step."""

from __future__ import annotations

from typing import Callable

import torch


class StepGraphs:
    def __init__(self, device):
        self.device = torch.device(device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, object] = {}  # what each capture returned: its buffers hold a replay's result
        self.pool = None  # one memory pool for all sizes (their graphs never run at the same time)

    def __call__(self, size: int, step: Callable[[], object]):
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            return self.outputs[size]
        result = step()  # the capture below only records: this call's answer is the eager run's
        if self.device.type == "cuda":
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = step()
            self.graphs[size] = graph
        return result

    def clear(self) -> None:
        """Drops the captures: they hold the collectives of the group they were captured in, and a captured
        collective still alive can hang that group's teardown."""
        self.graphs.clear()
        self.outputs.clear()
