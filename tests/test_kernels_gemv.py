"""The weight-streaming expert kernels (kernels/experts/gemv.py) against the reference, on CPU under the Triton
interpreter, as tests/test_kernels_triton.py does: TRITON_INTERPRET=1 must be set before triton is first imported,
so the checks run in subprocesses (this file run as a script, two halves in parallel) that print their measurements
as JSON, and the tests assert on them. Outputs are NaN-poisoned before each call to prove every element is written.
The interpreter truncates fp32 -> bf16 instead of rounding: about twice the GPU's output error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-2  # relative L2 error allowed on bf16 paths

# name: (E, H, F, group sizes). "a": an empty expert, experts of 1, 3 and 4 rows, K tiles that divide H; "b": partial
# N tiles (F=52, H=72 against BN 8/16) and partial K tiles (72 and 52 against BK 32)
CASES = {"a": (4, 64, 96, [1, 0, 3, 4]), "b": (3, 72, 52, [3, 1, 0])}
CONFIGS = {  # (config, down_config); None: the defaults (BM=4 here)
    "default": (None, None),
    "bm2": (dict(BM=2, BN=16, BK=32, num_warps=4, num_stages=2), dict(BM=2, BN=8, BK=32, num_warps=2, num_stages=2)),
    "bm1": (dict(BM=1, BN=32, BK=16, num_warps=2, num_stages=1), None),
}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _inputs(E, H, F, sizes, seed=0):
    import torch

    torch.manual_seed(seed)
    N = sum(sizes)
    x = torch.randn(N, H).bfloat16()
    w13 = (torch.randn(E, 2 * F, H) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, F) / F ** 0.5).bfloat16()
    return x, w13, w2, torch.rand(N).bfloat16()


# the checks, split in two halves of about equal interpreter time (run in parallel)
PARTS = ([("bf16", "a"), ("int8", "a", "default")],
         [("bf16", "b"), ("int8", "b", "default"), ("int8", "a", "bm2"), ("padded", "a")])


def _run_checks(part: int) -> dict:
    import torch

    from kernels.experts.gemv import grouped_swiglu_gemv, swiglu_gemv_launch
    from kernels.experts.reference import dequantize_int8, grouped_swiglu, quantize_int8

    def err(y, ref):
        return _rel(y, ref) if torch.isfinite(y).all() else float("inf")

    res: dict = {}
    for kind, name, *rest in PARTS[part]:
        E, H, F, sizes = CASES[name]
        x, w13, w2, wts = _inputs(E, H, F, sizes)
        if kind == "bf16":  # every config with routing weights, the defaults also without
            for cname, (cfg, down) in CONFIGS.items():
                for w in (wts, None) if cname == "default" else (wts,):
                    ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(),
                                         None if w is None else w.double())
                    y = torch.full_like(x, float("nan"))
                    grouped_swiglu_gemv(x, sizes, w13, w2, w, config=cfg, down_config=down, out=y)
                    res[f"{name}_{cname}_{'w' if w is not None else 'now'}_err"] = err(y, ref)
        elif kind == "int8":  # weight-only, per-output-channel scales
            q13, s13 = quantize_int8(w13)
            q2, s2 = quantize_int8(w2)
            ref = grouped_swiglu(x.double(), sizes, dequantize_int8(q13, s13, torch.float64),
                                 dequantize_int8(q2, s2, torch.float64), wts.double())
            cfg, down = CONFIGS[rest[0]]
            y = torch.full_like(x, float("nan"))
            grouped_swiglu_gemv(x, sizes, q13, q2, wts, w13_scale=s13, w2_scale=s2, config=cfg, down_config=down,
                                out=y)
            res[f"{name}_int8_{rest[0]}_err"] = err(y, ref)
        else:
            # a hand-made table padded with empty tiles (first row == end row, first row > end row), one of them
            # naming an expert far outside w13 / w2: reading its weights faults (the interpreter dereferences raw
            # addresses). Rows 8-9 of the padded x / h / y belong to no real tile and must keep their poison.
            ref = grouped_swiglu(x.double(), sizes, w13.double(), w2.double(), wts.double())
            xp = torch.cat([x, torch.randn(2, H).bfloat16()])
            wp = torch.cat([wts, torch.ones(2).bfloat16()])
            h = torch.full((10, F), float("nan")).bfloat16()
            yp = torch.full_like(xp, float("nan"))
            tiles = torch.tensor([[0, 1, 2, 2, 1 << 20, 3],
                                  [0, 8, 1, 4, 9, 4],
                                  [1, 8, 4, 8, 8, 8]], dtype=torch.int32)
            cfg = dict(BM=4, BN=16, BK=32, num_warps=4, num_stages=2)
            swiglu_gemv_launch(xp, tiles, tiles.shape[1], w13, w2, wp, None, None, cfg, cfg, h, yp)
            res["padded_table_err"] = err(yp[:8], ref)
            res["padded_rows_untouched"] = bool(yp[8:].isnan().all() and h[8:].isnan().all())
    return res


@pytest.fixture(scope="module")
def results() -> dict:
    import triton  # noqa: F401  (a test dependency: fail, never skip, without it)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(part)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for part in (0, 1)]
    res = {}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:] + err[-4000:]
        res.update(json.loads(out.strip().splitlines()[-1]))
    return res


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gemv_bf16(results, case, config):
    for key in (f"{case}_{config}_w_err", f"{case}_{config}_now_err"):
        if key in results:
            assert results[key] < TOL, (key, results[key])
    assert f"{case}_{config}_w_err" in results


@pytest.mark.parametrize("key", ["a_int8_default_err", "a_int8_bm2_err", "b_int8_default_err"])
def test_gemv_int8(results, key):
    assert results[key] < TOL


def test_gemv_padded_table_writes_nothing_for_empty_tiles(results):
    assert results["padded_table_err"] < TOL
    assert results["padded_rows_untouched"]


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    print(json.dumps(_run_checks(int(sys.argv[1]))))
