"""Side-by-side GPU benchmark of m1serve's Triton kernels (one GPU, one process).

    python3 -m bench.kernels --out results.json [--tune | --tune-only] [--repeat 2] [--quick] [--deadline-s S]

(as a module from the repo root: run as a file, bench/kernels.py would shadow the `kernels` package)

Runs a correctness gate on GPU first (fp64 recurrence / references), then times on identical inputs:
  lightning prefill: ours | fla chunk_simple_gla(g_gamma=-slope, scale=1) | vLLM lightning_attention (fp32 inputs,
                     one call per sequence as vLLM runs it) | torch blockwise reference
  lightning decode:  ours | fla fused_recurrent_simple_gla (contiguous states, and with the gather/scatter a slot
                     pool needs) | vLLM linear_decode_forward_triton (same slot pool, in place) | torch reference
  experts:           ours (the engine's path, group sizes on the device: Triton, or the grouped_mm path above 64 rows
                     per expert) | ours Triton only (host group sizes) | ours int8 weight-only | torch._grouped_mm
                     pipeline | per-expert matmul reference
  experts graph:     decode sizes (<= 32 rows) replayed from a CUDA graph (do_bench_cudagraph), as graphed decode steps
                     run them: ours (group sizes on the device, fixed grid) | torch._grouped_mm pipeline
  combine:           each token's K expert rows summed back: ours (Triton, no atomics) | index_add_ | torch gather+sum
Also measures copy bandwidth and the bf16 GEMM rate, and reports each row as a fraction of its roofline floor
t_floor = max(min_bytes / copy_bw, flops / gemm_rate). Timing: triton.testing.do_bench median (L2 flushed between
reps), the whole table repeated --repeat times (contenders interleaved), median of the repeats and their spread.
fla is optional: if it does not import, its rows are skipped with a note. So are vLLM's kernels: the one file
vllm/model_executor/layers/lightning_attn.py, extracted and shimmed by bench/fetch_vllm_lightning.sh into the
git-ignored third_party/vllm_lightning/ (send that folder along to the GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.experts import combine_pairs, grouped_swiglu_no_sync  # noqa: E402
from kernels.experts.grouped import grouped_swiglu_grouped_mm, grouped_swiglu_triton  # noqa: E402
from kernels.experts.reference import dequantize_int8, quantize_int8  # noqa: E402
from kernels.experts.reference import combine_pairs as combine_reference  # noqa: E402
from kernels.experts.reference import grouped_swiglu as experts_reference  # noqa: E402
from kernels.lightning import lightning_attention  # noqa: E402
from kernels.lightning.decode import lightning_decode_pool  # noqa: E402
from kernels.lightning.prefill import lightning_prefill_varlen  # noqa: E402
from kernels.lightning.reference import lightning_attention as lightning_reference  # noqa: E402
from kernels.lightning.reference import lightning_recurrence  # noqa: E402
from kernels.peer_copy import reference as peer_reference  # noqa: E402
from kernels.peer_copy.triton_copy import send_answer_triton, send_rows_triton, sum_answers_triton  # noqa: E402

try:
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    FLA_NOTE = "fla-core imported"
except Exception as exc:  # noqa: BLE001 - any import problem means "skip fla"
    chunk_simple_gla = fused_recurrent_simple_gla = None
    FLA_NOTE = f"fla unavailable: {type(exc).__name__}: {exc}"

VLLM_LIGHTNING_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party",
                                   "vllm_lightning", "lightning_attn.py")
VLLM_PREFILL = "vLLM lightning_attention (fp32)"
VLLM_DECODE = "vLLM linear_decode (slot pool)"


def _import_vllm_lightning():
    """vLLM's lightning_attn.py from third_party/vllm_lightning (never installed, never committed), or None + why."""
    import importlib.util

    if not os.path.exists(VLLM_LIGHTNING_FILE):
        return None, f"vLLM lightning kernels unavailable: no {VLLM_LIGHTNING_FILE} (bench/fetch_vllm_lightning.sh)"
    name = "vllm_lightning_attn"
    try:
        spec = importlib.util.spec_from_file_location(name, VLLM_LIGHTNING_FILE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        for fn in ("lightning_attention", "linear_decode_forward_triton"):
            getattr(mod, fn)
    except Exception as exc:  # noqa: BLE001 - any import problem means "skip vLLM"
        sys.modules.pop(name, None)
        return None, f"vLLM lightning kernels unavailable: {type(exc).__name__}: {exc}"
    return mod, ("vLLM 0.33.0 lightning_attn.py (third_party/vllm_lightning, import-shimmed): timed on fp32 q/k/v "
                 "prepared outside the timed call, as vLLM's model feeds them (the bf16->fp32 cast is not timed); "
                 "prefill = one call per sequence; relL2 of the vLLM rows is vs ours (information, not a gate: "
                 "vLLM's inter-block decay is off by one factor of lambda)")


vllm_lightning, VLLM_NOTE = _import_vllm_lightning()

DEV = "cuda"
HEADS, HEAD_DIM = 64, 128


def slopes_for(layer: int, heads: int = HEADS, layers: int = 80) -> torch.Tensor:
    base = torch.tensor([2 ** (-8 * (h + 1) / 64) for h in range(64)])[torch.linspace(0, 63, heads).long()]
    return (base * (1 - layer / (layers - 1) + 1e-5)).float()


def act(*shape):
    return F.silu(torch.randn(*shape, device=DEV)).bfloat16()


def rel(a, b) -> float:
    a, b = a.double(), b.double().to(a.device)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def bench_ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_ms(fn) -> float:
    """fn replayed from a CUDA graph, as the engine's graphed decode steps launch it (no Python or launch cost)."""
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


# ----------------------------------------------------------------------------------------------------- ceilings
def ceilings() -> dict:
    a = torch.empty(1 << 28, device=DEV)  # 1 GiB
    b = torch.empty_like(a)
    t = bench_ms(lambda: b.copy_(a))
    copy_bw = 2 * a.numel() * 4 / (t * 1e-3)
    a = b = None  # free the 2 GiB (not `del`: the lambda above closes over them, pyflakes flags that)
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t = bench_ms(lambda: x @ y)
    gemm = 2 * 8192 ** 3 / (t * 1e-3)
    return {"copy_bw_Bps": copy_bw, "gemm_bf16_flops": gemm}


# ----------------------------------------------------------------------------------------------------- gate
def correctness_gate() -> dict:
    torch.manual_seed(0)
    res = {}
    H, D = 8, HEAD_DIM
    slopes = torch.cat([slopes_for(0, 4), slopes_for(79, 4)]).to(DEV)
    lens = [1, 5, 64, 65, 300, 1000]
    T = sum(lens)
    q, k, v = act(T, H, D), act(T, H, D), act(T, H, D)
    pool0 = torch.randn(9, H, D, D, device=DEV) * 0.1
    pool0[3] = 0
    slots = torch.tensor([6, 1, 3, 8, 0, 4], device=DEV)
    qc, kc, vc, sc = q.cpu(), k.cpu(), v.cpu(), slopes.cpu()
    refs, s_refs, start = [], [], 0
    for n, slot in zip(lens, slots.tolist()):
        sl = slice(start, start + n)
        o_ref, s_ref = lightning_recurrence(qc[sl].transpose(0, 1), kc[sl].transpose(0, 1), vc[sl].transpose(0, 1),
                                            sc, pool0[slot].cpu())
        refs.append(o_ref.transpose(0, 1))
        s_refs.append(s_ref)
        start += n
    eo, es, written, untouched = [], [], [], []
    for cfg in ({}, {"segment": 256}, {"segment": 128, "block_v": 128}):  # default, and the segmented path forced
        pool = pool0.clone()
        out = torch.full_like(q, float("nan"))
        lightning_prefill_varlen(q, k, v, slopes, pool, lens, slots, out=out, **cfg)
        torch.cuda.synchronize()
        written.append(bool(torch.isfinite(out).all()))
        untouched.append(bool(torch.equal(pool[[2, 5, 7]], pool0[[2, 5, 7]])))
        start = 0
        for n, slot, o_ref, s_ref in zip(lens, slots.tolist(), refs, s_refs):
            eo.append(rel(out[start:start + n].cpu(), o_ref))
            es.append(rel(pool[slot].cpu(), s_ref))
            start += n
    res["prefill_all_written"] = all(written)
    res["prefill_o_relL2_max"] = max(eo)
    res["prefill_state_relL2_max"] = max(es)
    res["prefill_o_relL2_all"] = rel(out.cpu(), torch.cat(refs))
    res["prefill_untouched"] = all(untouched)
    pool = pool0.clone()
    out = lightning_prefill_varlen(q, k, v, slopes, pool, lens, slots)
    if chunk_simple_gla is not None:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEV)
        with torch.no_grad():
            of, hf = chunk_simple_gla(q[None], k[None], v[None], g_gamma=-slopes, scale=1.0,
                                      initial_state=pool0[slots], output_final_state=True, cu_seqlens=cu,
                                      cu_seqlens_cpu=cu.cpu())
        res["fla_prefill_o_relL2_all"] = rel(of[0].cpu(), torch.cat(refs))
    # dispatcher on CUDA, the way the model calls it
    pool2 = pool0.clone()
    o2 = lightning_attention(q, k, v, slopes.cpu(), pool2, lens, slots, 256)
    res["dispatch_prefill_matches_kernel"] = rel(o2, out) < 1e-6 and rel(pool2, pool) < 1e-6

    # decode with a padded slot, then against the recurrence
    B = 16
    q, k, v = act(B, H, D), act(B, H, D), act(B, H, D)
    pool = torch.randn(40, H, D, D, device=DEV) * 0.1
    slots = torch.randperm(40, device=DEV)[:B]
    slots[3] = -1
    pool0 = pool.clone()
    out = torch.full_like(q, float("nan"))
    lightning_attention(q, k, v, slopes, pool, [1] * B, slots)
    out = lightning_decode_pool(q, k, v, slopes, pool0.clone(), slots, out=out)
    eo, es = [], []
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        o_ref, s_ref = lightning_recurrence(q[b:b + 1].cpu().transpose(0, 1), k[b:b + 1].cpu().transpose(0, 1),
                                            v[b:b + 1].cpu().transpose(0, 1), slopes.cpu(), pool0[slot].cpu())
        eo.append(rel(out[b].cpu(), o_ref[:, 0]))
        es.append(rel(pool[slot].cpu(), s_ref))
    live = set(s for s in slots.tolist() if s >= 0)
    rest = [i for i in range(40) if i not in live]
    res["decode_all_written"] = bool(torch.isfinite(out).all())
    res["decode_pad_zero"] = bool((out[3] == 0).all())
    res["decode_o_relL2_max"] = max(eo)
    res["decode_state_relL2_max"] = max(es)
    res["decode_untouched"] = bool(torch.equal(pool[rest], pool0[rest]))

    # experts at the real width, uneven groups (one empty), with weights; and int8
    E, Hd, Fd = 4, 6144, 9216
    sizes = [0, 5, 300, 40]
    N = sum(sizes)
    x = torch.randn(N, Hd, device=DEV).bfloat16()
    w13 = (torch.randn(E, 2 * Fd, Hd, device=DEV) / Hd ** 0.5).bfloat16()
    w2 = (torch.randn(E, Hd, Fd, device=DEV) / Fd ** 0.5).bfloat16()
    wts = torch.rand(N, device=DEV).bfloat16()
    ref64 = experts_reference(x.double(), sizes, w13.double(), w2.double(), wts.double())
    y = torch.full_like(x, float("nan"))
    grouped_swiglu_triton(x, sizes, w13, w2, wts, out=y)
    res["experts_relL2"] = rel(y, ref64)
    res["experts_ref_bf16_relL2"] = rel(experts_reference(x, sizes, w13, w2, wts), ref64)
    yg = torch.full_like(x, float("nan"))
    grouped_swiglu_grouped_mm(x, sizes, w13, w2, wts, out=yg)
    res["experts_grouped_mm_relL2"] = rel(yg, ref64)
    # the engine's path (ExpertPart.forward): group sizes as a device tensor, 7 rows after them that are no expert's
    # (NaN here: they must not leak into the experts' rows); many rows per expert -> grouped_mm, few -> Triton
    xp = torch.cat([x, torch.full((7, Hd), float("nan"), device=DEV).bfloat16()])
    wp = torch.cat([wts, torch.rand(7, device=DEV).bfloat16()])
    counts = torch.tensor(sizes, device=DEV)
    res["experts_no_sync_relL2"] = rel(grouped_swiglu_no_sync(xp, counts, w13, w2, wp)[:N], ref64)
    res["experts_no_sync_grouped_mm_relL2"] = rel(
        grouped_swiglu_no_sync(xp, counts, w13, w2, wp, rows_per_expert=200)[:N], ref64)
    small = [0, 5, 4, 3]
    res["experts_dispatch_matches"] = (
        rel(grouped_swiglu_no_sync(xp, counts, w13, w2, wp, rows_per_expert=200)[:N], yg) < 1e-6
        and rel(grouped_swiglu_no_sync(x[:12], torch.tensor(small, device=DEV), w13, w2, wts[:12]),
                grouped_swiglu_triton(x[:12], small, w13, w2, wts[:12])) < 1e-6)
    # the combine: 300 tokens x top-2 over those rows in a random order; slots past the count are other shards'
    slot = torch.randperm(N + 7, device=DEV)[:2 * 150].view(150, 2)
    num_rows = torch.tensor([N], device=DEV)
    yc = torch.cat([ref64[:N].bfloat16(), xp[N:]])
    res["combine_relL2"] = rel(combine_pairs(yc, slot, num_rows), combine_reference(yc.double(), slot, num_rows))
    res["combine_skips_past_count"] = bool(torch.isfinite(combine_pairs(yc, slot, num_rows)).all())
    q13, s13 = quantize_int8(w13)
    q2, s2 = quantize_int8(w2)
    y8 = torch.full_like(x, float("nan"))
    grouped_swiglu_triton(x, sizes, q13, q2, wts, w13_scale=s13, w2_scale=s2, out=y8)
    ref8 = experts_reference(x.double(), sizes, dequantize_int8(q13, s13, torch.float64),
                             dequantize_int8(q2, s2, torch.float64), wts.double())
    res["experts_int8_relL2"] = rel(y8, ref8)
    res["experts_int8_vs_bf16_weights_relL2"] = rel(y8, ref64)
    res.update(peer_copy_gate())
    ok = (res["prefill_all_written"] and res["prefill_untouched"] and res["prefill_o_relL2_max"] < 1e-2
          and res["prefill_state_relL2_max"] < 1e-2 and res["decode_all_written"] and res["decode_pad_zero"]
          and res["decode_o_relL2_max"] < 1e-2 and res["decode_state_relL2_max"] < 1e-2 and res["decode_untouched"]
          and res["experts_relL2"] < 1e-2 and res["experts_int8_relL2"] < 1e-2
          and res["experts_grouped_mm_relL2"] < 1e-2
          and res["experts_no_sync_relL2"] < 1e-2 and res["experts_no_sync_grouped_mm_relL2"] < 1e-2
          and res["combine_relL2"] < 1e-2 and res["combine_skips_past_count"]
          and res["dispatch_prefill_matches_kernel"] and res["experts_dispatch_matches"]
          and res["peer_send_rows_exact"] and res["peer_send_answer_exact"] and res["peer_sum_relL2"] < 1e-2)
    res["pass"] = bool(ok)
    return res


def peer_copy_gate() -> dict:
    """The direct-write row copies at the real row layout (16 routing columns + 6144), 3 shards of 8 experts after
    the router's 8, into NaN-filled destinations on this GPU: separate allocations (the 16-byte aligned path) and
    views 8 elements apart (the unaligned one). Copies must equal the reference exactly."""
    T, K, Hd, meta, N, per = 300, 2, 6144, 16, 3, 8
    ids = torch.randint(0, 32, (T, K), device=DEV)
    ids[-5:] = -1
    rows = torch.randn(T, meta + Hd, device=DEV).bfloat16()
    exact = True
    base = torch.full((N, T * (meta + Hd) + 16), float("nan"), device=DEV).bfloat16()
    for dsts in ([torch.full((T, meta + Hd), float("nan"), device=DEV).bfloat16() for _ in range(N)],
                 [base[s, 8 * (s % 2):][:T * (meta + Hd)].view(T, meta + Hd) for s in range(N)]):
        want = [d.clone() for d in dsts]
        peer_reference.send_rows(rows, want, ids, per, per, meta)
        send_rows_triton(rows, dsts, ids, per, per, meta)
        exact &= all(torch.equal(d.nan_to_num(), w.nan_to_num()) and torch.equal(d.isnan(), w.isnan())
                     for d, w in zip(dsts, want))
    y = torch.randn(N, T, Hd, device=DEV).bfloat16()
    answers = torch.full((N, T, Hd), float("nan"), device=DEV).bfloat16()
    want = answers.clone()
    for s in range(N):
        peer_reference.send_answer(y[s], want[s], ids, per * (s + 1), per * (s + 2))
        send_answer_triton(y[s], answers[s], ids, per * (s + 1), per * (s + 2))
    share = torch.randn(T, Hd, device=DEV).bfloat16()
    ref = peer_reference.sum_answers(share.double(), want.nan_to_num().double(), ids, per, per, N)
    return {"peer_send_rows_exact": bool(exact),
            "peer_send_answer_exact": bool(torch.equal(answers.nan_to_num(), want.nan_to_num())
                                           and torch.equal(answers.isnan(), want.isnan())),
            "peer_sum_relL2": rel(sum_answers_triton(share, answers, ids, per, per, N), ref)}


# ----------------------------------------------------------------------------------------------------- cases
def prefill_cases(quick: bool):
    singles = [2048, 8192] if quick else [2048, 8192, 32768, 131072]
    cases = [(f"single {n // 1024}K", [n], HEADS) for n in singles]
    # TP8: 8 heads per GPU, one sequence -> few programs: the segmented path
    cases += [(f"TP8 single {n // 1024}K", [n], 8) for n in ([32768] if quick else [32768, 131072])]
    cases.append(("pack 16x2K", [2048] * 16, HEADS))
    if not quick:
        cases.append(("pack 4x8K+64x256", [8192] * 4 + [256] * 64, HEADS))
    return cases


class PrefillCase:
    def __init__(self, lens, H=HEADS):
        D = HEAD_DIM
        self.lens, T = lens, sum(lens)
        self.q, self.k, self.v = act(T, H, D), act(T, H, D), act(T, H, D)
        self.slopes = slopes_for(0, H).to(DEV)
        n = len(lens)
        self.pool = torch.randn(n + 4, H, D, D, device=DEV) * 0.05
        self.slots = torch.randperm(n + 4, device=DEV)[:n]
        self.h0 = self.pool[self.slots].clone()
        self.cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
        self.cu_cpu = self.cu.cpu()
        self.out = torch.empty_like(self.q)
        self.bytes = 4 * T * H * D * 2 + 2 * n * H * D * D * 4
        self.flops = T * H * (2 * 64 * D * 2 + 4 * D * D)  # chunk-64 intra (dense) + inter + state update

    def ours(self, **cfg):
        return lambda: lightning_prefill_varlen(self.q, self.k, self.v, self.slopes, self.pool, self.lens, self.slots,
                                                out=self.out, **cfg)

    def fla(self):
        cu = self.cu if len(self.lens) > 1 else None
        cu_cpu = self.cu_cpu if len(self.lens) > 1 else None

        def run():
            with torch.no_grad():
                return chunk_simple_gla(self.q[None], self.k[None], self.v[None], g_gamma=-self.slopes, scale=1.0,
                                        initial_state=self.h0, output_final_state=True, cu_seqlens=cu,
                                        cu_seqlens_cpu=cu_cpu)
        return run

    def torch_ref(self):
        return lambda: lightning_reference(self.q, self.k, self.v, self.slopes, self.pool, self.lens, self.slots)


class DecodeCase:
    POOL_SLOTS = 2048  # 8 GiB of fp32 state at 64 heads: far larger than L2

    def __init__(self, B, pool):
        H, D = HEADS, HEAD_DIM
        self.B, self.pool = B, pool
        self.q, self.k, self.v = act(B, H, D), act(B, H, D), act(B, H, D)
        self.slopes = slopes_for(0).to(DEV)
        self.slots = torch.randperm(pool.shape[0], device=DEV)[:B]
        self.h0 = pool[self.slots].clone()
        self.out = torch.empty_like(self.q)
        self.bytes = 2 * B * H * D * D * 4 + 4 * B * H * D * 2
        self.flops = 4 * B * H * D * D

    def ours(self, **cfg):
        return lambda: lightning_decode_pool(self.q, self.k, self.v, self.slopes, self.pool, self.slots, out=self.out,
                                             **cfg)

    def fla(self, gather: bool):
        def run():
            h0 = self.pool[self.slots] if gather else self.h0
            with torch.no_grad():
                o, ht = fused_recurrent_simple_gla(self.q[:, None], self.k[:, None], self.v[:, None],
                                                   g_gamma=-self.slopes, scale=1.0, initial_state=h0,
                                                   output_final_state=True)
            if gather:
                self.pool[self.slots] = ht
            return o
        return run

    def torch_ref(self):
        return lambda: lightning_reference(self.q, self.k, self.v, self.slopes, self.pool, [1] * self.B, self.slots)


class VllmPrefill:
    """vLLM's prefill the way its MiniMax model runs it (`jit_linear_forward_prefix`, once per sequence in a Python
    loop: vLLM has no varlen kernel): fp32 q/k/v [1, H, n, D] (vLLM casts qkv to fp32 before the SiLU; here the cast
    and the transposes are done once, outside the timed call), slopes [H, 1, 1] fp32, kv_history = the sequence's slot
    of the fp32 state pool, its final state copied back into the slot. The outputs stay in vLLM's [1, H, n, D] fp32
    layout (the model's rearrange to [n, H*D] is not timed); slot ids are Python ints (vLLM indexes with tensor
    elements). Its inter-block term is off by one factor of lambda, so it is not an oracle."""

    def __init__(self, case: PrefillCase):
        H, D = case.q.shape[1], case.q.shape[2]
        self.case = case
        self.slopes = case.slopes.float().reshape(H, 1, 1).contiguous()
        self.slot_list = case.slots.tolist()
        self.seqs, start = [], 0
        for n in case.lens:
            self.seqs.append(tuple(torch.empty(1, H, n, D, device=t.device).copy_(t[start:start + n].transpose(0, 1))
                                   for t in (case.q, case.k, case.v)))
            start += n

    def run(self, pool=None):
        pool = self.case.pool if pool is None else pool

        def run():
            outs = []
            for (q, k, v), slot in zip(self.seqs, self.slot_list):
                o, kv = vllm_lightning.lightning_attention(q, k, v, self.slopes, block_size=256,
                                                           kv_history=pool[slot][None])
                pool[slot].copy_(kv[0, :, -1])
                outs.append(o)
            return outs
        return run

    def crosscheck(self) -> dict:
        """rel-L2 of vLLM's outputs and final states vs ours, same inputs and start states (information only)."""
        case = self.case
        p_ours, p_vllm = case.pool.clone(), case.pool.clone()
        o_ours = lightning_prefill_varlen(case.q, case.k, case.v, case.slopes, p_ours, case.lens, case.slots)
        num = den = 0.0
        start = 0
        for n, o in zip(case.lens, self.run(p_vllm)()):
            ref = o_ours[start:start + n].transpose(0, 1).float()
            num += float((o[0] - ref).norm()) ** 2
            den += float(ref.norm()) ** 2
            start += n
        return {"o_vs_ours": (num / max(den, 1e-300)) ** 0.5,
                "state_vs_ours": rel(p_vllm[case.slots], p_ours[case.slots])}


class VllmDecode:
    """vLLM's decode kernel the way its model runs it (`linear_attention_decode`): fp32 q/k/v [B, H, 1, D] (cast and
    made contiguous outside the timed call), slopes [H, 1, 1] fp32, BLOCK_SIZE 32, on the same fp32 state pool
    [slots, H, D, D] and slot ids as ours (vLLM's pool layout), updated in place; output [B, H*D] fp32."""

    def __init__(self, case: DecodeCase):
        H = case.q.shape[1]
        self.case = case
        self.q, self.k, self.v = (t.float()[:, :, None].contiguous() for t in (case.q, case.k, case.v))
        self.slopes = case.slopes.float().reshape(H, 1, 1).contiguous()

    def run(self, pool=None):
        pool = self.case.pool if pool is None else pool
        return lambda: vllm_lightning.linear_decode_forward_triton(self.q, self.k, self.v, pool, self.slopes,
                                                                   self.case.slots, BLOCK_SIZE=32)

    def crosscheck(self) -> float:
        """max rel-L2 (output, updated states) vs the torch reference on the same fp32 inputs and start states."""
        from kernels.lightning.reference import lightning_decode

        case = self.case
        pool = case.pool.clone()
        states = pool[case.slots]
        o_ref = lightning_decode(self.q[:, :, 0], self.k[:, :, 0], self.v[:, :, 0], case.slopes, states)
        o = self.run(pool)()
        return max(rel(o.view_as(o_ref), o_ref), rel(pool[case.slots], states))


def vllm_prefill_row(case: PrefillCase, name: str, rep: int, record, log, xcheck: dict):
    """Time vLLM's prefill on `case` (and cross-check it against ours on the first pass); failures only log."""
    try:
        vcase = VllmPrefill(case)
        err = None
        if rep == 0:
            xcheck[name] = res = vcase.crosscheck()
            err = res["o_vs_ours"]
            log(f"  prefill {name} {VLLM_PREFILL} vs ours: o {err:.1e}, final states {res['state_vs_ours']:.1e}")
        record("prefill", name, VLLM_PREFILL, vcase.run(), case.bytes, case.flops, err)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report, keep going
        log(f"  prefill {name} {VLLM_PREFILL}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
    vcase = None
    torch.cuda.empty_cache()


def vllm_decode_row(case: DecodeCase, name: str, rep: int, record, log):
    """Time vLLM's decode on `case` (and check it against the reference on the first pass); failures only log."""
    try:
        vcase = VllmDecode(case)
        err = vcase.crosscheck() if rep == 0 else None
        record("decode", name, VLLM_DECODE, vcase.run(), case.bytes, case.flops, err)
    except Exception as exc:  # noqa: BLE001
        log(f"  decode {name} {VLLM_DECODE}: FAILED {type(exc).__name__}: {str(exc)[:200]}")


def vllm_check() -> dict:
    """vLLM's kernels vs the fp64 recurrence, on the gate's inputs (information, not a gate).

    vLLM's prefill inter-block term uses lambda^i where the recurrence has lambda^(i+1) (i = row in the 256-token
    block), so its output error is expected well above TF32 rounding wherever a carried state is non-zero: after
    the first block, and in the first block too when the initial state is non-zero. Its final states and its decode
    should match the recurrence to TF32 / fp32 rounding."""
    torch.manual_seed(1)
    res = {}
    H, D = 8, HEAD_DIM
    slopes = torch.cat([slopes_for(0, 4), slopes_for(79, 4)]).to(DEV)
    sl = slopes.float().reshape(H, 1, 1).contiguous()
    sq_err = sq_ref = 0.0
    eo, es = [], []
    for n in [1, 5, 64, 65, 300, 1000]:
        q, k, v = act(H, n, D), act(H, n, D), act(H, n, D)
        s0 = torch.randn(H, D, D, device=DEV) * 0.1
        o_ref, s_ref = lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), s0.cpu())
        o, kv = vllm_lightning.lightning_attention(q.float()[None], k.float()[None], v.float()[None], sl,
                                                   block_size=256, kv_history=s0[None].clone())
        o = o[0].cpu().double()
        sq_err += float((o - o_ref).norm()) ** 2
        sq_ref += float(o_ref.norm()) ** 2
        eo.append(rel(o, o_ref))
        es.append(rel(kv[0, :, -1].cpu(), s_ref))
    res["prefill_o_relL2_all"] = (sq_err / sq_ref) ** 0.5
    res["prefill_o_relL2_max"] = max(eo)
    res["prefill_state_relL2_max"] = max(es)
    # zero initial state: the first block has no carried state (matches), the rest carries the off-by-one
    n = 1000
    q, k, v = act(H, n, D), act(H, n, D), act(H, n, D)
    o_ref, _ = lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu())
    o, _ = vllm_lightning.lightning_attention(q.float()[None], k.float()[None], v.float()[None], sl, block_size=256)
    o = o[0].cpu()
    res["prefill_zero_state_first_block_relL2"] = rel(o[:, :256], o_ref[:, :256])
    res["prefill_zero_state_after_first_block_relL2"] = rel(o[:, 256:], o_ref[:, 256:])
    # decode: scattered slots with a padded one (-1: skipped, output row left unwritten), in place
    B, NS = 16, 40
    q, k, v = (act(B, H, D).float()[:, :, None].contiguous() for _ in range(3))
    pool = torch.randn(NS, H, D, D, device=DEV) * 0.1
    slots = torch.randperm(NS, device=DEV)[:B]
    slots[3] = -1
    pool0 = pool.clone()
    o = vllm_lightning.linear_decode_forward_triton(q, k, v, pool, sl, slots, BLOCK_SIZE=32).view(B, H, D)
    eo, es = [], []
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        o_ref, s_ref = lightning_recurrence(q[b].cpu(), k[b].cpu(), v[b].cpu(), slopes.cpu(), pool0[slot].cpu())
        eo.append(rel(o[b].cpu(), o_ref[:, 0]))
        es.append(rel(pool[slot].cpu(), s_ref))
    rest = [i for i in range(NS) if i not in set(slots.tolist())]
    res["decode_o_relL2_max"] = max(eo)
    res["decode_state_relL2_max"] = max(es)
    res["decode_untouched"] = bool(torch.equal(pool[rest], pool0[rest]))
    return res


class ExpertsCase:
    def __init__(self, E, M, weights):
        self.E, self.M = E, M
        w13, w2, q13, s13, q2, s2 = weights
        self.w13, self.w2, self.q13, self.s13, self.q2, self.s2 = w13[:E], w2[:E], q13[:E], s13[:E], q2[:E], s2[:E]
        Hd, Fd = w2.shape[1], w2.shape[2]
        self.sizes = [M // E + (1 if e < M % E else 0) for e in range(E)]
        self.x = torch.randn(M, Hd, device=DEV).bfloat16()
        self.wts = torch.rand(M, device=DEV).bfloat16()
        self.offs = torch.tensor(torch.tensor(self.sizes).cumsum(0).tolist(), device=DEV, dtype=torch.int32)
        touched = sum(1 for n in self.sizes if n)
        self.bytes = touched * 3 * Hd * Fd * 2 + 2 * M * Hd * 2
        self.bytes_int8 = touched * 3 * Hd * Fd + 2 * M * Hd * 2
        self.flops = 2 * M * 3 * Hd * Fd
        self.out = torch.empty_like(self.x)

    def engine(self):
        counts = torch.tensor(self.sizes, device=DEV)
        return lambda: grouped_swiglu_no_sync(self.x, counts, self.w13, self.w2, self.wts)

    def ours(self, **cfg):
        return lambda: grouped_swiglu_triton(self.x, self.sizes, self.w13, self.w2, self.wts, out=self.out, **cfg)

    def ours_int8(self):
        return lambda: grouped_swiglu_triton(self.x, self.sizes, self.q13, self.q2, self.wts, w13_scale=self.s13,
                                             w2_scale=self.s2)

    def grouped_mm(self):
        Fd = self.w2.shape[2]

        def run():
            h = torch._grouped_mm(self.x, self.w13.transpose(1, 2), offs=self.offs)
            h = F.silu(h[:, :Fd]) * h[:, Fd:]
            return torch._grouped_mm(h, self.w2.transpose(1, 2), offs=self.offs) * self.wts[:, None]
        return run

    def torch_ref(self):
        return lambda: experts_reference(self.x, self.sizes, self.w13, self.w2, self.wts)


# ----------------------------------------------------------------------------------------------------- tuning
def tune(log) -> dict:
    best = {}
    # prefill
    # num_stages=1 with block_v=32 miscompiles under triton 3.6 (wrong results / illegal address, seen on H200),
    # chunk 128 with block_v 128 and 3 stages runs out of shared memory: neither is swept. Earlier sweeps (chunk 32 /
    # 128, 8 warps, segmenting at 64 heads) are in bench/results/kernels-tune-h100-2026-11-27.json. Each config is
    # checked against the default config's output before it is timed.
    single = [dict(), dict(num_warps=8), dict(num_stages=2), dict(block_v=32, num_stages=3),
              dict(block_v=128, num_warps=8), dict(block_v=64, segment=8192)]
    packed = [dict(block_v=64, num_warps=4, num_stages=st, segment=0) for st in (2, 3)]
    for name, lens in [("single 8K", [8192]), ("single 32K", [32768]), ("single 128K", [131072]),
                       ("pack 16x2K", [2048] * 16)]:
        cfgs = packed if len(lens) > 1 else single
        case = PrefillCase(lens)
        rows = []
        pool0 = case.pool.clone()  # every call updates the states in place: restart from the same ones
        ref = case.ours()().clone()
        for cfg in cfgs:
            try:
                case.pool.copy_(pool0)
                err = rel(case.ours(**cfg)(), ref)
                if not err < 1e-2:
                    log(f"  prefill {name} {cfg}: WRONG (rel {err:.2e} vs the default config)")
                    continue
                rows.append((bench_ms(case.ours(**cfg)), cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (e.g. out of shared memory)
                log(f"  prefill {name} {cfg}: {type(exc).__name__}")
        rows.sort(key=lambda r: r[0])
        if chunk_simple_gla is not None:
            rows.append((bench_ms(case.fla()), "fla chunk_simple_gla (contender)"))
        for t, cfg in rows[:5] + rows[-1:]:
            log(f"  prefill {name}: {t:.3f} ms {cfg}")
        best[f"prefill {name}"] = [(t, cfg) for t, cfg in rows]
        del case
    # decode: swept before (block_v 16-128 x 1-8 warps: kernels-tune-h100-2026-11-27.json); today's default only
    pool = torch.zeros(DecodeCase.POOL_SLOTS, HEADS, HEAD_DIM, HEAD_DIM, device=DEV)
    for B in (64, 1024):
        case = DecodeCase(B, pool)
        best[f"decode B={B}"] = [(bench_ms(case.ours()), "default")]
        log(f"  decode B={B}: {best[f'decode B={B}'][0][0]:.4f} ms default")
    del pool, case
    torch.cuda.empty_cache()
    return best


def expert_weights():
    """8 experts at hidden 6144 / ffn 9216: bf16 and int8 weight-only (w13, w2, q13, s13, q2, s2)."""
    w13 = (torch.randn(8, 2 * 9216, 6144, device=DEV) * 0.01).bfloat16()
    w2 = (torch.randn(8, 6144, 9216, device=DEV) * 0.01).bfloat16()
    q13, s13 = quantize_int8(w13)
    q2, s2 = quantize_int8(w2)
    return w13, w2, q13, s13, q2, s2


def expert_tune(weights, log) -> dict:
    # decode sizes: tiles of both GEMMs (config=) or of the down GEMM alone (down_config=)
    decode = [(which, dict(BM=16, BN=BN, BK=BK, GROUP_M=1, num_warps=4, num_stages=4))
              for BN, BK in ((32, 128), (64, 128), (128, 128), (32, 256), (64, 256))
              for which in ("config", "down_config")]
    # larger steps: tiles of both GEMMs, beside the grouped_mm path
    large = [("config", cfg) for cfg in (
        dict(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BM=16, BN=32, BK=256, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BM=16, BN=128, BK=128, GROUP_M=1, num_warps=4, num_stages=3),
        dict(BM=32, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BM=64, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BM=64, BN=128, BK=64, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BM=64, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3))]
    best = {}
    for E, M, tries in ((4, 1, decode), (4, 4, decode), (8, 8, decode), (8, 128, large), (4, 512, large),
                        (8, 8192, large)):
        case = ExpertsCase(E, M, weights)
        rows = [(bench_ms(case.ours()), "Triton, default config")]
        for which, cfg in tries:
            try:
                rows.append((bench_ms(case.ours(**{which: cfg})), f"{which}={cfg}"))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (e.g. out of shared memory)
                log(f"  experts E={E} M={M} {which}={cfg}: {type(exc).__name__}")
        if tries is large:
            rows.append((bench_ms(lambda: grouped_swiglu_grouped_mm(case.x, case.sizes, case.w13, case.w2,
                                                                    case.wts)), "grouped_mm path"))
        if hasattr(torch, "_grouped_mm"):
            rows.append((bench_ms(case.grouped_mm()), "torch._grouped_mm pipeline (contender)"))
        rows.sort(key=lambda r: r[0])
        swept = ("config=", "down_config=")
        for t, label in rows[:6] + [r for r in rows[6:] if not r[1].startswith(swept)]:
            log(f"  experts E={E} M={M}: {t:.4f} ms {label}")
        best[f"experts E={E} M={M}"] = rows
    return best


# ----------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tune", action="store_true", help="also sweep kernel configs (adds a few minutes)")
    ap.add_argument("--quick", action="store_true", help="small subset of shapes")
    ap.add_argument("--sections", default="prefill,decode,experts,combine", help="which timing sections to run")
    ap.add_argument("--tune-only", action="store_true", help="run the gate and the sweeps, skip the timing table")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="skip further timing passes once another would end past this many seconds of timing")
    args = ap.parse_args()

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = proc.stdout.strip() if proc.returncode == 0 else "uncommitted"
    except OSError:
        commit = "uncommitted"
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit, "fla": FLA_NOTE,
            "grouped_mm": hasattr(torch, "_grouped_mm")}
    info["vllm_lightning"] = VLLM_NOTE
    result = {"info": info, "rows": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    log(json.dumps(info))
    torch.manual_seed(0)
    result["ceilings"] = ceil = ceilings()
    bw, gemm = ceil["copy_bw_Bps"], ceil["gemm_bf16_flops"]
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 GEMM 8192^3 {gemm / 1e12:.0f} TFLOP/s")
    result["gate"] = gate = correctness_gate()
    log("correctness gate: " + json.dumps(gate))
    if vllm_lightning is not None:
        try:
            result["vllm_check"] = vllm_check()
            log("vLLM kernels vs fp64 recurrence (information, not a gate): " + json.dumps(result["vllm_check"]))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            log(f"vLLM check FAILED {type(exc).__name__}: {str(exc)[:200]}")
    save()
    if args.tune or args.tune_only:
        t0 = time.time()
        result["tune"] = tune(log)
        save()
        log(f"(lightning tuning took {time.time() - t0:.0f} s)")
    if args.tune_only:
        result["tune"].update(expert_tune(expert_weights(), log))
        result["log"] = lines
        save()
        return

    def floor_ms(nbytes, flops):
        return max(nbytes / bw, flops / gemm) * 1e3

    timings = {}  # (section, shape, contender) -> [ms per repeat]
    meta = {}

    def record(section, shape, contender, fn, nbytes, flops, err=None, timer=bench_ms):
        key = (section, shape, contender)
        try:
            t = timer(fn)
        except Exception as exc:  # noqa: BLE001 - a contender that fails is reported, not fatal
            log(f"  {section} {shape} {contender}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            return
        timings.setdefault(key, []).append(t)
        if key not in meta or err is not None:  # the cross-check error is computed on the first pass only
            meta[key] = (nbytes, flops, err)

    sections = args.sections.split(",")
    t_start = time.time()
    for rep in range(args.repeat):
        elapsed = time.time() - t_start
        if rep and args.deadline_s and elapsed * (rep + 1) / rep > args.deadline_s:
            log(f"-- timing pass {rep + 1}/{args.repeat} skipped: it would end past --deadline-s {args.deadline_s:.0f}")
            break
        log(f"-- timing pass {rep + 1}/{args.repeat}")
        for name, lens, heads in prefill_cases(args.quick) if "prefill" in sections else []:
            case = PrefillCase(lens, heads)
            err = None
            if chunk_simple_gla is not None and rep == 0:
                pool = case.pool.clone()
                o = lightning_prefill_varlen(case.q, case.k, case.v, case.slopes, pool, lens, case.slots)
                of, _ = case.fla()()
                err = rel(o, of[0])
            record("prefill", name, "ours", case.ours(), case.bytes, case.flops, err)
            if heads < HEADS:
                record("prefill", name, "ours, not segmented", case.ours(segment=0), case.bytes, case.flops)
            if chunk_simple_gla is not None:
                record("prefill", name, "fla chunk_simple_gla", case.fla(), case.bytes, case.flops)
            if vllm_lightning is not None:
                vllm_prefill_row(case, name, rep, record, log, result.setdefault("vllm_crosscheck", {}))
            if sum(lens) <= 8192:
                record("prefill", name, "torch reference", case.torch_ref(), case.bytes, case.flops)
            del case
            torch.cuda.empty_cache()
        pool = None
        if "decode" in sections:
            pool = torch.zeros(DecodeCase.POOL_SLOTS, HEADS, HEAD_DIM, HEAD_DIM, device=DEV)
        for B in ([1, 64, 256] if args.quick else [1, 16, 64, 256, 1024]) if "decode" in sections else []:
            case = DecodeCase(B, pool)
            err = None
            if rep == 0:
                p1, p2 = pool.clone(), pool.clone()
                o1 = lightning_decode_pool(case.q, case.k, case.v, case.slopes, p1, case.slots)
                o2 = lightning_reference(case.q, case.k, case.v, case.slopes, p2, [1] * B, case.slots)
                err = max(rel(o1, o2), rel(p1[case.slots], p2[case.slots]))
                del p1, p2
            name = f"B={B}"
            record("decode", name, "ours", case.ours(), case.bytes, case.flops, err)
            if fused_recurrent_simple_gla is not None:
                record("decode", name, "fla fused_recurrent (contiguous)", case.fla(False), case.bytes, case.flops)
                record("decode", name, "fla fused_recurrent + gather/scatter", case.fla(True), case.bytes,
                       case.flops)
            if vllm_lightning is not None:
                vllm_decode_row(case, name, rep, record, log)
            record("decode", name, "torch reference", case.torch_ref(), case.bytes, case.flops)
            del case
        del pool
        torch.cuda.empty_cache()
        if rep == 0:
            weights = expert_weights()
            if args.tune:
                result["tune"].update(expert_tune(weights, log))
                save()
        for E in (4, 8) if "experts" in sections else ():
            for M in ([1, 8, 32, 512, 4096] if args.quick else [1, 8, 32, 128, 512, 2048, 8192]):
                case = ExpertsCase(E, M, weights)
                err = err_triton = None
                if rep == 0:
                    ref = case.torch_ref()()
                    err, err_triton = rel(case.engine()(), ref), rel(case.ours()(), ref)
                name = f"E={E} M={M}"
                record("experts", name, "ours (engine: Triton, or grouped_mm path)", case.engine(), case.bytes,
                       case.flops, err)
                record("experts", name, "ours Triton bf16", case.ours(), case.bytes, case.flops, err_triton)
                record("experts", name, "ours int8 weight-only", case.ours_int8(), case.bytes_int8, case.flops)
                if info["grouped_mm"]:
                    record("experts", name, "torch._grouped_mm", case.grouped_mm(), case.bytes, case.flops)
                record("experts", name, "per-expert matmul (reference)", case.torch_ref(), case.bytes, case.flops)
                if M <= 32:  # decode sizes, launched the way graphed decode steps launch them
                    err = rel(case.engine()(), ref) if rep == 0 else None
                    record("experts graph", name, "ours (engine's graphed decode path)", case.engine(),
                           case.bytes, case.flops, err, timer=graph_ms)
                    if info["grouped_mm"]:
                        record("experts graph", name, "torch._grouped_mm", case.grouped_mm(), case.bytes, case.flops,
                               timer=graph_ms)
                del case
        for T in (64, 2048, 16384) if "combine" in sections else ():
            # each token's top-2 expert rows (in expert order, as the shard's sort leaves them) summed back
            Hd, K = 6144, 2
            y = torch.randn(T * K, Hd, device=DEV).bfloat16()
            slot = torch.randperm(T * K, device=DEV).view(T, K)
            num_rows = torch.tensor([T * K], device=DEV)
            token = torch.empty(T * K, dtype=torch.long, device=DEV)
            token[slot.flatten()] = torch.arange(T, device=DEV).repeat_interleave(K)
            nbytes = (T * K + T) * Hd * 2
            err = rel(combine_pairs(y, slot, num_rows), combine_reference(y.double(), slot, num_rows)) \
                if rep == 0 else None
            name = f"T={T} K={K}"
            record("combine", name, "ours", lambda: combine_pairs(y, slot, num_rows), nbytes, 0, err)
            record("combine", name, "index_add_ (bf16 atomics)",
                   lambda: torch.zeros(T, Hd, device=DEV, dtype=y.dtype).index_add_(0, token, y), nbytes, 0)
            record("combine", name, "gather + sum (reference)", lambda: combine_reference(y, slot, num_rows), nbytes, 0)
        save()

    # table
    log("")
    log(f"{'section':8} {'shape':18} {'contender':38} {'ms':>9} {'spread':>7} {'TB/s':>6} {'TFLOP/s':>7} "
        f"{'floor%':>6} {'relL2':>8}")
    rows = []
    for key, ts in timings.items():
        section, shape, contender = key
        nbytes, flops, err = meta[key]
        t = sorted(ts)[len(ts) // 2]
        row = {"section": section, "shape": shape, "contender": contender, "ms": t, "ms_all": ts,
               "spread": (max(ts) - min(ts)) / t if t else 0.0, "TBps": nbytes / (t * 1e-3) / 1e12,
               "TFLOPs": flops / (t * 1e-3) / 1e12, "floor_ms": floor_ms(nbytes, flops),
               "floor_fraction": floor_ms(nbytes, flops) / t, "relL2": err}
        rows.append(row)
        e = f"{err:.1e}" if err is not None else ""
        log(f"{section:8} {shape:18} {contender:38} {t:9.4f} {row['spread'] * 100:6.1f}% {row['TBps']:6.2f} "
            f"{row['TFLOPs']:7.1f} {row['floor_fraction'] * 100:5.0f}% {e:>8}")
    result["rows"] = rows

    # speedups vs the best public contender
    summary = []
    for section, shape in sorted({(r["section"], r["shape"]) for r in rows}):
        mine = [r for r in rows if r["section"] == section and r["shape"] == shape and r["contender"].startswith("ours")
                and "int8" not in r["contender"]]
        others = [r for r in rows if r["section"] == section and r["shape"] == shape
                  and not r["contender"].startswith("ours")]
        if mine and others:
            best = min(others, key=lambda r: r["ms"])
            summary.append({"section": section, "shape": shape, "vs": best["contender"],
                            "speedup": best["ms"] / mine[0]["ms"], "floor_fraction": mine[0]["floor_fraction"],
                            "speedup_vs": {r["contender"]: r["ms"] / mine[0]["ms"] for r in others}})
    result["summary"] = summary
    log("")
    for s in summary:
        log(f"{s['section']:8} {s['shape']:18} speedup vs {s['vs']:38} {s['speedup']:5.2f}x   "
            f"ours at {s['floor_fraction'] * 100:3.0f}% of floor")
    for section in ("prefill", "decode", "experts", "experts graph", "combine"):
        sp = [s["speedup"] for s in summary if s["section"] == section]
        if sp:
            log(f"geomean speedup {section} (vs best other): {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x")
    for section, vs in (("prefill", "fla chunk_simple_gla"), ("decode", "fla fused_recurrent (contiguous)"),
                        ("experts", "torch._grouped_mm"), ("experts graph", "torch._grouped_mm")):
        sp = [s["speedup_vs"][vs] for s in summary if s["section"] == section and vs in s["speedup_vs"]]
        if sp:
            log(f"geomean speedup {section} vs {vs}: {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x")
    for section, vs in (("prefill", VLLM_PREFILL), ("decode", VLLM_DECODE)):
        sp = [s["speedup_vs"][vs] for s in summary if s["section"] == section and vs in s["speedup_vs"]]
        if sp:
            log(f"geomean speedup {section} vs {vs}: {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x")
    result["log"] = lines
    save()


if __name__ == "__main__":
    main()
