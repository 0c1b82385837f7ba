"""bench/gpu_cluster.py on CPU, tiny dims: the engine phase and the transformers baseline (hf phase) on the same
checkpoint and prompts, and the report that sets them side by side. The engine runs one shard plus the router's own
share of the experts (--router-experts), the topology that uses every GPU of a 4-GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

CONC, PROMPT, TOKENS = 3, 64, 6


@pytest.mark.slow
def test_engine_and_transformers_phases_on_cpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_cluster.py"), "--out", str(out), "--work", str(tmp_path / "w"),
           "--model", str(tmp_path / "ckpt"), "--device", "cpu", "--tiny", "--layers", "4", "--vocab", "512",
           "--shards", "1", "--router-experts", "--concurrency", str(CONC), "--prompt-len", str(PROMPT), "--engine-tokens", str(TOKENS),
           "--hf-max-tokens", str(TOKENS), "--phases", "ckpt,engine,graphs,hf", "--deadline-s", "500"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu-cluster.json").read_text())
    assert all(data["phases"][p].startswith("ok") for p in ("ckpt", "engine", "graphs", "hf")), data["phases"]

    hf = data["hf"]
    assert "error" not in hf, hf["error"]
    assert hf["transformers"] == transformers.__version__
    assert hf["rope"].startswith("first 16 of 32 dims")
    rows = {r["concurrency"]: r for r in hf["rows"]}
    assert set(rows) == {1, CONC}
    engine_rows = {r["concurrency"]: r for r in data["engine"]["rows"]}
    graph_rows = {r["concurrency"]: r for r in data["graphs"]["rows"]}  # fixed-size decode steps (eager on CPU)
    assert set(graph_rows) == {1, CONC}
    for c, r in rows.items():
        assert "error" not in r, r["error"]
        assert r["generated_tokens"] == c * TOKENS
        assert r["prompt_len"] == PROMPT
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["output_tok_s"] > 0
        # same prompts, same weights, fp32 on both sides, MiniMax's partial RoPE: the same greedy tokens
        assert r["tokens_head"] == engine_rows[c]["tokens_head"] == graph_rows[c]["tokens_head"]
        assert len(r["tokens_head"]) == min(c, 4) and all(len(t) == TOKENS for t in r["tokens_head"])

    md = (out / "gpu-cluster.md").read_text()
    assert "## transformers generate" in md and "engine / transformers decode" in md
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {CONC} | {PROMPT} | {TOKENS} |") and "x**" in ln)
    ratio = engine_rows[CONC]["decode_tok_s"] / rows[CONC]["decode_tok_s"]
    assert f"**{ratio:.1f}x**" in line and f"| {TOKENS} of {TOKENS} |" in line
    graph_ratio = graph_rows[CONC]["decode_tok_s"] / rows[CONC]["decode_tok_s"]
    assert line.endswith(f"**{graph_ratio:.1f}x** |")
    assert "## Engine in-process with CUDA-graph decode steps" in md
    assert "the router holds a share of the experts too (--router-experts: 2 equal shares)" in md


@pytest.mark.slow
def test_dispatch_phase_on_cpu(tmp_path):
    """The dispatch phase over gloo, tiny dims: ours (padded where the engine pads) and raw all_to_all_single per size
    and layer count, each answer checked (echo shards: the sum is the input times the shards a token went to), and the
    report's table (no peer links on CPU: every size on the rings)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_cluster.py"), "--out", str(out), "--work", str(tmp_path / "w"),
           "--model", str(tmp_path / "none"), "--device", "cpu", "--tiny", "--layers", "2", "--shards", "2",
           "--dispatch-layers", "3", "--phases", "dispatch", "--deadline-s", "300"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu-cluster.json").read_text())
    rows = data["dispatch"]["rows"]
    assert {(r["layers_per_step"], r["tokens"]) for r in rows} == {(n, t) for n in (2, 3) for t in (1, 8, 64, 256)}
    for r in rows:
        assert r["ours_right"] is True and r["ours_plain_right"] is True, r
        assert r["ours_ms"] > 0 and r["raw_exact_ms"] > 0
        assert r["ratio_exact"] == pytest.approx(r["ours_ms"] / r["raw_exact_ms"])
        assert r["direct"] is False and "ring_ms" not in r
    md = (out / "gpu-cluster.md").read_text()
    assert "## Dispatch: RouterDispatcher protocol vs raw all_to_all_single, 3 ranks" in md
    assert sum(1 for ln in md.splitlines() if ln.startswith("| 3 | 64 |") and "| yes |" in ln) == 1


def _bench():
    """bench/gpu_cluster.py as a module, without putting bench/ on sys.path (its kernels.py would shadow the kernels
    package in every process spawned later in the session)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_cluster", ROOT / "bench" / "gpu_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_floor_counts_the_checkpoints_weights_and_flops():
    from model_shards.tiny import random_weights, tiny_config

    g = _bench()
    cfg = tiny_config(num_layers=4)
    weights = random_weights(cfg)
    shards = 2  # expert holders, equal shares
    held = cfg.num_local_experts // shards
    # bandwidth-bound (GEMMs free): every router projection, one holder's experts and the LM head read once, bf16
    router = sum(t.numel() for k, t in weights.items() if ".self_attn." in k and not k.endswith("norm.weight"))
    experts = sum(t.numel() for k, t in weights.items()
                  if any(f".experts.{e}." in k for e in range(held)))
    lm_head = weights["lm_head.weight"].numel()
    floor = g.prefill_floor_ms(cfg, {"copy_TBps": 1e-9, "gemm_TFLOPs": 1e12}, shards, seqs=3, prompt_len=50)
    assert floor["total_ms"] == pytest.approx(2 * (router + experts + lm_head), rel=1e-9)  # 1e3 B/s, in ms
    # GEMM-bound (bytes free): the flops are linear in the prompts at a fixed length (softmax's L^2 is per prompt)
    gemm = {"copy_TBps": 1e12, "gemm_TFLOPs": 1e-9}
    one, four = (g.prefill_floor_ms(cfg, gemm, shards, s, 50)["total_ms"] for s in (1, 4))
    assert four == pytest.approx(4 * one, rel=1e-9)
    # ... and the experts' share halves with twice the holders
    e2, e4 = (g.prefill_floor_ms(cfg, gemm, s, 4, 50)["experts_ms"] for s in (2, 4))
    assert e4 == pytest.approx(e2 / 2, rel=1e-9)
    # the serve workload: the prefill, then one decode step per output token after the first
    serve = g.serve_floor(cfg, gemm, shards, 4, 50, 9)
    step = g.decode_floor_ms(cfg, gemm, shards, 4, 54)["total_ms"]
    assert serve["wall_s"] == pytest.approx((four + 8 * step) / 1e3, rel=1e-9)
    assert serve["output_tok_s"] == pytest.approx(36 / serve["wall_s"])


def test_step_seconds_sums_ray_label_sets_and_reads_bucket_quantiles():
    g = _bench()

    def family(replica, kind, counts, total):
        les = ["0.005", "0.01", "0.1", "+Inf"]
        lines = [f'ray_m1serve_engine_step_seconds_bucket{{kind="{kind}",le="{le}",replica="{replica}"}} {c}'
                 for le, c in zip(les, counts)]
        return lines + [f'ray_m1serve_engine_step_seconds_count{{kind="{kind}",replica="{replica}"}} {counts[-1]}',
                        f'ray_m1serve_engine_step_seconds_sum{{kind="{kind}",replica="{replica}"}} {total}']

    text = "\n".join(family("a", "ahead", [6, 9, 10, 10], 0.05) + family("b", "ahead", [4, 4, 10, 10], 0.5)
                     + family("a", "prefill", [0, 0, 0, 2], 0.4)
                     + ['ray_m1serve_generation_tokens_total{replica="a"} 99', "# HELP x y"])
    steps = g.step_seconds(text)
    assert set(steps) == {"ahead", "prefill"}
    assert steps["ahead"]["steps"] == 20 and steps["ahead"]["mean_ms"] == pytest.approx(27.5)
    assert steps["ahead"]["p50_ms_le"] == 5.0 and steps["ahead"]["p90_ms_le"] == 100.0  # cumulative 10, 13, 20
    assert steps["prefill"]["steps"] == 2 and steps["prefill"]["p50_ms_le"] == float("inf")


def test_counter_total_sums_label_sets_of_that_counter_only():
    g = _bench()
    text = "\n".join(['ray_m1serve_generation_tokens_total{replica="a"} 100.0',
                      'ray_m1serve_generation_tokens_total{replica="b",model="x"} 28',
                      "ray_m1serve_generation_tokens_created 5", 'ray_m1serve_prompt_tokens_total{replica="a"} 7'])
    assert g.counter_total(text, "ray_m1serve_generation_tokens") == 128.0
    assert g.counter_total(text, "ray_m1serve_missing") == 0


def test_kernel_builds_picks_the_build_lines_of_any_process():
    g = _bench()
    text = "\n".join(["m1serve.engine: warm-up done in 12.0 s",
                      "(ServeReplica:m1serve:ExpertShard_1 pid=7) m1serve.deployments: triton kernel built in 812 ms: "
                      "_grouped_kernel[num_warps=8](x: *bf16)",
                      "m1serve.engine: triton kernel built in 3 ms: _combine_kernel[num_warps=4](K: 2)"])
    assert g.kernel_builds(text) == ["triton kernel built in 812 ms: _grouped_kernel[num_warps=8](x: *bf16)",
                                     "triton kernel built in 3 ms: _combine_kernel[num_warps=4](K: 2)"]
    assert g.kernel_builds("m1serve.engine: warm-up done in 12.0 s") == []


def test_served_vs_hf_matches_the_same_workload_only():
    g = _bench()
    served = {"ok": 64, "concurrency": 64, "prompt_len": 1024, "max_tokens": 256, "output_tok_s": 7000.0}
    rows = [{"concurrency": 1, "prompt_len": 1024, "max_tokens": 256, "output_tok_s": 14.0},
            {"concurrency": 64, "prompt_len": 1024, "max_tokens": 64, "output_tok_s": 300.0},
            {"concurrency": 64, "prompt_len": 1024, "max_tokens": 256, "output_tok_s": 350.0}]
    assert g.served_vs_hf(served, rows) == {"served": 7000.0, "hf": 350.0, "ratio": 20.0}
    assert g.served_vs_hf(served, rows[:2]) is None
    assert g.served_vs_hf(served | {"ok": 63}, rows) is None  # a failed stream: no claim


def test_workload_from_several_client_processes_sends_every_stream_once():
    """The serve phase's client spread over processes: every stream is sent once, their tokens and times are merged
    into one summary, and the busiest client process's CPU share is reported (against a local SSE server that
    answers each request with `max_tokens` one-token events)."""
    import asyncio
    import threading

    from aiohttp import web

    g = _bench()
    prompts = []

    async def completions(request):
        body = await request.json()
        prompts.append(tuple(body["prompt"]))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await resp.write(b'data: {"choices": [{"text": "x", "token_ids": [%d]}]}\n\n' % i)
            await asyncio.sleep(0.002)
        await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % body["max_tokens"])
        await resp.write(b"data: [DONE]\n\n")
        return resp

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        got = g._workload(port, "m", 7, 16, 5, 1000, 0, client_procs=3)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    assert len(prompts) == 7 and len(set(prompts)) == 7  # each stream sent once, by exactly one process
    assert got["client_procs"] == 3 and got["ok"] == 7 and got["errors"] == []
    assert got["output_tokens"] == 35
    assert got["wall_s"] >= 5 * 0.002 and got["output_tok_s"] == pytest.approx(35 / got["wall_s"])
    assert got["ttft_ms"]["n"] == 7 and got["itl_ms"]["n"] == 7 * 4
    assert 0 < got["client_cpu_busy"] < 2


def test_report_renders_a_gpu_runs_phases_again(tmp_path):
    """A checked-in GPU run's phase results, re-rendered: the same markdown, with the LM-head comparison (env phase)
    and the profiled decode level (graphs phase, --trace) that only a GPU run produces."""
    g = _bench()
    run = json.loads((ROOT / "bench" / "results" / "gpu-cluster-h200x4-2026-11-28-lm-head-first-run.json").read_text())
    work = tmp_path / "w"
    work.mkdir()
    (tmp_path / "out").mkdir()
    for name in g.PHASES:
        if run[name] is not None:
            (work / f"{name}.json").write_text(json.dumps(run[name]))
    argv = run["markdown"].split("`python3 bench/gpu_cluster.py ", 1)[1].split("`", 1)[0].split()
    args = g.build_parser().parse_args(argv + ["--work", str(work), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "no")])
    args.argv = argv
    md = g.report(args, run["phases"])["markdown"]
    lm = run["env"]["lm_head"]
    assert f"= **{lm['fp32_ms'] / lm['split_bf16_ms']:.2f}x** (floor" in md
    assert "same argmax: True / True" in md
    decode = run["graphs"]["prefill_kernels"]["decode"]
    assert f"{decode['decode_steps']} decode steps at {decode['decode_ms_per_step_wall']:.2f} ms/step wall" in md
    assert "| kernel (decode level) | ms | launches |" in md
    served = run["serve"]["workload"]["output_tok_s"]
    assert f"{served:.1f}" in md


def test_host_timers_count_the_engine_threads_host_work_and_undo_themselves(tiny_ckpt):
    from cluster.engine.engine import Engine, EngineConfig
    from model_shards.batch import ForwardBatch

    g = _bench()
    build = ForwardBatch.__dict__["build"]
    host: dict = {}
    with Engine(EngineConfig(model=str(tiny_ckpt.path), max_num_seqs=4, max_model_len=64, warmup=False)) as engine:
        with g._host_timers(engine, host):
            row = g.run_level(engine, 3, 16, 4)
        assert "schedule" not in vars(engine.scheduler) and "_append" not in vars(engine)
        assert ForwardBatch.__dict__["build"] is build
        steps = row["prefill_steps"] + row["decode_steps"]
        assert host["token_processing_calls"] == 3 * 4  # every sampled token, each once
        assert host["batch_build_calls"] == steps and host["schedule_calls"] >= steps
        assert all(host[k] > 0 for k in ("schedule", "batch_build", "token_processing"))
        g.run_level(engine, 1, 8, 2)  # unpatched again: nothing more is counted
    assert host["token_processing_calls"] == 12
    assert "processing the sampled tokens" in g._host_line(host) and "in 12 calls" in g._host_line(host)


def test_working_tree_hash_names_the_files_not_the_head(tmp_path):
    """The env phase's `tree`: the commit's tree hash when the files are that commit's, another one as soon as a
    tracked file changes or an untracked one appears, whatever HEAD says."""
    g = _bench()

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("out/\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.json").write_text("{}")  # ignored: not part of the run's files
    assert g.working_tree_hash(tmp_path) == git("rev-parse", "HEAD^{tree}")
    (tmp_path / "a.py").write_text("x = 2\n")
    changed = g.working_tree_hash(tmp_path)
    assert changed not in (None, git("rev-parse", "HEAD^{tree}"))
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("")
    assert g.working_tree_hash(tmp_path) not in (None, changed, git("rev-parse", "HEAD^{tree}"))
    assert git("status", "--porcelain") == "?? b.py"  # the real index is untouched
