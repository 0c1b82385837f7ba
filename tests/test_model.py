"""Our model (RouterPart + ExpertPart over ForwardBatch / ModelCache) against the patched transformers oracle, and
against itself under chunking, packing, expert sharding and transformers checkpoint naming."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import KV_BLOCK, MODEL_CASES, Runner, random_ids, rel_err
from model_shards.batch import ForwardBatch, SeqChunk
from model_shards.expert_part import expert_range, router_expert_range, shard_expert_range
from model_shards.loading import load_expert_part, load_router_part

TOL = 1e-4  # fp32: max |delta| / max |ref|
LENGTHS = [1, 255, 256, 257, 600]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=list(MODEL_CASES))
def case(request, model_cases):
    return model_cases(request.param)


def test_cases_cover_what_they_claim(model_cases):
    d, g, e = model_cases("default").cfg, model_cases("gqa").cfg, model_cases("e4").cfg
    assert d.full_layers == [7] and d.num_local_experts == 8
    assert g.full_layers == [2, 5] and g.num_hidden_layers == 6
    assert g.num_attention_heads // g.num_key_value_heads == 4 and g.rotary_dim < g.head_dim
    assert e.num_local_experts == 4 and e.head_dim not in (d.head_dim, d.hidden_size // d.num_attention_heads)
    for cfg in (d, g, e):
        assert cfg.q_size != cfg.hidden_size


# ---- vs the oracle ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", LENGTHS)
def test_prefill_logits_vs_oracle(case, T):
    ids = random_ids(T, case.cfg.vocab_size, seed=T)
    ours = case.prefill(ids)
    ref = case.hf_logits(ids)
    assert ours.shape == ref.shape == (T, case.cfg.vocab_size)
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < TOL
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_last_token_logits_only(case):
    ids = random_ids(300, case.cfg.vocab_size, seed=3)
    r = case.runner()
    last = r.step([(r.new_seq(0, 300), ids)], all_logits=False)
    assert last.shape == (1, case.cfg.vocab_size)
    assert rel_err(last[0], case.hf_logits(ids)[-1]) < TOL


@pytest.mark.parametrize("prompt_len", [1, 257])
def test_prefill_then_greedy_decode_vs_oracle(case, prompt_len):
    ids = random_ids(prompt_len, case.cfg.vocab_size, seed=77 + prompt_len)
    r = case.runner()
    seq = r.new_seq(slot=3, max_len=prompt_len + 5)
    logits = r.step([(seq, ids)])[0]
    assert rel_err(logits, case.hf_logits(ids)[-1]) < TOL
    for _ in range(5):
        tok = int(logits.argmax())
        logits = r.step([(seq, [tok])])[0]  # one new token, state and KV from the cache
        ref = case.hf_logits(seq.ids)[-1]  # oracle: full forward of the extended sequence
        assert rel_err(logits, ref) < TOL
        assert int(logits.argmax()) == int(ref.argmax())
    assert len(seq.ids) == prompt_len + 5


# ---- self-consistency ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[100, 300, 200], [256, 1, 256, 87], [255, 2, 343]])
def test_chunked_prefill_equals_single_prefill(case, chunks):
    ids = random_ids(sum(chunks), case.cfg.vocab_size, seed=5)
    single = case.prefill(ids)
    r = case.runner()
    seq = r.new_seq(slot=1, max_len=len(ids))
    parts, start = [], 0
    for n in chunks:
        parts.append(r.step([(seq, ids[start:start + n])], all_logits=True))
        start += n
    chunked = torch.cat(parts)
    assert chunked.shape == single.shape
    assert rel_err(chunked, single) < TOL
    assert rel_err(chunked, case.hf_logits(ids)) < TOL


def test_packed_batch_equals_each_alone(case):
    V = case.cfg.vocab_size
    prompts = [random_ids(n, V, seed=100 + n) for n in (257, 1, 90)]
    more = [random_ids(n, V, seed=200 + n) for n in (1, 40, 1)]  # step 2: decode, prefill-continue, decode

    # alone: each sequence in its own fresh model cache
    alone = []
    for p, m in zip(prompts, more):
        r = case.runner()
        s = r.new_seq(0, len(p) + len(m))
        alone.append((r.step([(s, p)], all_logits=True), r.step([(s, m)], all_logits=True)))

    # packed: one ForwardBatch per step, scattered slots, interleaved block tables from one pool
    r = case.runner(num_slots=8)
    seqs = [r.new_seq(slot, len(p) + len(m)) for slot, p, m in zip((5, 0, 2), prompts, more)]
    step1 = r.step(list(zip(seqs, prompts)), all_logits=True)
    step2 = r.step(list(zip(seqs, more)), all_logits=True)
    for step, outs in ((step1, [a[0] for a in alone]), (step2, [a[1] for a in alone])):
        assert step.shape[0] == sum(o.shape[0] for o in outs)
        for got, want in zip(torch.split(step, [o.shape[0] for o in outs]), outs):
            assert rel_err(got, want) < TOL
    # and the last logits of each sequence agree with the oracle on its full text
    for s, (a1, a2) in zip(seqs, alone):
        assert rel_err(a2[-1], case.hf_logits(s.ids)[-1]) < TOL


def test_packed_pure_decode_batch(case):
    """Three sequences decoding together (the batched lightning decode path) equal their separate decodes."""
    V = case.cfg.vocab_size
    prompts = [random_ids(n, V, seed=300 + n) for n in (10, 257, 3)]
    r = case.runner(num_slots=8)
    seqs = [r.new_seq(slot, len(p) + 3) for slot, p in zip((7, 1, 4), prompts)]
    last = r.step(list(zip(seqs, prompts)))
    for _ in range(3):
        toks = last.argmax(-1).tolist()
        last = r.step([(s, [t]) for s, t in zip(seqs, toks)])
        for s, row in zip(seqs, last):
            assert rel_err(row, case.hf_logits(s.ids)[-1]) < TOL


def test_slot_reuse_after_reset(case):
    """A slot that held another sequence, once reset, gives the same logits as a fresh one."""
    V = case.cfg.vocab_size
    a, b = random_ids(300, V, seed=1), random_ids(50, V, seed=2)
    r = case.runner()
    r.prefill(a, slot=2)
    reused = r.prefill(b, slot=2)  # new_seq resets the slot and takes new KV blocks
    assert rel_err(reused, case.runner().prefill(b)) < 1e-6


# ---- expert sharding and checkpoint naming ------------------------------------------------------------------------
def test_router_share_and_shard_ranges_cover_the_experts_once():
    for shards, router in [(1, False), (4, False), (1, True), (3, True), (7, True)]:
        ranges = ([router_expert_range(32, shards)] if router else []) + [
            shard_expert_range(32, shards, s, router) for s in range(shards)]
        assert [e for first, last in ranges for e in range(first, last)] == list(range(32))
        assert len({last - first for first, last in ranges}) == 1  # equal shares
    with pytest.raises(ValueError, match="3 does not divide the 32"):  # shards + 1 shares must divide the experts
        shard_expert_range(32, 2, 0, router_experts=True)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_expert_subsets_sum_to_all_experts(case, k):
    E = case.cfg.num_local_experts
    parts = [case.experts(*expert_range(E, k, i)) for i in range(k)]
    assert [p.num_experts for p in parts] == [E // k] * k
    assert all(p.w13[0].shape[0] == E // k for p in parts)
    ids = random_ids(300, case.cfg.vocab_size, seed=9)
    whole = case.prefill(ids)
    split = Runner(case.router(), parts).prefill(ids)
    assert rel_err(split, whole) < 1e-5
    if k > 1:  # each part alone is only a part: dropping one must change the logits
        partial = Runner(case.router(), parts[1:]).prefill(ids)
        assert rel_err(partial, whole) > 1e-2


def test_expert_part_ignores_foreign_experts(tiny_ckpt):
    """ExpertPart(2, 4) adds only the weighted outputs of experts 2 and 3; tokens routed elsewhere get zeros."""
    cfg = tiny_ckpt.cfg
    F_ = cfg.intermediate_size
    part, full = tiny_ckpt.experts(2, 4), tiny_ckpt.experts()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, cfg.hidden_size, generator=g)
    ids = torch.tensor([[0, 1], [2, 5], [3, 2], [7, 6], [3, 0], [1, 2]])
    w = torch.rand(6, 2, generator=g)
    y = part.forward(0, x, ids, w)
    assert torch.equal(y[[0, 3]], torch.zeros(2, cfg.hidden_size))
    want = torch.zeros_like(x)
    for t in range(6):
        for kk in range(2):
            e = int(ids[t, kk])
            if 2 <= e < 4:
                h = full.w13[0][e] @ x[t]
                want[t] += w[t, kk] * (full.w2[0][e] @ (torch.nn.functional.silu(h[:F_]) * h[F_:]))
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    assert (want[[1, 2, 4, 5]].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_transformers_naming_same_logits(tiny_ckpt, tiny_ckpt_tf, k):
    E = tiny_ckpt.cfg.num_local_experts
    router = load_router_part(tiny_ckpt_tf, dtype=torch.float32)
    parts = [load_expert_part(tiny_ckpt_tf, *expert_range(E, k, i), dtype=torch.float32) for i in range(k)]
    ids = random_ids(300, tiny_ckpt.cfg.vocab_size, seed=13)
    tf_logits = Runner(router, parts).prefill(ids)
    orig_logits = tiny_ckpt.prefill(ids)
    assert rel_err(tf_logits, orig_logits) < 1e-6
    assert rel_err(tf_logits, tiny_ckpt.hf_logits(ids)) < TOL


def test_transformers_naming_checkpoint_is_what_transformers_loads(tiny_ckpt, tiny_ckpt_tf, tmp_path):
    """Guards the test's own conversion: transformers loads the fused-expert checkpoint with no key problems and
    gives the oracle's logits."""
    from hf_oracle import hf_logits, load_hf_model

    m = load_hf_model(tiny_ckpt_tf, tmp_path / "hf")
    ids = random_ids(257, tiny_ckpt.cfg.vocab_size, seed=17)
    assert rel_err(hf_logits(m, ids), tiny_ckpt.hf_logits(ids)) < 1e-6


# ---- bf16 (the GPU dtype) against the fp32 oracle -----------------------------------------------------------------
def test_bf16_close_to_fp32_oracle(tiny_ckpt):
    router = load_router_part(tiny_ckpt.path, dtype=torch.bfloat16)
    experts = load_expert_part(tiny_ckpt.path, dtype=torch.bfloat16)
    assert router.lm_head.dtype == torch.float32 and router.gates[0].dtype == torch.float32
    r = Runner(router, [experts])
    r.cache = type(r.cache)(tiny_ckpt.cfg, 8, 256, 16, torch.bfloat16, "cpu")
    ids = random_ids(600, tiny_ckpt.cfg.vocab_size, seed=23)
    ours = r.prefill(ids)
    assert r.cache.lightning.dtype == torch.float32  # fp32 lightning state
    ref = tiny_ckpt.hf_logits(ids)
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) < 0.2
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85


def test_fp32_logits_from_bf16_weights_are_fp32_exact():
    """The LM head's bf16-weight path (tensor cores on GPU): x split into three bf16 pieces that sum to x exactly,
    and logits as close to the fp64 product as an fp32 GEMM's, where x in bf16 alone is far off."""
    from model_shards.router_part import fp32_logits, split_bf16

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 512, generator=g) * torch.logspace(-4, 4, 512)
    pieces = split_bf16(x)
    assert pieces.dtype == torch.bfloat16 and pieces.shape == (3, 16, 512)
    assert torch.equal(pieces.double().sum(0), x.double())
    w = torch.randn(300, 512, generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().T
    ours = fp32_logits(x, w)
    assert ours.dtype == torch.float32 and ours.shape == (16, 300)
    fp32_err = rel_err(x @ w.float().T, exact)
    assert rel_err(ours, exact) < max(4 * fp32_err, 1e-6)
    assert rel_err(pieces[0].float() @ w.float().T, exact) > 100 * rel_err(ours, exact)
    assert torch.equal(fp32_logits(x, w.float()), x @ w.float().T)  # fp32 weights: the plain fp32 GEMM
    assert fp32_logits(x[:0], w).shape == (0, 300)  # a prefill step that samples no sequence


def test_bf16_lm_head_router_same_logits(tiny_ckpt):
    """The router with its LM head in bf16 (as on GPU) gives the fp32 head's logits, also for a step whose chunk
    samples nothing (no last-token rows)."""
    router = load_router_part(tiny_ckpt.path, dtype=torch.float32)
    assert torch.equal(router.lm_head.to(torch.bfloat16).float(), router.lm_head)  # the checkpoint's head is bf16
    fast = load_router_part(tiny_ckpt.path, dtype=torch.float32)
    fast.lm_head = fast.lm_head.to(torch.bfloat16)
    ids = random_ids(300, tiny_ckpt.cfg.vocab_size, seed=29)
    experts = [load_expert_part(tiny_ckpt.path, dtype=torch.float32)]
    ref, ours = Runner(router, experts).prefill(ids), Runner(fast, experts).prefill(ids)
    assert rel_err(ours, ref) < 1e-6
    r = Runner(fast, experts)
    seq = r.new_seq(slot=0, max_len=64)
    batch = ForwardBatch.build([SeqChunk(ids[:64], 0, seq.slot, seq.blocks)], KV_BLOCK, "cpu")
    batch.last_token_rows = batch.last_token_rows[:0]
    assert fast(batch, r.cache, r.moe).shape == (0, tiny_ckpt.cfg.vocab_size)


# ---- make-tiny output in transformers -----------------------------------------------------------------------------
DERIVED = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def test_make_tiny_loads_in_transformers(tmp_path):
    from transformers import MiniMaxForCausalLM

    from hf_oracle import hf_logits, load_hf_model
    from model_shards.tiny import make_tiny, tiny_config
    from model_shards.transformers_compat import to_hf_config

    cfg = tiny_config(num_layers=4, full_attention_every=2, num_experts=4)
    try:
        out = make_tiny(tmp_path / "tiny", cfg, seed=3)
    except ImportError:  # tokenizer module not there: the weights alone
        from model_shards.tiny import random_weights, write_checkpoint
        out = tmp_path / "tiny"
        write_checkpoint(out, cfg, random_weights(cfg, 3))
    hf_cfg = to_hf_config(json.loads((out / "config.json").read_text()))
    model, info = MiniMaxForCausalLM.from_pretrained(out, config=hf_cfg, dtype=torch.float32,
                                                     output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info.get("error_msgs"), info["error_msgs"]
    want_missing = {f"model.layers.{i}.self_attn.{b}" for i in cfg.linear_layers for b in DERIVED}
    assert set(info["missing_keys"]) == want_missing
    # every real parameter came from the file: compare a few against what we load
    router = load_router_part(out, dtype=torch.float32)
    sd = model.state_dict()
    assert torch.equal(sd["lm_head.weight"], router.lm_head)
    assert torch.equal(sd["model.layers.1.mlp.gate.weight"], router.gates[1])
    experts = load_expert_part(out, dtype=torch.float32)
    assert torch.equal(sd["model.layers.2.mlp.experts.gate_up_proj"], experts.w13[2])
    assert torch.equal(sd["model.layers.2.mlp.experts.down_proj"], experts.w2[2])
    # and it runs: our model on the make-tiny folder equals the oracle
    ids = random_ids(260, cfg.vocab_size, seed=4)
    ours = Runner(router, [experts]).prefill(ids)
    assert rel_err(ours, hf_logits(load_hf_model(out, tmp_path / "hf"), ids)) < TOL


def test_forward_batch_maps_each_token_to_its_kv_row():
    from model_shards.batch import ForwardBatch, SeqChunk

    bs = 4
    chunks = [SeqChunk([7, 8, 9], 5, 2, [9, 3]),  # positions 5..7: block 3 (the table's second), rows 1..3
              SeqChunk([1], 0, 0, [6]),  # a one-token prompt
              SeqChunk([4, 5], 7, 1, [2, 0, 11])]  # positions 7, 8 cross from block 0 into block 11
    b = ForwardBatch.build(chunks, bs, "cpu")
    assert b.input_ids.tolist() == [7, 8, 9, 1, 4, 5]
    assert b.positions.tolist() == [5, 6, 7, 0, 7, 8]
    assert b.slot_mapping.tolist() == [3 * bs + 1, 3 * bs + 2, 3 * bs + 3, 6 * bs, 0 * bs + 3, 11 * bs + 0]
    assert b.last_token_rows.tolist() == [2, 3, 5]
    assert b.block_tables.tolist() == [[9, 3, 0], [6, 0, 0], [2, 0, 11]]
    assert b.seq_lens == [3, 1, 2] and b.context_lens == [8, 1, 9] and b.slot_ids.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="at least one token"):
        ForwardBatch.build([SeqChunk([], 0, 0, [1])], bs, "cpu")
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        ForwardBatch.build([SeqChunk([1, 2], 7, 0, [1, 2])], bs, "cpu")
