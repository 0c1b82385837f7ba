"""Why is softmax attention slow in bench/gpu_cluster.py? Times kernels.attention.paged_attention's SDPA call at
MiniMax-M1 dims (64 q heads, 8 KV heads, 128) per backend, decode (n=1) with a context that grows every call (as
in a real decode loop) or stays fixed, and a 1024-token prefill chunk with an explicit mask vs is_causal.

    python3 bench/sdpa_probe.py [--out file.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def timed(fn, reps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KVH, D = 64, 8, 128
    rows = []
    for ctx in (1024, 32768):
        k = torch.randn(1, KVH, ctx + 64, D, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q1 = torch.randn(1, H, 1, D, device=dev, dtype=dt)
        for name, be in BACKENDS.items():
            for gqa in (True, False):
                def call(i, grow, _be=be, _gqa=gqa):
                    c = ctx + (i % 64 if grow else 0)
                    kk, vv = k[:, :, :c], v[:, :, :c]
                    if not _gqa:
                        kk, vv = kk.repeat_interleave(H // KVH, 1), vv.repeat_interleave(H // KVH, 1)
                    if _be is None:
                        return F.scaled_dot_product_attention(q1, kk, vv, enable_gqa=_gqa)
                    with sdpa_kernel([_be]):
                        return F.scaled_dot_product_attention(q1, kk, vv, enable_gqa=_gqa)
                for grow in (False, True):
                    try:
                        call(0, grow)
                        ms = timed(lambda i: call(i + 1, grow), 20)
                    except Exception as e:
                        ms = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append({"case": "decode", "ctx": ctx, "backend": name, "enable_gqa": gqa,
                                 "ctx_grows": grow, "ms": ms})
                    print(rows[-1], flush=True)
    # prefill chunk: 1024 new tokens at the end of ctx, mask as paged_attention builds it
    n = 1024
    for ctx in (1024, 8192):
        q = torch.randn(1, H, n, D, device=dev, dtype=dt)
        k = torch.randn(1, KVH, ctx, D, device=dev, dtype=dt)
        v = torch.randn_like(k)
        rws = torch.arange(ctx - n, ctx, device=dev)[:, None]
        mask = torch.arange(ctx, device=dev)[None, :] <= rws
        for name, be in BACKENDS.items():
            for variant in ("mask", "is_causal" if ctx == n else None):
                if variant is None:
                    continue
                def call(i, _be=be, _v=variant):
                    kw = {"attn_mask": mask} if _v == "mask" else {"is_causal": True}
                    if _be is None:
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                    with sdpa_kernel([_be]):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                try:
                    call(0)
                    ms = timed(call, 5)
                except Exception as e:
                    ms = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append({"case": "prefill1024", "ctx": ctx, "backend": name, "variant": variant, "ms": ms})
                print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
