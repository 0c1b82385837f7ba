"""Where the router's experts live: in its own process, or in N expert shards joined over torch.distributed (child
processes of the router, or processes started elsewhere that a rendezvous gathers). All expose the calls the engine
uses: begin_step, moe, heartbeat, close, restart."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from kernels.triton_utils import log_kernel_builds
from model_shards.config import ModelConfig
from model_shards.expert_part import ExpertPart, router_expert_range, shard_expert_range
from model_shards.loading import load_expert_part

from .dispatch import DispatchError, RouterDispatcher, ShardWorker, row_width
from .peer_links import open_peer_links

log = logging.getLogger("m1serve.shards")


class LocalExperts:
    """All experts in the router process (the single-process model)."""

    def __init__(self, experts: ExpertPart):
        self.experts = experts
        self.healthy = True
        self.dispatcher = None

    def begin_step(self, num_tokens: int, graphed: bool = False) -> None:
        pass

    def finish_step(self) -> None:
        pass

    def moe(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.experts.forward(layer, h, ids, weights)

    def heartbeat(self) -> None:
        pass

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def shard_device(router_device: torch.device, shard: int) -> torch.device:
    """Shard i on the GPU after the router's (round robin over the visible GPUs); CPU stays CPU."""
    if router_device.type != "cuda":
        return router_device
    return torch.device("cuda", (router_device.index or 0) + 1 + shard) if torch.cuda.device_count() > 1 + shard \
        else torch.device("cuda", (1 + shard) % torch.cuda.device_count())


def master_store(world_size: int, join_timeout_s: float, host: str = "127.0.0.1") -> dist.TCPStore:
    """The rendezvous store, hosted by the router on a free port (store.port)."""
    return dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=join_timeout_s))


def join_group(rank: int, world_size: int, store: dist.Store, device: torch.device, timeout_s: float,
               join_timeout_s: float, peers_alive=lambda: True) -> None:
    """Joins the group once every rank is ready (each may take join_timeout_s to load and arrive, unless
    peers_alive() says one is gone); afterwards each collective fails after timeout_s."""
    store.set(f"ready/{rank}", "1")
    keys, deadline = [f"ready/{r}" for r in range(world_size)], time.monotonic() + join_timeout_s
    while True:
        try:
            store.wait(keys, timedelta(seconds=1))
            break
        except dist.DistStoreError:
            if not peers_alive():
                raise DispatchError("an expert shard exited before joining the group") from None
            if time.monotonic() > deadline:
                raise
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def open_links(rank: int, world_size: int, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               expert_range: tuple[int, int]):
    """Right after join_group, on every rank: the direct-write buffers (peer_links), or None."""
    try:
        return open_peer_links(rank, world_size, device, dtype, cfg.hidden_size,
                               row_width(cfg.hidden_size, dtype, cfg.num_experts_per_tok), expert_range)
    except Exception as e:
        raise DispatchError(f"opening the direct-write buffers failed: {type(e).__name__}: {e}") from e


def shard_store(host: str, port: int, world_size: int, join_timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=join_timeout_s))


def serve_experts(experts: ExpertPart, cfg: ModelConfig, rank: int, world_size: int, host: str, port: int,
                  device: torch.device, timeout_s: float, join_timeout_s: float, observe_compute=None) -> None:
    """A shard's life in one group: join, follow the router until shutdown or failure, leave the group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this thread's current device: Triton launches on it
        log_kernel_builds(log)
    join_group(rank, world_size, shard_store(host, port, world_size, join_timeout_s), device, timeout_s,
               join_timeout_s)
    try:
        links = open_links(rank, world_size, cfg, experts.dtype, device, (experts.first, experts.last))
        with torch.inference_mode():
            ShardWorker(experts, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts_per_tok,
                        experts.dtype, device, observe_compute, links).serve()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def run_shard(model_path: str, shard: int, num_shards: int, port: int, device: str, dtype: torch.dtype,
              timeout_s: float, join_timeout_s: float, expert_dtype: str | None = None,
              router_experts: bool = False) -> None:
    """Body of one expert-shard process: load its experts, then serve in the router's group."""
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # N shards + the router share the cores
    else:
        torch.cuda.set_device(device)
    cfg = ModelConfig.from_file(model_path)
    first, last = shard_expert_range(cfg.num_local_experts, num_shards, shard, router_experts)
    experts = load_expert_part(model_path, first, last, dtype, device, expert_dtype)
    serve_experts(experts, cfg, shard + 1, num_shards + 1, "127.0.0.1", port, device, timeout_s, join_timeout_s)


def _shard_process_main(*args) -> None:
    try:
        run_shard(*args)
    except DispatchError:
        os._exit(3)  # the group broke; the router sees it too and decides what happens next


def load_router_share(model_path: str, num_shards: int, dtype: torch.dtype, device, expert_dtype: str | None = None
                      ) -> ExpertPart:
    """The router's own share of the experts (router_experts): the first of num_shards + 1 equal ranges."""
    first, last = router_expert_range(ModelConfig.from_file(model_path).num_local_experts, num_shards)
    return load_expert_part(model_path, first, last, dtype, device, expert_dtype)


class FormedGroup:
    """The router's side of a formed group: a call that fails marks the group down (the engine then re-forms it)."""

    dispatcher: RouterDispatcher | None = None
    healthy: bool = False

    def _call(self, fn, *args):
        if not self.healthy:
            raise DispatchError("expert-shard group is down")
        try:
            return fn(*args)
        except DispatchError:
            self.healthy = False
            raise

    def begin_step(self, num_tokens: int, graphed: bool = False) -> None:
        self._call(self.dispatcher.begin_step, num_tokens, graphed)

    def moe(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._call(self.dispatcher, layer, h, ids, weights)

    def finish_step(self) -> None:
        self._call(self.dispatcher.finish_step)

    def heartbeat(self) -> None:
        if self.healthy:
            self._call(self.dispatcher.heartbeat)

    def close(self) -> None:
        """Tells the shards to leave (when they can still hear it), then leaves the group."""
        if self.healthy:
            try:
                self.dispatcher.shutdown()
            except DispatchError:
                pass
        self._leave()

    def _join_links(self, world_size: int) -> None:
        local = self.dispatcher.local
        self.dispatcher.links = open_links(0, world_size, self.cfg, self.dtype, self.device,
                                           (0, 0) if local is None else (local.first, local.last))

    def _leave(self) -> None:
        self.healthy = False
        if self.dispatcher is not None:
            self.dispatcher.clear_graphs()
            self.dispatcher.links = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


class RendezvousShardGroup(FormedGroup):
    """Shards started elsewhere (Ray Serve deployments) that join the router's group when asked. Each time the group
    forms, rendezvous() has every shard asked to join a fresh store and returns that store's (host, port); this
    process then joins as rank 0."""

    def __init__(self, rendezvous, num_shards: int, cfg: ModelConfig, device, dtype: torch.dtype,
                 timeout_s: float = 30.0, join_timeout_s: float = 300.0, sync_timing: bool = False,
                 local: ExpertPart | None = None, layer_graphs: bool | None = None):
        """local: the router's own share of the experts (load_router_share), or None. layer_graphs: see
        RouterDispatcher."""
        self.rendezvous, self.num_shards, self.device = rendezvous, num_shards, torch.device(device)
        self.cfg, self.dtype = cfg, dtype
        self.timeout_s, self.join_timeout_s = timeout_s, join_timeout_s
        self.dispatcher = RouterDispatcher(self.device, sync_timing, local, layer_graphs, timeout_s)
        self.healthy = False
        self.start()

    def start(self) -> None:
        world = self.num_shards + 1
        try:
            host, port = self.rendezvous()
            join_group(0, world, shard_store(host, port, world, self.join_timeout_s), self.device, self.timeout_s,
                       self.join_timeout_s)
            self._join_links(world)
        except Exception as e:
            raise DispatchError(f"expert shards did not form a group: {type(e).__name__}: {e}") from e
        self.healthy = True

    def restart(self) -> None:
        self._leave()
        self.start()


class ProcessShardGroup(FormedGroup):
    """N expert shards as child processes of the router (plain processes, no Ray)."""

    def __init__(self, model_path: str, num_shards: int, router_device, dtype: torch.dtype, timeout_s: float = 30.0,
                 sync_timing: bool = False, join_timeout_s: float = 300.0, expert_dtype: str | None = None,
                 local: ExpertPart | None = None, layer_graphs: bool | None = None):
        """local: the router's own share of the experts (load_router_share), or None. layer_graphs: see
        RouterDispatcher."""
        self.cfg = cfg = ModelConfig.from_file(model_path)
        shard_expert_range(cfg.num_local_experts, num_shards, 0, local is not None)  # validates the split
        self.model_path, self.num_shards = str(model_path), num_shards
        self.device, self.dtype, self.timeout_s = torch.device(router_device), dtype, timeout_s
        self.join_timeout_s, self.expert_dtype = join_timeout_s, expert_dtype
        self.sync_timing, self.local, self.layer_graphs = sync_timing, local, layer_graphs
        self.procs: list[mp.Process] = []
        self.dispatcher: RouterDispatcher | None = None
        self.healthy = False
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        store = master_store(self.num_shards + 1, self.join_timeout_s)
        self.procs = []
        for shard in range(self.num_shards):
            p = ctx.Process(target=_shard_process_main, daemon=True, name=f"m1serve-shard-{shard}",
                            args=(self.model_path, shard, self.num_shards, store.port,
                                  str(shard_device(self.device, shard)), self.dtype, self.timeout_s,
                                  self.join_timeout_s, self.expert_dtype, self.local is not None))
            p.start()
            self.procs.append(p)
        try:
            join_group(0, self.num_shards + 1, store, self.device, self.timeout_s, self.join_timeout_s,
                       peers_alive=lambda: all(p.is_alive() for p in self.procs))
        except Exception as e:
            self._kill()
            raise DispatchError(f"expert shards did not join within {self.join_timeout_s}s: {e}") from e
        self.dispatcher = RouterDispatcher(self.device, self.sync_timing, self.local, self.layer_graphs,
                                           self.timeout_s)
        try:
            self._join_links(self.num_shards + 1)
        except DispatchError:
            self._kill()
            raise
        self.healthy = True

    def begin_step(self, num_tokens: int, graphed: bool = False) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            self.healthy = False
            raise DispatchError(f"expert shard process exited: {', '.join(dead)}")
        super().begin_step(num_tokens, graphed)

    def restart(self) -> None:
        """Tears the broken group down and forms a new one with fresh shard processes."""
        self.close(graceful=False)
        self.start()

    def close(self, graceful: bool = True) -> None:
        if graceful and self.healthy and all(p.is_alive() for p in self.procs):
            super().close()
            for p in self.procs:
                p.join(timeout=10)
        self._kill()
        self._leave()

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
