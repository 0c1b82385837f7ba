"""Shared fixtures for the model-core tests: tiny checkpoints (original and transformers naming), our model
loaded from them, and the patched-transformers oracle (tests/hf_oracle.py), all built once per session."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from model_shards.batch import ForwardBatch, ModelCache, SeqChunk  # noqa: E402
from model_shards.checkpoint import INDEX_FILE  # noqa: E402
from model_shards.config import ModelConfig  # noqa: E402
from model_shards.tiny import random_weights, tiny_config, write_checkpoint  # noqa: E402
from model_shards.transformers_compat import to_transformers_tensors  # noqa: E402

KV_BLOCK = 16


# ---- checkpoint rewriting ---------------------------------------------------------------------------------------
def read_all(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint folder, by stored name."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    weight_map = json.loads((ckpt_dir / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for fname in sorted(set(weight_map.values())):
        with safe_open(str(ckpt_dir / fname), framework="pt") as f:
            for n in f.keys():
                out[n] = f.get_tensor(n)
    return out


def write_sharded(out: str | Path, config: dict, groups: list[tuple[str, dict[str, torch.Tensor]]]) -> Path:
    """Writes (filename, tensors) groups + an index naming exactly those files, and config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for fname, tensors in groups:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_transformers_naming(src: str | Path, dst: str | Path, cfg: ModelConfig, num_files: int = 3) -> Path:
    """Rewrites an original-named checkpoint in transformers naming, spread round-robin over num_files shards."""
    tensors = to_transformers_tensors(cfg, read_all(src))
    groups = [(f"model-{i + 1:05d}-of-{num_files:05d}.safetensors", {}) for i in range(num_files)]
    for i, n in enumerate(sorted(tensors)):
        groups[i % num_files][1][n] = tensors[n]
    return write_sharded(dst, json.loads((Path(src) / "config.json").read_text()), groups)


# ---- running our model ------------------------------------------------------------------------------------------
@dataclass
class Seq:
    ids: list[int]
    slot: int
    blocks: list[int]
    done: int = 0  # tokens already in the caches


class Runner:
    """Our model (router part + one or more expert parts) with its own cache and a trivial block allocator."""

    def __init__(self, router, experts, num_slots=8, num_kv_blocks=256):
        self.router, self.experts = router, list(experts)
        self.cfg = router.cfg
        self.cache = ModelCache(self.cfg, num_slots, num_kv_blocks, KV_BLOCK, torch.float32, "cpu")
        self.next_block = 0

    def moe(self, layer, h, ids, weights):
        out = self.experts[0].forward(layer, h, ids, weights)
        for part in self.experts[1:]:
            out = out + part.forward(layer, h, ids, weights)
        return out

    def new_seq(self, slot: int, max_len: int) -> Seq:
        n = (max_len + KV_BLOCK - 1) // KV_BLOCK
        blocks = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        assert self.next_block <= self.cache.k.shape[1]
        self.cache.reset_slot(slot)
        return Seq([], slot, blocks)

    @torch.no_grad()
    def step(self, work: list[tuple[Seq, list[int]]], all_logits: bool = False) -> torch.Tensor:
        """One forward over several sequences' new tokens, packed; returns logits (last rows or all rows)."""
        chunks = []
        for seq, new in work:
            chunks.append(SeqChunk(list(new), seq.done, seq.slot, seq.blocks))
        batch = ForwardBatch.build(chunks, KV_BLOCK, "cpu")
        logits = self.router(batch, self.cache, self.moe, all_logits=all_logits)
        for seq, new in work:
            seq.ids.extend(new)
            seq.done += len(new)
        return logits

    def prefill(self, ids: list[int], slot: int = 0) -> torch.Tensor:
        """All-position logits [T, V] of a fresh sequence in one step."""
        seq = self.new_seq(slot, len(ids))
        return self.step([(seq, ids)], all_logits=True)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- tiny model cases -------------------------------------------------------------------------------------------
MODEL_CASES = {
    # model.md section 10 config (1 softmax layer of 8, GQA 4:1, rotary 16 of 32), 8 experts
    "default": dict(),
    # 2 softmax layers among 6 (layers 2 and 5), GQA 4:1, rotary_dim 8 < head_dim 32
    "gqa": dict(num_layers=6, full_attention_every=3, num_heads=8, num_kv_heads=2, head_dim=32, rotary_dim=8),
    # 4 experts, head_dim 48 (8*48 = 384 != 128), GQA 2:1, softmax layers 1 and 3
    "e4": dict(num_layers=4, num_experts=4, head_dim=48, rotary_dim=16, num_kv_heads=4, full_attention_every=2),
}


@dataclass
class ModelCase:
    name: str
    cfg: ModelConfig
    path: Path
    tmp: Path
    _hf: object = None
    _parts: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    @property
    def hf(self):
        if self._hf is None:
            from hf_oracle import load_hf_model

            self._hf = load_hf_model(self.path, self.tmp / "hf")
        return self._hf

    def router(self):
        if "router" not in self._parts:
            from model_shards.loading import load_router_part

            self._parts["router"] = load_router_part(self.path, dtype=torch.float32)
        return self._parts["router"]

    def experts(self, first=None, last=None):
        key = ("experts", first, last)
        if key not in self._parts:
            from model_shards.loading import load_expert_part

            self._parts[key] = load_expert_part(self.path, first, last, dtype=torch.float32)
        return self._parts[key]

    def runner(self, **kw) -> Runner:
        return Runner(self.router(), [self.experts()], **kw)

    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        """The oracle's full-sequence logits [T, V] (memoised: several tests ask for the same prompt)."""
        from hf_oracle import hf_logits

        key = ("hf", tuple(ids))
        if key not in self._memo:
            self._memo[key] = hf_logits(self.hf, ids)
        return self._memo[key]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Our single-step prefill logits [T, V] with all experts in one part (memoised)."""
        key = ("ours", tuple(ids))
        if key not in self._memo:
            self._memo[key] = self.runner().prefill(ids)
        return self._memo[key]


@pytest.fixture(scope="module")
def single_thread():
    """The tiny models are far too small for intra-op threads; with one thread they also stay fast when other
    processes load the (2-core) machine. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def model_cases(tmp_path_factory):
    cache: dict[str, ModelCase] = {}

    def get(name: str) -> ModelCase:
        if name not in cache:
            cfg = tiny_config(**MODEL_CASES[name])
            tmp = tmp_path_factory.mktemp(f"model_{name}")
            write_checkpoint(tmp / "ckpt", cfg, random_weights(cfg, seed=list(MODEL_CASES).index(name) + 1))
            cache[name] = ModelCase(name, cfg, tmp / "ckpt", tmp)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(model_cases) -> ModelCase:
    """The default tiny model (original naming, MiniMax's expert-major shard layout)."""
    return model_cases("default")


@pytest.fixture(scope="session")
def tiny_ckpt_tf(tiny_ckpt, tmp_path_factory) -> Path:
    """The default tiny checkpoint rewritten in transformers naming."""
    return write_transformers_naming(tiny_ckpt.path, tmp_path_factory.mktemp("tf_naming") / "ckpt", tiny_ckpt.cfg)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """make-tiny output: the published layout plus tokenizer, as `m1serve make-tiny` writes it."""
    from model_shards.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.fixture(scope="session")
def reference_parts(tiny_model):
    """The single-process model of tiny_model: router part and all experts, fp32."""
    from model_shards.loading import load_expert_part, load_router_part

    return load_router_part(tiny_model, torch.float32), load_expert_part(tiny_model, dtype=torch.float32)
