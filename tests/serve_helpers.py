"""Starting `m1serve serve` as a subprocess for end-to-end tests, and poking at its processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from cluster.ingress import free_port  # noqa: F401  (the tests import it from here)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"m1serve serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("server did not become healthy")


class Server:
    def __init__(self, proc: subprocess.Popen, http: int, grpc: int, metrics: int, model: str, log_path: Path):
        self.proc, self.model, self.log_path = proc, model, log_path
        self.url, self.grpc, self.metrics_url = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", \
            f"http://127.0.0.1:{metrics}/metrics"

    def metric(self, name: str, label: str = "") -> float:
        """Sum of a metric over its label sets (those containing `label`, e.g. 'finish_reason="abort"'), from Ray's
        metrics export (NaN if absent)."""
        text = httpx.get(self.metrics_url, timeout=10).text
        values = [float(m.group(2)) for m in re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
                  if label in (m.group(1) or "")]
        return sum(values) if values else float("nan")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


RAY_START_TIMEOUT = "The current node timed out during startup"  # Ray's fixed 30 s wait for its raylet


@contextmanager
def running_server(model: Path, log_dir: Path, *extra: str, env: dict | None = None, shards: int = 2):
    """The server, healthy. Started a second time only if Ray itself failed to start its node in time (seen on the
    2-core CI machine right after another test's Ray cluster went down); any other exit fails at once."""
    for attempt in range(2):
        http, grpc_port, metrics = free_port(), free_port(), free_port()
        log_path = log_dir / f"serve-{attempt}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model), "--expert-shards", str(shards),
             "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_metrics_report_interval_ms": "1000", **(env or {})})
        server = Server(proc, http, grpc_port, metrics, model.name, log_path)
        try:
            wait_healthy(server.url, proc)
            break
        except AssertionError:
            log.close()
            if attempt == 0 and proc.poll() is not None and RAY_START_TIMEOUT in server.log_tail(20000):
                print(server.log_tail())
                continue
            _stop(proc)
            print(server.log_tail())
            raise
    try:
        yield server
    finally:
        _stop(proc)
        log.close()
        print(server.log_tail())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def replica_pids(deployment: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:m1serve:{deployment}"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def replica_pid(deployment: str) -> int:
    pids = replica_pids(deployment)
    assert len(pids) == 1, (deployment, pids)
    return pids[0]


def engine_pid(router_pid: int) -> int:
    """The Router replica's engine process (its multiprocessing spawn child; the other child is the resource
    tracker)."""
    out = subprocess.run(["pgrep", "-P", str(router_pid), "-f", "spawn_main"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 1, (router_pid, pids)
    return pids[0]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
