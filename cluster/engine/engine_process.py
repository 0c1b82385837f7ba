"""The engine in a process of its own, driven from the Router replica through the same calls as an in-process
Engine (submit with a sink, abort, stats, shutdown, healthy).

Ray Serve handles requests and streams tokens on the replica's event loop. Sharing that process's GIL with the
engine's step loop held the served decode rate to 65% of the in-process engine's (4x H200, 64 streams). So the
replica keeps the APIs, the Ray handles and the metrics export, and the child process owns the model, the cache, the
scheduler and rank 0 of the expert-shard group.

One duplex pipe carries lists of messages. The child sends whatever queued up since its last send (outputs, metric
records, status changes) as one list, so a step's outputs cost one pickle and one write.
child -> parent: ("out", RequestOutput) ("reject", request_id, error) ("metric", name, value, labels)
                 ("status", healthy, error) ("ready", warmup_s) ("fatal", traceback) ("reply", id, value, error)
                 ("call", id, "rendezvous")
parent -> child: ("submit", prompt, params, request_id) ("abort", request_id) ("call", id, method, args)
                 ("reply", id, value, error)
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import traceback
import uuid
from concurrent.futures import Future

from model_shards.tokenizer import Tokenizer, TokenizerError

from ..metrics import Metrics
from .engine import Engine, EngineConfig, EngineUnavailable, QueueFull
from .sampling import InvalidRequest, SamplingParams
from .sequence import RequestOutput, Sink

log = logging.getLogger("m1serve.engine")

# Every wait on the GPU releases the GIL, and taking it back from a busy thread takes up to the switch interval:
# Python's default 5 ms is as long as a whole decode step.
GIL_SWITCH_INTERVAL_S = 0.0005
STATUS_PERIOD_S = 0.5  # the child reports a changed health at least this often
ERRORS = {"InvalidRequest": InvalidRequest, "QueueFull": QueueFull, "EngineUnavailable": EngineUnavailable}


def _error(e: BaseException) -> tuple:
    return type(e).__name__, str(e), getattr(e, "param", None)


def _exception(error: tuple) -> Exception:
    kind, message, param = error
    if kind == "InvalidRequest":
        return InvalidRequest(message, param)
    return ERRORS.get(kind, RuntimeError)(message if kind in ERRORS else f"{kind}: {message}")


class _Calls:
    """Calls awaiting a reply over the pipe, by id."""

    def __init__(self):
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}

    def new(self) -> tuple[int, Future]:
        call_id, future = next(self._ids), Future()
        self._pending[call_id] = future
        return call_id, future

    def reply(self, call_id: int, value, error) -> None:
        future = self._pending.pop(call_id, None)
        if future is not None:
            future.set_exception(RuntimeError(error)) if error else future.set_result(value)

    def fail_all(self, message: str) -> None:
        for call_id in list(self._pending):
            self.reply(call_id, None, message)


class EngineProcess:
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None, rendezvous=None,
                 per_layer_expert_metrics: bool = False, ready_timeout_s: float | None = None):
        """Starts the child and waits until its engine is built and warmed up (raises what the build raised).
        rendezvous: with config.expert_shards, what gathers the shards each time the group forms (see
        RendezvousShardGroup); it is called in this process."""
        self.config = config
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_dir(config.model)
        except TokenizerError:
            self.tokenizer = None  # the child logs it
        self.metrics = metrics or Metrics(None)
        self._rendezvous = rendezvous
        self._sinks: dict[str, Sink] = {}
        self._calls = _Calls()
        self._send_lock = threading.Lock()
        self._status: tuple[bool, str | None] = (False, "starting")
        self._stopping = False
        self._final_stats: dict | None = None
        self._ready: Future = Future()
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name="m1serve-engine", daemon=True,
                                 args=(child_conn, config, rendezvous is not None, self.metrics.enabled,
                                       per_layer_expert_metrics))
        self._proc.start()
        child_conn.close()
        self._reader = threading.Thread(target=self._read_loop, name="m1serve-engine-reader", daemon=True)
        self._reader.start()
        try:
            self.warmup_s = self._ready.result(ready_timeout_s)
        except BaseException:
            self._kill()
            raise

    # ---- the Engine's calls ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def healthy(self) -> bool:
        return self._status[0] and not self._stopping and self.alive

    @property
    def error(self) -> str | None:
        return self._status[1] if self.alive else "the engine process exited"

    def submit(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
               sink: Sink) -> str:
        """Queues the request; what the engine's submit would raise (InvalidRequest, QueueFull, EngineUnavailable)
        reaches sink as the exception instead of an output. Returns the request id."""
        if self._stopping or not self.alive:
            raise EngineUnavailable("the engine is shutting down" if self._stopping else "the engine process exited")
        request_id = request_id or uuid.uuid4().hex
        self._sinks[request_id] = sink
        try:
            self._send(("submit", prompt, params, request_id))
        except EngineUnavailable:
            self._sinks.pop(request_id, None)
            raise
        return request_id

    def abort(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)  # the caller has stopped listening
        try:
            self._send(("abort", request_id))
        except EngineUnavailable:
            pass  # nothing left to abort

    def stats(self) -> dict:
        if not self.alive:
            return {**(self._final_stats or {}), "healthy": False}
        return self._call("stats").result(timeout=30)

    def shutdown(self, drain_timeout_s: float = 0.0) -> dict:
        """As Engine.shutdown, then the child exits. Returns the engine's last stats."""
        self._stopping = True
        if self.alive:
            try:
                self._final_stats = self._call("shutdown", drain_timeout_s).result(timeout=drain_timeout_s + 90)
            except Exception as e:  # noqa: BLE001 - the child is stopped below either way
                log.warning("engine process did not shut down cleanly: %s", e)
            self._proc.join(timeout=30)
        self._kill()
        return self._final_stats or {}

    # ---- the pipe --------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send([msg])
        except (OSError, ValueError) as e:  # the child is gone: the reader fails what was in flight
            raise EngineUnavailable("the engine process exited") from e

    def _call(self, method: str, *args) -> Future:
        call_id, future = self._calls.new()
        self._send(("call", call_id, method, args))
        return future

    def _read_loop(self) -> None:
        try:
            while True:
                for msg in self._conn.recv():
                    self._handle(msg)
        except (EOFError, OSError):
            pass
        finally:
            self._gone()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            out: RequestOutput = msg[1]
            self._deliver(out.request_id, out, out.finished)
        elif kind == "metric":
            self.metrics.record(msg[1], msg[2], **msg[3])
        elif kind == "reject":
            self._deliver(msg[1], _exception(msg[2]), True)
        elif kind == "status":
            self._status = (msg[1], msg[2])
        elif kind == "reply":
            self._calls.reply(*msg[1:])
        elif kind == "call":  # the child forms its shard group: gather the shards
            try:
                self._send(("reply", msg[1], self._rendezvous(), None))
            except Exception as e:  # noqa: BLE001 - the child's group forming fails with it
                self._send(("reply", msg[1], None, f"{type(e).__name__}: {e}"))
        elif kind == "ready":
            self._status = (True, None)
            self._ready.set_result(msg[1])
        elif kind == "fatal":
            self._ready.set_exception(RuntimeError(f"the engine process failed to start:\n{msg[1]}"))

    def _deliver(self, request_id: str, item, last: bool) -> None:
        sink = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if sink is None:
            return
        try:
            sink(item)
        except Exception:  # a client that went away must not stop the reader
            log.exception("output sink failed for %s", request_id)
            if not last:
                self.abort(request_id)

    def _gone(self) -> None:
        """The child exited: nothing in flight may hang."""
        self._status = (False, "the engine process exited")
        if not self._ready.done():
            self._proc.join(timeout=5)  # its exit code, for the message
            self._ready.set_exception(RuntimeError(f"the engine process exited during start-up "
                                                   f"(exit code {self._proc.exitcode})"))
        self._calls.fail_all("the engine process exited")
        for request_id in list(self._sinks):
            self._deliver(request_id, RequestOutput(request_id, [], "", True, "error", "the engine process exited"),
                          True)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._conn.close()
        self._reader.join(timeout=10)


def _child_main(conn, config: EngineConfig, sharded: bool, metrics_on: bool, per_layer_expert_metrics: bool) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(format="%(name)s: %(message)s")  # on the replica's stderr, which Ray forwards
    logging.getLogger("m1serve").setLevel(logging.INFO)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    calls = _Calls()
    engine: Engine | None = None
    stopped = threading.Event()

    def send_loop() -> None:
        status = None
        while not stopped.is_set():
            try:
                batch = [outbox.get(timeout=STATUS_PERIOD_S)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            if engine is not None and (engine.healthy, engine.error) != status:
                status = (engine.healthy, engine.error)
                batch.append(("status", *status))
            if batch:
                try:
                    conn.send(batch)
                except OSError:
                    return  # the parent is gone: the receiver sees it too

    def rendezvous() -> tuple[str, int]:
        call_id, future = calls.new()
        outbox.put(("call", call_id, "rendezvous"))
        return tuple(future.result(timeout=60))

    def shutdown(call_id: int, drain_timeout_s: float) -> None:
        engine.shutdown(drain_timeout_s)
        outbox.put(("reply", call_id, engine.stats(), None))
        _flush_and_exit(outbox, stopped, sender, conn, 0)

    def receive_loop() -> None:
        while True:
            try:
                msgs = conn.recv()
            except (EOFError, OSError):
                return  # the parent closed the pipe (or exited)
            for msg in msgs:
                kind = msg[0]
                if kind == "submit":
                    _, prompt, params, request_id = msg
                    try:
                        engine.submit(prompt, params, request_id, sink=lambda out: outbox.put(("out", out)))
                    except Exception as e:  # noqa: BLE001 - the client's error, or the engine's: answered either way
                        outbox.put(("reject", request_id, _error(e)))
                elif kind == "abort":
                    engine.abort(msg[1])
                elif kind == "reply":
                    calls.reply(*msg[1:])
                elif kind == "call" and msg[2] == "stats":
                    outbox.put(("reply", msg[1], engine.stats(), None))
                elif kind == "call" and msg[2] == "shutdown":  # drains for a while: the pipe is read meanwhile
                    threading.Thread(target=shutdown, args=(msg[1], *msg[3]), daemon=True).start()

    sender = threading.Thread(target=send_loop, name="m1serve-engine-sender", daemon=True)
    sender.start()
    receiver = threading.Thread(target=receive_loop, name="m1serve-engine-receiver", daemon=True)
    receiver.start()  # replies to the rendezvous calls arrive while the engine is built
    try:
        metrics = Metrics("forward", per_layer_experts=per_layer_expert_metrics, forward=outbox.put) \
            if metrics_on else None
        engine = Engine(config, metrics=metrics, rendezvous=rendezvous if sharded else None)
        # The model, Triton's compiled kernels and the warm-up leave ~10^5-10^6 long-lived objects, and a full
        # collection walks them all (180 ms with the tiny model on CPU) in the middle of a step; frozen, they are
        # skipped. Not measured on GPU yet.
        gc.freeze()
        outbox.put(("ready", engine.warmup_s))
    except BaseException:
        outbox.put(("fatal", traceback.format_exc()))
        _flush_and_exit(outbox, stopped, sender, conn, 1)
    receiver.join()  # ends when the parent closes the pipe without a shutdown call
    engine.shutdown()
    _flush_and_exit(outbox, stopped, sender, conn, 0)


def _flush_and_exit(outbox, stopped, sender, conn, code: int) -> None:
    stopped.set()
    sender.join(timeout=5)
    try:
        rest = []
        while True:
            rest.append(outbox.get_nowait())
    except queue.Empty:
        pass
    try:
        if rest:
            conn.send(rest)
    except OSError:
        pass
    os._exit(code)
