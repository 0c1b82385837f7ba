"""transformers' MiniMaxForCausalLM with the two fixes model.md section 10 describes: an independent oracle.

(a) RoPE on the first rotary_dim dims only, (b) position_ids always passed (its cache reports length 0).
Names, config and loading live in model_shards/transformers_compat.py (shared with bench/gpu_cluster.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model_shards.transformers_compat import fix_partial_rope, load_transformers_model


def load_hf_model(ckpt_dir: str | Path, work_dir: str | Path):
    """Loads our checkpoint folder (either naming, sharded) into patched transformers, in fp32."""
    fix_partial_rope()
    return load_transformers_model(ckpt_dir, work_dir, dtype=torch.float32)


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [T, V] for one prompt."""
    x = torch.tensor([ids])
    return model(input_ids=x, position_ids=torch.arange(len(ids))[None]).logits[0].float()
