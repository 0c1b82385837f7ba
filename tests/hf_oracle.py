"""transformers' MiniMaxForCausalLM with the two fixes model.md section 10 describes: an independent oracle.

(a) RoPE on the first rotary_dim dims only, (b) position_ids always passed (its cache reports length 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def to_hf_config(c: dict):
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


def _patch_partial_rope():
    import transformers.models.minimax.modeling_minimax as TM

    def inv_freq(config, **kw):
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


def load_hf_model(ckpt_dir: str | Path, work_dir: str | Path):
    """Loads our checkpoint folder (original names, sharded) into patched transformers, in fp32."""
    from transformers import MiniMaxForCausalLM

    _patch_partial_rope()
    ckpt_dir, work_dir = Path(ckpt_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    to_hf_config(json.loads((ckpt_dir / "config.json").read_text())).save_pretrained(work_dir)
    for f in ckpt_dir.glob("model*.safetensors*"):
        target = work_dir / f.name
        if not target.exists():
            target.symlink_to(f.resolve())
    return MiniMaxForCausalLM.from_pretrained(work_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [T, V] for one prompt."""
    x = torch.tensor([ids])
    return model(input_ids=x, position_ids=torch.arange(len(ids))[None]).logits[0].float()
