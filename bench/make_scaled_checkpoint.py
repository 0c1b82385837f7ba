"""A random MiniMax-M1 checkpoint at the real per-layer dimensions, with few layers, in the published layout.

Real dims (MiniMax-M1): hidden 6144, 64 heads x 128, 8 KV heads, rotary 64, 32 experts x 9216 (top-2), vocab
200064 (reduced here by default: `--vocab`, to save disk and time; the LM head is a small part of a step).
Layer types follow the real pattern scaled down: every `--full-every`-th layer is softmax (GQA), the rest are
lightning. Layout as MiniMax publishes it (see model_shards/tiny.py): original config.json and tensor names, bf16
weights with fp32 router gates, embedding alone in shard 0, the other non-expert tensors in shard 1, then one file
per expert index holding that expert of every layer, plus the index and a (tiny, BPE) tokenizer.

The tensors are generated on the GPU (when there is one) and written straight out, several files at once:

    python bench/make_scaled_checkpoint.py /tmp/m1-4l --layers 4 --full-every 4      # ~44 GB, 4 layers
    python bench/make_scaled_checkpoint.py /tmp/m1-tiny --tiny                       # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_shards.checkpoint import INDEX_FILE, router_names  # noqa: E402
from model_shards.tiny import tiny_config  # noqa: E402
from model_shards.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

REAL = dict(hidden_size=6144, num_heads=64, num_kv_heads=8, head_dim=128, rotary_dim=64, intermediate_size=9216,
            num_experts=32)
TINY = dict(hidden_size=128, num_heads=8, num_kv_heads=2, head_dim=32, rotary_dim=16, intermediate_size=96,
            num_experts=8)


def scaled_config(layers: int, vocab: int, full_every: int, tiny: bool = False):
    dims = TINY if tiny else REAL
    return tiny_config(num_layers=layers, vocab_size=vocab, full_attention_every=full_every, **dims)


def write_scaled_checkpoint(out: str | Path, cfg, device: str = "cuda", seed: int = 0, workers: int = 8) -> dict:
    """Writes the checkpoint; returns sizes and timings. Values: matrices N(0, 1/fan_in), norms 1 + 0.1 N(0, 1),
    embedding N(0, 1) (as model_shards.tiny.random_weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    t0 = time.perf_counter()

    def make(name: str, shape, gen: torch.Generator) -> torch.Tensor:
        fp32 = name.endswith("block_sparse_moe.gate.weight")
        t = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32 if fp32 else torch.bfloat16)
        if len(shape) == 1:
            t.mul_(0.1).add_(1)
        elif name != "model.embed_tokens.weight":
            t.mul_(shape[-1] ** -0.5)
        return t

    rnames = router_names(cfg)
    H, F = cfg.hidden_size, cfg.intermediate_size
    groups: list[dict[str, tuple]] = [{"model.embed_tokens.weight": rnames["model.embed_tokens.weight"]},
                                      {n: s for n, s in rnames.items() if n != "model.embed_tokens.weight"}]
    for e in range(cfg.num_local_experts):
        g = {}
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            g[p + "w1.weight"], g[p + "w3.weight"], g[p + "w2.weight"] = (F, H), (F, H), (H, F)
        groups.append(g)
    n_files = len(groups)

    def write(i: int) -> tuple[int, dict[str, str]]:
        gen = torch.Generator(device=dev).manual_seed(seed * 100003 + i)
        tensors = {n: make(n, s, gen) for n, s in groups[i].items()}
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
        tensors = {n: t.cpu() for n, t in tensors.items()}
        filename = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        return sum(t.numel() * t.element_size() for t in tensors.values()), {n: filename for n in tensors}

    weight_map, total = {}, 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for size, names in pool.map(write, range(n_files)):
            total += size
            weight_map.update(names)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    write_tiny_tokenizer(out, cfg.vocab_size)
    seconds = time.perf_counter() - t0
    expert_bytes = sum(3 * H * F * 2 for _ in range(cfg.num_local_experts * cfg.num_hidden_layers))
    return {"path": str(out), "files": n_files, "total_bytes": total, "expert_bytes": expert_bytes,
            "seconds": seconds, "GB_per_s": total / seconds / 1e9, "layers": cfg.num_hidden_layers,
            "layer_types": list(cfg.layer_types), "vocab_size": cfg.vocab_size, "hidden_size": H,
            "intermediate_size": F, "experts": cfg.num_local_experts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full-every", type=int, default=4, help="every N-th layer is softmax attention (real model: 8)")
    p.add_argument("--vocab", type=int, default=32768, help="real model: 200064")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    a = p.parse_args(argv)
    cfg = scaled_config(a.layers, a.vocab, a.full_every, a.tiny)
    print(json.dumps(write_scaled_checkpoint(a.out, cfg, a.device, a.seed, a.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
