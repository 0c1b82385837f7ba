"""Decode-size expert sweep: the tl.dot grouped kernels (kernels/experts/grouped.py) against the weight-streaming
gemv kernels (kernels/experts/gemv.py) at 1..4 rows per touched expert, hidden 6144 / ffn 9216 (one GPU).

    python bench/experts_m1_sweep.py --out results.json [--deadline-s 150] [--stages1]
    TRITON_INTERPRET=1 python bench/experts_m1_sweep.py --tiny --out /tmp/tiny.json   (CPU: the code path only)

Per case (E experts in the shard, M rows spread over the first experts as bench/kernels.py does) every candidate is
first checked against grouped_swiglu_triton's default output (relative L2 < 1e-2, else WRONG and not timed), then
timed twice: triton.testing.do_bench median (L2 flushed between reps; the Python wrapper, host overhead included,
as the engine calls it) and do_bench_cudagraph median (the raw launches over a tile table built beforehand: no host
overhead). Each time is also given as % of the HBM floor = (touched experts' weight bytes + 2*M*H*2 activation
bytes) / copy bandwidth (measured first, as bench/kernels.py's ceilings() does). Last, int8 weights: the best bf16
gemv config (by graph time) against grouped_swiglu_triton int8.
--stages1 adds, after all cases, the gemv register path (num_stages=1: no cp.async pipeline, x re-read from L1);
it is off by default because num_stages=1 with small tiles miscompiled once under triton 3.6 on H200 (another
kernel), and an illegal address would end the sweep (it stops when the CUDA context is lost; the JSON keeps what
ran). --deadline-s stops sweeping (the JSON is still written) once that many seconds have passed since the start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

if "--tiny" in sys.argv:  # must precede the first triton import; the interpreter runs the kernels on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.experts.gemv import grouped_swiglu_gemv, swiglu_gemv_launch  # noqa: E402
from kernels.experts.grouped import (_down_kernel, _fit, _gate_up_kernel, _tile_table, default_config,  # noqa: E402
                                     grouped_swiglu_triton)
from kernels.experts.reference import quantize_int8  # noqa: E402
from kernels.triton_utils import dot_dtype  # noqa: E402

CASES = [(4, 1), (4, 2), (8, 4), (8, 8), (4, 16)]  # (experts in the shard, rows)
GROUPED = [dict(BM=16, BN=BN, BK=BK, GROUP_M=1, num_warps=4, num_stages=4)
           for BN, BK in ((32, 128), (32, 256), (64, 256), (16, 128), (16, 256))]  # besides the default (64, 128)
# gemv (BN, BK, num_warps, num_stages); num_stages = depth of the K loop's cp.async pipeline
GEMV = [(4, 256, 4, 2), (4, 256, 4, 3), (4, 512, 4, 2), (4, 512, 4, 3), (4, 1024, 4, 2), (4, 256, 2, 3),
        (4, 512, 2, 3), (8, 256, 4, 2), (8, 256, 4, 3), (8, 256, 4, 4), (8, 512, 4, 2), (8, 512, 4, 3),
        (8, 256, 8, 3), (8, 512, 8, 2), (8, 512, 8, 3), (16, 256, 4, 2), (16, 256, 4, 3), (16, 256, 8, 3),
        (16, 512, 8, 2), (16, 512, 8, 3), (32, 256, 8, 2), (32, 256, 8, 3)]
GEMV_TINY = [(16, 256, 4, 2), (32, 256, 8, 3)]  # --tiny: few programs (the interpreter runs them one by one)
GEMV_STAGES1 = [(4, 256, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (8, 256, 4, 1), (8, 512, 4, 1), (8, 256, 8, 1),
                (8, 512, 8, 1), (16, 256, 4, 1), (16, 256, 8, 1), (16, 512, 8, 1), (32, 256, 8, 1)]
TOP_FOR_MULTIROW = 10  # cases with several rows per expert (BM > 1) try only the best configs of the earlier cases


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def gemv_cfg(c, BM=1) -> dict:
    BN, BK, W, S = c
    return dict(BM=BM, BN=BN, BK=BK, num_warps=W, num_stages=S)


def label(kind, cfg) -> str:
    if cfg is None:
        return f"{kind} default"
    keys = ("BM", "BN", "BK", "num_warps", "num_stages")
    return f"{kind} " + "/".join(str(cfg[k]) for k in keys) + " (BM/BN/BK/warps/stages)"


class Case:
    def __init__(self, E, M, weights, dev):
        self.E, self.M = E, M
        w13, w2, q13, s13, q2, s2 = weights
        self.w13, self.w2, self.q13, self.s13, self.q2, self.s2 = w13[:E], w2[:E], q13[:E], s13[:E], q2[:E], s2[:E]
        self.H, self.F = w2.shape[1], w2.shape[2]
        self.sizes = [M // E + (1 if e < M % E else 0) for e in range(E)]
        self.x = torch.randn(M, self.H, device=dev).bfloat16()
        self.wts = torch.rand(M, device=dev).bfloat16()
        self.out = torch.empty_like(self.x)
        touched = sum(1 for n in self.sizes if n)
        act = 2 * M * self.H * 2
        self.bytes = {"bf16": touched * 3 * self.H * self.F * 2 + act, "int8": touched * 3 * self.H * self.F + act}

    def weights(self, int8):
        return (self.q13, self.q2, self.s13, self.s2) if int8 else (self.w13, self.w2, None, None)

    # the wrappers, as the engine calls them (tile table built per call)
    def grouped(self, cfg, int8=False):
        w13, w2, s13, s2 = self.weights(int8)
        return lambda: grouped_swiglu_triton(self.x, self.sizes, w13, w2, self.wts, w13_scale=s13, w2_scale=s2,
                                             config=cfg, out=self.out)

    def gemv(self, cfg, int8=False):
        w13, w2, s13, s2 = self.weights(int8)
        return lambda: grouped_swiglu_gemv(self.x, self.sizes, w13, w2, self.wts, w13_scale=s13, w2_scale=s2,
                                           config=cfg, out=self.out)

    # the raw launches over a table built here (capturable in a CUDA graph)
    def grouped_raw(self, cfg, int8=False):
        """grouped_swiglu_triton's two launches (same arguments) with the tile table and h built beforehand."""
        w13, w2, s13, s2 = self.weights(int8)
        x, H, F = self.x, self.H, self.F
        cfg = cfg or default_config(self.M / max(1, sum(1 for n in self.sizes if n)))
        c1, c2 = _fit(cfg, H), _fit(cfg, F)
        tiles, n = _tile_table(self.sizes, c1["BM"], x.device)
        h = torch.empty(self.M, F, device=x.device, dtype=x.dtype)
        DT = dot_dtype(x.dtype)

        def run():
            _gate_up_kernel[(n * triton.cdiv(F, c1["BN"]),)](
                x, w13, s13 if int8 else x, h, tiles, n, F, H, x.stride(0), w13.stride(0), w13.stride(1),
                h.stride(0), INT8=int8, DT=DT, EVEN_K=H % c1["BK"] == 0, BM=c1["BM"], BN=c1["BN"], BK=c1["BK"],
                GROUP_M=c1["GROUP_M"], num_warps=c1["num_warps"], num_stages=c1["num_stages"])
            _down_kernel[(n * triton.cdiv(H, c2["BN"]),)](
                h, w2, s2 if int8 else h, self.wts, self.out, tiles, n, H, F, h.stride(0), w2.stride(0),
                w2.stride(1), self.out.stride(0), INT8=int8, HAS_WEIGHTS=True, DT=DT, EVEN_K=F % c2["BK"] == 0,
                BM=c2["BM"], BN=c2["BN"], BK=c2["BK"], GROUP_M=c2["GROUP_M"], num_warps=c2["num_warps"],
                num_stages=c2["num_stages"])
            return self.out
        return run

    def gemv_raw(self, cfg, int8=False):
        w13, w2, s13, s2 = self.weights(int8)
        tiles, n = _tile_table(self.sizes, cfg["BM"], self.x.device)
        h = torch.empty(self.M, self.F, device=self.x.device, dtype=self.x.dtype)
        return lambda: swiglu_gemv_launch(self.x, tiles, n, w13, w2, self.wts, s13, s2, cfg, cfg, h, self.out)


def expert_weights(dev, E, H, F):
    w13 = (torch.randn(E, 2 * F, H, device=dev) * 0.01).bfloat16()
    w2 = (torch.randn(E, H, F, device=dev) * 0.01).bfloat16()
    q13, s13 = quantize_int8(w13)
    q2, s2 = quantize_int8(w2)
    return w13, w2, q13, s13, q2, s2


def ceilings(dev, tiny) -> dict:
    """Copy bandwidth (read + write) as bench/kernels.py's ceilings() measures it: 1 GiB fp32 copy, do_bench median."""
    if tiny:
        a = torch.empty(1 << 20, device=dev)
        b = torch.empty_like(a)
        t0 = time.perf_counter()
        b.copy_(a)
        return {"copy_bw_Bps": 2 * a.numel() * 4 / (time.perf_counter() - t0)}
    a = torch.empty(1 << 28, device=dev)  # 1 GiB
    b = torch.empty_like(a)
    t = float(do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median"))
    return {"copy_bw_Bps": 2 * a.numel() * 4 / (t * 1e-3)}


class Sweep:
    def __init__(self, args, log):
        self.args, self.log = args, log
        self.t0 = time.time()
        self.context_lost = False

    def out_of_time(self) -> bool:
        return self.context_lost or time.time() - self.t0 > self.args.deadline_s

    @staticmethod
    def time_ms(fn, graph_fn):
        bench = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        torch.cuda.synchronize()
        graph = float(do_bench_cudagraph(graph_fn, rep=20, return_mode="median"))
        return bench, graph

    def run(self, case, name, fn, graph_fn, ref, floor_s) -> dict:
        row = {"candidate": name}
        try:
            errs, wall = [], []
            for f in (fn, graph_fn):
                case.out.fill_(float("nan"))  # every element must be written
                t0 = time.perf_counter()
                y = f()
                wall.append((time.perf_counter() - t0) * 1e3)
                errs.append(rel(y, ref) if torch.isfinite(y).all() else float("inf"))
            row["relL2_vs_grouped_default"] = max(errs)
            if not max(errs) < 1e-2:
                row["status"] = "WRONG"
            else:  # --tiny (interpreter): the wall time of those single calls
                bench, graph = wall if self.args.tiny else self.time_ms(fn, graph_fn)
                row.update(status="ok", bench_us=bench * 1e3, graph_us=graph * 1e3,
                           bench_pct_floor=1e5 * floor_s / bench, graph_pct_floor=1e5 * floor_s / graph)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory) or fails
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            row.update(status="FAILED", error=f"{type(exc).__name__}: {first}")
            if case.x.is_cuda:
                try:
                    torch.cuda.synchronize()
                    torch.zeros(1, device=case.x.device).item()
                except Exception:  # noqa: BLE001
                    self.context_lost = True
                    self.log("!! CUDA context lost: sweep stopped")
        self.log(fmt_row(row))
        return row


def fmt_row(row) -> str:
    if row.get("status") != "ok":
        extra = row.get("error", f"rel {row.get('relL2_vs_grouped_default', float('nan')):.1e}")
        return f"  {row['candidate']:<58} {row.get('status', '?'):>8}  {extra}"
    return (f"  {row['candidate']:<58} {row['bench_us']:8.1f} us {row['bench_pct_floor']:5.1f}%  "
            f"{row['graph_us']:8.1f} us {row['graph_pct_floor']:5.1f}%  rel {row['relL2_vs_grouped_default']:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline-s", type=float, default=150)
    ap.add_argument("--tiny", action="store_true", help="small shapes, 2 gemv candidates, one call each (CPU)")
    ap.add_argument("--stages1", action="store_true", help="also sweep the gemv register path (num_stages=1)")
    args = ap.parse_args()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    if dev == "cpu" and not args.tiny:
        sys.exit("no GPU: run with --tiny (under TRITON_INTERPRET=1) on CPU")
    E_max, H, F = (8, 64, 96) if args.tiny else (8, 6144, 9216)
    gemv_main = GEMV_TINY if args.tiny else GEMV
    grouped_cfgs = GROUPED[:1] if args.tiny else GROUPED
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (TRITON_INTERPRET=1)",
            "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
            "hidden": H, "ffn": F, "tiny": args.tiny}
    result = {"info": info, "cases": {}}

    def save():
        result["log"] = lines
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    sweep = Sweep(args, log)
    try:
        log(json.dumps(info))
        torch.manual_seed(0)
        result["ceilings"] = ceilings(dev, args.tiny)
        bw = result["ceilings"]["copy_bw_Bps"]
        log(f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write)")
        weights = expert_weights(dev, E_max, H, F)
        cases, refs = {}, {}
        ranking = {}  # gemv (BN, BK, warps, stages) -> best % of floor (graph) at one row per expert

        def gemv_rows(case, key, configs, phase):
            floor_s = case.bytes["bf16"] / bw
            rows = []
            for cfg in configs:
                if sweep.out_of_time():
                    result["cases"][key].setdefault("skipped", []).append(label("gemv", cfg))
                    continue
                row = sweep.run(case, label("gemv", cfg), case.gemv(cfg), case.gemv_raw(cfg), refs[key], floor_s)
                row.update(kind="gemv", config=cfg, phase=phase)
                rows.append(row)
                if row["status"] == "ok" and cfg["BM"] == 1:
                    c = tuple(cfg[k] for k in ("BN", "BK", "num_warps", "num_stages"))
                    ranking[c] = max(ranking.get(c, 0.0), row["graph_pct_floor"])
            return rows

        for E, M in CASES:
            key = f"E={E} M={M}"
            if sweep.out_of_time():
                log(f"-- {key}: skipped (deadline or lost context)")
                result["cases"][key] = {"skipped": "all"}
                continue
            case = cases[key] = Case(E, M, weights, dev)
            floor = {k: v / bw for k, v in case.bytes.items()}
            res = result["cases"][key] = {"sizes": case.sizes, "floor_us": {k: v * 1e6 for k, v in floor.items()},
                                          "rows": []}
            log(f"-- {key} sizes {case.sizes}: floor {floor['bf16'] * 1e6:.1f} us bf16, {floor['int8'] * 1e6:.1f} us"
                f" int8 | do_bench median (wrapper) | do_bench_cudagraph median (raw launches) | vs grouped default")
            refs[key] = case.grouped(None)().clone()
            for cfg in [None] + grouped_cfgs:
                if sweep.out_of_time():
                    break
                row = sweep.run(case, label("grouped", cfg), case.grouped(cfg), case.grouped_raw(cfg), refs[key],
                                floor["bf16"])
                row.update(kind="grouped", config=cfg or "default", phase="main")
                res["rows"].append(row)
            BM = min(4, triton.next_power_of_2(max(case.sizes)))
            if BM == 1:
                configs = [gemv_cfg(c) for c in gemv_main]
            else:  # the best BM=1 configs so far, with this case's row tile (and half of it for the top 3)
                best = sorted(gemv_main, key=lambda c: -ranking.get(c, 0.0))[:2 if args.tiny else TOP_FOR_MULTIROW]
                configs = [gemv_cfg(c, BM) for c in best] + [gemv_cfg(c, BM // 2) for c in best[:3]]
            res["rows"] += gemv_rows(case, key, configs, "main")
            # int8: the best bf16 gemv config (graph time) against the grouped kernel's default
            ok = [r for r in res["rows"] if r["kind"] == "gemv" and r["status"] == "ok"]
            if ok and not sweep.out_of_time():
                best_cfg = max(ok, key=lambda r: r["graph_pct_floor"])["config"]
                ref8 = case.grouped(None, int8=True)().clone()
                for kind, cfg in (("grouped", None), ("gemv", best_cfg)):
                    fn = case.grouped(cfg, True) if kind == "grouped" else case.gemv(cfg, True)
                    raw = case.grouped_raw(cfg, True) if kind == "grouped" else case.gemv_raw(cfg, True)
                    row = sweep.run(case, "int8 " + label(kind, cfg), fn, raw, ref8, floor["int8"])
                    row.update(kind=f"{kind} int8", config=cfg or "default", phase="int8")
                    res["rows"].append(row)
            summarize(res, log)
            save()

        if args.stages1:  # after everything else: a lost CUDA context here costs no earlier result
            log("-- gemv register path (num_stages=1)")
            for key, case in cases.items():
                BM = min(4, triton.next_power_of_2(max(case.sizes)))
                stages1 = [c[:3] + (1,) for c in GEMV_TINY] if args.tiny else GEMV_STAGES1
                log(f"-- {key}")
                result["cases"][key]["rows"] += gemv_rows(case, key, [gemv_cfg(c, BM) for c in stages1], "stages1")
                summarize(result["cases"][key], log)
                save()
    finally:
        result["elapsed_s"] = time.time() - sweep.t0
        save()
        log(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")


def summarize(res, log):
    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    best = {}
    for kind in ("grouped", "gemv", "grouped int8", "gemv int8"):
        rows = [r for r in ok if r["kind"] == kind]
        if rows:
            b = max(rows, key=lambda r: r["graph_pct_floor"])
            best[kind] = {"candidate": b["candidate"], "graph_pct_floor": b["graph_pct_floor"],
                          "bench_pct_floor": b["bench_pct_floor"],
                          "best_bench_pct_floor": max(r["bench_pct_floor"] for r in rows)}
    res["best"] = best
    for kind, b in best.items():
        log(f"   best {kind:<13}: {b['candidate']}  graph {b['graph_pct_floor']:.1f}% / do_bench "
            f"{b['bench_pct_floor']:.1f}% of floor (best do_bench of any: {b['best_bench_pct_floor']:.1f}%)")


if __name__ == "__main__":
    main()
