"""Our checkpoints in transformers' `MiniMaxForCausalLM`: tensor names, config, the partial-RoPE fix, loading.

Used by the tests' oracle (tests/hf_oracle.py) and by the `hf` phase of bench/gpu_cluster.py (transformers'
`generate` as the speed baseline). Needs transformers >= 5 (MiniMaxConfig with `layer_types` and
`rope_parameters`); run with 5.17 and 5.24. transformers itself is imported only inside the functions.

transformers' MiniMax differs from MiniMax's model in two ways (reference model.md section 10): it rotates the whole
head_dim instead of the first rotary_dim dims (`fix_partial_rope` patches that), and its cache reports length 0, so
a forward in cached decoding needs explicit `position_ids` (`generate` passes them: it derives them from the
attention mask).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig


def to_transformers_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names -> transformers names (model.md section 2): `.block_sparse_moe.` -> `.mlp.`, experts fused
    to gate_up_proj [E, 2F, H] = cat(stack(w1), stack(w3), dim=1) and down_proj [E, H, F]."""
    out = {}
    for n, t in tensors.items():
        if ".experts." not in n:
            out[n.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        w1 = torch.stack([tensors[f"{p}{e}.w1.weight"] for e in range(cfg.num_local_experts)])
        w3 = torch.stack([tensors[f"{p}{e}.w3.weight"] for e in range(cfg.num_local_experts)])
        w2 = torch.stack([tensors[f"{p}{e}.w2.weight"] for e in range(cfg.num_local_experts)])
        q = f"model.layers.{layer}.mlp.experts."
        out[q + "gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[q + "down_proj"] = w2
    return out


def to_hf_config(c: dict):
    """An original-flavour config.json dict (as `ModelConfig.to_dict` writes it) -> transformers' MiniMaxConfig.
    Every field is given explicitly: transformers reading the original file itself gets the layer types and the
    alpha factors wrong (model.md 0.3c)."""
    from transformers import MiniMaxConfig

    return MiniMaxConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        max_position_embeddings=c["max_position_embeddings"], num_local_experts=c["num_local_experts"],
        num_experts_per_tok=c["num_experts_per_tok"], block_size=256, tie_word_embeddings=False,
        layer_types=["linear_attention" if t == 0 else "full_attention" for t in c["attn_type_list"]],
        full_attn_alpha_factor=c["layernorm_full_attention_alpha"],
        full_attn_beta_factor=c["layernorm_full_attention_beta"],
        linear_attn_alpha_factor=c["layernorm_linear_attention_alpha"],
        linear_attn_beta_factor=c["layernorm_linear_attention_beta"],
        mlp_alpha_factor=c["layernorm_mlp_alpha"], mlp_beta_factor=c["layernorm_mlp_beta"],
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_theta"]),
                         "partial_rotary_factor": c["rotary_dim"] / c["head_dim"]})


def fix_partial_rope() -> None:
    """Makes transformers' MiniMax rotate only the first rotary_dim = head_dim * partial_rotary_factor dims, as
    MiniMax does. Patches its module (process-wide); call before building a model."""
    import transformers.models.minimax.modeling_minimax as TM

    def inv_freq(config, *args, **kwargs):  # 5.17 passes a (deprecated) device positionally, 5.24 does not
        rp = config.rope_parameters
        dim = int(config.head_dim * rp.get("partial_rotary_factor", 1.0))
        return 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    def apply_partial(q, k, cos, sin, unsqueeze_dim=1):
        rd = cos.shape[-1]
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def f(x):
            return torch.cat((x[..., :rd] * cos + TM.rotate_half(x[..., :rd]) * sin, x[..., rd:]), -1)

        return f(q), f(k)

    TM.MiniMaxRotaryEmbedding.compute_default_rope_parameters = staticmethod(inv_freq)
    TM.apply_rotary_pos_emb = apply_partial


def load_transformers_model(ckpt_dir: str | Path, work_dir: str | Path, dtype=torch.float32, device_map=None):
    """Our checkpoint folder (either naming, either config flavour) as transformers' MiniMaxForCausalLM, eval mode.

    work_dir gets the transformers config.json and symlinks to the checkpoint's files: transformers loads the
    original names itself (its "minimax" weight conversion fuses the experts), streaming tensor by tensor to the
    devices of `device_map` (accelerate's dispatch when several)."""
    from transformers import MiniMaxForCausalLM

    ckpt_dir, work_dir = Path(ckpt_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    to_hf_config(ModelConfig.from_file(ckpt_dir).to_dict()).save_pretrained(work_dir)
    for f in ckpt_dir.glob("model*.safetensors*"):
        target = work_dir / f.name
        target.unlink(missing_ok=True)
        target.symlink_to(f.resolve())
    return MiniMaxForCausalLM.from_pretrained(work_dir, dtype=dtype, device_map=device_map).eval()
