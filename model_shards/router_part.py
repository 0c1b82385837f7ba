"""The non-expert part of MiniMax-M1: embedding, attention layers, MoE gates, final norm, fp32 LM head.

This is what the router deployment runs. The experts are behind `moe(layer, hidden, expert_ids, weights)`: local
experts in one process, the all-to-all dispatch to expert shards in the cluster.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import paged_attention, write_kv
from kernels.lightning import lightning_attention

from .batch import ForwardBatch, ModelCache
from .config import LINEAR, ModelConfig, lightning_slopes

MoEFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x, weight, eps):
    # one fused kernel on GPU (fp32 inside); the unfused fp32 pow/mean/rsqrt/mul chain was ~6% of a prefill step
    return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)


def scaled_residual(h, alpha: float, y, beta: float):
    """alpha * h + beta * y; one kernel when beta is 1 (every beta in MiniMax-M1's config), not three."""
    return torch.add(y, h, alpha=alpha) if beta == 1 else alpha * h + beta * y


def split_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 x as three bf16 tensors [3, *x.shape] whose sum is x exactly: 8 significant bits each, fp32 has 24."""
    hi = x.to(torch.bfloat16)
    rest = x - hi.float()
    mid = rest.to(torch.bfloat16)
    return torch.stack((hi, mid, (rest - mid.float()).to(torch.bfloat16)))


def fp32_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, H] fp32 @ w [V, H].T in fp32. bf16 weights (a bf16 checkpoint's LM head, so exact) multiply x's three
    bf16 pieces in one tensor-core GEMM with fp32 output: every bf16 product is exact in the fp32 accumulator, so
    this is an fp32 GEMM's result up to summation order. It reads half the bytes of fp32 weights, and an fp32 GEMM at
    decode batch sizes runs on the CUDA cores, compute-bound (0.56 ms vs a 0.19 ms HBM floor at batch 64, 32K vocab,
    on H200)."""
    if w.dtype == torch.float32:
        return x @ w.T
    pieces = split_bf16(x).flatten(0, 1)
    if pieces.is_cuda:
        out = torch.mm(pieces, w.T, out_dtype=torch.float32)
    else:  # no bf16 GEMM with fp32 output on CPU: the same products and sums in fp32
        out = pieces.float() @ w.float().T
    return out.view(3, x.shape[0], w.shape[0]).sum(0)  # (a step can sample no row: x has 0 rows)


def apply_partial_rope(x, cos, sin):
    """neox-style rotation of the first rotary_dim dims of each head; x [T, heads, D], cos/sin [T, rotary_dim]."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd].float(), x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = rot * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]
    return torch.cat((rotated.to(x.dtype), rest), -1)


class LightningAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = w["qkv_proj.weight"]
        self.gate = w["output_gate.weight"]
        self.norm = w["norm.weight"]
        self.out = w["out_proj.weight"]
        self.register_buffer("slopes", torch.tensor(lightning_slopes(cfg.num_attention_heads, layer,
                                                                     cfg.num_hidden_layers), dtype=torch.float32))

    def forward(self, x, batch: ForwardBatch, cache: ModelCache):
        T, H, D = x.shape[0], self.cfg.num_attention_heads, self.cfg.head_dim
        # silu on the whole projection, then a head-interleaved split: each head's row is [q | k | v]
        qkv = F.silu(x @ self.qkv.T).view(T, H, 3 * D)
        q, k, v = qkv.split(D, dim=-1)
        o = lightning_attention(q, k, v, self.slopes, cache.state_pool(self.layer), batch.seq_lens, batch.slot_ids,
                                self.cfg.block_size)
        y = rms_norm(o.reshape(T, H * D), self.norm, self.cfg.lightning_norm_eps)
        y = torch.sigmoid(x @ self.gate.T) * y
        return y @ self.out.T


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q, self.k, self.v, self.o = (w[n + "_proj.weight"] for n in "qkvo")
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float32) / cfg.rotary_dim)
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x, batch: ForwardBatch, cache: ModelCache):
        cfg, T = self.cfg, x.shape[0]
        q = (x @ self.q.T).view(T, cfg.num_attention_heads, cfg.head_dim)
        k = (x @ self.k.T).view(T, cfg.num_key_value_heads, cfg.head_dim)
        v = (x @ self.v.T).view(T, cfg.num_key_value_heads, cfg.head_dim)
        freqs = batch.positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        k_cache, v_cache = cache.kv(self.layer)
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, batch.seq_lens, batch.context_lens, batch.block_tables,
                            scale=cfg.head_dim ** -0.5, decode_context_lens=batch.decode_context_lens)
        return o.reshape(T, -1) @ self.o.T


class RouterPart(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg

        def w(name, keep_fp32=False):
            t = weights[name]
            return t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")
        # fp32 LM head (tech report 3.2); bf16 weights stay bf16 on GPU, where fp32_logits uses the tensor cores
        lm_head = weights["lm_head.weight"]
        on_gpu = torch.device(device).type == "cuda"
        self.lm_head = (lm_head.to(device) if on_gpu and lm_head.dtype == torch.bfloat16
                        else w("lm_head.weight", keep_fp32=True))
        self.input_norms, self.post_norms, self.gates = [], [], []
        attn = []
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            self.input_norms.append(w(p + "input_layernorm.weight"))
            self.post_norms.append(w(p + "post_attention_layernorm.weight"))
            self.gates.append(w(p + "block_sparse_moe.gate.weight", keep_fp32=True))  # fp32 routing
            sa = {k[len(p + "self_attn."):]: w(k) for k in weights if k.startswith(p + "self_attn.")}
            cls = LightningAttention if cfg.layer_types[layer] == LINEAR else SoftmaxAttention
            attn.append(cls(cfg, layer, sa))
        self.attn = nn.ModuleList(attn).to(device)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token: softmax over all experts in fp32, top-k, renormalised (int64 ids, fp32 weights)."""
        probs = torch.softmax(h.float() @ self.gates[layer].T, dim=-1)
        weights, ids = probs.topk(self.cfg.num_experts_per_tok, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)

    def forward(self, batch: ForwardBatch, cache: ModelCache, moe: MoEFn, all_logits: bool = False,
                timer: Callable[[str], ContextManager] = lambda name: nullcontext()):
        """Runs every layer; returns fp32 logits of each sequence's last token [B, V] (or of every token).
        `timer(name)` wraps each part ("attention", "gate", "moe", "lm_head") for step profiling."""
        cfg = self.cfg
        x = self.embed[batch.input_ids]
        for layer in range(cfg.num_hidden_layers):
            alpha, beta = cfg.attn_alpha_beta(layer)
            with timer("attention"):
                h = rms_norm(x, self.input_norms[layer], cfg.rms_norm_eps)
                # postnorm: the residual is the normed input
                x = scaled_residual(h, alpha, self.attn[layer](h, batch, cache), beta)
            with timer("gate"):
                h = rms_norm(x, self.post_norms[layer], cfg.rms_norm_eps)
                ids, weights = self.route(layer, h)
            with timer("moe"):
                x = scaled_residual(h, cfg.mlp_alpha, moe(layer, h, ids, weights), cfg.mlp_beta)
        with timer("lm_head"):
            if not all_logits:
                x = x[batch.last_token_rows]
            x = rms_norm(x, self.final_norm, cfg.rms_norm_eps)
            return fp32_logits(x.float(), self.lm_head)
