"""Weight-streaming SwiGLU experts for steps with very few rows per touched expert (decode: 1..4), with the contract
of grouped.grouped_swiglu_triton and the same `tiles` table (expert, first row, end row of each row tile).

At one row on one expert the tl.dot tiles of grouped.py starve the GPU: [16, 64] output tiles make 144 (gate/up) and
96 (down) programs for 132 SMs, one per SM, so the second wave runs nearly empty with few bytes in flight. Here a
program owns BN (4-32) output features of one row tile and streams their weight rows along K (contiguous: 16-byte
vector loads): thousands of small programs, several resident per SM.
  - No tl.dot. The weight tile is viewed as [BN, BK/V, V], V = one 16-byte vector, multiplied elementwise by the x
    chunk (fp32) and summed over V inside each thread. The sum across lanes runs once, after the K loop, so the loop
    has no shuffles and no barriers (besides the pipeline's).
  - The x chunk is loaded through pointers broadcast to the weight tile's shape, so it gets the weight tile's
    register layout (no layout conversion in the loop). A plain [1, BK] chunk made Triton convert the
    weight tile in every iteration, or pipelined, reduce across lanes in it (sm_90 TTGIR/SASS, triton 3.9).
  - The rows (at most BM) are unrolled; each one's partial sums go to its own slot of a [BN, BK/V, BM] accumulator.
  - num_stages is the K loop's software-pipelining depth: 1 = plain loads (the repeated x reads hit L1, occupancy
    keeps the bytes in flight); > 1 = cp.async through shared memory, where the broadcast x costs as much shared
    memory and L2 traffic per row as a weight row.
  - int8 weights are widened with the 2^23 magic number (an integer add and an fp32 subtract, both full rate: the
    int8 -> fp32 convert instruction runs at 16 per clock per SM and would cap the stream), and scaled per output
    channel after the sum.
A tile whose first row >= its end row returns before reading any weight, so a caller may launch a fixed grid over a
table padded with empty tiles (CUDA graphs): see swiglu_gemv_launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped import _k_offset, _tile_table


@triton.jit
def _widen(w, INT8: tl.constexpr):
    if INT8:
        # exact for every int8 w: the fp32 with bits 0x4B000080 + w is 2^23 + 128 + w
        out = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        out = w.to(tl.float32)
    return out


# num_m_tiles changes from step to step: unspecialised, so a new value never recompiles mid-serving
@triton.jit(do_not_specialize=["num_m_tiles"])
def _gate_up_gemv_kernel(x, w13, scale13, h, tiles, num_m_tiles, F, K,
                         stride_xm, stride_we, stride_wn, stride_hm,
                         INT8: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    pid_m = tl.program_id(0) % num_m_tiles  # row tiles fastest: the tiles of one expert share each weight tile in L2
    pid_n = tl.program_id(0) // num_m_tiles
    row0 = tl.load(tiles + num_m_tiles + pid_m)
    row1 = tl.load(tiles + 2 * num_m_tiles + pid_m)
    if row0 >= row1:
        return
    e = tl.load(tiles + pid_m).to(tl.int64)
    rows = row1 - row0
    rows_b = tl.zeros([1, 1, 1], dtype=tl.int32) + rows  # the interpreter turns `block & (scalar < scalar)` into int32
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK // VEC)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
    n_ok = (rn < F)[:, None, None]
    slot = tl.arange(0, BM)[None, None, :]
    g_ptrs = w13 + e * stride_we + rn[:, None, None].to(tl.int64) * stride_wn + rk  # [BN, BK/V, V]
    u_ptrs = g_ptrs + F * stride_wn
    x_ptrs = tl.broadcast_to(x + row0.to(tl.int64) * stride_xm + rk, [BN, BK // VEC, VEC])
    acc_g = tl.zeros([BN, BK // VEC, BM], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK // VEC, BM], dtype=tl.float32)
    n_k = tl.cdiv(K, BK)
    for i in tl.range(0, n_k, num_stages=STAGES):
        k0 = _k_offset(i, n_k, pid_n % n_k, BK)
        ok = n_ok if EVEN_K else n_ok & (rk < K - k0)
        wg = _widen(tl.load(g_ptrs + k0, mask=ok, other=0), INT8)
        wu = _widen(tl.load(u_ptrs + k0, mask=ok, other=0), INT8)
        for m in tl.static_range(BM):
            xm = tl.load(x_ptrs + m * stride_xm + k0, mask=ok & (rows_b > m), other=0.0).to(tl.float32)
            acc_g = tl.where(slot == m, acc_g + tl.sum(wg * xm, axis=2)[:, :, None], acc_g)
            acc_u = tl.where(slot == m, acc_u + tl.sum(wu * xm, axis=2)[:, :, None], acc_u)
    g = tl.sum(acc_g, axis=1)  # [BN, BM]
    u = tl.sum(acc_u, axis=1)
    if INT8:
        sc = scale13 + e * 2 * F + rn
        g *= tl.load(sc, mask=rn < F, other=0.0)[:, None]
        u *= tl.load(sc + F, mask=rn < F, other=0.0)[:, None]
    out = g * tl.sigmoid(g) * u
    rm = tl.arange(0, BM)
    h_ptrs = h + (row0 + rm)[None, :].to(tl.int64) * stride_hm + rn[:, None]
    tl.store(h_ptrs, out.to(h.dtype.element_ty), mask=(rn < F)[:, None] & (rm < rows)[None, :])


@triton.jit(do_not_specialize=["num_m_tiles"])
def _down_gemv_kernel(h, w2, scale2, weights, y, tiles, num_m_tiles, N, K,
                      stride_hm, stride_we, stride_wn, stride_ym,
                      INT8: tl.constexpr, HAS_WEIGHTS: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    pid_m = tl.program_id(0) % num_m_tiles
    pid_n = tl.program_id(0) // num_m_tiles
    row0 = tl.load(tiles + num_m_tiles + pid_m)
    row1 = tl.load(tiles + 2 * num_m_tiles + pid_m)
    if row0 >= row1:
        return
    e = tl.load(tiles + pid_m).to(tl.int64)
    rows = row1 - row0
    rows_b = tl.zeros([1, 1, 1], dtype=tl.int32) + rows
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK // VEC)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
    n_ok = (rn < N)[:, None, None]
    slot = tl.arange(0, BM)[None, None, :]
    w_ptrs = w2 + e * stride_we + rn[:, None, None].to(tl.int64) * stride_wn + rk
    a_ptrs = tl.broadcast_to(h + row0.to(tl.int64) * stride_hm + rk, [BN, BK // VEC, VEC])
    acc = tl.zeros([BN, BK // VEC, BM], dtype=tl.float32)
    n_k = tl.cdiv(K, BK)
    for i in tl.range(0, n_k, num_stages=STAGES):
        k0 = _k_offset(i, n_k, pid_n % n_k, BK)
        ok = n_ok if EVEN_K else n_ok & (rk < K - k0)
        w = _widen(tl.load(w_ptrs + k0, mask=ok, other=0), INT8)
        for m in tl.static_range(BM):
            a = tl.load(a_ptrs + m * stride_hm + k0, mask=ok & (rows_b > m), other=0.0).to(tl.float32)
            acc = tl.where(slot == m, acc + tl.sum(w * a, axis=2)[:, :, None], acc)
    out = tl.sum(acc, axis=1)  # [BN, BM]
    rm = tl.arange(0, BM)
    m_ok = rm < rows
    if INT8:
        out *= tl.load(scale2 + e * N + rn, mask=rn < N, other=0.0)[:, None]
    if HAS_WEIGHTS:
        out *= tl.load(weights + row0 + rm, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y + (row0 + rm)[None, :].to(tl.int64) * stride_ym + rn[:, None]
    tl.store(y_ptrs, out.to(y.dtype.element_ty), mask=(rn < N)[:, None] & m_ok[None, :])


def default_gemv_config(max_rows: int) -> dict:
    """Placeholder tiles until bench/experts_m1_sweep.py has run on H100/H200. BM: rows of one tile (a power of 2,
    at most 4: an expert with more rows takes several tiles, which read the same weight tile at about the same time
    and so mostly from L2)."""
    BM = min(4, triton.next_power_of_2(max(1, max_rows)))
    return dict(BM=BM, BN=8, BK=256, num_warps=4, num_stages=3)


def _fit(cfg: dict, K: int, vec: int) -> dict:
    cfg = dict(cfg)
    cfg["BK"] = max(vec, min(cfg["BK"], triton.next_power_of_2(K)))
    return cfg


def swiglu_gemv_launch(x, tiles, n_tiles: int, w13, w2, weights, w13_scale, w2_scale, config: dict,
                       down_config: dict, h, y):
    """Both launches over a tile table already on the device ([3, n_tiles] int32: expert, first row, end row; tiles
    with first row >= end row are skipped, rows at most config["BM"] per tile). Nothing here reads the GPU or
    allocates, so a fixed-size table makes the call capturable in a CUDA graph. Arguments as grouped_swiglu_gemv;
    h [N, F] is the scratch for silu(x w1^T) * (x w3^T), y [N, H] the output."""
    Hd = x.shape[1]
    F = w2.shape[2]
    int8 = w13.dtype == torch.int8
    vec = 16 // w13.element_size()
    cfg1, cfg2 = _fit(config, Hd, vec), _fit(down_config, F, vec)
    assert cfg1["BM"] == cfg2["BM"], "both kernels walk the same tile table"
    _gate_up_gemv_kernel[(n_tiles * triton.cdiv(F, cfg1["BN"]),)](
        x, w13, w13_scale if int8 else x, h, tiles, n_tiles, F, Hd,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        INT8=int8, EVEN_K=Hd % cfg1["BK"] == 0, VEC=vec, BM=cfg1["BM"], BN=cfg1["BN"], BK=cfg1["BK"],
        STAGES=cfg1["num_stages"], num_warps=cfg1["num_warps"], num_stages=cfg1["num_stages"])
    _down_gemv_kernel[(n_tiles * triton.cdiv(Hd, cfg2["BN"]),)](
        h, w2, w2_scale if int8 else h, weights if weights is not None else h, y, tiles, n_tiles, Hd, F,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        INT8=int8, HAS_WEIGHTS=weights is not None, EVEN_K=F % cfg2["BK"] == 0, VEC=vec,
        BM=cfg2["BM"], BN=cfg2["BN"], BK=cfg2["BK"],
        STAGES=cfg2["num_stages"], num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"])
    return y


def grouped_swiglu_gemv(x, group_sizes: list[int], w13, w2, weights=None, w13_scale=None, w2_scale=None,
                        config: dict | None = None, down_config: dict | None = None, out=None):
    """Same contract as grouped_swiglu_triton: x [N, H] (bf16/fp16) sorted by expert; w13 [E, 2F, H], w2 [E, H, F]
    in x's dtype, or int8 with w13_scale [E, 2F] / w2_scale [E, H]. Returns [N, H] in x's dtype. Meant for 1..4 rows
    per touched expert; correct for any."""
    N, Hd = x.shape
    F = w2.shape[2]
    y = torch.empty_like(x) if out is None else out
    if N == 0:
        return y
    assert sum(group_sizes) == N and len(group_sizes) <= w13.shape[0]
    int8 = w13.dtype == torch.int8
    assert int8 == (w13_scale is not None) and (w2.dtype == torch.int8) == (w2_scale is not None)
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    x = x if x.stride(-1) == 1 else x.contiguous()
    if weights is not None:
        weights = weights.contiguous()
    if int8:
        w13_scale = w13_scale.float().contiguous()
        w2_scale = w2_scale.float().contiguous()
    config = config or default_gemv_config(max(group_sizes))
    down_config = {**(down_config or config), "BM": config["BM"]}
    tiles, n_tiles = _tile_table(group_sizes, config["BM"], x.device)
    h = torch.empty(N, F, device=x.device, dtype=x.dtype)
    return swiglu_gemv_launch(x, tiles, n_tiles, w13, w2, weights, w13_scale, w2_scale, config, down_config, h, y)
