"""The direct-write path of the router <-> shard protocol (cluster/peer_links.py), on CPU: real RouterDispatcher and
ShardWorker processes in a gloo group, whose PeerLinks are shared-memory files instead of GPU symmetric memory and
whose barrier is gloo's. Each step's answers must equal the single-process experts', for steps through the links
(padded and not) and steps too large for them (the ring collectives), interleaved. The buffers start as NaN, so a
row read before it was written, or a slot summed that no shard wrote, shows."""

from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest
import torch
import torch.distributed as dist

from cluster.dispatch import RouterDispatcher, ShardWorker, row_width
from cluster.peer_links import PeerLinks, buffer_elements, links_agreed
from model_shards.config import ModelConfig
from model_shards.expert_part import router_expert_range, shard_expert_range
from model_shards.loading import load_expert_part

MAX_TOKENS = 32
STEPS = (3, 40, 17, 5, 32, 1)  # 40: over MAX_TOKENS (the rings); 17: padded to 32 (links); 5 after 17: stale rows


def _links(rank: int, world: int, files: list[str], cfg: ModelConfig, ranges) -> PeerLinks:
    n = buffer_elements(world - 1, cfg.hidden_size, _width(cfg), MAX_TOKENS)
    buffers = [torch.from_file(f, shared=True, size=n, dtype=torch.float32) for f in files]
    return PeerLinks(rank, buffers, dist.barrier, ranges, cfg.hidden_size, _width(cfg), MAX_TOKENS)


def _width(cfg: ModelConfig) -> int:
    return row_width(cfg.hidden_size, torch.float32, cfg.num_experts_per_tok)


def _rank_main(rank, world, store, files, model, router_experts, errors):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        cfg = ModelConfig.from_file(model)
        N = world - 1
        ranges = [router_expert_range(cfg.num_local_experts, N) if router_experts else (0, 0)]
        ranges += [shard_expert_range(cfg.num_local_experts, N, s, router_experts) for s in range(N)]
        links = _links(rank, world, files, cfg, ranges)
        with torch.inference_mode():
            if rank:
                experts = load_expert_part(model, *ranges[rank], dtype=torch.float32)
                ShardWorker(experts, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts_per_tok, torch.float32,
                            "cpu", links=links).serve()
            else:
                _router(cfg, model, links, ranges[0] if router_experts else None)
        dist.destroy_process_group()
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _router(cfg, model, links, local_range):
    full = load_expert_part(model, dtype=torch.float32)
    local = load_expert_part(model, *local_range, dtype=torch.float32) if local_range else None
    disp = RouterDispatcher("cpu", local=local, layer_graphs=True)
    disp.links = links
    gen = torch.Generator().manual_seed(0)
    for n in STEPS:
        h = torch.randn(n, cfg.hidden_size, generator=gen)
        ids = torch.stack([torch.randperm(cfg.num_local_experts, generator=gen)[:2] for _ in range(n)])
        weights = torch.rand(n, 2, generator=gen)
        disp.begin_step(n)
        assert disp.direct == (n <= MAX_TOKENS), (n, disp.direct)
        for layer in range(cfg.num_hidden_layers):
            out = disp(layer, h, ids, weights)
            assert out.isfinite().all(), f"step of {n}: NaN from an unwritten row"
            torch.testing.assert_close(out, full.forward(layer, h, ids, weights), rtol=1e-5, atol=1e-5)
        disp.finish_step()
    disp.shutdown()


@pytest.mark.parametrize("shards,router_experts", [(2, False), (3, True)])
def test_direct_writes_answer_like_one_process(tmp_path, tiny_model, shards, router_experts):
    cfg = ModelConfig.from_file(tiny_model)
    world = shards + 1
    n = buffer_elements(shards, cfg.hidden_size, _width(cfg), MAX_TOKENS)
    files = []
    for r in range(world):
        f = str(tmp_path / f"buffer{r}")
        torch.from_file(f, shared=True, size=n, dtype=torch.float32).fill_(float("nan"))
        files.append(f)
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path / "store"), files, str(tiny_model),
                                                  router_experts, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    found = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not alive and not found, "\n".join(found) or "a rank hung"
    assert [p.exitcode for p in procs] == [0] * world


def test_links_reject_unequal_or_unordered_shard_ranges():
    bufs = [torch.zeros(1)] * 3
    with pytest.raises(ValueError, match="equal"):
        PeerLinks(0, bufs, lambda: None, [(0, 0), (0, 2), (2, 6)], 4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        PeerLinks(0, bufs, lambda: None, [(0, 0), (4, 8), (0, 4)], 4, 8)
    links = PeerLinks(0, bufs, lambda: None, [(0, 2), (2, 5), (5, 8)], 4, 8)
    assert (links.first, links.per, links.num_shards, links.shard_range(1)) == (2, 3, 2, (5, 8))


def test_links_need_every_rank_usable_on_one_host_each_on_its_own_gpu():
    assert links_agreed([("a", True, 0), ("a", True, 1), ("a", True, 2)])
    assert not links_agreed([("a", True, 0), ("a", False, 1), ("a", True, 2)])  # e.g. one that joined a group before
    assert not links_agreed([("a", True, 0), ("b", True, 1)])
    assert not links_agreed([("a", True, 0), ("a", True, 0)])  # Ray replicas that each see only their GPU


def test_no_links_on_cpu(tmp_path):
    from cluster.peer_links import open_peer_links

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert open_peer_links(0, 1, torch.device("cpu"), torch.float32, 8, 16, (0, 0)) is None
    finally:
        dist.destroy_process_group()


def test_replicas_pick_their_ray_gpu_when_they_see_the_whole_node(monkeypatch):
    """Links need the router and shards to see each other's GPUs: with NOSET every replica sees all of them and must
    pick the one Ray assigned it by id (its index in CUDA_VISIBLE_DEVICES when the node narrows that); without it,
    Ray narrows the replica to its GPU, which is cuda:0."""
    from cluster import deployments

    monkeypatch.setattr(deployments.ray, "get_gpu_ids", lambda: [2])
    monkeypatch.delenv(deployments.NOSET_CUDA_VISIBLE_DEVICES, raising=False)
    assert deployments.replica_device() == torch.device("cuda", 0)
    monkeypatch.setenv(deployments.NOSET_CUDA_VISIBLE_DEVICES, "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert deployments.replica_device() == torch.device("cuda", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,2,7")
    assert deployments.replica_device() == torch.device("cuda", 1)
    monkeypatch.setattr(deployments.ray, "get_gpu_ids", lambda: [])
    assert deployments.replica_device() == torch.device("cpu")


def test_the_app_builder_lets_replicas_see_their_node(tiny_model):
    from cluster.app import build_app
    from cluster.deployments import NOSET_CUDA_VISIBLE_DEVICES

    app = build_app({"model": str(tiny_model), "expert_shards": 2, "env": {"X": "1"}})
    router = app._bound_deployment
    for d in [router, *(s._bound_deployment for s in router.init_args[1])]:
        assert d.ray_actor_options["runtime_env"]["env_vars"] == {NOSET_CUDA_VISIBLE_DEVICES: "1", "X": "1"}
    app = build_app({"model": str(tiny_model), "expert_shards": 2, "env": {NOSET_CUDA_VISIBLE_DEVICES: "0"}})
    assert app._bound_deployment.ray_actor_options["runtime_env"]["env_vars"] == {NOSET_CUDA_VISIBLE_DEVICES: "0"}
