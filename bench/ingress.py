"""The ingress alone: `m1serve serve --ingress haproxy` vs `--ingress proxy` on the tiny checkpoint (CPU is fine).

For each ingress, one server (bench/gpu_cluster.py's, 2 expert shards), then:
  requests  GET /v1/models (no engine work): ms per request one after another, and with 200 in flight
  cancels   gRPC GenerateStream calls cancelled after 2 messages, each followed by a 1-token Generate on a server
            with one sequence slot: a cancel that never reaches the engine holds the slot until the request
            timeout (5 s), so that Generate waits. Counts the cancels that were lost.

    python bench/ingress.py --out bench/results [--cancels 30]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_cluster import _server, build_parser  # noqa: E402

REQUEST_TIMEOUT_S = 5


async def per_request_ms(url: str, n: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one():
            async with session.get(url) as r:
                assert r.status == 200, r.status
                await r.read()

        await one()
        t0 = time.perf_counter()
        for _ in range(n):
            await one()
        serial = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        concurrent = (time.perf_counter() - t0) / n
    return {"serial_ms": serial * 1e3, "concurrent_ms": concurrent * 1e3}


def lost_cancels(target: str, n: int) -> dict:
    import grpc

    from cluster.api import m1serve_pb2 as pb
    from cluster.api import m1serve_pb2_grpc as pb_grpc

    waits = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.M1ServeStub(channel)
        for _ in range(n):
            call = stub.GenerateStream(pb.GenerateRequest(text="a", max_tokens=2000, ignore_eos=True), timeout=60)
            for i, _ in enumerate(call):
                if i == 2:
                    call.cancel()
                    break
            t0 = time.monotonic()
            stub.Generate(pb.GenerateRequest(text="a", max_tokens=1), timeout=60)
            waits.append(time.monotonic() - t0)
    return {"cancels": n, "lost": sum(w > REQUEST_TIMEOUT_S / 2 for w in waits),
            "next_request_s": [round(w, 2) for w in waits]}


def run(ingress: str, args, cancels: int) -> dict:
    result = {}
    with _server(args, ingress, f"m1serve-{ingress}.log", result, ("--request-timeout-s", str(REQUEST_TIMEOUT_S))):
        result["requests"] = asyncio.run(per_request_ms(f"http://127.0.0.1:{args.http_port}/v1/models", 200))
        result["grpc"] = lost_cancels(f"127.0.0.1:{args.grpc_port}", cancels)
    print(f"[{ingress}] {json.dumps({k: result[k] for k in ('requests', 'grpc')})}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--work", default="/tmp/m1serve-ingress-bench")
    p.add_argument("--cancels", type=int, default=30)
    own = p.parse_args()
    Path(own.work).mkdir(parents=True, exist_ok=True)
    Path(own.out).mkdir(parents=True, exist_ok=True)
    from cluster.cli import default_model_dir
    from cluster.ingress import free_port

    # the tiny demo checkpoint, one sequence slot (--concurrency 1), room for the cancelled streams' 2000 tokens
    args = build_parser().parse_args([
        "--out", own.work, "--work", own.work, "--device", "cpu", "--shards", "2", "--concurrency", "1",
        "--prompt-len", "16", "--serve-tokens", "2100", "--long-tokens", "16", "--serve-long", "",
        "--model", str(default_model_dir()), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
        "--metrics-port", str(free_port())])
    results = {name: run(name, args, own.cancels) for name in ("haproxy", "proxy")}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    date = dt.date.today().isoformat()
    lines = [f"# Ingress: HAProxy vs Ray Serve's Python proxy ({date})\n",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; commit: `{commit}`",
             "- command: `python bench/ingress.py`; the tiny demo checkpoint, 2 expert shards (gloo), one server per "
             "ingress\n",
             "| ingress | GET /v1/models, one at a time, ms per request | 200 in flight, ms per request | gRPC cancels "
             "lost |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        q, g = r["requests"], r["grpc"]
        lines.append(f"| {name} | {q['serial_ms']:.2f} | {q['concurrent_ms']:.2f} | {g['lost']} of {g['cancels']} |")
    out = Path(own.out, f"ingress-cpu-{date}.md")
    out.write_text("\n".join(lines) + "\n")
    Path(own.out, f"ingress-cpu-{date}.json").write_text(json.dumps(
        {"commit": commit, "date": date, **results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
