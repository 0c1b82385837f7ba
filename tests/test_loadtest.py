"""The locust load test (loadtest/): its profiles and summary (fast), and a ~20 s run against `m1serve serve` on the
tiny checkpoint (slow): HTTP streaming chat and gRPC GenerateStream users, no failures, per-transport
ttft/itl/e2e entries, and the output tokens locust counted equal to the server's ray_m1serve_generation_tokens_total
(the server serves nothing but the load test).

Locust runs in its own process (`python -m loadtest.run` starts `python -m locust`): locust's gevent monkey-patching
breaks when requests or ray are imported first, as they are in this pytest process."""

from __future__ import annotations

import importlib.util

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtest import run as lt_run
from loadtest.workload import PROFILES_DIR, Profile, ProfileError
from serve_helpers import running_server

ROOT = Path(__file__).resolve().parents[1]
DURATION_S = 20
USERS = 6  # 3 HTTP + 3 gRPC


# ---- fast: profiles and the summary -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
def test_shipped_profiles_draw_valid_requests(name):
    import random

    profile = Profile.load(name)
    rng = random.Random(0)
    seen = {}
    for _ in range(200):
        req = profile.draw(rng)
        seen[req.scenario] = req
        body = req.chat_body("m")
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["model"] == "m"
        assert body["messages"][-1]["role"] == "user" and body["max_tokens"] >= 1
        assert req.text().endswith("assistant:")
    assert set(seen) == {s.name for s in profile.scenarios} == {"short_chat", "long_context", "tool_call"}
    tool = seen["tool_call"]
    assert tool.tools and "tools" in tool.chat_body("m") and "get_weather" in tool.text()
    assert any(m.get("tool_calls") for m in tool.messages) and any(m["role"] == "tool" for m in tool.messages)
    # unique prefixes: no two prompts alike
    a, b = profile.draw(rng), profile.draw(rng)
    assert a.messages[-1]["content"] != b.messages[-1]["content"]


def test_profile_errors_name_the_problem(tmp_path):
    bad = {"scenarios": [{"name": "x", "max_tokens": [5, 2]}]}
    with pytest.raises(ProfileError, match="x.max_tokens"):
        Profile.from_dict("p", bad)
    with pytest.raises(ProfileError, match="unknown keys"):
        Profile.from_dict("p", {"scenarios": [{"name": "x", "max_token": 3}]})
    with pytest.raises(ProfileError, match="no profile"):
        Profile.load(tmp_path / "missing")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"defaults": {"max_tokens": 3}, "scenarios": [{"name": "a", "prompt_words": 2}]}))
    req = Profile.load(path).draw(__import__("random").Random(1))
    assert req.max_tokens == 3 and req.ignore_eos and req.extra_body == {"return_token_ids": True}


def test_run_summary_and_exit_status(tmp_path):
    assert lt_run.parse_timespan("20s") == 20 and lt_run.parse_timespan("1h2m3s") == 3723
    assert lt_run.parse_timespan("90") == 90
    header = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
              "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
              "99.99%,100%\n")

    def row(t, name, n, failed):
        return f"{t},{name},{n},{failed},10,10,1,20,0,1,0,10,11,12,13,14,15,16,17,18,19,20\n"

    (tmp_path / "locust_stats.csv").write_text(
        header + row("http", "e2e", 4, 1) + row("http", "ttft", 3, 0) + row("http", "itl", 9, 0)
        + row("", "Aggregated", 16, 1))
    (tmp_path / "locust_exceptions.csv").write_text("Count,Message,Traceback,Nodes\n")
    s = lt_run.summarize(tmp_path, 1, ["http"])
    assert not s["ok"] and s["failures"] == 1 and s["transports"]["http"]["requests"] == 4
    assert s["transports"]["http"]["itl_ms"] == {"count": 9, "p50": 10.0, "p90": 14.0, "p99": 17.0}
    assert any("results.json" in p for p in s["problems"])
    (tmp_path / "locust_stats.csv").write_text(header + row("http", "e2e", 4, 0) + row("", "Aggregated", 4, 0))
    (tmp_path / "results.json").write_text(json.dumps({"duration_s": 2.0, "total": {"output_tokens_per_s": 8.0},
                                                       "transports": {"http": {"requests": 4, "failures": 0,
                                                                               "output_tokens": 16,
                                                                               "output_tokens_per_s": 8.0,
                                                                               "ttft_ms": {"count": 4, "p50": 1.0,
                                                                                           "p90": 2.0,
                                                                                           "p99": 3.0}}}}))
    s = lt_run.summarize(tmp_path, 0, ["http"])
    assert s["ok"] and s["output_tokens"] == 16 and s["transports"]["http"]["ttft_ms"]["p99"] == 3.0
    assert not lt_run.summarize(tmp_path, 0, ["http", "grpc"])["ok"]  # no gRPC request finished


# ---- slow: a real run ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    # never import locust here: it monkey-patches with gevent and deadlocks this (threaded) process
    assert importlib.util.find_spec("locust"), "the load test needs locust (pip install locust)"
    with running_server(tiny_model, tmp_path_factory.mktemp("serve")) as s:
        yield {"url": s.url, "grpc": s.grpc, "metrics": s.metrics_url, "model": s.model}


def generation_tokens(metrics_url: str) -> float:
    """ray_m1serve_generation_tokens_total summed over its label sets (one per replica/worker)."""
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_m1serve_generation_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_locust_http_and_grpc_streams_match_server_token_count(server, tmp_path):
    out = tmp_path / "loadtest"
    before = generation_tokens(server["metrics"])
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", server["url"], "--grpc-target", server["grpc"],
         "--users", str(USERS), "--duration", f"{DURATION_S}s", "--profile", "smoke", "--stop-timeout", "60",
         "--out", str(out), "--", "--profile-seed", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=DURATION_S + 60 + 90)
    elapsed = time.monotonic() - t0
    print(run.stdout[-6000:], run.stderr[-3000:], f"load test took {elapsed:.1f}s", sep="\n")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASS" in run.stdout and "ttft p50/p90/p99" in run.stdout

    # locust's CSV: ttft, itl and e2e entries for both transports, no failures anywhere
    with (out / "locust_stats.csv").open(newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for transport in ("http", "grpc"):
        for name in ("ttft", "itl", "tpot", "e2e"):
            row = rows[(transport, name)]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, (transport, name, row)
        # one ttft per request; n - 1 ITL entries per request of n tokens
        assert rows[(transport, "ttft")]["Request Count"] == rows[(transport, "e2e")]["Request Count"]
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    with (out / "locust_failures.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == []
    assert (out / "report.html").stat().st_size > 10_000

    summary = json.loads((out / "summary.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert summary["ok"] and summary["failures"] == 0 and summary["exceptions"] == 0
    assert results["profile"] == "smoke" and results["model"] == server["model"]
    locust_tokens = 0
    for transport in ("http", "grpc"):
        t = results["transports"][transport]
        assert t["requests"] >= 3 and t["failures"] == 0, t
        # usage.completion_tokens == the token ids the stream delivered; smoke uses ignore_eos
        assert t["output_tokens"] == t["streamed_tokens"] > 0, t
        assert t["itl_ms"]["count"] == t["output_tokens"] - t["requests"], t
        assert t["output_tokens_per_s"] > 0 and t["ttft_ms"]["p50"] > 0
        assert int(rows[(transport, "itl")]["Request Count"]) == t["itl_ms"]["count"]
        locust_tokens += t["output_tokens"]
    drawn = {k.split("/")[1] for k in results["scenarios"]}
    assert drawn <= {"short_chat", "long_context", "tool_call"} and len(drawn) >= 2, drawn

    # the server's counter reaches exactly what locust counted (Ray exports metrics every second here)
    deadline, server_tokens = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        server_tokens = generation_tokens(server["metrics"]) - before
        if server_tokens == locust_tokens:
            break
        time.sleep(0.5)
    print(f"server counter matched after {time.monotonic() - deadline + 20:.1f}s: {server_tokens} tokens")
    time.sleep(1.5)  # and stays there: nothing was generated that locust did not see
    server_tokens = generation_tokens(server["metrics"]) - before
    assert server_tokens == locust_tokens, (server_tokens, locust_tokens)
