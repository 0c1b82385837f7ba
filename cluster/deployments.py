"""The Ray Serve deployments: the Router (HTTP + gRPC in front of the engine process) and the ExpertShards (a range
of experts each).

Ray carries only the rendezvous (Router -> ExpertShard.join, each time the group forms) and the requests (proxy ->
Router); the per-layer expert traffic is the torch.distributed collective between the engine process and the shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time

import grpc
import ray
import torch

from model_shards.config import ModelConfig
from model_shards.expert_part import shard_expert_range
from model_shards.loading import load_expert_part

from .engine.async_engine import AsyncEngine
from .engine.engine import DTYPES, EngineConfig
from .engine.engine_process import GIL_SWITCH_INTERVAL_S, EngineProcess
from .metrics import Metrics
from .ray_shard_group import RayShardRendezvous
from .shard_group import serve_experts

log = logging.getLogger("m1serve.deployments")


def setup_logging() -> None:
    """Our INFO logs (loading progress, group events) on the replica's stderr, which Ray forwards to the driver."""
    logger = logging.getLogger("m1serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def replica_device() -> torch.device:
    """The replica's GPU, the first Ray assigned it. Ray narrows CUDA_VISIBLE_DEVICES to it (cuda:0) unless
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, which build_app sets so that the router and shards on one node
    see each other's GPUs and can open the peer links: then it is picked by its id."""
    ids = ray.get_gpu_ids()
    if not ids:
        return torch.device("cpu")
    if os.environ.get(NOSET_CUDA_VISIBLE_DEVICES) != "1":
        return torch.device("cuda", 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", visible.split(",").index(str(ids[0])) if visible else int(ids[0]))


class ExpertShard:
    """Holds experts [first, last) of every layer; serves them in the router's group while it exists."""

    def __init__(self, model: str, shard: int, num_shards: int, dtype: str | None = None,
                 expert_dtype: str | None = None, router_experts: bool = False):
        setup_logging()
        self.device = replica_device()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        else:
            torch.cuda.set_device(self.device)
        self.cfg = ModelConfig.from_file(model)
        self.shard = shard
        self.first, self.last = shard_expert_range(self.cfg.num_local_experts, num_shards, shard, router_experts)
        dt = DTYPES[dtype] if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        t0 = time.monotonic()
        self.experts = load_expert_part(model, self.first, self.last, dt, self.device, expert_dtype)
        log.info("shard %d: experts %d..%d loaded in %.1fs", shard, self.first, self.last - 1, time.monotonic() - t0)
        metrics = Metrics("ray")
        shard_label = str(shard)
        self._observe_compute = lambda s: metrics.record("m1serve_shard_compute_seconds", s, shard=shard_label)
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.groups_joined = 0

    async def join(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                   join_timeout_s: float) -> dict:
        """Starts serving in a new group (after the previous one, if any, has ended). Returns at once: the
        group forms when every rank has joined."""
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout_s + 5)
            if self._thread.is_alive():
                raise RuntimeError("still serving in the previous group")

        def run():
            try:
                serve_experts(self.experts, self.cfg, rank, world_size, host, port, self.device, timeout_s,
                              join_timeout_s, self._observe_compute)
                self.last_error = None
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("shard %d left the group: %s", self.shard, self.last_error)

        self._thread = threading.Thread(target=run, name=f"m1serve-shard-{self.shard}", daemon=True)
        self._thread.start()
        self.groups_joined += 1
        return {"shard": self.shard, "experts": [self.first, self.last], "pid": os.getpid()}

    def status(self) -> dict:
        return {"shard": self.shard, "experts": [self.first, self.last], "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "in_group": bool(self._thread and self._thread.is_alive()), "groups_joined": self.groups_joined,
                "last_error": self.last_error}


class Router:
    """The APIs (OpenAI HTTP, gRPC) in front of the engine, which runs in a process of its own (EngineProcess):
    this replica's event loop streams tokens without taking the engine's GIL."""

    async def __init__(self, model: str, shards: list, engine: dict, model_name: str, api_key_env: str | None = None,
                       per_layer_expert_metrics: bool = False, group_down_grace_s: float = 120.0):
        setup_logging()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        config = EngineConfig(model=model, expert_shards=len(shards), device=str(replica_device()), **engine)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.group_down_grace_s = group_down_grace_s
        self.metrics = Metrics("ray", per_layer_experts=per_layer_expert_metrics)
        rendezvous = (RayShardRendezvous(shards, ray.util.get_node_ip_address(), config.collective_timeout_s)
                      if shards else None)
        self.engine = await asyncio.to_thread(EngineProcess, config, self.metrics, rendezvous,
                                              per_layer_expert_metrics)
        self.async_engine = AsyncEngine(self.engine, model_name)
        self._down_since: float | None = None

    def __serve_build_asgi_app__(self):
        from .api.openai_api import create_app

        return create_app(self.async_engine, api_key=self.api_key, metrics=self.metrics)

    async def Generate(self, request, grpc_context=None):
        from .api import grpc_service

        return await grpc_service.generate(self.async_engine, request, grpc_context, self.metrics, self.api_key)

    async def GenerateStream(self, request, grpc_context=None):
        from .api import grpc_service

        # aclosing: Serve may cancel a stream by throwing into this generator at its yield (user code on its loop),
        # which would leave the inner one (and so the engine request) open until garbage collection
        async with contextlib.aclosing(grpc_service.generate_stream(self.async_engine, request, grpc_context,
                                                                    self.metrics, self.api_key)) as responses:
            async for response in responses:
                yield response
        # Serve's proxy carries a stream's context only with its messages; a status set after the last one (or
        # with none) reaches the client only if we raise: it then answers with the code we set.
        if grpc_context is not None and grpc_context.code() not in (None, grpc.StatusCode.OK):
            raise RuntimeError(grpc_context.details())

    def stats(self) -> dict:
        return self.engine.stats()

    async def drain(self, timeout_s: float) -> dict:
        """Graceful stop: no new requests; those in flight finish within timeout_s or end with an error event."""
        return await asyncio.to_thread(self.engine.shutdown, timeout_s)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def check_health(self) -> None:
        """A group that stays broken past the grace period makes Serve replace this replica (which forms a new
        group); shorter outages are reported by /health and recovered by the engine itself."""
        if not self.engine.alive:
            raise RuntimeError("the engine process exited")
        if self.engine.healthy:
            self._down_since = None
            return
        self._down_since = self._down_since or time.monotonic()
        if time.monotonic() - self._down_since > self.group_down_grace_s:
            raise RuntimeError(f"expert-shard group down for over {self.group_down_grace_s}s: {self.engine.error}")
