"""One-command GPU benchmark of the whole cluster (issue 11).

    python3 bench/gpu_cluster.py --out DIR                      # on a 3+ GPU machine (router GPU + 2 shard GPUs;
                                                                # --shards 1 on a 2-GPU machine)
    python3 bench/gpu_cluster.py --out DIR --device cpu --tiny  # the same phases on CPU (gloo), tiny dims

Phases, each in its own subprocess with a time cap (a hang or crash in one leaves the others' results); each
writes DIR/<phase>.json, and `report` assembles DIR/gpu-cluster.json + DIR/gpu-cluster.md:

  env       GPUs, versions; roofline inputs measured on GPU 0: device-to-device copy bandwidth, bf16 GEMM rate
  ckpt      bench/make_scaled_checkpoint.py: random MiniMax-M1 checkpoint at real per-layer dims, few layers,
            published layout, generated on the GPU (skipped when already there)
  dispatch  router <-> shards traffic alone, over NCCL (gloo on CPU): our RouterDispatcher/ShardWorker protocol vs
            raw all_to_all_single of the same bytes, per layer round trip, plus an alpha + bytes/bandwidth fit
  engine    the engine in-process (router on GPU 0, ProcessShardGroup shards on the next GPUs, NCCL) with
            EngineConfig(profile=True): decode tok/s at concurrency 1 and 64, ms/step per part, split into the
            prefill and the decode phase, attention split into lightning / softmax layers
  serve     `m1serve serve` (python3 -m cluster.cli serve: Ray Serve, router deployment on one GPU, one expert-shard
            deployment per GPU) + a fixed streaming workload over the OpenAI HTTP API: TTFT / ITL percentiles,
            output tokens/s, the Triton kernels built during the workload (from the server log); then the same
            workload from --client-procs client processes and from one again, with each run's busiest client
            process's CPU share (whether the client's own event parsing set the pace)
  ingress   the serve phase's first workload again, same prompts, through the other ingress (--ingress haproxy:
            HAProxy straight to the router replica's own HTTP server; proxy: Ray Serve's Python proxy actor)
  longctx   the engine in-process at one sequence with 8K / 32K / 128K-token prompts: decode ms/step per part
            (lightning layers' cost per token should stay flat; the softmax layer's grows)
  hf        the baseline: transformers' MiniMaxForCausalLM.generate on the same checkpoint (bf16, layers split over
            all visible GPUs), greedy, on the engine phase's prompts (concurrency 1 and --concurrency):
            TTFT, decode tok/s, output tok/s; the report sets them beside the engine's (last in the default order:
            loading 46 GB into transformers is the slowest start, and the other phases do not depend on it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("env", "ckpt", "dispatch", "engine", "graphs", "serve", "ingress", "longctx", "hf")
CAPS = {"env": 60, "ckpt": 180, "dispatch": 120, "engine": 150, "graphs": 150, "serve": 240, "ingress": 180,
        "longctx": 150, "hf": 240}
MIN_START = {"env": 10, "ckpt": 20, "dispatch": 20, "engine": 45, "graphs": 45, "serve": 70, "ingress": 70,
             "longctx": 45, "hf": 60}
TOKENS_HEAD = (4, 16)  # the first output tokens of the first sequences, recorded by engine and hf to compare
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def now() -> float:
    return time.perf_counter()


def save(args, name: str, data: dict) -> None:
    Path(args.work, f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))
    return v[i]


def percentiles(values, scale=1e3) -> dict:
    return {f"p{q}": (None if not values else pct(values, q) * scale) for q in (50, 90, 99)} | {
        "mean": (sum(values) / len(values) * scale) if values else None, "n": len(values)}


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# env
def phase_env(args) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": args.device,
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "date": dt.date.today().isoformat(), "env": {k: os.environ.get(k) for k in NCCL_SAFE}}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    # the device's copy of .git can be stale or missing: the caller names the commit it sent
    info["commit"] = os.environ.get("GPU_CLUSTER_COMMIT") or info["commit"]
    info["tree"] = working_tree_hash(REPO)
    for mod in ("triton", "ray", "safetensors", "tokenizers", "grpc", "google.protobuf", "fastapi", "pydantic",
                "prometheus_client", "llguidance", "aiohttp", "transformers", "jinja2"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[f"ver_{mod}"] = getattr(m, "__version__", "?")
        except Exception as e:
            info[f"ver_{mod}"] = f"missing ({type(e).__name__})"
    if args.device != "cuda":
        info.update(card="cpu", copy_TBps=None, gemm_TFLOPs=None)
        return info
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["gpu_mem_GiB"] = [torch.cuda.get_device_properties(i).total_memory / 2**30
                           for i in range(torch.cuda.device_count())]
    info["card"] = info["gpus"][0]
    try:
        info["nvidia_smi_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                                 timeout=20).stdout
    except Exception as e:
        info["nvidia_smi_topo"] = str(e)
    dev = torch.device("cuda", 0)
    a = torch.empty(2**30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(dev)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(20):
        b.copy_(a)
    ev[1].record()
    sync(dev)
    info["copy_TBps"] = 2 * a.numel() * 20 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    sync(dev)
    ev[0].record()
    for _ in range(10):
        x @ y
    ev[1].record()
    sync(dev)
    info["gemm_TFLOPs"] = 2 * 8192**3 * 10 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    info["lm_head"] = lm_head_check(args, dev, info["copy_TBps"])
    return info


def working_tree_hash(repo: Path) -> str | None:
    """Git's tree hash of the files as they are (tracked and untracked-not-ignored), through a scratch index: it
    equals `git rev-parse COMMIT^{tree}` exactly when the run's files are that commit's, whatever HEAD the copy of
    .git says (a stale one named the wrong commit on the GPU machines). None without git."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp, "index")))
        try:
            add = subprocess.run(["git", "add", "-A"], cwd=repo, env=env, capture_output=True, timeout=60)
            tree = subprocess.run(["git", "write-tree"], cwd=repo, env=env, capture_output=True, text=True,
                                  timeout=60)
        except Exception:
            return None
    return tree.stdout.strip() or None if add.returncode == tree.returncode == 0 else None


def lm_head_check(args, dev, copy_TBps: float, batch: int = 64, hidden: int = 6144) -> dict:
    """The fp32 LM head at the checkpoint's vocabulary, batch `batch`, side by side on one GPU: the fp32 GEMM on fp32
    weights (what the router ran before) vs router_part.fp32_logits on the bf16 weights (x in three bf16 pieces, one
    tensor-core GEMM with fp32 output), each timed over 50 back-to-back calls; and each one's error vs fp64."""
    import torch

    from model_shards.router_part import fp32_logits

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, hidden, device=dev, generator=g)
    w16 = (torch.randn(args.vocab, hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    w32 = w16.float()
    exact = x.double() @ w32.double().T
    out = {"batch": batch, "vocab": args.vocab, "hidden": hidden}
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for name, fn in (("fp32", lambda: x @ w32.T), ("split_bf16", lambda: fp32_logits(x, w16))):
        y = fn()
        out[f"{name}_rel_err"] = ((y.double() - exact).abs().max() / exact.abs().max()).item()
        out[f"{name}_same_argmax"] = bool(torch.equal(y.argmax(-1), exact.argmax(-1)))
        for _ in range(3):
            fn()
        ev[0].record()
        for _ in range(50):  # 805 MB of fp32 weights: far above L2, no flush needed
            fn()
        ev[1].record()
        sync(dev)
        out[f"{name}_ms"] = ev[0].elapsed_time(ev[1]) / 50
    out["floor_ms"] = args.vocab * hidden * 2 / (copy_TBps * 1e9)  # the bf16 weights read once
    return out


# ---------------------------------------------------------------------------------------------------------------
# ckpt
def phase_ckpt(args) -> dict:
    from bench.make_scaled_checkpoint import scaled_config, write_scaled_checkpoint
    from model_shards.checkpoint import INDEX_FILE

    path = Path(args.model)
    if (path / "config.json").exists() and (path / INDEX_FILE).exists() and (path / "tokenizer.json").exists():
        return {"path": str(path), "reused": True}
    cfg = scaled_config(args.layers, args.vocab, args.full_every, args.tiny)
    res = write_scaled_checkpoint(path, cfg, "cuda" if args.device == "cuda" else "cpu")
    res["reused"] = False
    return res


# ---------------------------------------------------------------------------------------------------------------
# dispatch: RouterDispatcher vs raw all_to_all_single
class _EchoExperts:
    """Shard-side stand-in for the experts [lo, hi): answers each token routed to them with its input, the others
    with zeros (as real experts do), so only the protocol is measured."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def forward(self, layer, x, ids, weights):
        import torch

        from kernels.peer_copy.reference import routed

        return torch.where(routed(ids, self.lo, self.hi)[:, None], x, 0)


def _dispatch_rank(rank, world, port, device, sizes, layer_counts, hidden, experts, top_k, result_path,
                   profile_at=None):
    import torch
    import torch.distributed as dist

    from cluster.dispatch import (LAYER_GRAPH_MAX_TOKENS, RouterDispatcher, ShardWorker, layer_graph_tokens,
                                  row_width)
    from cluster.peer_links import open_peer_links
    from cluster.step_graphs import StepGraphs
    from kernels.peer_copy.reference import routed

    for k, v in NCCL_SAFE.items():
        os.environ.setdefault(k, v)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=dt.timedelta(seconds=60),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    N = world - 1
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def time_steps(step, warm: int, steps: int, layers: int) -> tuple[float, float]:
        """warm + steps calls of step(): (host seconds, seconds) per layer over the last `steps` (host = the time to
        issue the work, no sync: near the total means the CPU sets the pace)."""
        for i in range(warm + steps):
            if i == warm:
                sync(dev)
                t0 = now()
            step()
        host = (now() - t0) / (steps * layers)
        sync(dev)
        return host, (now() - t0) / (steps * layers)

    width = row_width(hidden, dtype, top_k)
    eps = experts // N
    my_range = (0, 0) if rank == 0 else ((rank - 1) * eps, rank * eps)
    links = open_peer_links(rank, world, dev, dtype, hidden, width, my_range)  # None on CPU / without peer access
    rows_out = []
    with torch.inference_mode():
        for layers, T in [(n, T) for n in layer_counts for T in sizes]:
            steps = max(5, 800 // layers) if dev.type == "cuda" else 5
            gen = torch.Generator().manual_seed(T)  # same routing on every rank
            ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(T)]).to(dev)
            weights = torch.rand(T, top_k, generator=gen).to(dev)  # fp32, as the router's gate gives them
            h = torch.randn(T, hidden, generator=gen).to(dev, dtype)
            to_shard = [routed(ids, s * eps, (s + 1) * eps) for s in range(N)]  # [T] bool per shard
            routed_rows = [int(m.sum()) for m in to_shard]  # each shard's routed tokens
            graphable = T <= 256  # decode sizes: what the engine replays from graphs
            padded = T <= LAYER_GRAPH_MAX_TOKENS  # eager steps replay per-layer graphs (on CPU: their padded path)

            def run_ours(warm: int, steps: int, graphed: bool = False, layer_graphs: bool | None = None,
                         direct: bool = True):
                """warm + steps steps of `layers` MoE layers through our protocol (router: rank 0, echo shards);
                on the router, (host seconds, seconds) per layer over the last `steps`, and whether a last step's
                answers were right (one fewer token, so padded where it is replayed from graphs, new inputs at each
                layer). graphed: the steps' layers replayed from a CUDA graph on both sides (the engine's decode
                steps), the step header eager. layer_graphs: see RouterDispatcher (None: as the engine runs it).
                direct: the peer links carry the steps they fit (as the engine runs), else the rings only."""
                use = links if direct else None
                if rank != 0:
                    ShardWorker(_EchoExperts(*my_range), layers, hidden, top_k, dtype, dev, links=use).serve()
                    return None
                disp = RouterDispatcher(dev, layer_graphs=layer_graphs)
                disp.links = use
                graphs = StepGraphs(dev)

                def moe_layers():
                    for layer in range(layers):
                        disp(layer, h, ids, weights)

                def step():
                    disp.begin_step(T, graphed)
                    if graphed:
                        graphs(T, moe_layers)
                    else:
                        moe_layers()

                timed = time_steps(step, warm, steps, layers)
                right = None
                if not graphed:  # each shard echoes its tokens: the sum is x times the shards a token went to
                    n = max(1, T - 1)
                    disp.begin_step(n)
                    right = True
                    times = sum(m[:n].float() for m in to_shard)[:, None]
                    for layer in range(layers):
                        x = torch.randn(n, hidden, device=dev).to(dtype)
                        out = disp(layer, x, ids[:n], weights[:n]).float()
                        right &= bool(torch.allclose(out, times * x.float(), rtol=2e-2, atol=2e-2))
                    disp.finish_step()
                graphs.clear()
                disp.clear_graphs()
                disp.shutdown()
                return (*timed, right)

            def run_raw(counts: list[int]) -> tuple[float, float, float | None]:
                """all_to_all_single of `counts` rows per shard (forward rows with routing meta, answers back): host
                seconds and seconds per layer eager, and replayed from a graph at decode sizes (the link's own time)
                or None."""
                if rank == 0:
                    send_f = torch.randn(sum(counts), width, device=dev).to(dtype)
                    recv_f = send_f.new_empty(0, width)
                    recv_b = send_f.new_empty(sum(counts), hidden)
                    send_b = send_f.new_empty(0, hidden)
                    f_in, f_out, b_in, b_out = [0] + counts, [0] * world, [0] * world, [0] + counts
                else:
                    n = counts[rank - 1]
                    send_f = torch.empty(0, width, device=dev, dtype=dtype)
                    recv_f = torch.empty(n, width, device=dev, dtype=dtype)
                    send_b = torch.randn(n, hidden, device=dev).to(dtype)
                    recv_b = send_b.new_empty(0, hidden)
                    f_in, f_out, b_in, b_out = [0] * world, [n] + [0] * N, [n] + [0] * N, [0] * world

                def raw_layers():
                    for layer in range(layers):
                        dist.all_to_all_single(recv_f, send_f, f_out, f_in)
                        dist.all_to_all_single(recv_b, send_b, b_out, b_in)

                raw_cpu, raw = time_steps(raw_layers, warm, steps, layers)
                dist.barrier()
                raw_graph = None
                if padded and dev.type == "cuda":  # the same collectives replayed from a graph
                    graphs = StepGraphs(dev)
                    graphs(T, raw_layers)  # run once, captured
                    raw_graph = time_steps(lambda: graphs(T, raw_layers), warm, steps, layers)[1]
                    graphs.clear()  # a captured collective still alive can hang destroy_process_group
                    dist.barrier()
                return raw_cpu, raw, raw_graph

            warm = 3
            raw_exact = run_raw(routed_rows)  # the fewest bytes any protocol must move: each shard's routed rows
            counts = [T] * N  # what ours sends: every token to every shard
            timed = run_ours(warm, steps, layer_graphs=padded)
            if rank == 0:
                ours_cpu, ours, ours_right = timed
            dist.barrier()
            direct = links is not None and links.fits(layer_graph_tokens(T) or T)
            if direct:  # the same steps through the rings only (the protocol before the links)
                timed = run_ours(warm, steps, layer_graphs=padded, direct=False)
                if rank == 0:
                    ring_cpu, ring, ring_right = timed
                dist.barrier()
            if padded:  # the same steps without the per-layer graphs
                timed = run_ours(warm, steps, layer_graphs=False)
                if rank == 0:
                    plain_cpu, plain, plain_right = timed
                dist.barrier()
            if graphable:
                timed = run_ours(warm, steps, graphed=True)
                if rank == 0:
                    ours_graph = timed[1]
                dist.barrier()
            if profile_at == [layers, T]:  # where the time goes, on every rank (torch.profiler tables; eager, so
                # that each collective is its own kernel)
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    run_ours(0, 3, layer_graphs=False)
                    sync(dev)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                Path(result_path).with_name(f"dispatch_profile_rank{rank}.txt").write_text(table)
                dist.barrier()
            raw_cpu, raw, raw_graph = raw_exact if counts == routed_rows else run_raw(counts)
            if rank == 0:
                elem = torch.empty((), dtype=dtype).element_size()
                row = {"layers_per_step": layers, "tokens": T, "rows_per_shard": counts,
                       "bytes_per_layer": sum(counts) * (width + hidden) * elem,
                       "exact_bytes_per_layer": sum(routed_rows) * (width + hidden) * elem,
                       "ours_ms": ours * 1e3, "raw_ms": raw * 1e3, "ratio": ours / raw,
                       "raw_exact_ms": raw_exact[1] * 1e3, "ratio_exact": ours / raw_exact[1],
                       "ours_host_ms": ours_cpu * 1e3, "raw_host_ms": raw_cpu * 1e3, "ours_right": ours_right,
                       "layer_graphs": padded, "direct": direct}
                if direct:
                    row.update({"ring_ms": ring * 1e3, "ring_host_ms": ring_cpu * 1e3, "ring_right": ring_right,
                                "ring_ratio_exact": ring / raw_exact[1]})
                if padded:
                    row.update({"ours_plain_ms": plain * 1e3, "ours_plain_host_ms": plain_cpu * 1e3,
                                "plain_ratio_exact": plain / raw_exact[1], "ours_plain_right": plain_right})
                if graphable:
                    row["ours_graph_ms"] = ours_graph * 1e3
                    row["ours_graph_vs_raw"] = ours_graph / raw
                if raw_graph is not None:
                    row["raw_graph_ms"] = raw_graph * 1e3
                    row["raw_exact_graph_ms"] = raw_exact[2] * 1e3
                    row["ratio_exact_graph"] = ours / raw_exact[2]
                    if graphable:
                        row["ours_graph_vs_raw_graph"] = ours_graph / raw_graph
                rows_out.append(row)
    if rank == 0:
        Path(result_path).write_text(json.dumps(rows_out))
    dist.destroy_process_group()


def phase_dispatch(args) -> dict:
    import torch.multiprocessing as mp

    from cluster.ingress import free_port
    from model_shards.config import ModelConfig

    if Path(args.model, "config.json").exists():
        cfg = ModelConfig.from_file(args.model)
    else:  # only the dims matter here (echo experts): no checkpoint needed
        from bench.make_scaled_checkpoint import scaled_config
        cfg = scaled_config(args.layers, args.vocab, args.full_every, args.tiny)
    world = args.shards + 1
    sizes = [1, 8, 64, 256, 1024, 2048, 4096, 16384] if not args.tiny else [1, 8, 64, 256]
    # the checkpoint's MoE layers per step, and MiniMax-M1's 80 (the step header is paid once per step)
    layer_counts = sorted({cfg.num_hidden_layers, *args.dispatch_layers})
    result = Path(args.work, "dispatch_rows.tmp.json")
    mp.spawn(_dispatch_rank, args=(world, free_port(), args.device, sizes, layer_counts, cfg.hidden_size,
                                   cfg.num_local_experts, cfg.num_experts_per_tok, str(result), args.dispatch_profile),
             nprocs=world)
    rows = json.loads(result.read_text())
    result.unlink()
    # alpha + bytes / bandwidth, least squares on the raw rows
    xs, ys = [r["bytes_per_layer"] for r in rows], [r["raw_ms"] / 1e3 for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    alpha = my - slope * mx
    for r in rows:
        r["model_ms"] = (alpha + slope * r["bytes_per_layer"]) * 1e3
    return {"world": world, "layers_per_step": layer_counts, "rows": rows,
            "fit": {"alpha_us": alpha * 1e6, "bandwidth_GBps": (1 / slope / 1e9) if slope > 0 else None,
                    "note": "per layer round trip = 2 all_to_all_single (to the shards, back); alpha covers both"}}


# ---------------------------------------------------------------------------------------------------------------
# engine (in-process, ProcessShardGroup) and longctx
ATTN_SPLIT: dict[str, float] = defaultdict(float)


def _patch_attention_timers(device):
    """Times lightning and softmax attention layers apart (bench-only wrapper; profile mode syncs anyway)."""
    import model_shards.router_part as rp

    for cls, key in ((rp.LightningAttention, "attention.lightning"), (rp.SoftmaxAttention, "attention.softmax")):
        orig = cls.forward

        def timed(self, *a, _orig=orig, _key=key, **k):
            sync(device)
            t0 = now()
            out = _orig(self, *a, **k)
            sync(device)
            ATTN_SPLIT[_key] += now() - t0
            return out

        cls.forward = timed


def _snapshot(engine) -> dict:
    snap = dict(engine.profile.seconds) | {k: v for k, v in ATTN_SPLIT.items()}
    d = getattr(engine.experts, "dispatcher", None)
    if d is not None:
        snap.update({f"moe.{k}": getattr(d.times, k) for k in ("dispatch", "experts")})
    snap["_steps"] = engine.profile.steps
    snap["_tokens"] = engine.profile.tokens
    return snap


def _per_step(a: dict, b: dict) -> dict:
    steps = max(b["_steps"] - a["_steps"], 1)
    out = {k: 1e3 * (b[k] - a.get(k, 0.0)) / steps for k in b if not k.startswith("_")}
    out["total"] = sum(out.get(k, 0.0) for k in ("attention", "gate", "moe", "lm_head", "sampling"))
    return out


def level_prompts(concurrency: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The random prompt ids of one level (the engine and the hf phase send the same)."""
    rng = random.Random(concurrency * 7919 + prompt_len)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(concurrency)]


def run_level(engine, concurrency: int, prompt_len: int, max_tokens: int) -> dict:
    """Like cluster.bench_engine._one_level, but the profile is cut where the last first token arrives: a prefill
    phase and a pure decode phase, each with its own ms/step breakdown."""
    from cluster.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first, done, token_times, tokens = {}, {}, defaultdict(list), defaultdict(list)
    snaps = {}
    all_done = threading.Event()

    def sink_for(rid):
        def sink(out):  # engine thread
            t = now()
            if out.token_ids:
                token_times[rid].append(t)
                tokens[rid].extend(out.token_ids)
            if rid not in first:
                first[rid] = t
                if len(first) == concurrency:
                    snaps["decode_start"] = _snapshot(engine)
            if out.finished:
                done[rid] = t
                if len(done) == concurrency:
                    snaps["end"] = _snapshot(engine)
                    all_done.set()
        return sink

    start = _snapshot(engine)
    rids = [f"b{concurrency}-{prompt_len}-{i}" for i in range(concurrency)]
    prompts = level_prompts(concurrency, prompt_len, engine.model_config.vocab_size)
    t0 = now()
    for rid, prompt in zip(rids, prompts):
        engine.submit(prompt, params, rid, sink_for(rid))
    if not all_done.wait(timeout=600):
        raise RuntimeError("level did not finish")
    t_end = max(done.values())
    decode_start = max(first.values())
    ds, end = snaps["decode_start"], snaps["end"]
    decode_steps = end["_steps"] - ds["_steps"]
    itl = [b - a for ts in token_times.values() for a, b in zip(ts, ts[1:])]
    ttft = [first[r] - t0 for r in first]
    return {"concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens,
            "wall_s": t_end - t0, "prefill_s": decode_start - t0,
            "prefill_tok_s": concurrency * prompt_len / max(decode_start - t0, 1e-9),
            "output_tok_s": concurrency * max_tokens / (t_end - t0),
            "decode_tok_s": concurrency * (max_tokens - 1) / max(t_end - decode_start, 1e-9),
            "decode_steps": decode_steps, "decode_ms_per_step_wall": 1e3 * (t_end - decode_start) / max(decode_steps, 1),
            "prefill_steps": ds["_steps"] - start["_steps"],
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
            "decode_ms_per_step": _per_step(ds, end), "prefill_ms_per_step": _per_step(start, ds),
            "tokens_head": [tokens[r][:TOKENS_HEAD[1]] for r in rids[:TOKENS_HEAD[0]]]}


def _engine(args, max_model_len: int, max_num_seqs: int, graphs: bool = False):
    """profile=True with eager decode steps (each part synchronised: the breakdown), or decode steps replayed from
    CUDA graphs with no profiling (what serving runs)."""
    from cluster.engine.engine import Engine, EngineConfig

    device = "cuda:0" if args.device == "cuda" else "cpu"
    if not graphs:
        _patch_attention_timers(device)
    cfg = EngineConfig(model=args.model, expert_shards=args.shards, router_experts=args.router_experts, device=device,
                       dtype="bfloat16" if args.device == "cuda" else None, max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, max_num_batched_tokens=args.chunk, profile=not graphs,
                       collective_timeout_s=120.0, cuda_graphs=graphs)
    t0 = now()
    engine = Engine(cfg)
    return engine, now() - t0, cfg


def _levels_phase(args, name: str, levels: list[tuple[int, int, int]], max_num_seqs: int,
                  graphs: bool = False, after=None) -> dict:
    max_len = max(p + m for _, p, m in levels) + 16
    engine, load_s, cfg = _engine(args, max_len, max_num_seqs, graphs)
    result = {"load_s": load_s, "config": {k: v for k, v in vars(cfg).items()}, "rows": []}
    try:
        run_level(engine, 1, 64, 4)  # warm-up: Triton compiles, NCCL connects
        run_level(engine, min(max_num_seqs, 8), min(300, max_len - 8), 4)
        for c, p, m in levels:
            t0 = now()
            row = run_level(engine, c, p, m)
            result["rows"].append(row)
            save(args, name, result)  # partial results survive a later hang
            print(f"[{name}] conc={c} prompt={p} out={m}: decode {row['decode_tok_s']:.1f} tok/s, "
                  f"{row['decode_ms_per_step_wall']:.2f} ms/step wall ({now() - t0:.1f}s)", flush=True)
        if after is not None:
            result[after.__name__] = after(engine, args)
    finally:
        engine.shutdown()
    return result


def phase_engine(args) -> dict:
    t = args.engine_tokens
    return _levels_phase(args, "engine", [(1, args.prompt_len, t), (args.concurrency, args.prompt_len, t)],
                         args.concurrency)


def phase_graphs(args) -> dict:
    """The engine phase's levels with decode steps replayed from CUDA graphs (router and shards), no profiling; then,
    on GPU, the prefill of the top level's prompts alone under torch.profiler (`prefill_kernels`)."""
    t = args.engine_tokens
    levels = [(c, args.prompt_len, t) for c in sorted({1, min(8, args.concurrency), args.concurrency})]
    return _levels_phase(args, "graphs", levels, args.concurrency, graphs=True,
                         after=prefill_kernels if args.device == "cuda" else None)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (us in, ms out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def _kernel_summary(prof, wall_s: float) -> dict:
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    by_name: dict = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e.name][0] += (e.time_range.end - e.time_range.start) / 1e3
        by_name[e.name][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"wall_ms": wall_s * 1e3, "busy_ms": _union_ms(spans), "compute_busy_ms": _union_ms(compute),
            "kernel_ms_sum": sum(v[0] for v in by_name.values()),
            "top": [{"name": k[:120], "ms": v[0], "count": v[1]} for k, v in top]}


@contextlib.contextmanager
def _host_timers(engine, into: dict):
    """Times the engine thread's host work that no GPU trace shows (the profiler records the CPU ops of the calling
    thread only): scheduling, building a step's batch, and processing each sampled token. Seconds and calls into
    `into`; the originals are back afterwards."""
    from model_shards.batch import ForwardBatch

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = now()
            try:
                return fn(*a, **k)
            finally:
                into[key] = into.get(key, 0.0) + now() - t0
                into[key + "_calls"] = into.get(key + "_calls", 0) + 1
        return wrapper

    build = ForwardBatch.__dict__["build"]
    engine.scheduler.schedule = timed(engine.scheduler.schedule, "schedule")
    engine._append = timed(engine._append, "token_processing")
    ForwardBatch.build = classmethod(timed(build.__func__, "batch_build"))
    try:
        yield
    finally:
        del engine.scheduler.schedule, engine._append
        ForwardBatch.build = build


def _profiled_level(engine, args, name: str, concurrency: int, prompt_len: int, max_tokens: int):
    """run_level under torch.profiler (GPU kernels; with --trace also the host: a gzipped chrome trace of the router
    process in --out, `trace-<name>.json.gz`, and the engine thread's host timers, `host_ms`). Returns (the level's
    row, the kernel summary)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
    host: dict = {}
    with profile(activities=activities) as prof, (_host_timers(engine, host) if args.trace
                                                  else contextlib.nullcontext()):
        t0 = now()
        row = run_level(engine, concurrency, prompt_len, max_tokens)
        wall = now() - t0
    if args.trace:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.out, f"trace-{name}.json.gz")))  # (.gz: the profiler gzips it)
    summary = _kernel_summary(prof, wall)
    if host:
        summary["host_ms"] = {k: v * 1e3 if not k.endswith("_calls") else v for k, v in host.items()}
    return row, summary


def prefill_kernels(engine, args) -> dict:
    """The router GPU's kernels while the engine prefills `--concurrency` prompts (one output token each), from
    torch.profiler (CUPTI sees every thread's launches): wall time, time any kernel ran, time a compute (non-NCCL)
    kernel ran, and the kernels that took the most. Wall minus compute-busy is where the router's GPU waited: on the
    host, or on the shards through NCCL. The shards are other processes, not in it. With --trace, then the same for
    a short decode at that concurrency (its summary under `decode`)."""
    row, summary = _profiled_level(engine, args, "prefill", args.concurrency, args.prompt_len, 1)
    result = {"concurrency": args.concurrency, "prompt_len": args.prompt_len, "prefill_steps": row["prefill_steps"],
              **summary}
    if args.trace:
        row, summary = _profiled_level(engine, args, "decode", args.concurrency, args.prompt_len, 32)
        result["decode"] = {"decode_steps": row["decode_steps"],
                            "decode_ms_per_step_wall": row["decode_ms_per_step_wall"], **summary}
    return result


def phase_longctx(args) -> dict:
    return _levels_phase(args, "longctx", [(1, p, args.long_tokens) for p in args.long_prompts], 2)


# ---------------------------------------------------------------------------------------------------------------
# hf: transformers' generate on the same checkpoint and prompts
def hf_device_map(layers: int, gpus: int) -> dict:
    """Consecutive layers per GPU: embedding + the first layers on cuda:0, ..., the last layers + final norm + LM
    head on the last GPU used (accelerate moves the hidden states between them)."""
    per = math.ceil(layers / gpus)
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    dmap |= {f"model.layers.{i}": i // per for i in range(layers)}
    dmap["model.norm"] = dmap["lm_head"] = (layers - 1) // per
    return dmap


def hf_level(model, prompts: list[list[int]], max_tokens: int, device) -> dict:
    """Greedy generate of max_tokens per prompt (no EOS stop), after a warm-up call. The prefill is timed as a
    generate with max_new_tokens=1 (its TTFT); the decode rate is the rest of the full call."""
    import torch

    x = torch.tensor(prompts, device=device)
    mask = torch.ones_like(x)

    def generate(n: int):
        sync(device)
        t0 = now()
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        sync(device)
        return out[:, x.shape[1]:], now() - t0

    generate(2)  # warm-up
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    _, prefill_s = generate(1)
    new, total_s = generate(max_tokens)
    B, n = len(prompts), new.shape[1]
    decode_s = max(total_s - prefill_s, 1e-9)
    row = {"concurrency": B, "prompt_len": x.shape[1], "max_tokens": max_tokens, "generated_tokens": new.numel(),
           "prefill_s": prefill_s, "prefill_tok_s": x.numel() / prefill_s, "total_s": total_s,
           "decode_tok_s": B * (n - 1) / decode_s, "decode_ms_per_step": 1e3 * decode_s / max(n - 1, 1),
           "output_tok_s": new.numel() / total_s,
           "tokens_head": new[:TOKENS_HEAD[0], :TOKENS_HEAD[1]].tolist()}
    if torch.device(device).type == "cuda":
        row["peak_GiB"] = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
    return row


def phase_hf(args) -> dict:
    import traceback

    import torch
    import transformers

    from model_shards.config import ModelConfig
    from model_shards.transformers_compat import fix_partial_rope, load_transformers_model

    cfg = ModelConfig.from_file(args.model)
    gpu = args.device == "cuda"
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "rows": [],
              "dtype": "bfloat16" if gpu else "float32", "max_tokens": args.hf_max_tokens}
    try:
        import accelerate

        result["accelerate"] = accelerate.__version__
    except ImportError:
        result["accelerate"] = None
    try:  # MiniMax's partial RoPE: the same model as ours (same greedy tokens on CPU); costs what full RoPE costs
        fix_partial_rope()
        result["rope"] = f"first {cfg.rotary_dim} of {cfg.head_dim} dims (patched, as MiniMax)"
    except Exception as e:
        result["rope"] = f"whole head_dim (transformers' own; patch failed: {type(e).__name__}: {e})"
    try:
        device_map = hf_device_map(cfg.num_hidden_layers, torch.cuda.device_count()) if gpu else None
        result["device_map"] = device_map
        t0 = now()
        model = load_transformers_model(args.model, Path(args.work, "hf-model"),
                                        torch.bfloat16 if gpu else torch.float32, device_map)
        sync("cuda" if gpu else "cpu")
        result["load_s"] = now() - t0
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    except Exception as e:
        traceback.print_exc()
        result["error"] = f"load: {type(e).__name__}: {str(e)[:500]}"
        return result
    print(f"[hf] transformers {transformers.__version__}: loaded in {result['load_s']:.1f}s, attention "
          f"{result['attn_implementation']}, experts {result['experts_implementation']}", flush=True)
    device = "cuda:0" if gpu else "cpu"
    for c in (1, args.concurrency):
        t0 = now()
        try:
            row = hf_level(model, level_prompts(c, args.prompt_len, cfg.vocab_size), args.hf_max_tokens, device)
            print(f"[hf] conc={c} prompt={args.prompt_len} out={args.hf_max_tokens}: TTFT {row['prefill_s']:.3f}s, "
                  f"decode {row['decode_tok_s']:.1f} tok/s, output {row['output_tok_s']:.1f} tok/s "
                  f"({now() - t0:.1f}s)", flush=True)
        except Exception as e:  # out of memory, unsupported: record it, go on
            traceback.print_exc()
            row = {"concurrency": c, "prompt_len": args.prompt_len, "max_tokens": args.hf_max_tokens,
                   "error": f"{type(e).__name__}: {str(e)[:500]}"}
            if gpu:
                torch.cuda.empty_cache()
        result["rows"].append(row)
        save(args, "hf", result)  # partial results survive a later hang
    return result


# ---------------------------------------------------------------------------------------------------------------
# serve: m1serve serve + a streaming workload
async def _stream_one(session, url, body) -> dict:
    t_send = now()
    times, counts, usage, error = [], [], None, None
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:300]}", "t_send": t_send, "t_end": now()}
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    error = str(obj["error"])[:300]
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    n = len(ch.get("token_ids") or []) or (1 if ch.get("text") else 0)
                    if n:
                        times.append(now())
                        counts.append(n)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"t_send": t_send, "t_end": now(), "times": times, "counts": counts, "usage": usage, "error": error}


async def _streams(url: str, bodies: list[dict]) -> dict:
    """All bodies streamed at once from this process: each stream's result, and this process's span and CPU time."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=900)
    cpu = time.process_time()
    # read_bufsize: an SSE event is one line, and the first one echoes the prompt's ids (800 KB at 128K tokens)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     read_bufsize=2**22) as session:
        t0 = now()
        res = await asyncio.gather(*[_stream_one(session, url, b) for b in bodies])
        t1 = now()
    return {"t0": t0, "t1": t1, "cpu_s": time.process_time() - cpu, "streams": res}


def _client_process(url: str, bodies: list[dict], start, results) -> None:
    """One client process's share of the streams, begun once every client process is ready (start: a barrier)."""
    try:
        start.wait(timeout=120)
        results.put(asyncio.run(_streams(url, bodies)))
    except BaseException as e:  # reported to the parent, which would otherwise wait for this share
        results.put({"error": f"client process: {type(e).__name__}: {e}"})


def _run_clients(url: str, bodies: list[dict], procs: int) -> list[dict]:
    """The streams spread round-robin over `procs` processes (their clocks agree: perf_counter is system-wide on
    Linux), so that one Python process's event parsing does not set the pace; procs 1: in this process."""
    if procs <= 1:
        return [asyncio.run(_streams(url, bodies))]
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children run only this module's asyncio client (no CUDA, nothing to import)
    start, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_client_process, args=(url, bodies[i::procs], start, results), daemon=True)
               for i in range(procs)]
    for w in workers:
        w.start()
    parts = [results.get(timeout=900) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        raise RuntimeError("; ".join(failed))
    return parts


def _workload(port: int, model_name: str, concurrency: int, prompt_len: int, max_tokens: int, vocab: int,
              seed: int, client_procs: int = 1) -> dict:
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/v1/completions"
    bodies = [{"model": model_name, "prompt": [rng.randrange(vocab) for _ in range(prompt_len)],
               "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
               "return_token_ids": True, "stream_options": {"include_usage": True}} for _ in range(concurrency)]
    parts = _run_clients(url, bodies, min(client_procs, concurrency))
    t0, t1 = min(p["t0"] for p in parts), max(p["t1"] for p in parts)
    res = [r for p in parts for r in p["streams"]]
    ok = [r for r in res if not r.get("error") and r.get("times")]
    ttft = [r["times"][0] - r["t_send"] for r in ok]
    itl = []
    for r in ok:
        for a, b, n in zip(r["times"], r["times"][1:], r["counts"][1:]):
            itl.extend([(b - a) / n] * n)
    out_tokens = sum((r["usage"] or {}).get("completion_tokens") or sum(r["counts"]) for r in ok)
    last_first = max((r["times"][0] for r in ok), default=t0)
    decode_tokens = sum(sum(n for t, n in zip(r["times"], r["counts"]) if t > last_first) for r in ok)
    return {"concurrency": concurrency, "prompt_len": prompt_len, "max_tokens": max_tokens, "ok": len(ok),
            "errors": [r["error"] for r in res if r.get("error")][:5], "wall_s": t1 - t0,
            "output_tokens": out_tokens, "output_tok_s": out_tokens / (t1 - t0),
            "decode_tok_s_after_last_first_token": decode_tokens / max(t1 - last_first, 1e-9),
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
            "e2e_s": percentiles([r["t_end"] - r["t_send"] for r in ok], 1),
            # the busiest client process's CPU time over its span: near 1 means the client, not the server, may
            # have set the pace
            "client_procs": len(parts), "client_cpu_busy": max(p["cpu_s"] / max(p["t1"] - p["t0"], 1e-9)
                                                                for p in parts)}


def serve_max_model_len(args) -> int:
    return max(args.prompt_len + args.serve_tokens, max(args.serve_long, default=0) + args.long_tokens) + 64


def counter_total(metrics_text: str, name: str) -> float:
    """A counter's value summed over its label sets (`name_total{...} v` lines)."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}_total(?:{{[^}}]*}})?\s+(\S+)$", metrics_text,
                                                      re.MULTILINE))


def step_seconds(metrics_text: str) -> dict:
    """The engine's step-time histogram by kind (prefill / decode / ahead) from a Prometheus scrape, summed over the
    label sets Ray adds: steps, mean ms, and p50 / p90 as the upper bound of the bucket holding them. Ray exports a
    histogram's sum as the sum of the observations' bucket midpoints, so the mean is that approximation."""
    totals: dict = defaultdict(lambda: {"count": 0.0, "sum": 0.0})
    buckets: dict = defaultdict(lambda: defaultdict(float))
    for line in metrics_text.splitlines():
        m = re.match(r'^(?:ray_)?m1serve_engine_step_seconds_(sum|count|bucket)\{([^}]*)\}\s+(\S+)$', line)
        kind = m and re.search(r'kind="([^"]+)"', m.group(2))
        if not kind:
            continue
        if m.group(1) == "bucket":
            le = re.search(r'le="([^"]+)"', m.group(2)).group(1)
            buckets[kind.group(1)][float(le)] += float(m.group(3))
        else:
            totals[kind.group(1)][m.group(1)] += float(m.group(3))

    def quantile(kind: str, q: float):
        cum = sorted(buckets[kind].items())
        n = cum[-1][1] if cum else 0
        return next((1e3 * le for le, c in cum if c >= q * n), None) if n else None

    return {k: {"steps": int(v["count"]), "mean_ms": 1e3 * v["sum"] / v["count"] if v["count"] else None,
                "p50_ms_le": quantile(k, 0.5), "p90_ms_le": quantile(k, 0.9)}
            for k, v in sorted(totals.items())}


def kernel_builds(log_text: str) -> list[str]:
    """The server's "triton kernel built" lines (kernels.triton_utils.log_kernel_builds), without the log prefixes."""
    marker = "triton kernel built"
    return [marker + line.split(marker, 1)[1] for line in log_text.splitlines() if marker in line]


def served_vs_hf(workload: dict | None, hf_rows: list[dict]) -> dict | None:
    """The served workload's output tok/s over transformers' on the same workload (streams, prompt, output tokens)."""
    if not workload or workload.get("ok") != workload.get("concurrency"):  # every stream completed
        return None
    for r in hf_rows:
        if (not r.get("error") and r.get("output_tok_s")
                and (r["concurrency"], r["prompt_len"], r["max_tokens"])
                == (workload["concurrency"], workload["prompt_len"], workload["max_tokens"])):
            return {"served": workload["output_tok_s"], "hf": r["output_tok_s"],
                    "ratio": workload["output_tok_s"] / r["output_tok_s"]}
    return None


@contextlib.contextmanager
def _server(args, ingress: str, log_name: str, result: dict, extra: tuple[str, ...] = ()):
    """`m1serve serve` on the checkpoint (extra: more of its flags), ready; stopped (SIGTERM, then SIGKILL) on the way
    out. Records its command, log, start-up time and exit code in result."""
    gpu = args.device == "cuda"
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", args.model, "--expert-shards", str(args.shards),
           "--router-gpus", "1" if gpu else "0", "--gpus-per-shard", "1" if gpu else "0",
           "--max-num-seqs", str(args.concurrency), "--max-model-len", str(serve_max_model_len(args)),
           "--max-num-batched-tokens", str(args.chunk), "--ingress", ingress,
           "--metrics-port", str(args.metrics_port), "--http-port", str(args.http_port),
           "--grpc-port", str(args.grpc_port), "--collective-timeout-s", "120"]
    if gpu:
        cmd += ["--dtype", "bfloat16"]
    if args.serve_cuda_graphs:
        cmd += ["--cuda-graphs", args.serve_cuda_graphs]
    if args.router_experts:
        cmd += ["--router-experts"]
    cmd += extra
    env = dict(os.environ) | NCCL_SAFE | {"PYTHONPATH": os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)]),
        "RAY_AUTH_MODE": "disabled", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.05",
        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
        "RAY_DEDUP_LOGS": "0"}  # every process's kernel-build lines, not "[repeated 3x across cluster]"
    log_path = Path(args.work, log_name)
    log = open(log_path, "w")
    t0 = now()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result.update({"command": " ".join(cmd[1:]), "log": str(log_path), "ingress": ingress})
    try:
        deadline = t0 + args.serve_start_timeout
        while now() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"m1serve serve exited with {proc.returncode} before ready")
            if "m1serve: ready" in log_path.read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"m1serve serve not ready within {args.serve_start_timeout}s")
        result["startup_s"] = now() - t0
        print(f"[serve] ready in {result['startup_s']:.1f}s (ingress {ingress})", flush=True)
        yield log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        result["exit_code"] = proc.returncode
        log.close()


MAIN_WORKLOAD_SEED = 2


def phase_serve(args) -> dict:
    from model_shards.config import ModelConfig

    cfg = ModelConfig.from_file(args.model)
    result = {}
    with _server(args, args.ingress, "m1serve-server.log", result) as log_path:
        name = Path(args.model).name
        # warm-up at the measured shapes: Triton compiles each kernel config (prefill chunk, expert tile bucket) on
        # its first use, which would otherwise land in the measured TTFT
        # (--no-client-warmup: only the server's own start-up warm-up, `m1serve serve --warmup`: what users get)
        if args.client_warmup:
            w = _workload(args.http_port, name, min(8, args.concurrency), args.prompt_len, 4, cfg.vocab_size, 1)
            result["warmup"] = {k: w[k] for k in ("ok", "errors", "wall_s")}
        result["client_warmup"] = args.client_warmup
        save(args, "serve", result)
        result["warmup_kernel_builds"] = len(kernel_builds(log_path.read_text(errors="replace")))
        workload_start = log_path.stat().st_size
        main = _workload(args.http_port, name, args.concurrency, args.prompt_len, args.serve_tokens, cfg.vocab_size,
                         MAIN_WORKLOAD_SEED)
        result["workload"] = main
        with open(log_path, errors="replace") as f:
            f.seek(workload_start)
            result["workload_kernel_builds"] = kernel_builds(f.read())
        print(f"[serve] {main['ok']}/{args.concurrency} ok, {main['output_tok_s']:.1f} output tok/s, TTFT p50 "
              f"{main['ttft_ms']['p50']} ms, ITL p50 {main['itl_ms']['p50']} ms, kernels built during it "
              f"{len(result['workload_kernel_builds'])}, client CPU busy {main['client_cpu_busy']:.0%}", flush=True)
        save(args, "serve", result)
        # the same workload from several client processes, then from one again: whether the client set the pace
        result["client_runs"] = []
        for seed, procs in ((3, args.client_procs), (4, 1)) if args.client_procs > 1 else ():
            run = _workload(args.http_port, name, args.concurrency, args.prompt_len, args.serve_tokens,
                            cfg.vocab_size, seed, procs)
            result["client_runs"].append(run)
            save(args, "serve", result)
            print(f"[serve] {procs} client processes: {run['ok']}/{args.concurrency} ok, {run['output_tok_s']:.1f} "
                  f"output tok/s, busiest client process {run['client_cpu_busy']:.0%} CPU", flush=True)
        try:
            import urllib.request

            # Ray's metrics agent exports every few seconds: wait until all the workload's tokens show
            for _ in range(30):
                text = urllib.request.urlopen(f"http://127.0.0.1:{args.metrics_port}/metrics",
                                              timeout=10).read().decode()
                if counter_total(text, "ray_m1serve_generation_tokens") >= main["output_tokens"]:
                    break
                time.sleep(1)
            keep = [ln for ln in text.splitlines() if ln.startswith("ray_m1serve")]
            Path(args.out, "metrics.txt").write_text("\n".join(keep) + "\n")
            result["metrics_lines"] = len(keep)
            result["step_seconds"] = step_seconds(text)
        except Exception as e:
            result["metrics_error"] = f"{type(e).__name__}: {e}"
        # one stream at a time, short prompt then the long ones: per-token time against context through the server
        result["single"] = []
        for i, n in enumerate([args.prompt_len] + args.serve_long):
            one = _workload(args.http_port, name, 1, n, args.long_tokens, cfg.vocab_size, 10 + i)
            result["single"].append(one)
            save(args, "serve", result)
            print(f"[serve] one stream, {n}-token prompt: {one['ok']}/1 ok, TTFT {one['ttft_ms']['p50']} ms, "
                  f"ITL mean {one['itl_ms']['mean']} ms {one['errors']}", flush=True)
    return result


def phase_ingress(args) -> dict:
    """The serve phase's first workload (same prompts, first after start-up) through the other ingress."""
    from model_shards.config import ModelConfig

    cfg = ModelConfig.from_file(args.model)
    other = "proxy" if args.ingress == "haproxy" else "haproxy"
    name, result = Path(args.model).name, {}
    with _server(args, other, "m1serve-server-ingress.log", result):
        if args.client_warmup:
            _workload(args.http_port, name, min(8, args.concurrency), args.prompt_len, 4, cfg.vocab_size, 1)
        result["workload"] = w = _workload(args.http_port, name, args.concurrency, args.prompt_len,
                                           args.serve_tokens, cfg.vocab_size, MAIN_WORKLOAD_SEED)
        print(f"[ingress] {other}: {w['ok']}/{args.concurrency} ok, {w['output_tok_s']:.1f} output tok/s, TTFT p50 "
              f"{w['ttft_ms']['p50']} ms", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# roofline + report
def attention_params(cfg, layer_type: str) -> int:
    """Weights of one attention layer's projections: lightning q, k, v, output gate, out; softmax q, k, v, o."""
    if layer_type == "linear_attention":
        return 5 * cfg.q_size * cfg.hidden_size
    return (2 * cfg.q_size + 2 * cfg.kv_size) * cfg.hidden_size


def decode_floor_ms(cfg, env: dict, shards: int, batch: int, context: int) -> dict | None:
    """HBM/GEMM floor of one decode step: per layer, the router's attention (weights, lightning state read+write,
    KV read) then the busiest shard's experts (each touched expert's weights once), then the LM head. Router and
    shards run one after the other in a layer, so the floors add. Dispatch (NVLink) not included. shards: the expert
    holders (with --router-experts the router's share is one more, computed alongside the shards')."""
    if not (env.get("copy_TBps") and env.get("gemm_TFLOPs")):
        return None
    bw, rate = env["copy_TBps"] * 1e12, env["gemm_TFLOPs"] * 1e12
    H, F, E, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    touched = (E / shards) * (1 - (1 - K / E) ** batch)  # expected experts touched per shard
    total = router_total = experts_total = 0.0
    for t in cfg.layer_types:
        params = attention_params(cfg, t)
        if t == "linear_attention":
            extra = batch * cfg.num_attention_heads * cfg.head_dim ** 2 * 4 * 2  # fp32 state read + write
        else:
            extra = batch * context * 2 * cfg.kv_size * 2  # bf16 K and V read
        r = max((2 * params + extra + E * H * 4) / bw, 2 * batch * params / rate)
        x = max(touched * 3 * H * F * 2 / bw, 2 * batch * K / shards * 3 * H * F / rate)
        router_total += r
        experts_total += x
        total += r + x
    lm = max(cfg.vocab_size * H * 2 / bw, 2 * batch * cfg.vocab_size * H / rate)
    total += lm
    return {"total_ms": total * 1e3, "router_attention_ms": router_total * 1e3, "experts_ms": experts_total * 1e3,
            "lm_head_ms": lm * 1e3, "batch": batch, "context": context, "experts_touched_per_shard": touched}


def prefill_floor_ms(cfg, env: dict, shards: int, seqs: int, prompt_len: int) -> dict | None:
    """HBM/GEMM floor of prefilling `seqs` prompts of `prompt_len` tokens as if in one step (each weight read once,
    every GEMM at the measured rate): per layer the router's projections (+ the lightning state update, + the softmax
    layer's causal QK and PV), then the busiest expert holder's share of the routed rows, then the LM head on each
    prompt's last token. Chunked prefill reads the weights once per step, so this is a lower bound for any chunk."""
    if not (env.get("copy_TBps") and env.get("gemm_TFLOPs")):
        return None
    bw, rate = env["copy_TBps"] * 1e12, env["gemm_TFLOPs"] * 1e12
    H, F, E, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    n = seqs * prompt_len
    held = -(-E // shards)  # experts on the busiest holder
    router = experts = 0.0
    heads, d = cfg.num_attention_heads, cfg.head_dim
    for t in cfg.layer_types:
        params = attention_params(cfg, t)
        if t == "linear_attention":
            flops = 2 * n * params + 4 * n * heads * d * d  # projections + q.S and the k^T v state update
        else:
            flops = 2 * n * params + 2 * seqs * heads * d * prompt_len ** 2  # + causal QK^T and PV
        router += max(2 * params / bw, flops / rate)
        experts += max(held * 3 * H * F * 2 / bw, 2 * n * K / shards * 3 * H * F / rate)
    lm = max(cfg.vocab_size * H * 2 / bw, 2 * seqs * cfg.vocab_size * H / rate)
    return {"total_ms": (router + experts + lm) * 1e3, "router_attention_ms": router * 1e3,
            "experts_ms": experts * 1e3, "lm_head_ms": lm * 1e3, "seqs": seqs, "prompt_len": prompt_len}


def serve_floor(cfg, env: dict, shards: int, seqs: int, prompt_len: int, max_tokens: int) -> dict | None:
    """Floor of the serve workload (all streams sent at once): every prompt prefilled, then max_tokens - 1 decode
    steps at full batch (the first token comes out of the prefill)."""
    pre = prefill_floor_ms(cfg, env, shards, seqs, prompt_len)
    dec = decode_floor_ms(cfg, env, shards, seqs, prompt_len + max_tokens // 2)
    if pre is None or dec is None:
        return None
    wall_s = (pre["total_ms"] + (max_tokens - 1) * dec["total_ms"]) / 1e3
    return {"prefill_ms": pre["total_ms"], "decode_step_ms": dec["total_ms"], "wall_s": wall_s,
            "output_tok_s": seqs * max_tokens / wall_s}


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _kernel_table(header: str, summary: dict) -> list[str]:
    """A profiled level's kernels (most time first), then its host timers if it has them."""
    lines = [f"| {header} | ms | launches |", "|---|---:|---:|"]
    lines += [f"| `{k['name']}` | {fmt(k['ms'], 1)} | {k['count']} |" for k in summary["top"]] + [""]
    if summary.get("host_ms"):
        lines.append(_host_line(summary["host_ms"]))
    return lines


def _host_line(host: dict) -> str:
    parts = [f"{name} {fmt(host[key], 1)} ms in {host[key + '_calls']} calls"
             for key, name in (("schedule", "scheduling"), ("batch_build", "building the batch"),
                               ("token_processing", "processing the sampled tokens")) if key in host]
    return "The engine thread's host work meanwhile (`host_ms`, not in the GPU trace): " + "; ".join(parts) + ".\n"


def report(args, phase_status: dict) -> dict:
    data = {"phases": phase_status}
    for name in PHASES:
        p = Path(args.work, f"{name}.json")
        data[name] = json.loads(p.read_text()) if p.exists() else None
    env = data["env"] or {}
    card = (env.get("card") or "cpu").replace("NVIDIA ", "").replace(" ", "-")
    date = env.get("date") or dt.date.today().isoformat()
    cfg = None
    try:
        from model_shards.config import ModelConfig

        cfg = ModelConfig.from_file(args.model)
    except Exception:
        pass
    holders = args.shards + int(args.router_experts)  # equal shares of the experts
    L = []
    L.append(f"# GPU cluster benchmark: {card}, {date}\n")
    L.append(f"- card: **{env.get('card')}** x {env.get('cuda_devices')}, torch {env.get('torch')}, NCCL "
             f"{env.get('nccl')}, triton {env.get('ver_triton')}, ray {env.get('ver_ray')}")
    L.append(f"- commit: `{env.get('commit')}` (plus the uncommitted working tree of the run); the run's files: git "
             f"tree `{env.get('tree')}` (equal to `git rev-parse <commit>^{{tree}}` when they are that commit's)")
    L.append(f"- command: `python3 bench/gpu_cluster.py {' '.join(args.argv)}`")
    if cfg is not None:
        L.append(f"- checkpoint: random weights, MiniMax-M1 per-layer dims (hidden {cfg.hidden_size}, "
                 f"{cfg.num_attention_heads} heads x {cfg.head_dim}, {cfg.num_key_value_heads} KV heads, rotary "
                 f"{cfg.rotary_dim}, {cfg.num_local_experts} experts x {cfg.intermediate_size}, top-"
                 f"{cfg.num_experts_per_tok}), {cfg.num_hidden_layers} layers "
                 f"({', '.join('S' if t == 'full_attention' else 'L' for t in cfg.layer_types)}; L lightning, "
                 f"S softmax), vocab {cfg.vocab_size} (real: 200064)")
    ck = data["ckpt"] or {}
    if ck.get("total_bytes"):
        L.append(f"- checkpoint written on the GPU in {ck['seconds']:.1f}s: {ck['total_bytes'] / 1e9:.1f} GB "
                 f"({ck['expert_bytes'] / 1e9:.1f} GB experts) in {ck['files']} files, "
                 f"{ck['GB_per_s']:.2f} GB/s")
    L.append(f"- roofline inputs measured on GPU 0 in the same run: copy {fmt(env.get('copy_TBps'))} TB/s "
             f"(read+write), bf16 8192^3 GEMM {fmt(env.get('gemm_TFLOPs'), 0)} TFLOP/s")
    lm = env.get("lm_head")
    if lm:
        L.append(f"- fp32 LM head on GPU 0, batch {lm['batch']} x hidden {lm['hidden']} x vocab {lm['vocab']}: fp32 "
                 f"GEMM on fp32 weights {fmt(lm['fp32_ms'], 3)} ms vs `fp32_logits` on the bf16 weights (three bf16 "
                 f"pieces of x, one tensor-core GEMM, fp32 out) {fmt(lm['split_bf16_ms'], 3)} ms = "
                 f"**{fmt(lm['fp32_ms'] / lm['split_bf16_ms'])}x** (floor {fmt(lm['floor_ms'], 3)} ms); max error "
                 f"vs fp64 {lm['fp32_rel_err']:.1e} vs {lm['split_bf16_rel_err']:.1e}, same argmax: "
                 f"{lm['fp32_same_argmax']} / {lm['split_bf16_same_argmax']}")
    L.append(f"- topology: router = GPU rank 0 of the group, {args.shards} expert shards (one GPU each)"
             + (f"; the router holds a share of the experts too (--router-experts: {holders} equal shares)"
                if args.router_experts else ""))
    L.append("- phases: " + ", ".join(f"{k} {v}" for k, v in phase_status.items()) + "\n")

    serve = data["serve"] or {}
    sv = serve.get("workload")
    other = (data["ingress"] or {}).get("workload")  # the same workload through the other ingress
    if sv:
        L.append(f"## Serve: `m1serve serve --ingress {serve.get('ingress')}` (Ray Serve, OpenAI HTTP "
                 f"streaming)\n")
        L.append(f"startup (ray.init + Serve + load + group) {fmt(serve.get('startup_s'), 1)} s. "
                 f"Workload: {sv['concurrency']} concurrent streams, {sv['prompt_len']}-token prompts (random ids),"
                 f" {sv['max_tokens']} output tokens each (ignore_eos, greedy).\n")
        L.append("ITL: a chunk of n tokens arriving d after the previous one counts n gaps of d/n. Several SSE events "
                 "can arrive in one read (the server merges what a lagging stream missed, the proxy batches): then "
                 "the median is near 0 and the mean is the per-stream pace.\n")
        L.append("| ok | wall s | output tok/s | decode tok/s (after last first token) | TTFT p50 / p90 / p99 ms | "
                 "ITL mean ms | ITL p50 / p90 / p99 ms |")
        L.append("|---:|---:|---:|---:|---|---:|---|")
        t, i = sv["ttft_ms"], sv["itl_ms"]
        L.append(f"| {sv['ok']}/{sv['concurrency']} | {fmt(sv['wall_s'], 1)} | {fmt(sv['output_tok_s'], 1)} | "
                 f"{fmt(sv['decode_tok_s_after_last_first_token'], 1)} | {fmt(t['p50'], 0)} / {fmt(t['p90'], 0)} / "
                 f"{fmt(t['p99'], 0)} | {fmt(i['mean'])} | {fmt(i['p50'])} / {fmt(i['p90'])} / {fmt(i['p99'])} |")
        if sv.get("errors"):
            L.append(f"\nerrors: {sv['errors']}")
        runs = [sv] + (serve.get("client_runs") or [])
        if len(runs) > 1:
            L.append("\nThe same workload (other random prompts) again right after, from several client processes, "
                     "then from one: `client CPU` = the busiest client process's CPU time over its span (near 100%: "
                     "the client's own event parsing may set the pace).\n")
            L.append("| run | client processes | ok | wall s | output tok/s | decode tok/s (after last first token) | "
                     "TTFT p50 / p90 ms | client CPU |")
            L.append("|---:|---:|---:|---:|---:|---:|---|---:|")
            for n, r in enumerate(runs, 1):
                L.append(f"| {n} | {r['client_procs']} | {r['ok']}/{r['concurrency']} | {fmt(r['wall_s'], 2)} | "
                         f"{fmt(r['output_tok_s'], 1)} | {fmt(r['decode_tok_s_after_last_first_token'], 1)} | "
                         f"{fmt(r['ttft_ms']['p50'], 0)} / {fmt(r['ttft_ms']['p90'], 0)} | "
                         f"{fmt(100 * r['client_cpu_busy'], 0)}% |")
        if other:
            ingress = serve.get("ingress")
            L.append("\nThe first workload (same prompts, first after start-up) through each ingress: `haproxy` = "
                     "HAProxy straight to the router replica's own HTTP server, `proxy` = Ray Serve's Python proxy "
                     "actor in between (each on a server of its own; this table's first row is the one above).\n")
            L.append("| ingress | ok | output tok/s | decode tok/s (after last first token) | TTFT p50 / p90 / p99 ms | "
                     "ITL mean ms | vs the other |")
            L.append("|---|---:|---:|---:|---|---:|---:|")
            pair = [(ingress, sv, other), (data["ingress"].get("ingress"), other, sv)]
            for name, r, o in pair:
                t = r["ttft_ms"]
                L.append(f"| {name} | {r['ok']}/{r['concurrency']} | {fmt(r['output_tok_s'], 1)} | "
                         f"{fmt(r['decode_tok_s_after_last_first_token'], 1)} | {fmt(t['p50'], 0)} / "
                         f"{fmt(t['p90'], 0)} / {fmt(t['p99'], 0)} | {fmt(r['itl_ms']['mean'])} | "
                         f"{fmt(r['output_tok_s'] / o['output_tok_s'] if o['output_tok_s'] else None)}x |")
        floor = serve_floor(cfg, env, holders, sv["concurrency"], sv["prompt_len"], sv["max_tokens"]) \
            if cfg is not None else None
        if floor:
            sv["floor"] = floor
            L.append(f"\nFloor of this workload (`serve_floor`): every prompt prefilled at the GEMM/HBM floor "
                     f"({fmt(floor['prefill_ms'], 0)} ms, `prefill_floor_ms`) then {sv['max_tokens'] - 1} decode steps"
                     f" at batch {sv['concurrency']} ({fmt(floor['decode_step_ms'])} ms each) = "
                     f"{fmt(floor['wall_s'])} s, {fmt(floor['output_tok_s'], 0)} output tok/s: measured output tok/s "
                     f"is **{fmt(floor['output_tok_s'] / sv['output_tok_s'])}x below the floor's**, ITL mean "
                     f"{fmt(sv['itl_ms']['mean'] / floor['decode_step_ms'])}x the decode step floor.")
        steps = serve.get("step_seconds")
        if steps:
            L.append("\nEngine steps during the workload (the server's `m1serve_engine_step_seconds`): " + "; ".join(
                f"{k} {v['steps']} steps, mean {fmt(v['mean_ms'])} ms, p50 <= {fmt(v['p50_ms_le'])} ms, p90 <= "
                f"{fmt(v['p90_ms_le'])} ms" for k, v in steps.items()) +
                ". `ahead` = decode steps launched before the previous one's tokens were read; the mean is Ray's "
                "(bucket midpoints), the percentiles are bucket upper bounds.")
        builds = serve.get("workload_kernel_builds")
        if builds is not None:
            L.append(f"\nTriton kernel variants built during the workload (after the server's warm-up, which built "
                     f"{serve.get('warmup_kernel_builds')} in all processes): **{len(builds)}**"
                     + "".join(f"\n- `{b[:300]}`" for b in builds[:20]))
        L.append("")
    singles = serve.get("single")
    if singles:
        L.append("### Serve: one stream at a time, short and long prompts\n")
        L.append("Sent one after another after the workload, each alone on the server. ITL mean = the stream's "
                 "per-token pace; its floor: one decode step at batch 1 at that context (`decode_floor_ms`). The "
                 "lightning layers' state is the same size at any context, so only the softmax layer's KV read grows."
                 " TTFT floor: `prefill_floor_ms` of the one prompt (the first request of a new length also pays for "
                 "any kernel compiled for it).\n")
        L.append("| prompt | ok | TTFT ms | TTFT floor ms | prefill tok/s | ITL mean ms | ITL floor ms | x floor | "
                 "ITL x vs first |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        base = singles[0]["itl_ms"]["mean"] if singles[0].get("ok") else None
        for r in singles:
            if not r.get("ok"):
                L.append(f"| {r['prompt_len']} | 0/1 | error: {str(r.get('errors'))[:200]} |")
                continue
            ttft, itl = r["ttft_ms"]["p50"], r["itl_ms"]["mean"]
            pf = prefill_floor_ms(cfg, env, holders, 1, r["prompt_len"]) if cfg is not None else None
            df = decode_floor_ms(cfg, env, holders, 1, r["prompt_len"] + r["max_tokens"] // 2) \
                if cfg is not None else None
            L.append(f"| {r['prompt_len']} | 1/1 | {fmt(ttft, 0)} | {fmt(pf and pf['total_ms'], 0)} | "
                     f"{fmt(r['prompt_len'] / (ttft / 1e3) if ttft else None, 0)} | {fmt(itl)} | "
                     f"{fmt(df and df['total_ms'])} | {fmt(df and itl / df['total_ms'])} | "
                     f"{fmt(base and itl / base)} |")
        L.append("")
    elif data["serve"] is not None or phase_status.get("serve"):
        L.append(f"## Serve\n\nno workload result ({phase_status.get('serve')}); see logs.txt\n")

    def breakdown_table(title, rows, phase_key, floor_ctx=None):
        if not rows:
            return
        keys = ["attention", "attention.lightning", "attention.softmax", "gate", "moe", "moe.dispatch",
                "moe.experts", "lm_head", "sampling", "total"]
        L.append(title + "\n")
        hdr = "| conc | prompt | out | decode tok/s | wall ms/step | " + " | ".join(keys) + " | floor ms | x floor |"
        L.append(hdr)
        L.append("|" + "---:|" * (hdr.count("|") - 1))
        for r in rows:
            ms = r[phase_key]
            floor = decode_floor_ms(cfg, env, holders, r["concurrency"], r["prompt_len"] + r["max_tokens"] // 2) \
                if cfg is not None and phase_key == "decode_ms_per_step" else None
            r["decode_floor"] = floor
            wall = r["decode_ms_per_step_wall"]
            L.append(f"| {r['concurrency']} | {r['prompt_len']} | {r['max_tokens']} | {fmt(r['decode_tok_s'], 1)} | "
                     f"{fmt(wall)} | " + " | ".join(fmt(ms.get(k)) for k in keys) +
                     f" | {fmt(floor and floor['total_ms'])} | {fmt(floor and ms['total'] / floor['total_ms'])} |")
        L.append("")

    en = data["engine"]
    if en and en.get("rows"):
        L.append("## Engine in-process (router on cuda:0, ProcessShardGroup shards over NCCL, profile=True)\n")
        L.append(f"load {fmt(en.get('load_s'), 1)} s; prefill chunk {args.chunk} tokens/step. ms/step per part "
                 "(each part synchronised, so the parts add up to about the profiled step; wall ms/step is the "
                 "unprofiled-looking wall time of the decode phase, with the syncs in it). `moe.experts` = the "
                 "router's own experts, then the reduce that waits for the shards' compute and sums their answers "
                 "(the combine). Floor: HBM/GEMM floor of the step "
                 "(`decode_floor_ms`: weights + state/KV bytes at the measured copy bandwidth, router and busiest "
                 "shard in sequence per layer). Prefill floor: `prefill_floor_ms`, all prompts as one step.\n")
        breakdown_table("### Decode phase", en["rows"], "decode_ms_per_step")
        L.append("### Prefill phase\n")
        L.append("| conc | prompt | prefill s | prefill tok/s | steps | attention | attention.lightning | "
                 "attention.softmax | moe | moe.experts | total ms/step | TTFT p50 / p99 ms | floor s | x floor |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in en["rows"]:
            ms = r["prefill_ms_per_step"]
            pf = prefill_floor_ms(cfg, env, holders, r["concurrency"], r["prompt_len"]) if cfg is not None else None
            L.append(f"| {r['concurrency']} | {r['prompt_len']} | {fmt(r['prefill_s'])} | {fmt(r['prefill_tok_s'], 0)}"
                     f" | {r['prefill_steps']} | " + " | ".join(fmt(ms.get(k)) for k in (
                         "attention", "attention.lightning", "attention.softmax", "moe", "moe.experts", "total")) +
                     f" | {fmt(r['ttft_ms']['p50'], 0)} / {fmt(r['ttft_ms']['p99'], 0)} | "
                     f"{fmt(pf and pf['total_ms'] / 1e3, 3)} | {fmt(pf and r['prefill_s'] * 1e3 / pf['total_ms'])} |")
        L.append("")
    gr = data["graphs"]
    if gr and gr.get("rows"):
        L.append("## Engine in-process with CUDA-graph decode steps (router and shards replay their graphs)\n")
        L.append("Same engine and prompts as above, `cuda_graphs=True`, no profiling: a decode step is one graph "
                 "replay per side plus the step header. Eager = the profiled engine above (its syncs inflate it).\n")
        L.append("| conc | prompt | out | decode tok/s | wall ms/step | floor ms | x floor | eager wall ms/step | "
                 "eager / graphs | TTFT p50 ms |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        eager = {(r["concurrency"], r["prompt_len"]): r for r in (en or {}).get("rows") or []}
        for r in gr["rows"]:
            floor = decode_floor_ms(cfg, env, holders, r["concurrency"], r["prompt_len"] + r["max_tokens"] // 2) \
                if cfg is not None else None
            wall = r["decode_ms_per_step_wall"]
            e = eager.get((r["concurrency"], r["prompt_len"]))
            L.append(f"| {r['concurrency']} | {r['prompt_len']} | {r['max_tokens']} | {fmt(r['decode_tok_s'], 1)} | "
                     f"{fmt(wall)} | {fmt(floor and floor['total_ms'])} | "
                     f"{fmt(floor and wall / floor['total_ms'])} | {fmt(e and e['decode_ms_per_step_wall'])} | "
                     f"{fmt(e and e['decode_ms_per_step_wall'] / wall)} | {fmt(r['ttft_ms']['p50'], 0)} |")
        L.append("")
    pk = (gr or {}).get("prefill_kernels")
    if pk:
        L.append(f"### Prefill under torch.profiler: router GPU, {pk['concurrency']} prompts of {pk['prompt_len']} "
                 f"tokens, one output token each ({pk['prefill_steps']} steps of up to {args.chunk} tokens)\n")
        L.append(f"wall {fmt(pk['wall_ms'], 1)} ms (profiler on); a kernel running {fmt(pk['busy_ms'], 1)} ms; a "
                 f"compute (non-NCCL) kernel running {fmt(pk['compute_busy_ms'], 1)} ms "
                 f"({fmt(100 * pk['compute_busy_ms'] / pk['wall_ms'], 0)}% of wall); kernel time summed "
                 f"{fmt(pk['kernel_ms_sum'], 1)} ms. NCCL kernels' time includes waiting for the shards.\n")
        L += _kernel_table("kernel", pk)
        dk = pk.get("decode")
        if dk:
            L.append(f"Then a decode at that concurrency under torch.profiler with host activity (--trace: "
                     f"`trace-prefill.json.gz`, `trace-decode.json.gz` in the results folder): "
                     f"{dk['decode_steps']} decode steps at {fmt(dk['decode_ms_per_step_wall'])} ms/step wall; the "
                     f"whole level {fmt(dk['wall_ms'], 1)} ms, a kernel running {fmt(dk['busy_ms'], 1)} ms.\n")
            L += _kernel_table("kernel (decode level)", dk)
    lc = data["longctx"]
    if lc and lc.get("rows"):
        L.append("## Long context (engine in-process, one sequence)\n")
        breakdown_table("### Decode phase by prompt length", lc["rows"], "decode_ms_per_step")
        base = lc["rows"][0]["decode_ms_per_step"]
        L.append("| prompt | lightning ms/step | x vs first | softmax ms/step | x vs first | prefill s | prefill tok/s |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for r in lc["rows"]:
            ms = r["decode_ms_per_step"]
            li, so = ms.get("attention.lightning"), ms.get("attention.softmax")
            L.append(f"| {r['prompt_len']} | {fmt(li, 3)} | {fmt(li and li / base['attention.lightning'])} | "
                     f"{fmt(so, 3)} | {fmt(so and so / base['attention.softmax'])} | {fmt(r['prefill_s'])} | "
                     f"{fmt(r['prefill_tok_s'], 0)} |")
        L.append("")
    di = data["dispatch"]
    if di and di.get("rows"):
        f = di["fit"]
        L.append(f"## Dispatch: RouterDispatcher protocol vs raw all_to_all_single, {di['world']} ranks\n")
        L.append("Per MoE layer round trip on the router, echo experts on the shards, at "
                 f"{' and '.join(map(str, di['layers_per_step']))} MoE layers per step (the checkpoint's; MiniMax-M1 "
                 "has 80): ours = the protocol as the engine runs it, including the step header broadcast / layers "
                 "and packing: up to PEER_MAX_TOKENS tokens (after padding), direct writes over the peer links when "
                 "the ranks have them (`links`: each shard's tokens written into its memory, the answers into the "
                 "router's, GPU barriers, no host sync), else every token to every shard by one broadcast and one "
                 "reduce that also sums the answers (`rings`, the same steps without the links). Raw same bytes = "
                 "all_to_all_single of what ours delivers (all tokens to each shard); raw exact = all_to_all_single "
                 "of each shard's routed rows only, the fewest bytes any protocol must move. Fit of the raw rows: "
                 "alpha "
                 f"{fmt(f['alpha_us'], 1)} us + bytes / {fmt(f['bandwidth_GBps'], 1)} GB/s.\n")
        L.append("`host ms` = time the router's CPU took to issue the layer (no sync): close to the total means the "
                 "host, not the link, sets the pace.\n")
        L.append("Eager steps of up to `LAYER_GRAPH_MAX_TOKENS` tokens run as the engine runs them: the router "
                 "replays one CUDA graph per MoE layer (broadcast, reduce) from static buffers and the shards replay "
                 "their step (`layer graphs`); `without` = the same steps with every collective issued eagerly. "
                 "`right`: a last step of one token fewer (padded), with new inputs at every layer, summed the echo "
                 "shards' answers correctly.\n")
        L.append("| layers/step | tokens | path | bytes/layer | ours ms | ours host ms | right | rings ms | "
                 "rings / raw exact | without layer graphs ms | "
                 "host ms | raw same bytes ms | ours / raw same | exact bytes/layer | raw exact ms | "
                 "**ours / raw exact** | without / raw exact | alpha+bytes/BW ms | ours / model |")
        L.append("|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in di["rows"]:
            right = {True: "yes", False: "**NO**"}.get(r.get("ours_right"), "-")
            if r.get("ours_plain_right") is False:
                right += " (without: **NO**)"
            if r.get("ring_right") is False:
                right += " (rings: **NO**)"
            L.append(f"| {r.get('layers_per_step', '-')} | {r['tokens']} | {'links' if r.get('direct') else 'rings'} | "
                     f"{r['bytes_per_layer']} | "
                     f"{fmt(r['ours_ms'], 3)} | {fmt(r.get('ours_host_ms'), 3)} | {right} | "
                     f"{fmt(r.get('ring_ms'), 3)} | {fmt(r.get('ring_ratio_exact'))} | "
                     f"{fmt(r.get('ours_plain_ms'), 3)} | {fmt(r.get('ours_plain_host_ms'), 3)} | "
                     f"{fmt(r['raw_ms'], 3)} | {fmt(r['ratio'])} | {r.get('exact_bytes_per_layer', '-')} | "
                     f"{fmt(r.get('raw_exact_ms'), 3)} | **{fmt(r.get('ratio_exact'))}** | "
                     f"{fmt(r.get('plain_ratio_exact'))} | {fmt(r['model_ms'], 3)} | "
                     f"{fmt(r['ours_ms'] / r['model_ms'] if r['model_ms'] > 0 else None)} |")
        L.append("")
        graphed = [r for r in di["rows"] if r.get("raw_graph_ms") is not None]
        if graphed:
            L.append("Against the raw collectives replayed from a CUDA graph (the link's own time, no host): `ours` as "
                     "above; `decode graph` (decode sizes) = the step's layers replayed from one graph on every rank, "
                     "as the engine's decode steps run (plus the eager step header).\n")
            L.append("| layers/step | tokens | ours ms | raw exact graph ms | ours / raw exact graph | "
                     "decode graph ms | raw same bytes graph ms | decode graph / raw same | "
                     "decode graph / raw same graph |")
            L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in graphed:
                L.append(f"| {r.get('layers_per_step', '-')} | {r['tokens']} | {fmt(r['ours_ms'], 3)} | "
                         f"{fmt(r.get('raw_exact_graph_ms'), 3)} | {fmt(r.get('ratio_exact_graph'))} | "
                         f"{fmt(r.get('ours_graph_ms'), 3)} | {fmt(r['raw_graph_ms'], 3)} | "
                         f"{fmt(r.get('ours_graph_vs_raw'))} | {fmt(r.get('ours_graph_vs_raw_graph'))} |")
            L.append("")
    hf = data["hf"]
    if hf:
        L.append("## transformers generate (same checkpoint, same prompts)\n")
        by_gpu = defaultdict(list)
        for k, d in (hf.get("device_map") or {}).items():
            if k.startswith("model.layers."):
                by_gpu[d].append(k.rsplit(".", 1)[1])
        placement = ("; ".join(f"layers {','.join(v)} on cuda:{d}" for d, v in sorted(by_gpu.items())) +
                     " (embedding on cuda:0, final norm + LM head with the last layer)") if by_gpu else "on the CPU"
        L.append(f"transformers {hf.get('transformers')} `MiniMaxForCausalLM.generate`, greedy, {hf.get('dtype')}, "
                 f"attention {hf.get('attn_implementation')}, experts {hf.get('experts_implementation')}, RoPE on "
                 f"{hf.get('rope')}; {placement}; load {fmt(hf.get('load_s'), 1)} s. "
                 "Prompts: the engine phase's. TTFT = a generate call with max_new_tokens=1; decode tok/s = conc x "
                 "(out - 1) / (full call - TTFT). Engine columns: the engine phase's row at the same concurrency "
                 "(its decode runs longer: --engine-tokens). Same tokens: the longest common prefix of the greedy "
                 f"tokens over the first {TOKENS_HEAD[0]} sequences (bf16 on GPU: both drift apart after a while).\n")
        if hf.get("error"):
            L.append(f"error: {hf['error']}\n")
        L.append("| conc | prompt | out | TTFT s | prefill tok/s | decode tok/s | decode ms/step | output tok/s | "
                 "engine decode tok/s | **engine / transformers decode** | engine last first token s | same tokens | "
                 "graphs decode tok/s | **graphs / transformers decode** |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        engine_rows = {(r["concurrency"], r["prompt_len"]): r for r in (en or {}).get("rows") or []}
        graph_rows = {(r["concurrency"], r["prompt_len"]): r for r in (gr or {}).get("rows") or []}
        for r in hf.get("rows") or []:
            if r.get("error"):
                L.append(f"| {r['concurrency']} | {r['prompt_len']} | {r['max_tokens']} | error: {r['error'][:200]} |")
                continue
            e = engine_rows.get((r["concurrency"], r["prompt_len"]))
            g = graph_rows.get((r["concurrency"], r["prompt_len"]))
            same = None
            if e and e.get("tokens_head"):
                pairs = list(zip(e["tokens_head"], r["tokens_head"]))
                common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                          for a, b in pairs]
                same = f"{min(common)} of {min(len(b) for _, b in pairs)}"
            L.append(f"| {r['concurrency']} | {r['prompt_len']} | {r['max_tokens']} | {fmt(r['prefill_s'], 3)} | "
                     f"{fmt(r['prefill_tok_s'], 0)} | {fmt(r['decode_tok_s'], 1)} | {fmt(r['decode_ms_per_step'])} | "
                     f"{fmt(r['output_tok_s'], 1)} | {fmt(e and e['decode_tok_s'], 1)} | "
                     f"**{fmt(e['decode_tok_s'] / r['decode_tok_s'] if e and r['decode_tok_s'] else None, 1)}x** | "
                     f"{fmt(e and e['prefill_s'], 3)} | {fmt(same)} | "
                     f"{fmt(g and g['decode_tok_s'], 1)} | "
                     f"**{fmt(g['decode_tok_s'] / r['decode_tok_s'] if g and r['decode_tok_s'] else None, 1)}x** |")
        ratio = served_vs_hf(sv, hf.get("rows") or [])
        if ratio:
            L.append(f"\nServed workload (Serve section, through HTTP) vs transformers on the same workload in this run: "
                     f"{fmt(ratio['served'], 1)} vs {fmt(ratio['hf'], 1)} output tok/s = **{fmt(ratio['ratio'], 1)}x**.")
        more = served_vs_hf(other, hf.get("rows") or [])
        if more:
            L.append(f"Through the other ingress ({data['ingress']['ingress']}): {fmt(more['served'], 1)} vs "
                     f"{fmt(more['hf'], 1)} output tok/s = **{fmt(more['ratio'], 1)}x**.")
        for r in serve.get("client_runs") or []:
            more = served_vs_hf(r, hf.get("rows") or [])
            if more and r["client_procs"] > 1:
                L.append(f"From {r['client_procs']} client processes: {fmt(more['served'], 1)} vs "
                         f"{fmt(more['hf'], 1)} output tok/s = **{fmt(more['ratio'], 1)}x**.")
        L.append("")
    elif phase_status.get("hf"):
        L.append(f"## transformers generate\n\nno result ({phase_status['hf']}); see logs.txt\n")
    data["markdown"] = "\n".join(L)
    data["card"], data["date"] = card, date
    Path(args.out, "gpu-cluster.json").write_text(json.dumps(data, indent=2, default=str))
    Path(args.out, "gpu-cluster.md").write_text(data["markdown"])
    return data


# ---------------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--work", default=None, help="scratch folder (logs); default: OUT")
    p.add_argument("--model", default=None, help="checkpoint folder (default: /dev/shm or /tmp)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full-every", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--router-experts", action="store_true",
                   help="the router holds a share of the experts too (engine, graphs, longctx and serve phases)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--serve-tokens", type=int, default=256)
    p.add_argument("--engine-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens of the engine and the server")
    p.add_argument("--long-prompts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768, 131072])
    p.add_argument("--long-tokens", type=int, default=64, help="output tokens of the one-stream cases")
    p.add_argument("--serve-long", type=lambda s: [int(x) for x in s.split(",") if x], default=[131072],
                   help="serve phase: after the workload, one stream with each of these prompt lengths (and one with "
                        "--prompt-len first); empty: none")
    p.add_argument("--dispatch-layers", type=lambda s: [int(x) for x in s.split(",")], default=[80],
                   help="MoE layers per step in the dispatch phase, besides the checkpoint's own count")
    p.add_argument("--dispatch-profile", type=lambda s: [int(x) for x in s.split("x")], default=None,
                   help="LAYERSxTOKENS: also profile that dispatch case on every rank (tables in --work)")
    p.add_argument("--serve-cuda-graphs", choices=["on", "off"], default=None,
                   help="the server's --cuda-graphs (default: the CLI's default)")
    p.add_argument("--trace", action="store_true",
                   help="graphs phase: also export chrome traces (host and GPU) of the router process's prefill and "
                        "decode into --out, and time the engine thread's host work in them")
    p.add_argument("--hf-max-tokens", type=int, default=64, help="output tokens per sequence in the hf phase")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--deadline-s", type=float, default=560, help="whole run; phases get what is left")
    p.add_argument("--serve-start-timeout", type=float, default=150)
    p.add_argument("--no-client-warmup", dest="client_warmup", action="store_false",
                   help="serve phase: measure right after the server reports ready (its own warm-up only)")
    p.add_argument("--client-procs", type=int, default=4,
                   help="serve phase: also run the workload from this many client processes (then from one again)")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="the serve phase's `m1serve serve --ingress` (the ingress phase runs the other)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    return p


def default_model_path(args) -> str:
    import shutil

    tag = f"m1-{'tiny' if args.tiny else 'real'}-{args.layers}l-v{args.vocab}"
    need = 0 if args.tiny else args.layers * 32 * 3 * 6144 * 9216 * 2 * 1.1
    for root in ("/dev/shm", "/tmp"):
        try:
            if Path(root, tag).exists() or shutil.disk_usage(root).free > need + 20e9:
                return str(Path(root, tag))
        except OSError:
            pass
    return str(Path("/tmp", tag))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.model = args.model or default_model_path(args)
    if args.phase:  # child: run one phase
        fn = globals()[f"phase_{args.phase}"]
        save(args, args.phase, fn(args))
        return 0
    t_start = now()
    status = {}
    phases = [p for p in args.phases.split(",") if p]
    child_argv = [a for a in argv if a != "--"] + ["--model", args.model]
    for name in phases:
        left = args.deadline_s - (now() - t_start)
        if left < MIN_START[name]:
            status[name] = f"skipped ({left:.0f}s left)"
            print(f"== {name}: skipped, {left:.0f}s left", flush=True)
            continue
        if name != "ckpt" and name != "env" and status.get("ckpt", "ok").startswith(("failed", "timeout")):
            status[name] = "skipped (no checkpoint)"
            continue
        cap = min(CAPS[name], left)
        print(f"== {name} (cap {cap:.0f}s)", flush=True)
        t0 = now()
        log_path = Path(args.work, f"{name}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, *child_argv, "--phase", name], cwd=REPO,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ) | NCCL_SAFE | {"PYTHONUNBUFFERED": "1"})
            try:
                rc = proc.wait(timeout=cap)
                status[name] = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                status[name] = f"timeout ({cap:.0f}s)"
        status[name] += f", {now() - t0:.0f}s"
        print(f"== {name}: {status[name]}", flush=True)
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print("\n".join("   | " + ln[:300] for ln in tail), flush=True)
    data = report(args, status)
    print(data["markdown"], flush=True)
    # the logs' tails, in one file
    with open(Path(args.out, "logs.txt"), "w") as f:
        for name in phases + ["m1serve-server"]:
            p = Path(args.work, f"{name}.log")
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()
                f.write(f"===== {p.name} ({len(lines)} lines; last 300)\n" + "\n".join(lines[-300:]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
