"""The same app on an existing multi-node Ray cluster: a head and a worker node on this machine, the expert shards
placed on the worker through a custom resource, `m1serve serve --address` deploying onto it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import pytest

from serve_helpers import free_port, wait_healthy

pytestmark = pytest.mark.slow

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}


def ray_cli(*args: str) -> None:
    subprocess.run(["ray", *args], env=ENV, check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_cli("start", "--head", "--port", str(port), "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
            "--include-dashboard", "false", "--disable-usage-stats")
    try:
        ray_cli("start", "--address", address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                "--resources", json.dumps({"m1serve_shard": 4}))
        yield address
    finally:
        subprocess.run(["ray", "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def placement(address: str) -> dict:
    """Node of each shard replica and the head node's id, asked from a separate Ray driver."""
    script = textwrap.dedent(f"""
        import json, ray
        from ray import serve
        ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
        head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
        shards = [serve.get_deployment_handle(f"ExpertShard{{i}}", app_name="m1serve").status.remote().result()
                  for i in range(2)]
        print("PLACEMENT" + json.dumps({{"head": head[0], "shards": shards}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("PLACEMENT")]
    assert line, out.stderr[-3000:]
    return json.loads(line[0][len("PLACEMENT"):])


def test_serve_on_existing_cluster_places_shards_on_the_worker(cluster, tiny_model, tmp_path):
    http, grpc_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--address", cluster, "--model", str(tiny_model),
         "--expert-shards", "2", "--shard-resource", "m1serve_shard=1", "--replica-env", "GLOO_SOCKET_IFNAME=lo",
         "--http-port", str(http), "--grpc-port", str(grpc_port)],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(url, proc)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": tiny_model.name, "prompt": "Hello", "max_tokens": 5, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        where = placement(cluster)
        assert [s["experts"] for s in where["shards"]] == [[0, 4], [4, 8]]
        assert all(s["node_id"] != where["head"] and s["in_group"] for s in where["shards"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.seek(0)
            print(log.read()[-4000:])
