"""Softmax GQA attention over a paged KV cache, with torch SDPA (the GPU stack's own fused attention).

Cache layout per softmax layer: k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim]; a sequence's
tokens live in the blocks of its block table, token p at block_table[p // block_size], row p % block_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

try:
    from .paged_decode import paged_decode_attention
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Store new keys/values [T, KVH, D] at flat cache rows slot_mapping [T] (= block * block_size + offset)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(q, k_cache, v_cache, seq_lens: list[int], context_lens: list[int], block_tables, scale: float,
                    decode_context_lens=None):
    """q [T, H, D] packed (seq_lens new tokens per sequence, the last ones of context_lens tokens each, already in
    the cache). Causal: new token i of a sequence sees cache rows 0 .. context_len - seq_len + i.
    decode_context_lens: a decode-only step's context lengths as a device tensor [B] int32: on GPU one kernel launch
    that reads nothing from the host lists (CUDA-graph safe)."""
    if decode_context_lens is not None and q.is_cuda and HAVE_TRITON:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, decode_context_lens, scale)
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    decodes = [b for b, n in enumerate(seq_lens) if n == 1]
    if q.is_cuda and HAVE_TRITON and len(decodes) > 1:  # all one-token sequences in one launch
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        sel = torch.tensor(decodes, device=q.device)
        ctx = torch.tensor([context_lens[b] for b in decodes], device=q.device, dtype=torch.int32)
        out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, block_tables[sel], ctx, scale)
        done = set(decodes)
    else:
        done = set()
    for b, (n, ctx) in enumerate(zip(seq_lens, context_lens)):
        if b in done:
            continue
        start = starts[b]
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).to(q.dtype)  # [KVH, ctx, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).to(q.dtype)
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        o = _gpu_attention(qs, k, v, scale) if q.is_cuda else _cpu_attention(qs, k, v, scale)
        out[start:start + n] = o.transpose(0, 1)
    return out


def _cpu_attention(q, k, v, scale):
    n, ctx = q.shape[1], k.shape[1]
    mask = None
    if n > 1:
        mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


# cuDNN attention is left out: with a context length that changes every call (decoding) it builds a new plan each
# time, ~57 ms per call on an H200, against ~0.06 ms for flash (bench/results/sdpa-probe-h200-2026-11-27.json).
_GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _gpu_attention(q, k, v, scale):
    n, ctx = q.shape[1], k.shape[1]
    with sdpa_kernel(_GPU_BACKENDS):
        if n == 1 or n == ctx:  # decode, or a prompt from the start: plain (top-left) causal is right
            return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=n > 1, scale=scale,
                                                  enable_gqa=True)[0]
        # a chunk continuing a prompt: causal aligned to the bottom right, which the fused kernels take as a bias
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal_lower_right(n, ctx),
                                              scale=scale)[0]
