"""The expert-shard group when the shards are Ray Serve deployments (one single-replica deployment per shard, so
ranks and expert ranges are deterministic). The router hosts the rendezvous store and asks every shard to join
through its DeploymentHandle; afterwards per-layer traffic is the collective alone."""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.distributed as dist

from .dispatch import PADDED_MAX_ROWS, DispatchError, RouterDispatcher
from .shard_group import FormedGroup, join_group, master_store

log = logging.getLogger("m1serve.shards")


class RayShardGroup(FormedGroup):
    def __init__(self, shard_handles: list, num_experts: int, hidden: int, top_k: int, device, host: str,
                 timeout_s: float = 30.0, join_timeout_s: float = 300.0, padded_max_rows: int = PADDED_MAX_ROWS,
                 sync_timing: bool = False, local=None):
        """local: the router's own share of the experts (shard_group.load_router_share), or None."""
        self.handles, self.num_shards = list(shard_handles), len(shard_handles)
        self.device, self.host = torch.device(device), host
        self.timeout_s, self.join_timeout_s = timeout_s, join_timeout_s
        self.dispatcher = RouterDispatcher(self.num_shards, num_experts, hidden, top_k, self.device, padded_max_rows,
                                           sync_timing, local)
        self.healthy = False
        self.start()

    def start(self) -> None:
        world = self.num_shards + 1
        store = master_store(world, self.join_timeout_s, self.host)
        failure: list[BaseException] = []

        def join_as_router():
            try:
                join_group(0, world, store, self.device, self.timeout_s, self.join_timeout_s)
            except BaseException as e:  # reported below
                failure.append(e)

        router = threading.Thread(target=join_as_router, daemon=True)
        router.start()
        # a shard being restarted by Serve may fail the call: ask again until the group forms or time runs out
        deadline = time.monotonic() + self.join_timeout_s
        calls = {i: self._ask_join(i, store.port) for i in range(self.num_shards)}
        while calls and time.monotonic() < deadline and router.is_alive():
            for i, call in list(calls.items()):
                try:
                    call.result(timeout_s=0.5)
                    del calls[i]
                except TimeoutError:
                    pass
                except Exception as e:
                    log.warning("shard %d did not take the join request (%s); asking again", i, e)
                    time.sleep(1.0)
                    calls[i] = self._ask_join(i, store.port)
        router.join(timeout=max(0.0, deadline - time.monotonic()))
        if router.is_alive() or failure:
            raise DispatchError(f"expert shards did not form a group: {failure[0] if failure else 'timed out'}")
        self.healthy = True
        log.info("expert-shard group formed: %d shards", self.num_shards)

    def _ask_join(self, shard: int, port: int):
        return self.handles[shard].join.remote(self.host, port, shard + 1, self.num_shards + 1, self.timeout_s,
                                               self.join_timeout_s)

    def restart(self) -> None:
        self._leave()
        self.start()

    def close(self) -> None:
        if self.healthy:
            try:
                self.dispatcher.shutdown()
            except DispatchError:
                pass
        self._leave()

    def _leave(self) -> None:
        self.healthy = False
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
