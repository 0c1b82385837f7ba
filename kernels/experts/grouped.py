"""Triton grouped-GEMM SwiGLU experts (same contract as reference.grouped_swiglu), bf16 or int8 weight-only, and the
GEMM-bound path for many rows per expert (torch._grouped_mm, i.e. CUTLASS, plus one Triton silu*mul pass).

Two launches over the rows of x, which come sorted by expert:
  1. gate/up: h = silu(x w1^T) * (x w3^T) with w1, w3 the two halves of w13 [E, 2F, H]: each program computes one
     [BM, BN] tile of both products (two accumulators) and writes only h (bf16), so silu*mul costs no extra pass;
  2. down:    y = (h w2^T) * weights, w2 [E, H, F].
The row tiles never straddle two experts: a tile -> (expert, first row, end row) table says which rows a program
takes. The host builds it when it holds group_sizes as a list; with per-expert counts on the device
(`grouped_swiglu_counts`: no host sync, CUDA-graph safe) each program derives its own tile from the counts (a prefix
sum over at most a few dozen experts, in registers), over a fixed grid whose spare tiles exit at once. Programs are
ordered in groups of GROUP_M row tiles so that a weight tile is reused from L2 by the row tiles that need it.
int8 weights: w13/w2 hold int8 values and per-output-channel scales (w13_scale [E, 2F], w2_scale [E, H]); the
int8 tile is widened to bf16 (exact) before the dot and the scale is applied to the fp32 accumulator.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..triton_utils import dot_dtype


@triton.jit
def _tile_coords(num_m_tiles, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _k_offset(i, n_k, rot, BK: tl.constexpr):
    """Offset of a program's i-th K tile: each program starts at its own tile (rot) so that at any moment the
    programs read different columns of the weight rows. All of them streaming the same column band at once
    concentrates the traffic on a few memory channels: the worst passes of one-token steps (one expert, ~150
    programs) were 8-14% slower on H200 without this (bench/results/experts-sweep-h200-2026-11-27.json)."""
    return tl.multiple_of(((i + rot) % n_k) * BK, BK)


@triton.jit
def _tile(tiles, pid_m, num_m_tiles, NUM_E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr):
    """(expert, first row, end row) of row tile pid_m: from the host's table [3, num_m_tiles], or (NUM_E > 0) from
    the NUM_E per-expert row counts at `tiles`. Past the last real tile: first row >= end row."""
    if NUM_E == 0:
        e = tl.load(tiles + pid_m)
        row0 = tl.load(tiles + num_m_tiles + pid_m)
        row1 = tl.load(tiles + 2 * num_m_tiles + pid_m)
    else:
        offs = tl.arange(0, E_PAD)
        counts = tl.load(tiles + offs, mask=offs < NUM_E, other=0).to(tl.int32)
        n_tiles = (counts + BM - 1) // BM
        tile_ends = tl.cumsum(n_tiles, 0)
        e = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)  # the expert whose tiles cover pid_m (NUM_E: none)
        mine = offs == e
        count = tl.sum(tl.where(mine, counts, 0), 0)
        row1 = tl.sum(tl.where(mine, tl.cumsum(counts, 0), 0), 0)
        first_tile = tl.sum(tl.where(mine, tile_ends - n_tiles, 0), 0)
        row0 = row1 - count + (pid_m - first_tile) * BM
    return e.to(tl.int64), row0, row1


# num_m_tiles changes from step to step: unspecialised, so a new value (1, a multiple of 16) never recompiles
# mid-serving
@triton.jit(do_not_specialize=["num_m_tiles"])
def _gate_up_kernel(x, w13, scale13, h, tiles, num_m_tiles, F, K,
                    stride_xm, stride_we, stride_wn, stride_hm,
                    INT8: tl.constexpr, DT: tl.constexpr, EVEN_K: tl.constexpr, NUM_E: tl.constexpr,
                    E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(num_m_tiles, F, BN, GROUP_M)
    e, row0, row1 = _tile(tiles, pid_m, num_m_tiles, NUM_E, E_PAD, BM)
    if row0 >= row1:  # an empty tile of a fixed grid
        return
    rm = row0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < row1
    n_ok = rn < F
    x_ptrs = x + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    g_ptrs = w13 + e * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BK, BN] view of w1^T
    u_ptrs = g_ptrs + F * stride_wn
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    n_k = tl.cdiv(K, BK)
    for i in range(0, n_k):
        k0 = _k_offset(i, n_k, pid_n % n_k, BK)
        if EVEN_K:
            a = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
            bg = tl.load(g_ptrs + k0, mask=n_ok[None, :], other=0)
            bu = tl.load(u_ptrs + k0, mask=n_ok[None, :], other=0)
        else:
            k_ok = rk < K - k0
            a = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs + k0, mask=n_ok[None, :] & k_ok[:, None], other=0)
            bu = tl.load(u_ptrs + k0, mask=n_ok[None, :] & k_ok[:, None], other=0)
        a = a.to(DT)
        acc_g = tl.dot(a, bg.to(DT), acc_g)
        acc_u = tl.dot(a, bu.to(DT), acc_u)
    if INT8:
        sc = scale13 + e * 2 * F + rn
        acc_g *= tl.load(sc, mask=n_ok, other=0.0)[None, :]
        acc_u *= tl.load(sc + F, mask=n_ok, other=0.0)[None, :]
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h + rm[:, None].to(tl.int64) * stride_hm + rn[None, :]
    tl.store(h_ptrs, out.to(h.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_m_tiles"])
def _down_kernel(h, w2, scale2, weights, y, tiles, num_m_tiles, N, K,
                 stride_hm, stride_we, stride_wn, stride_ym,
                 INT8: tl.constexpr, HAS_WEIGHTS: tl.constexpr, DT: tl.constexpr, EVEN_K: tl.constexpr,
                 NUM_E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(num_m_tiles, N, BN, GROUP_M)
    e, row0, row1 = _tile(tiles, pid_m, num_m_tiles, NUM_E, E_PAD, BM)
    if row0 >= row1:
        return
    rm = row0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < row1
    n_ok = rn < N
    a_ptrs = h + rm[:, None].to(tl.int64) * stride_hm + rk[None, :]
    b_ptrs = w2 + e * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BK, BN] view of w2^T
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    n_k = tl.cdiv(K, BK)
    for i in range(0, n_k):
        k0 = _k_offset(i, n_k, pid_n % n_k, BK)
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs + k0, mask=n_ok[None, :], other=0)
        else:
            k_ok = rk < K - k0
            a = tl.load(a_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc = tl.dot(a.to(DT), b.to(DT), acc)
    if INT8:
        acc *= tl.load(scale2 + e * N + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_WEIGHTS:
        acc *= tl.load(weights + rm, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _silu_mul_kernel(h13, weights, h, end, F, stride_13, stride_h, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if row >= tl.load(end):  # past the experts' rows (counts on the device: the grid covers all of x)
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(h13 + row * stride_13 + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h13 + row * stride_13 + F + cols, mask=ok, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    if HAS_WEIGHTS:
        out *= tl.load(weights + row).to(tl.float32)
    tl.store(h + row * stride_h + cols, out.to(h.dtype.element_ty), mask=ok)


def default_config(rows_per_expert: float) -> dict:
    """Tile shapes by the average number of rows an expert gets: few rows = weight streaming, many = GEMM-bound
    (picked from a sweep on H200 with hidden 6144 / ffn 9216, triton 3.6)."""
    if rows_per_expert <= 1:  # one token per expert: more, narrower programs stream the weights better (88.1% of
        # the floor vs 86.5% at BN=64, CUDA-graph launched, bench/results/experts-m1-sweep-h200-2026-11-27.txt)
        return dict(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 16:
        return dict(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 32:
        return dict(BM=32, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return dict(BM=64, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4 if rows_per_expert <= 256 else 3)


def _tile_table(group_sizes: list[int], BM: int, device) -> tuple[torch.Tensor, int]:
    experts, starts, ends = [], [], []
    row = 0
    for e, n in enumerate(group_sizes):
        for r in range(row, row + n, BM):
            experts.append(e)
            starts.append(r)
            ends.append(row + n)
        row += n
    table = torch.tensor([experts, starts, ends], dtype=torch.int32).to(device, non_blocking=True)
    return table, len(experts)


def _fit(cfg: dict, K: int) -> dict:
    cfg = dict(cfg)
    cfg["BK"] = min(cfg["BK"], max(16, triton.next_power_of_2(K)))
    return cfg


def grouped_swiglu_triton(x, group_sizes: list[int], w13, w2, weights=None, w13_scale=None, w2_scale=None,
                          config: dict | None = None, down_config: dict | None = None, out=None):
    """x [N, H] (bf16/fp16) sorted by expert; w13 [E, 2F, H], w2 [E, H, F] in x's dtype, or int8 with
    w13_scale [E, 2F] / w2_scale [E, H] (per output channel). Returns [N, H] in x's dtype."""
    N = x.shape[0]
    y = torch.empty_like(x) if out is None else out
    if N == 0:
        return y
    assert sum(group_sizes) == N and len(group_sizes) <= w13.shape[0]
    rows = N / max(1, sum(1 for n in group_sizes if n))
    cfg1 = config or default_config(rows)
    cfg2 = down_config or config or default_config(rows)
    table1 = _tile_table(group_sizes, cfg1["BM"], x.device)
    table2 = table1 if cfg2["BM"] == cfg1["BM"] else _tile_table(group_sizes, cfg2["BM"], x.device)
    return _launch(x, table1, table2, cfg1, cfg2, w13, w2, weights, w13_scale, w2_scale, y, num_e=0)


def grouped_swiglu_counts(x, counts: torch.Tensor, w13, w2, weights=None, w13_scale=None, w2_scale=None,
                          config: dict | None = None):
    """Same result from per-expert row counts [E] on the device instead of a host list, with no host sync and a grid
    that depends only on x's shape (so it can be captured in a CUDA graph). x's first sum(counts) rows are the
    experts' (sorted by expert); the rows after them get zeros. config: the tiles (default: for all of x's rows over
    the E experts)."""
    N = x.shape[0]
    y = torch.zeros_like(x)
    if N == 0:
        return y
    E = counts.shape[0]
    cfg = config or default_config(N / min(N, E))
    # tiles for any split of N rows over E experts: sum ceil(c / BM) <= N // BM + (experts with rows) (one-token
    # steps: exactly one tile, no spare programs)
    table = counts.contiguous(), N // cfg["BM"] + min(N, E)
    return _launch(x, table, table, cfg, cfg, w13, w2, weights, w13_scale, w2_scale, y, num_e=E)


def _launch(x, table1, table2, cfg1, cfg2, w13, w2, weights, w13_scale, w2_scale, y, num_e: int):
    """num_e: 0 when the tables are the host's, else the number of per-expert counts the tables are."""
    N, Hd = x.shape
    F = w13.shape[1] // 2
    int8 = w13.dtype == torch.int8
    assert int8 == (w13_scale is not None) and (w2.dtype == torch.int8) == (w2_scale is not None)
    x = x if x.stride(-1) == 1 else x.contiguous()
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    if weights is not None:
        weights = weights.contiguous()
    if int8:
        w13_scale = w13_scale.float().contiguous()
        w2_scale = w2_scale.float().contiguous()
    DT = dot_dtype(x.dtype)
    cfg1, cfg2 = _fit(cfg1, Hd), _fit(cfg2, F)
    e_pad = triton.next_power_of_2(max(num_e, 1))

    h = torch.empty(N, F, device=x.device, dtype=x.dtype)
    tiles, n_tiles = table1
    grid = (n_tiles * triton.cdiv(F, cfg1["BN"]),)
    _gate_up_kernel[grid](
        x, w13, w13_scale if int8 else x, h, tiles, n_tiles, F, Hd,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        INT8=int8, DT=DT, EVEN_K=Hd % cfg1["BK"] == 0, NUM_E=num_e, E_PAD=e_pad,
        BM=cfg1["BM"], BN=cfg1["BN"], BK=cfg1["BK"], GROUP_M=cfg1["GROUP_M"],
        num_warps=cfg1["num_warps"], num_stages=cfg1["num_stages"])

    tiles, n_tiles = table2
    grid = (n_tiles * triton.cdiv(Hd, cfg2["BN"]),)
    _down_kernel[grid](
        h, w2, w2_scale if int8 else h, weights if weights is not None else h, y, tiles, n_tiles, Hd, F,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        INT8=int8, HAS_WEIGHTS=weights is not None, DT=DT, EVEN_K=F % cfg2["BK"] == 0, NUM_E=num_e, E_PAD=e_pad,
        BM=cfg2["BM"], BN=cfg2["BN"], BK=cfg2["BK"], GROUP_M=cfg2["GROUP_M"],
        num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"])
    return y


def grouped_swiglu_grouped_mm(x, group_sizes, w13, w2, weights=None, out=None):
    """Same contract (bf16/fp16 weights only) with both GEMMs in torch._grouped_mm: at hundreds of rows per expert
    the work is GEMM-bound and CUTLASS's grouped GEMM beats our Triton tiles (bench/results/kernels.md). The routing
    weight is applied to h before w2 (the same product), so silu, mul and weights cost one pass over h.
    group_sizes: a host list, or per-expert counts [E] on x's device (no host sync): then x's rows after
    sum(counts) are not computed and their outputs are left unspecified."""
    N, Hd = x.shape
    E, F2, _ = w13.shape
    F = F2 // 2
    if N == 0:
        return torch.empty_like(x) if out is None else out
    if torch.is_tensor(group_sizes):
        assert group_sizes.shape == (E,)
        offs = torch.cumsum(group_sizes, 0, dtype=torch.int32)
    else:
        assert sum(group_sizes) == N and len(group_sizes) <= E
        ends = list(itertools.accumulate(group_sizes)) + [N] * (E - len(group_sizes))
        offs = torch.tensor(ends, dtype=torch.int32).to(x.device, non_blocking=True)
    h13 = torch._grouped_mm(x.contiguous(), w13.transpose(1, 2), offs=offs)
    h = torch.empty(N, F, device=x.device, dtype=x.dtype)
    BLOCK = 1024
    _silu_mul_kernel[(N, triton.cdiv(F, BLOCK))](
        h13, weights.contiguous() if weights is not None else h13, h, offs[-1:], F, h13.stride(0), h.stride(0),
        HAS_WEIGHTS=weights is not None, BLOCK=BLOCK)
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    return y if out is None else out.copy_(y)
