"""Softmax GQA attention over a paged KV cache, with torch SDPA (the GPU stack's own fused attention).

Cache layout per softmax layer: k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim]; a sequence's
tokens live in the blocks of its block table, token p at block_table[p // block_size], row p % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Store new keys/values [T, KVH, D] at flat cache rows slot_mapping [T] (= block * block_size + offset)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(q, k_cache, v_cache, seq_lens: list[int], context_lens: list[int], block_tables, scale: float):
    """q [T, H, D] packed (seq_lens new tokens per sequence, the last ones of context_lens tokens each, already in
    the cache). Causal: new token i of a sequence sees cache rows 0 .. context_len - seq_len + i."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for b, (n, ctx) in enumerate(zip(seq_lens, context_lens)):
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [KVH, ctx, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        mask = None
        if n > 1:
            rows = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qs[None], k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=mask,
                                           scale=scale, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out
