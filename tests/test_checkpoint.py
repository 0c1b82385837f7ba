"""Checkpoint: original vs transformers naming, arbitrary shard layouts, precise errors, and partial loads that
read only what they need (bytes_read, and peak RSS in a subprocess)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, read_all, to_transformers_tensors, write_sharded
from model_shards.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, router_names
from model_shards.tiny import random_weights, tiny_config


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.fixture(scope="session")
def raw(tiny_ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of the default tiny checkpoint, read straight from the files."""
    return read_all(tiny_ckpt.path)


def ranges(E):
    return [(a, b) for a in range(E) for b in range(a + 1, E + 1)]


def expected_experts(raw, layer, first, last):
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    w13 = torch.stack([torch.cat([raw[f"{p}{e}.w1.weight"], raw[f"{p}{e}.w3.weight"]]) for e in range(first, last)])
    w2 = torch.stack([raw[f"{p}{e}.w2.weight"] for e in range(first, last)])
    return w13, w2


def assert_same_dict(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---- what the reads return ----------------------------------------------------------------------------------------
def test_router_part_is_every_non_expert_tensor(tiny_ckpt, raw):
    cfg = tiny_ckpt.cfg
    ck = Checkpoint(tiny_ckpt.path)
    router = ck.load_router_part(cfg)
    assert not ck.transformers_naming
    assert router.keys() == {n for n in raw if ".experts." not in n}
    for n, t in router.items():
        assert torch.equal(t, raw[n]) and t.dtype == raw[n].dtype
    assert router["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32  # fp32 router gates
    assert router["lm_head.weight"].dtype == torch.bfloat16
    ck.close()


def test_experts_original_naming_any_range(tiny_ckpt, raw):
    cfg = tiny_ckpt.cfg
    ck = Checkpoint(tiny_ckpt.path)
    for layer in (0, cfg.num_hidden_layers - 1):
        for first, last in ranges(cfg.num_local_experts):
            w13, w2 = ck.load_experts(cfg, layer, first, last)
            e13, e2 = expected_experts(raw, layer, first, last)
            assert w13.shape == (last - first, 2 * cfg.intermediate_size, cfg.hidden_size)
            assert w2.shape == (last - first, cfg.hidden_size, cfg.intermediate_size)
            assert torch.equal(w13, e13) and torch.equal(w2, e2)


def test_transformers_naming_router_identical(tiny_ckpt, tiny_ckpt_tf):
    cfg = tiny_ckpt.cfg
    a, b = Checkpoint(tiny_ckpt.path), Checkpoint(tiny_ckpt_tf)
    assert b.transformers_naming and not a.transformers_naming
    assert any(".mlp.gate.weight" in n for n in b.weight_map)
    assert not any("block_sparse_moe" in n for n in b.weight_map)
    assert_same_dict(a.load_router_part(cfg), b.load_router_part(cfg))


def test_transformers_naming_experts_identical_any_range(tiny_ckpt, tiny_ckpt_tf):
    cfg = tiny_ckpt.cfg
    a, b = Checkpoint(tiny_ckpt.path), Checkpoint(tiny_ckpt_tf)
    for layer in range(cfg.num_hidden_layers):
        for first, last in ranges(cfg.num_local_experts):
            wa, wb = a.load_experts(cfg, layer, first, last), b.load_experts(cfg, layer, first, last)
            assert wa[0].dtype == wb[0].dtype and wa[1].dtype == wb[1].dtype
            assert torch.equal(wa[0], wb[0]) and torch.equal(wa[1], wb[1]), (layer, first, last)


def test_transformers_fused_layout_is_gate_first(tiny_ckpt_tf, raw, tiny_ckpt):
    """Guards the test helper itself: gate_up_proj[e] = [w1; w3], down_proj[e] = w2 (what TF's loader expects;
    test_model checks TF loads it to the same logits)."""
    cfg = tiny_ckpt.cfg
    F = cfg.intermediate_size
    with safe_open(str(tiny_ckpt_tf / json.loads((tiny_ckpt_tf / INDEX_FILE).read_text())["weight_map"][
            "model.layers.2.mlp.experts.gate_up_proj"]), framework="pt") as f:
        gu = f.get_tensor("model.layers.2.mlp.experts.gate_up_proj")
    assert gu.shape == (cfg.num_local_experts, 2 * F, cfg.hidden_size)
    assert torch.equal(gu[3, :F], raw["model.layers.2.block_sparse_moe.experts.3.w1.weight"])
    assert torch.equal(gu[3, F:], raw["model.layers.2.block_sparse_moe.experts.3.w3.weight"])


def _shuffled_layout(tensors: dict, seed: int, num_files: int, stem: str) -> list:
    rng = random.Random(seed)
    names = list(tensors)
    rng.shuffle(names)
    files = [f"{stem}-{rng.randrange(10 ** 6):06d}-{i}.safetensors" for i in range(num_files)]
    rng.shuffle(files)
    groups = [(f, {}) for f in files]
    for n in names:
        groups[rng.randrange(num_files)][1][n] = tensors[n]
    return [g for g in groups if g[1]]


@pytest.mark.parametrize("naming", ["original", "transformers"])
@pytest.mark.parametrize("seed, num_files", [(0, 2), (1, 5), (2, 11)])
def test_shuffled_shards_load_the_same(tiny_ckpt, raw, tmp_path, naming, seed, num_files):
    cfg = tiny_ckpt.cfg
    tensors = raw if naming == "original" else to_transformers_tensors(cfg, raw)
    config = json.loads((tiny_ckpt.path / "config.json").read_text())
    d = write_sharded(tmp_path / "ckpt", config, _shuffled_layout(tensors, seed, num_files, "weights"))
    ref, ck = Checkpoint(tiny_ckpt.path), Checkpoint(d)
    assert len(set(ck.weight_map.values())) > 1
    assert_same_dict(ref.load_router_part(cfg), ck.load_router_part(cfg))
    for layer in range(cfg.num_hidden_layers):
        for first, last in [(0, 8), (0, 1), (3, 5), (7, 8)]:
            a, b = ref.load_experts(cfg, layer, first, last), ck.load_experts(cfg, layer, first, last)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_single_file_checkpoint_without_index(tiny_ckpt, raw, tmp_path):
    cfg = tiny_ckpt.cfg
    save_file({n: t.contiguous() for n, t in raw.items()}, str(tmp_path / "model.safetensors"))
    ref, ck = Checkpoint(tiny_ckpt.path), Checkpoint(tmp_path)
    assert_same_dict(ref.load_router_part(cfg), ck.load_router_part(cfg))
    a, b = ref.load_experts(cfg, 4, 2, 6), ck.load_experts(cfg, 4, 2, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- bytes read -------------------------------------------------------------------------------------------------
def test_bytes_read_router_only(tiny_ckpt, raw):
    cfg = tiny_ckpt.cfg
    ck = Checkpoint(tiny_ckpt.path)
    ck.load_router_part(cfg)
    want = sum(nbytes(raw[n]) for n in router_names(cfg))
    assert ck.bytes_read == want
    assert want < sum(nbytes(t) for t in raw.values()) / 2  # experts dominate even the tiny model


@pytest.mark.parametrize("first, last", [(0, 1), (2, 5), (0, 8), (7, 8)])
def test_bytes_read_one_expert_subset(tiny_ckpt, tiny_ckpt_tf, raw, first, last):
    cfg = tiny_ckpt.cfg
    layer = 3
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    want = sum(nbytes(raw[f"{p}{e}.{w}.weight"]) for e in range(first, last) for w in ("w1", "w2", "w3"))
    for path in (tiny_ckpt.path, tiny_ckpt_tf):
        ck = Checkpoint(path)
        ck.load_experts(cfg, layer, first, last)
        assert ck.bytes_read == want, path


def test_bytes_read_accumulates_over_expert_part(tiny_ckpt, raw):
    from model_shards.expert_part import ExpertPart

    cfg = tiny_ckpt.cfg
    ck = Checkpoint(tiny_ckpt.path)
    ExpertPart.load(ck, cfg, 2, 4)
    want = sum(nbytes(t) for n, t in raw.items() if any(f".experts.{e}." in n for e in (2, 3)))
    assert ck.bytes_read == want


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    """A writable copy of the default tiny checkpoint (original naming) and a helper to edit its index."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt.path, d)
    return d


@pytest.fixture
def tf_copy(tiny_ckpt_tf, tmp_path):
    d = tmp_path / "ckpt_tf"
    shutil.copytree(tiny_ckpt_tf, d)
    return d


def index_of(d: Path) -> dict:
    return json.loads((d / INDEX_FILE).read_text())


def edit_index(d: Path, fn) -> None:
    idx = index_of(d)
    fn(idx["weight_map"])
    (d / INDEX_FILE).write_text(json.dumps(idx))


def rewrite_tensor(d: Path, name: str, new: torch.Tensor | None) -> str:
    """Replaces (or with None: drops) one tensor inside the shard file the index names for it."""
    fname = index_of(d)["weight_map"][name]
    with safe_open(str(d / fname), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    save_file(tensors, str(d / fname), metadata={"format": "pt"})
    return fname


def raises(fn, *words) -> str:
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    return msg


ATTN = "model.layers.3.self_attn.out_proj.weight"
EXPERT = "model.layers.2.block_sparse_moe.experts.5.w2.weight"


def test_error_tensor_missing_from_index(ckpt_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    edit_index(ckpt_copy, lambda wm: wm.pop(ATTN))
    raises(lambda: Checkpoint(ckpt_copy).load_router_part(cfg), ATTN, ckpt_copy)
    edit_index(ckpt_copy, lambda wm: wm.pop(EXPERT))
    raises(lambda: Checkpoint(ckpt_copy).load_experts(cfg, 2, 4, 6), EXPERT, ckpt_copy)
    # a partial load that does not need the missing tensor still works
    w13, w2 = Checkpoint(ckpt_copy).load_experts(cfg, 2, 0, 5)
    assert w13.shape[0] == 5
    Checkpoint(ckpt_copy).load_experts(cfg, 3, 0, 8)


def test_error_tensor_missing_from_its_file(ckpt_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    fname = rewrite_tensor(ckpt_copy, ATTN, None)
    raises(lambda: Checkpoint(ckpt_copy).load_router_part(cfg), ATTN, fname)
    efile = rewrite_tensor(ckpt_copy, EXPERT, None)
    raises(lambda: Checkpoint(ckpt_copy).load_experts(cfg, 2, 5, 6), EXPERT, efile)


def test_error_tensor_pointed_at_wrong_file(ckpt_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    other = index_of(ckpt_copy)["weight_map"]["model.embed_tokens.weight"]
    edit_index(ckpt_copy, lambda wm: wm.__setitem__(ATTN, other))
    raises(lambda: Checkpoint(ckpt_copy).load_router_part(cfg), ATTN, other)


def test_error_tensor_missing_from_its_file_transformers_naming(tf_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    name = "model.layers.1.mlp.experts.down_proj"
    fname = rewrite_tensor(tf_copy, name, None)
    raises(lambda: Checkpoint(tf_copy).load_experts(cfg, 1, 0, 2), name, fname)
    gate = "model.layers.4.mlp.gate.weight"
    gfile = rewrite_tensor(tf_copy, gate, None)
    raises(lambda: Checkpoint(tf_copy).load_router_part(cfg), gate, gfile)


@pytest.mark.parametrize("name, shape", [
    ("model.norm.weight", (129,)),
    (ATTN, (128, 255)),
    ("model.layers.7.self_attn.k_proj.weight", (32, 128)),
    ("model.layers.0.block_sparse_moe.gate.weight", (7, 128)),
])
def test_error_shape_mismatch_router(ckpt_copy, tiny_ckpt, name, shape):
    fname = rewrite_tensor(ckpt_copy, name, torch.zeros(shape, dtype=torch.bfloat16))
    raises(lambda: Checkpoint(ckpt_copy).load_router_part(tiny_ckpt.cfg), name, fname, shape)


def test_error_shape_mismatch_expert(ckpt_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    name = "model.layers.2.block_sparse_moe.experts.5.w1.weight"
    fname = rewrite_tensor(ckpt_copy, name, torch.zeros(cfg.hidden_size, cfg.intermediate_size, dtype=torch.bfloat16))
    raises(lambda: Checkpoint(ckpt_copy).load_experts(cfg, 2, 4, 8), name, fname)


def test_error_shape_mismatch_transformers_intermediate(tf_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    E, F, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fname = rewrite_tensor(tf_copy, name, torch.zeros(E, F, H, dtype=torch.bfloat16))  # gate only, no up
    msg = raises(lambda: Checkpoint(tf_copy).load_experts(cfg, 1, 0, 2), name, fname)
    assert str((E, F, H)) in msg and str((E, 2 * F, H)) in msg


def test_error_shape_mismatch_transformers_expert_count(tf_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    E, F, H = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fname = rewrite_tensor(tf_copy, name, torch.zeros(E - 1, 2 * F, H, dtype=torch.bfloat16))
    msg = raises(lambda: Checkpoint(tf_copy).load_experts(cfg, 1, 0, E), name, fname)
    assert str((E - 1, 2 * F, H)) in msg
    raises(lambda: Checkpoint(tf_copy).load_experts(cfg, 1, 0, 2), name, fname, (E - 1, 2 * F, H))


def _truncate(d, fname):
    p = d / fname
    p.write_bytes(p.read_bytes()[:-37])


def _delete(d, fname):
    (d / fname).unlink()


def _corrupt_header(d, fname):
    p = d / fname
    b = bytearray(p.read_bytes())
    b[8:16] = b"{garbag!"
    p.write_bytes(bytes(b))


def _header_length(d, fname):
    p = d / fname
    b = p.read_bytes()
    p.write_bytes((1 << 40).to_bytes(8, "little") + b[8:])


FILE_DAMAGE = {"truncated": _truncate, "missing": _delete, "corrupt_header": _corrupt_header,
               "bad_header_length": _header_length}


def _load_for(name, cfg):
    if ".experts." in name:
        return lambda ck: ck.load_experts(cfg, 2, 0, cfg.num_local_experts)
    return lambda ck: ck.load_router_part(cfg)


@pytest.mark.parametrize("damage", FILE_DAMAGE)
@pytest.mark.parametrize("name", [ATTN, EXPERT])
def test_error_damaged_shard_names_file(ckpt_copy, tiny_ckpt, damage, name):
    fname = index_of(ckpt_copy)["weight_map"][name]
    FILE_DAMAGE[damage](ckpt_copy, fname)
    load = _load_for(name, tiny_ckpt.cfg)
    raises(lambda: load(Checkpoint(ckpt_copy)), fname)


@pytest.mark.parametrize("damage", FILE_DAMAGE)
def test_error_damaged_shard_names_tensor(ckpt_copy, tiny_ckpt, damage):
    fname = index_of(ckpt_copy)["weight_map"][EXPERT]
    FILE_DAMAGE[damage](ckpt_copy, fname)
    ck = Checkpoint(ckpt_copy)
    raises(lambda: ck.read(EXPERT), EXPERT, fname)


def test_damaged_expert_shard_does_not_affect_router_load(ckpt_copy, tiny_ckpt):
    cfg = tiny_ckpt.cfg
    wm = index_of(ckpt_copy)["weight_map"]
    expert_files = {f for n, f in wm.items() if ".experts." in n} - {f for n, f in wm.items() if ".experts." not in n}
    assert expert_files
    for f in expert_files:
        _truncate(ckpt_copy, f)
    assert len(Checkpoint(ckpt_copy).load_router_part(cfg)) == len(router_names(cfg))


def test_error_bad_index(ckpt_copy, tmp_path):
    (ckpt_copy / INDEX_FILE).write_text("{not json")
    raises(lambda: Checkpoint(ckpt_copy), INDEX_FILE)
    (ckpt_copy / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    raises(lambda: Checkpoint(ckpt_copy), INDEX_FILE)
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(lambda: Checkpoint(empty), empty)


@pytest.mark.parametrize("first, last", [(3, 3), (5, 2), (-1, 2), (0, 9)])
def test_error_bad_expert_range(tiny_ckpt, first, last):
    raises(lambda: Checkpoint(tiny_ckpt.path).load_experts(tiny_ckpt.cfg, 0, first, last), "expert range")


# ---- peak memory of partial loads -------------------------------------------------------------------------------
RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from model_shards.checkpoint import Checkpoint
    from model_shards.config import ModelConfig
    from model_shards.loading import load_router_part
    from model_shards.expert_part import ExpertPart
    path, mode = sys.argv[2], sys.argv[3]
    cfg = ModelConfig.from_file(path)
    ck = Checkpoint(path)

    def peak():
        # ru_maxrss also counts the pre-exec image (sig->maxrss: here the forked pytest process), so on Linux read
        # this process's own high-water mark (VmHWM, resettable); ru_maxrss elsewhere
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    try:  # reset the high-water mark to the current RSS, so import-time peaks cannot hide the load
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = peak()
    if mode == "router":
        part = load_router_part(path, dtype=torch.bfloat16)
        touched = float(sum(t.float().sum() for t in [part.embed, part.lm_head] + part.gates))
        bytes_read = None
    else:
        part = ExpertPart.load(ck, cfg, 0, cfg.num_local_experts, dtype=torch.bfloat16)
        touched = float(sum(t.float().sum() for t in part.w13 + part.w2))
        bytes_read = ck.bytes_read
    print(json.dumps({"base": base, "peak": peak(), "bytes_read": bytes_read}))
""")


@pytest.fixture(scope="session")
def big_expert_ckpt(tmp_path_factory):
    """Experts dominate: 2 layers x 16 experts x (3 x 512 x 2048) bf16 = 201 MB vs ~5 MB of the rest. Router and
    expert tensors are interleaved inside the same shard files, so only range reads keep the router load small."""
    cfg = tiny_config(num_layers=2, num_experts=16, hidden_size=512, intermediate_size=2048, vocab_size=512,
                      num_heads=8, num_kv_heads=2, head_dim=64, rotary_dim=32, full_attention_every=2)
    tensors = random_weights(cfg, seed=5)
    d = tmp_path_factory.mktemp("big") / "ckpt"
    groups = _shuffled_layout(tensors, seed=3, num_files=3, stem="mixed")
    write_sharded(d, cfg.to_dict(), groups)
    expert_bytes = sum(nbytes(t) for n, t in tensors.items() if ".experts." in n)
    rest_bytes = sum(nbytes(t) for n, t in tensors.items() if ".experts." not in n)
    files = {f for f, g in groups if any(".experts." in n for n in g) and any(".experts." not in n for n in g)}
    assert files, "router and expert tensors should share files"
    return d, expert_bytes, rest_bytes


def _peak_delta(path, mode):
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), str(path), mode], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["peak"] - out["base"], out


@pytest.mark.slow
def test_peak_rss_router_only_vs_all_experts(big_expert_ckpt):
    path, expert_bytes, rest_bytes = big_expert_ckpt
    assert expert_bytes > 190e6 and rest_bytes < 10e6
    router_delta, _ = _peak_delta(path, "router")
    experts_delta, out = _peak_delta(path, "experts")
    assert out["bytes_read"] == expert_bytes
    print(f"router peak +{router_delta / 1e6:.1f} MB, experts peak +{experts_delta / 1e6:.1f} MB, "
          f"experts {expert_bytes / 1e6:.1f} MB")
    # router only: a few MB of tensors (+ allocator noise), far below the 200 MB of experts sharing its files
    assert router_delta < 0.2 * expert_bytes, (router_delta, expert_bytes)
    # all experts: at least their size must become resident (proves the measurement can see a full read)
    assert experts_delta > 0.9 * expert_bytes, (experts_delta, expert_bytes)
