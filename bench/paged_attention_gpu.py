"""GPU check of kernels/attention.py: the pinned SDPA path vs the explicit-mask path (same math), and the decode
time per call while the context grows (what decoding does). One GPU; prints a table, writes JSON to --out."""

from __future__ import annotations

import argparse
import json
import time

import torch

from kernels.attention import _cpu_attention, _gpu_attention, paged_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt, H, KVH, D = "cuda", torch.bfloat16, 64, 8, 128
    rows = []
    for n, ctx in ((1, 1024), (1, 32768), (512, 512), (256, 1280), (2048, 8192)):
        q = torch.randn(H, n, D, device=dev, dtype=dt)
        k, v = (torch.randn(KVH, ctx, D, device=dev, dtype=dt) for _ in range(2))
        fast = _gpu_attention(q, k, v, D ** -0.5).float()
        ref = _cpu_attention(q.float(), k.float(), v.float(), D ** -0.5)  # explicit mask, fp32
        rel = ((fast - ref).norm() / ref.norm()).item()
        rows.append({"case": "accuracy", "n": n, "ctx": ctx, "rel_l2": rel})
    # decode through the paged cache with the context growing by one each call
    block, blocks = 16, 4096
    kc, vc = (torch.randn(blocks, block, KVH, D, device=dev, dtype=dt) for _ in range(2))
    table = torch.arange(blocks, device=dev)[None]
    for start in (1024, 32768):
        q = torch.randn(1, H, D, device=dev, dtype=dt)
        for _ in range(3):
            paged_attention(q, kc, vc, [1], [start], table, D ** -0.5)
        torch.cuda.synchronize()
        t0, steps = time.perf_counter(), 50
        for i in range(steps):
            paged_attention(q, kc, vc, [1], [start + i], table, D ** -0.5)
        torch.cuda.synchronize()
        rows.append({"case": "decode_growing_ctx", "ctx": start, "ms_per_call": 1e3 * (time.perf_counter() - t0) / steps})
    # a decode step of 64 sequences with different contexts: the per-sequence SDPA loop vs one Triton launch
    import kernels.attention as attention

    B = 64
    ctx = torch.randint(500, 2000, (B,)).tolist()
    tables = torch.stack([torch.randperm(blocks, device=dev)[:128] for _ in range(B)])
    q = torch.randn(B, H, D, device=dev, dtype=dt)
    results = {}
    for name, use_kernel in (("sdpa_loop", False), ("triton_batched", True)):
        attention.HAVE_TRITON = use_kernel
        o = paged_attention(q, kc, vc, [1] * B, ctx, tables, D ** -0.5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            paged_attention(q, kc, vc, [1] * B, ctx, tables, D ** -0.5)
        torch.cuda.synchronize()
        results[name] = (o.float(), 1e3 * (time.perf_counter() - t0) / 20)
    rel = ((results["triton_batched"][0] - results["sdpa_loop"][0]).norm() / results["sdpa_loop"][0].norm()).item()
    rows.append({"case": "decode_step_64_seqs", "sdpa_loop_ms": results["sdpa_loop"][1],
                 "triton_batched_ms": results["triton_batched"][1], "rel_l2_vs_loop": rel})
    for r in rows:
        print(r)
    if args.out:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
