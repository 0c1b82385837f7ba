"""The Triton paged decode-attention kernel against the per-sequence reference, under Triton's interpreter (CPU).

Run in a subprocess: TRITON_INTERPRET must be set before triton is imported anywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kernels.attention import _cpu_attention
    from kernels.paged_decode import paged_decode_attention
    torch.manual_seed(0)
    for H, KVH, D, page in ((8, 2, 32, 16), (4, 4, 16, 8), (12, 2, 32, 16)):
        blocks = 48
        kc, vc = torch.randn(blocks, page, KVH, D), torch.randn(blocks, page, KVH, D)
        ctx = [1, page, page + 1, 5 * page + 3, 300 if page == 16 else 200]
        tables = torch.stack([torch.randperm(blocks)[:(300 + page - 1) // page] for _ in ctx])
        q = torch.randn(len(ctx), H, D)
        # one split (the program writes the output), and split contexts merged afterwards: 3 splits of 32-token
        # tiles leave the 1-token context two empty splits and cut 300 tokens mid-tile
        for splits in (1, 3, 8):
            out = torch.full_like(q, float("nan"))
            out[:] = paged_decode_attention(q, kc, vc, tables, torch.tensor(ctx, dtype=torch.int32), D ** -0.5,
                                            block_n=32, splits=splits)
            for b, n in enumerate(ctx):
                k = kc[tables[b]].flatten(0, 1)[:n].transpose(0, 1)
                v = vc[tables[b]].flatten(0, 1)[:n].transpose(0, 1)
                ref = _cpu_attention(q[b][:, None], k, v, D ** -0.5)[:, 0]
                err = ((out[b] - ref).norm() / ref.norm()).item()
                assert err < 1e-5, (H, KVH, D, page, n, splits, err)
    # the default: about two programs per SM, one split once the batch fills them
    from kernels.paged_decode import MAX_SPLITS, num_splits
    cpu = torch.device("cpu")  # counted as 8 SMs
    assert num_splits(1, 2, cpu) == 8 and num_splits(64, 8, cpu) == 1 and num_splits(1, 1, cpu) == 16
    assert num_splits(3, 1, cpu) == 4 and num_splits(5, 1, cpu) == 2  # 5 and 3 programs' worth: powers of two
    assert MAX_SPLITS >= 16
    # every batch size maps to a count that a power-of-two batch size (a CUDA-graph size) already uses
    by_graph_size = {num_splits(b, 8, cpu) for b in (1, 2, 4, 8, 16, 32, 64)}
    assert {num_splits(b, 8, cpu) for b in range(1, 300)} <= by_graph_size
    print("OK")
""")


def test_paged_decode_kernel_matches_reference_in_interpreter():
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
