"""bench/gpu_cluster.py on CPU, tiny dims: the engine phase and the transformers baseline (hf phase) on the same
checkpoint and prompts, and the report that sets them side by side. The engine runs one shard plus the router's own
share of the experts (--router-experts), the topology that uses every GPU of a 4-GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

CONC, PROMPT, TOKENS = 3, 64, 6


@pytest.mark.slow
def test_engine_and_transformers_phases_on_cpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_cluster.py"), "--out", str(out), "--work", str(tmp_path / "w"),
           "--model", str(tmp_path / "ckpt"), "--device", "cpu", "--tiny", "--layers", "4", "--vocab", "512",
           "--shards", "1", "--router-experts", "--concurrency", str(CONC), "--prompt-len", str(PROMPT), "--engine-tokens", str(TOKENS),
           "--hf-max-tokens", str(TOKENS), "--phases", "ckpt,engine,graphs,hf", "--deadline-s", "500"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu-cluster.json").read_text())
    assert all(data["phases"][p].startswith("ok") for p in ("ckpt", "engine", "graphs", "hf")), data["phases"]

    hf = data["hf"]
    assert "error" not in hf, hf["error"]
    assert hf["transformers"] == transformers.__version__
    assert hf["rope"].startswith("first 16 of 32 dims")
    rows = {r["concurrency"]: r for r in hf["rows"]}
    assert set(rows) == {1, CONC}
    engine_rows = {r["concurrency"]: r for r in data["engine"]["rows"]}
    graph_rows = {r["concurrency"]: r for r in data["graphs"]["rows"]}  # fixed-size decode steps (eager on CPU)
    assert set(graph_rows) == {1, CONC}
    for c, r in rows.items():
        assert "error" not in r, r["error"]
        assert r["generated_tokens"] == c * TOKENS
        assert r["prompt_len"] == PROMPT
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["output_tok_s"] > 0
        # same prompts, same weights, fp32 on both sides, MiniMax's partial RoPE: the same greedy tokens
        assert r["tokens_head"] == engine_rows[c]["tokens_head"] == graph_rows[c]["tokens_head"]
        assert len(r["tokens_head"]) == min(c, 4) and all(len(t) == TOKENS for t in r["tokens_head"])

    md = (out / "gpu-cluster.md").read_text()
    assert "## transformers generate" in md and "engine / transformers decode" in md
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {CONC} | {PROMPT} | {TOKENS} |") and "x**" in ln)
    ratio = engine_rows[CONC]["decode_tok_s"] / rows[CONC]["decode_tok_s"]
    assert f"**{ratio:.1f}x**" in line and f"| {TOKENS} of {TOKENS} |" in line
    graph_ratio = graph_rows[CONC]["decode_tok_s"] / rows[CONC]["decode_tok_s"]
    assert line.endswith(f"**{graph_ratio:.1f}x** |")
    assert "## Engine in-process with CUDA-graph decode steps" in md
    assert "the router holds a share of the experts too (--router-experts: 2 equal shares)" in md
