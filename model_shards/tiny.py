"""make-tiny: a small random MiniMax-M1 checkpoint in the published layout, so everything runs offline.

Layout as MiniMax publishes it: original config.json, original tensor names, bf16 weights with fp32 router gates,
zero-based shard names, expert-major shards (one layer's experts spread over many files), an index, and a
byte-level BPE tokenizer with MiniMax's special tokens and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, router_names
from .config import FULL, LINEAR, ModelConfig
from .tiny_tokenizer import write_tiny_tokenizer

DEEPNORM_ALPHA = 3.5565588200778455  # (2 * 80) ** 0.25, MiniMax-M1's value


def tiny_config(num_layers: int = 8, num_experts: int = 8, hidden_size: int = 128, num_heads: int = 8,
                num_kv_heads: int = 2, head_dim: int = 32, rotary_dim: int = 16, intermediate_size: int = 96,
                vocab_size: int = 512, full_attention_every: int = 8) -> ModelConfig:
    types = tuple(FULL if (i + 1) % full_attention_every == 0 else LINEAR for i in range(num_layers))
    cfg = ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rotary_dim, rope_theta=1e7,
        intermediate_size=intermediate_size, num_local_experts=num_experts, num_experts_per_tok=2,
        rms_norm_eps=1e-5, layer_types=types, linear_attn_alpha=DEEPNORM_ALPHA, linear_attn_beta=1.0,
        full_attn_alpha=DEEPNORM_ALPHA, full_attn_beta=1.0, mlp_alpha=DEEPNORM_ALPHA, mlp_beta=1.0,
        max_position_embeddings=10_240_000)
    cfg.validate()
    return cfg


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-named tensors. Matrices ~ N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1): with the usual 0.02
    init every path looks right even when the math is wrong."""
    g = torch.Generator().manual_seed(seed)

    def make(name, shape):
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        return t.to(torch.float32 if name.endswith("block_sparse_moe.gate.weight") else torch.bfloat16)

    tensors = {name: make(name, shape) for name, shape in router_names(cfg).items()}
    H, F = cfg.hidden_size, cfg.intermediate_size
    for e in range(cfg.num_local_experts):
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            tensors[p + "w1.weight"] = make(p + "w1.weight", (F, H))
            tensors[p + "w3.weight"] = make(p + "w3.weight", (F, H))
            tensors[p + "w2.weight"] = make(p + "w2.weight", (H, F))
    return tensors


def write_checkpoint(out: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Shards as MiniMax orders them: embedding alone first, the other non-expert tensors next, then one file per
    expert index holding that expert of every layer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = [["model.embed_tokens.weight"], [n for n in tensors if ".experts." not in n and "embed_tokens" not in n]]
    for e in range(cfg.num_local_experts):
        groups.append([n for n in tensors if f".experts.{e}." in n])
    groups = [g for g in groups if g]
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
        for n in names:
            weight_map[n] = filename
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def make_tiny(out: str | Path, cfg: ModelConfig | None = None, seed: int = 0) -> Path:
    cfg = cfg or tiny_config()
    write_checkpoint(out, cfg, random_weights(cfg, seed))
    write_tiny_tokenizer(out, cfg.vocab_size)
    return Path(out)
