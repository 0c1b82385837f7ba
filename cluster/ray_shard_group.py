"""The Router replica's side of forming the expert-shard group when the shards are Ray Serve deployments (one
single-replica deployment per shard, so ranks and expert ranges are deterministic).

The engine process joins the group as rank 0 (shard_group.RendezvousShardGroup); each time it (re-)forms the group
it asks the replica for a rendezvous, and this class hosts the store and asks every shard to join through its
DeploymentHandle. Afterwards per-layer traffic is the collective alone.
"""

from __future__ import annotations

import logging
import threading
import time

from .shard_group import master_store

log = logging.getLogger("m1serve.shards")


class RayShardRendezvous:
    def __init__(self, shard_handles: list, host: str, timeout_s: float = 30.0, join_timeout_s: float = 300.0):
        self.handles, self.host = list(shard_handles), host
        self.timeout_s, self.join_timeout_s = timeout_s, join_timeout_s
        self._store = None  # the current group's store: it must outlive the group's forming
        self._stop = threading.Event()

    def __call__(self) -> tuple[str, int]:
        """A fresh store, and every shard asked (in the background) to join it. Returns the store's address."""
        self._stop.set()  # an earlier round still asking gives up
        self._stop = stop = threading.Event()
        self._store = store = master_store(len(self.handles) + 1, self.join_timeout_s, self.host)
        threading.Thread(target=self._ask_all, args=(store.port, stop), name="m1serve-rendezvous",
                         daemon=True).start()
        return self.host, store.port

    def _ask_all(self, port: int, stop: threading.Event) -> None:
        # a shard being restarted by Serve may fail the call: ask again until it takes it or time runs out
        deadline = time.monotonic() + self.join_timeout_s
        calls = {i: self._ask(i, port) for i in range(len(self.handles))}
        while calls and time.monotonic() < deadline and not stop.is_set():
            for i, call in list(calls.items()):
                try:
                    call.result(timeout_s=0.5)
                    del calls[i]
                except TimeoutError:
                    pass
                except Exception as e:
                    log.warning("shard %d did not take the join request (%s); asking again", i, e)
                    time.sleep(1.0)
                    calls[i] = self._ask(i, port)

    def _ask(self, shard: int, port: int):
        return self.handles[shard].join.remote(self.host, port, shard + 1, len(self.handles) + 1, self.timeout_s,
                                               self.join_timeout_s)
