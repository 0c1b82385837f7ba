"""Triton kernels (kernels/lightning/{prefill,decode}.py, kernels/experts/*.py, kernels/peer_copy) against the
references, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and other test modules may import it earlier, so
all checks run once in a subprocess (this file run as a script) that prints its measurements as JSON; the tests
below only assert on them. Outputs are NaN-poisoned before each call to prove every element is written.
Under the interpreter the dots run on fp32 operands (its bf16 dot is broken) and fp32 -> bf16 casts truncate
instead of rounding (about twice the GPU's output error); the bf16-operand rounding is checked on GPU by
bench/kernels.py's correctness gate.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-2  # relative L2 error allowed on bf16 paths


def minimax_slope(head: int, layer: int, heads: int = 64, layers: int = 80) -> float:
    return 2 ** (-8 * (head + 1) / heads) * (1 - layer / (layers - 1) + 1e-5)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _run_checks() -> dict:
    import torch
    import torch.nn.functional as F

    from kernels.experts.combine import combine_pairs_triton
    from kernels.experts.grouped import grouped_swiglu_counts, grouped_swiglu_grouped_mm, grouped_swiglu_triton
    from kernels.experts.reference import combine_pairs as combine_pairs_reference
    from kernels.experts.reference import dequantize_int8, quantize_int8
    from kernels.experts.reference import grouped_swiglu
    from kernels.lightning.decode import lightning_decode_pool
    from kernels.lightning.prefill import lightning_prefill_varlen
    from kernels.lightning.reference import lightning_attention, lightning_recurrence

    torch.manual_seed(0)
    res: dict = {}
    H, D = 4, 32
    # strongest decay (s*64 = 59: exp underflows unless computed as exp(-s*n)), medium, weak, ~none
    slopes = torch.tensor([minimax_slope(0, 0), minimax_slope(20, 0), minimax_slope(40, 40), minimax_slope(63, 79)])

    def act(*shape):
        return F.silu(torch.randn(*shape)).bfloat16()

    def recurrence(q, k, v, state):  # [T, H, D] inputs -> o [T, H, D], state [H, D, D]
        o, s = lightning_recurrence(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), slopes, state)
        return o.transpose(0, 1), s

    # 1. packed varlen prefill: block edges (64, 65), a 1-token sequence, non-zero and zero initial states
    lens = [1, 5, 64, 65, 300]
    T = sum(lens)
    q, k, v = act(T, H, D), act(T, H, D), act(T, H, D)
    pool = torch.randn(10, H, D, D) * 0.5
    slots = torch.tensor([7, 2, 0, 9, 4])
    pool[0] = 0  # a fresh sequence
    pool0 = pool.clone()
    ref_pool = pool.clone()
    other = [i for i in range(10) if i not in slots.tolist()]
    # one program per sequence; long sequences cut into 64- and 128-token segments (segment pass + scan + main)
    errs_o, errs_s, written, untouched = [], [], [], []
    for cfg in ({"segment": 0}, {"segment": 64}, {"segment": 128, "block_v": 16}):
        pool = pool0.clone()
        out = torch.full_like(q, float("nan"))
        lightning_prefill_varlen(q, k, v, slopes, pool, lens, slots, out=out, **cfg)
        written.append(bool(torch.isfinite(out).all()))
        untouched.append(bool(torch.equal(pool[other], pool0[other])))
        start = 0
        for n, slot in zip(lens, slots.tolist()):
            o_ref, s_ref = recurrence(q[start:start + n], k[start:start + n], v[start:start + n], pool0[slot])
            errs_o.append(_rel(out[start:start + n], o_ref))
            errs_s.append(_rel(pool[slot], s_ref))
            start += n
    res["prefill_all_written"] = all(written)
    res["prefill_o_err"] = max(errs_o)
    res["prefill_state_err"] = max(errs_s)
    res["prefill_other_slots_untouched"] = all(untouched)
    o_blk = lightning_attention(q, k, v, slopes, ref_pool, lens, slots)
    res["prefill_vs_blockwise_ref"] = _rel(out, o_blk)

    # 2. chunked-prefill continuation (130 + 170 tokens) and decode after prefill, against one long recurrence
    n_all = 300
    q, k, v = act(n_all, H, D), act(n_all, H, D), act(n_all, H, D)
    s0 = torch.randn(H, D, D) * 0.5
    o_ref, s_ref = recurrence(q, k, v, s0)
    pool = torch.zeros(3, H, D, D)
    pool[1] = s0
    out = torch.full_like(q, float("nan"))
    for a, b in ((0, 130), (130, 297)):
        out[a:b] = lightning_prefill_varlen(q[a:b], k[a:b], v[a:b], slopes, pool, [b - a], torch.tensor([1]))
    for t in range(297, 300):  # decode steps for the last 3 tokens
        out[t:t + 1] = lightning_decode_pool(q[t:t + 1], k[t:t + 1], v[t:t + 1], slopes, pool, torch.tensor([1]))
    res["continuation_all_written"] = bool(torch.isfinite(out).all())
    res["continuation_o_err"] = _rel(out, o_ref)
    res["continuation_state_err"] = _rel(pool[1], s_ref)

    # 3. batched decode with a padded slot (-1): pool untouched outside the live slots, padded row zero
    B = 5
    q, k, v = act(B, H, D), act(B, H, D), act(B, H, D)
    pool = torch.randn(8, H, D, D) * 0.5
    pool0 = pool.clone()
    slots = torch.tensor([5, -1, 2, 7, 0])
    out = torch.full_like(q, float("nan"))
    lightning_decode_pool(q, k, v, slopes, pool, slots, out=out)
    res["decode_all_written"] = bool(torch.isfinite(out).all())
    errs_o, errs_s = [], []
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        o_ref, s_ref = recurrence(q[b:b + 1], k[b:b + 1], v[b:b + 1], pool0[slot])
        errs_o.append(_rel(out[b:b + 1], o_ref))
        errs_s.append(_rel(pool[slot], s_ref))
    res["decode_o_err"] = max(errs_o)
    res["decode_state_err"] = max(errs_s)
    res["decode_pad_zero"] = bool((out[1] == 0).all())
    res["decode_other_slots_untouched"] = bool(torch.equal(pool[[1, 3, 4, 6]], pool0[[1, 3, 4, 6]]))

    # q/k/v as views into one [T, H, 3D] projection (the router's lightning layer splits it so, no copies): the
    # same outputs and states as from contiguous copies, in prefill (long sequences cut into segments too) and decode
    lens = [3, 70, 130]
    q, k, v = act(sum(lens), H, 3 * D).split(D, dim=-1)
    pool0 = torch.randn(4, H, D, D) * 0.5
    slots = torch.tensor([1, 3, 0])
    same = []
    for cfg in ({"segment": 0}, {"segment": 64}):
        pools = [pool0.clone(), pool0.clone()]
        a = lightning_prefill_varlen(q, k, v, slopes, pools[0], lens, slots, **cfg)
        b = lightning_prefill_varlen(q.contiguous(), k.contiguous(), v.contiguous(), slopes, pools[1], lens, slots,
                                     **cfg)
        same.append(torch.equal(a, b) and torch.equal(*pools))
    pools = [pool0.clone(), pool0.clone()]
    a = lightning_decode_pool(q[:3], k[:3], v[:3], slopes, pools[0], slots)
    b = lightning_decode_pool(q[:3].contiguous(), k[:3].contiguous(), v[:3].contiguous(), slopes, pools[1], slots)
    res["strided_qkv_same"] = all(same) and torch.equal(a, b) and torch.equal(*pools)
    res["strided_qkv_is_strided"] = q.stride(0) == 3 * H * D and not q.is_contiguous()

    try:  # a misspelt tuning key is an error, not a silently ignored option
        x = act(4, H, D)
        lightning_prefill_varlen(x, x, x, slopes, torch.zeros(1, H, D, D), [4], torch.tensor([0]), block_vv=16)
        res["prefill_rejects_unknown_config"] = False
    except TypeError as e:
        res["prefill_rejects_unknown_config"] = "block_vv" in str(e)

    # 4. grouped SwiGLU experts: an empty group, a group smaller than a tile, tiles across expert boundaries,
    #    K not a multiple of the K tile (H=48), F not a multiple of the N tile (F=40), with and without weights
    #    and many K tiles per program (each program starts its K walk at its own tile; F=40: the last one partial)
    configs = [None, dict(BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=2),
               dict(BM=32, BN=64, BK=64, GROUP_M=4, num_warps=4, num_stages=2),
               dict(BM=16, BN=16, BK=16, GROUP_M=1, num_warps=4, num_stages=2)]
    for name, (E, Hd, Fd, sizes) in {"a": (4, 64, 96, [3, 0, 37, 20]), "b": (3, 48, 40, [1, 17, 0])}.items():
        N = sum(sizes)
        x = torch.randn(N, Hd).bfloat16()
        w13 = (torch.randn(E, 2 * Fd, Hd) / Hd ** 0.5).bfloat16()
        w2 = (torch.randn(E, Hd, Fd) / Fd ** 0.5).bfloat16()
        wts = torch.rand(N).bfloat16()
        errs = []
        for cfg in configs:
            for w in (wts, None):
                y = torch.full_like(x, float("nan"))
                grouped_swiglu_triton(x, sizes, w13, w2, w, config=cfg, out=y)
                ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(), None if w is None else w.double())
                errs.append(_rel(y, ref) if torch.isfinite(y).all() else float("inf"))
        res[f"experts_{name}_err"] = max(errs)
        # counts on the device, fixed grid (CUDA-graph path): 5 spare rows after the experts' must come back zero
        xp = torch.cat([x, torch.randn(5, Hd).bfloat16()])
        wp = torch.cat([wts, torch.rand(5).bfloat16()])
        counts = torch.tensor(sizes + [0] * (E - len(sizes)))
        errs, spare_zero = [], True
        for cfg in (None, configs[1]):
            y = grouped_swiglu_counts(xp, counts, w13, w2, wp, config=cfg)
            ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(), wts.double())
            errs.append(_rel(y[:N], ref) if torch.isfinite(y[:N]).all() else float("inf"))
            spare_zero &= bool((y[N:] == 0).all())
        # a one-token decode step: its row routed to the last expert only (the tile lookup's far end), 3 spare rows
        one = torch.zeros(E, dtype=torch.long)
        one[-1] = 1
        y = grouped_swiglu_counts(xp[:4], one, w13, w2, wp[:4])
        ref = grouped_swiglu(x[:1].double(), one.tolist(), w13.double(), w2.double(), wts[:1].double())
        errs.append(_rel(y[:1], ref) if torch.isfinite(y[:1]).all() else float("inf"))
        spare_zero &= bool((y[1:] == 0).all())
        res[f"experts_{name}_counts_err"] = max(errs)
        res[f"experts_{name}_counts_spare_zero"] = spare_zero
        errs = []  # the GEMM-bound path: torch._grouped_mm (CPU here) around the Triton silu*mul*weight pass
        for w in (wts, None):
            y = torch.full_like(x, float("nan"))
            grouped_swiglu_grouped_mm(x, sizes, w13, w2, w, out=y)
            ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(), None if w is None else w.double())
            errs.append(_rel(y, ref) if torch.isfinite(y).all() else float("inf"))
        res[f"experts_{name}_grouped_mm_err"] = max(errs)
        errs = []  # the same from counts on the device (the no-sync prefill path): the spare rows are not computed
        for w in (wp, None):
            y = grouped_swiglu_grouped_mm(xp, counts, w13, w2, w)
            ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(), None if w is None else wts.double())
            errs.append(_rel(y[:N], ref) if torch.isfinite(y[:N]).all() else float("inf"))
        res[f"experts_{name}_grouped_mm_counts_err"] = max(errs)
        # bf16 reference's own error, for scale
        res[f"experts_{name}_ref_bf16_err"] = _rel(grouped_swiglu(x, sizes, w13, w2, wts),
                                                   grouped_swiglu(x.double(), sizes, w13.double(), w2.double(),
                                                                  wts.double()))
        q13, s13 = quantize_int8(w13)
        q2, s2 = quantize_int8(w2)
        ref = grouped_swiglu(x.double(), sizes, dequantize_int8(q13, s13, torch.float64),
                             dequantize_int8(q2, s2, torch.float64), wts.double())
        errs = []
        for cfg in (None, configs[3]):
            y = torch.full_like(x, float("nan"))
            grouped_swiglu_triton(x, sizes, q13, q2, wts, w13_scale=s13, w2_scale=s2, config=cfg, out=y)
            errs.append(_rel(y, ref) if torch.isfinite(y).all() else float("inf"))
        res[f"experts_{name}_int8_err"] = max(errs)
    # combine: each token's K rows summed back; the rows past num_rows hold NaN and must not be read
    T, K, Hc = 9, 2, 40
    y = torch.randn(T * K, Hc).bfloat16()
    y[11:] = float("nan")
    slot = torch.randperm(T * K).view(T, K)
    num_rows = torch.tensor([11])
    got = combine_pairs_triton(y, slot, num_rows)
    want = torch.zeros(T, Hc, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            if slot[t, k] < 11:
                want[t] += y[slot[t, k]].double()
    res["combine_err"] = _rel(got, want) if torch.isfinite(got).all() else float("inf")
    ref = combine_pairs_reference(y, slot, num_rows)
    res["combine_reference_err"] = _rel(ref, want) if torch.isfinite(ref).all() else float("inf")
    res.update(_peer_copy_checks())
    return res


def _peer_copy_checks() -> dict:
    """The direct-write row copies (kernels/peer_copy) against their reference. Destinations start NaN: a row
    the kernel must not write stays NaN, and one it must write cannot stay NaN. Shards: 3 of 4 experts each, the
    first from expert 2 (the router holds 0-1); padding rows route to -1."""
    import torch

    from kernels.peer_copy import reference
    from kernels.peer_copy.triton_copy import send_answer_triton, send_rows_triton, sum_answers_triton

    torch.manual_seed(3)
    T, K, H, first, per, N = 11, 2, 1104, 2, 3, 3  # H + meta > the kernel's 1024-column block
    ids = torch.randint(0, first + N * per, (T, K))
    ids[9:] = -1
    res = {}
    ok = True
    for meta, hidden in ((16, H), (12, H - 4)):  # 16-column aligned rows (dispatch's layout), and unaligned ones
        rows = torch.randn(T, meta + hidden).bfloat16()
        wants = [torch.full((T + 2, meta + hidden), float("nan")).bfloat16() for _ in range(N)]
        gots = [w.clone() for w in wants]  # separate allocations, as other GPUs' buffers are
        reference.send_rows(rows, wants, ids, first, per, meta)
        send_rows_triton(rows, gots, ids, first, per, meta)
        for s, (want, got) in enumerate(zip(wants, gots)):
            mask = reference.routed(ids, first + s * per, first + (s + 1) * per)
            ok &= torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
            ok &= bool(mask.any() and (~mask[:9]).any())  # the case has both kinds of rows
            ok &= bool(got[:T, :meta].isfinite().all() and got[:T][mask, meta:].isfinite().all())
            ok &= bool(got[:T][~mask, meta:].isnan().all() and got[T:].isnan().all())
    res["peer_send_rows_exact"] = ok
    y = torch.randn(T, H).bfloat16()
    answers_ref = torch.full((N, T + 2, H), float("nan")).bfloat16()
    answers = answers_ref.clone()
    for s in range(N):
        lo, hi = first + s * per, first + (s + 1) * per
        reference.send_answer(y * (s + 1), answers_ref[s], ids, lo, hi)
        send_answer_triton(y * (s + 1), answers[s], ids, lo, hi)
    res["peer_send_answer_exact"] = torch.equal(answers.isnan(), answers_ref.isnan()) and torch.equal(
        answers.nan_to_num(), answers_ref.nan_to_num())
    share = torch.randn(T, H).bfloat16()
    want = share.double().clone()
    for t in range(T):
        for s in range(N):
            if any(first + s * per <= e < first + (s + 1) * per for e in ids[t].tolist()):
                want[t] += answers_ref[s, t].double()
    for has_share in (True, False):
        base = share.double() if has_share else torch.zeros_like(want)
        w = want - share.double() + base
        got = sum_answers_triton(share if has_share else None, answers, ids, first, per, N)
        ref = reference.sum_answers(share if has_share else None, answers, ids, first, per, N)
        key = "share" if has_share else "no_share"
        res[f"peer_sum_{key}_err"] = _rel(got, w) if torch.isfinite(got).all() else float("inf")
        res[f"peer_sum_{key}_reference_err"] = _rel(ref, w) if torch.isfinite(ref).all() else float("inf")
    return res


@pytest.fixture(scope="module")
def results() -> dict:
    import triton  # noqa: F401  (a test dependency: fail, never skip, without it)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prefill_varlen(results):
    assert results["prefill_all_written"]
    assert results["prefill_o_err"] < TOL
    assert results["prefill_state_err"] < TOL
    assert results["prefill_other_slots_untouched"]
    assert results["prefill_vs_blockwise_ref"] < TOL


def test_prefill_and_decode_take_qkv_views_of_one_projection(results):
    assert results["strided_qkv_is_strided"]
    assert results["strided_qkv_same"]


def test_prefill_rejects_unknown_config(results):
    assert results["prefill_rejects_unknown_config"]


def test_prefill_continuation_and_decode_handoff(results):
    assert results["continuation_all_written"]
    assert results["continuation_o_err"] < TOL
    assert results["continuation_state_err"] < TOL


def test_decode_padded_slot(results):
    assert results["decode_all_written"]
    assert results["decode_o_err"] < TOL
    assert results["decode_state_err"] < TOL
    assert results["decode_pad_zero"]
    assert results["decode_other_slots_untouched"]


@pytest.mark.parametrize("case", ["a", "b"])
def test_grouped_swiglu(results, case):
    assert results[f"experts_{case}_err"] < TOL
    assert results[f"experts_{case}_int8_err"] < TOL
    assert results[f"experts_{case}_grouped_mm_err"] < TOL


@pytest.mark.parametrize("case", ["a", "b"])
def test_grouped_swiglu_from_device_counts(results, case):
    """The CUDA-graph path: group sizes as a device tensor, a grid fixed by the row count, empty tiles exit."""
    assert results[f"experts_{case}_counts_err"] < TOL
    assert results[f"experts_{case}_counts_spare_zero"]


@pytest.mark.parametrize("case", ["a", "b"])
def test_grouped_mm_from_device_counts(results, case):
    """torch._grouped_mm with the group ends computed on the device (no host sync) and spare rows after them."""
    assert results[f"experts_{case}_grouped_mm_counts_err"] < TOL


def test_combine_pairs(results):
    """Each token's expert rows summed back in token order, skipping the rows past the count (NaN here)."""
    assert results["combine_err"] < TOL
    assert results["combine_reference_err"] < TOL


def test_peer_copy_rows(results):
    """The direct writes: every row's routing and only the routed rows' hidden states reach a shard's inbox, only
    its tokens' answers reach the router, and the router sums only the slots of the shards each token went to (the
    others hold NaN here)."""
    assert results["peer_send_rows_exact"]
    assert results["peer_send_answer_exact"]
    for key in ("share", "no_share"):
        assert results[f"peer_sum_{key}_err"] < TOL
        assert results[f"peer_sum_{key}_reference_err"] < TOL


def test_dispatch_falls_back_on_cpu():
    import torch

    from kernels.experts import combine_pairs, grouped_swiglu_no_sync, grouped_swiglu_reference
    from kernels.lightning import lightning_attention, lightning_attention_reference

    torch.manual_seed(1)
    q, k, v = (torch.rand(6, 2, 16) for _ in range(3))
    slopes = torch.tensor([0.5, 0.01])
    p1, p2 = torch.rand(3, 2, 16, 16), None
    p2 = p1.clone()
    a = lightning_attention(q, k, v, slopes, p1, [2, 4], torch.tensor([0, 2]))
    b = lightning_attention_reference(q, k, v, slopes, p2, [2, 4], torch.tensor([0, 2]))
    assert torch.equal(a, b) and torch.equal(p1, p2)
    x, w13, w2 = torch.rand(6, 8), torch.rand(2, 12, 8), torch.rand(2, 8, 6)
    y = grouped_swiglu_no_sync(x, torch.tensor([2, 3]), w13, w2)  # the 6th row is no expert's
    assert torch.equal(y[:5], grouped_swiglu_reference(x[:5], [2, 3], w13, w2))
    slot = torch.tensor([[0, 5], [4, 1]])  # row 5 is past the count: not summed
    assert torch.equal(combine_pairs(y, slot, torch.tensor([5])), torch.stack([y[0], y[4] + y[1]]))


def test_kernel_build_log(caplog):
    """The hooks Triton calls around each kernel build (in-memory cache miss) log the variant and its build time."""
    import logging

    from triton import knobs

    from kernels.triton_utils import log_kernel_builds

    before, after = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    try:
        assert log_kernel_builds(logging.getLogger("m1serve.test"))
        with caplog.at_level(logging.INFO, logger="m1serve.test"):
            key = ("sig", "opts")
            assert not knobs.runtime.jit_cache_hook(key=key, repr="_k[num_warps=4](x: *bf16)", fn=None,
                                                   compile={}, is_manual_warmup=False, already_compiled=False)
            knobs.runtime.jit_post_compile_hook(key=key, repr="_k[num_warps=4](x: *bf16,\n  n: i32)", fn=None,
                                                compile={}, is_manual_warmup=False, already_compiled=False)
        assert len(caplog.records) == 1
        assert re.fullmatch(r"triton kernel built in \d+ ms: _k\[num_warps=4\]\(x: \*bf16, n: i32\)",
                            caplog.records[0].getMessage())
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after


def test_int32_rows_start_16_byte_aligned():
    """Triton specializes pointers on 16-byte alignment: each row's start must not depend on the row length."""
    from kernels.triton_utils import int32_rows

    for n in (1, 2, 3, 4, 5, 7, 8):
        rows = [list(range(n)), [10 + i for i in range(n)], [7] * n]
        t = int32_rows(rows, "cpu")
        assert t[:, :n].tolist() == rows
        assert all(t[r].data_ptr() % 16 == 0 for r in range(3))


@pytest.mark.parametrize("int8", [False, True])
def test_warmup_builds_every_expert_tile_config(int8):
    """Every step size picks an expert kernel (grouped_mm, or a Triton tile config) that one of the warm-up's step
    sizes already built, at MiniMax-M1's routing (32 experts, top 2) and the engine's largest step."""
    from cluster.engine.engine import warmup_step_tokens
    from kernels.experts import expert_kernel

    def choice(tokens: int):
        kernel = expert_kernel(tokens * 2 / 32, int8)  # ExpertPart.forward's rows_per_expert
        return kernel if isinstance(kernel, str) else tuple(sorted(kernel.items()))

    step = 16384
    built = {choice(t) for t in warmup_step_tokens(step)} | {choice(b) for b in (1, 2, 4, 8, 16, 32, 64)}
    assert {choice(t) for t in range(1, step + 1)} <= built


def _copy_kernel_stores() -> dict:
    """The global stores the row-copy kernel compiles to for Hopper (Triton's compiler and ptxas; no GPU needed),
    its arguments specialized as a launch specializes them (pointers and integers that are multiples of 16 marked
    so): for dispatch's rows at MiniMax-M1's hidden size, and for rows of 12 routing columns (the layout before)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cluster.dispatch import meta_columns, row_width
    from kernels.peer_copy.triton_copy import _copy_rows_kernel

    layouts = {"dispatch_rows": (row_width(6144, torch.bfloat16, 2), meta_columns(torch.bfloat16, 2)),
               "rows_of_12_routing_columns": (6156, 12)}
    stores = {}
    for name, (width, meta) in layouts.items():
        ints = {"W": width, "meta": meta, "first": 8, "per": 8, "stride_src": width, "stride_dst": width,
                "stride_ids": 2}
        signature = {"src": "*bf16", "dst": "*bf16", "dst_offsets": "*i64", "ids": "*i64", **{k: "i32" for k in ints},
                     "K": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature)
                 if signature[arg].startswith("*") or ints.get(arg, 1) % 16 == 0}
        constexprs = {"K": 2, "BLOCK": 1024, "ALIGNED": True}  # buffers' offsets are multiples of 16 elements
        src = ASTSource(fn=_copy_rows_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        stores[name] = sorted(set(re.findall(r"st\.global[.\w]*", ptx)))
    return stores


def test_peer_copy_stores_16_bytes_at_a_time():
    """The router's rows go over NVLink in 16-byte stores: the routing columns are padded so rows stay 16-column
    aligned, and the kernel is told its loaded destination offsets are aligned. With the previous layout (12 routing
    columns) the same kernel compiles to 2-byte stores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "stores"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stores["dispatch_rows"] == ["st.global.v4.b32"], stores
    assert stores["rows_of_12_routing_columns"] == ["st.global.b16"], stores


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    print(json.dumps(_copy_kernel_stores() if sys.argv[1:] == ["stores"] else _run_checks()))
