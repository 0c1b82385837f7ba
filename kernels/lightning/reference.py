"""Plain-PyTorch lightning attention: the reference the Triton kernels are tested against.

Per head h with decay rate s (MiniMax semantics, HF-orig):
    S_t = exp(-s) * S_{t-1} + k_t^T v_t        S: [d_k, d_v], fp32 always
    o_t = q_t S_t                              (the current token is included with weight 1)
q/k/v are already silu-activated; no scaling, no normalisation here.
"""

from __future__ import annotations

import torch


def lightning_recurrence(q, k, v, slopes, state=None):
    """Token-by-token fp64 recurrence: the ground truth. q/k/v [H, T, D], slopes [H]; returns (o, state) fp64."""
    q, k, v = q.double(), k.double(), v.double()
    H, T, D = q.shape
    S = torch.zeros(H, D, v.shape[-1], dtype=torch.float64) if state is None else state.double().clone()
    decay = torch.exp(-slopes.double())[:, None, None]
    out = torch.empty(H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = decay * S + k[:, t, :, None] * v[:, t, None, :]
        out[:, t] = torch.einsum("hd,hde->he", q[:, t], S)
    return out, S


def lightning_prefill(q, k, v, slopes, state, block_size: int = 256):
    """Blockwise prefill of one sequence continuing from `state` (exactly HF-orig's algorithm, with a start state).

    q/k/v [H, T, D] (any float dtype), slopes [H] fp32, state [H, D, D] fp32 (updated in place).
    Returns o [H, T, D] in q's dtype. All decays are exp(-s * n) with n >= 0: nothing can overflow.
    """
    H, T, _ = q.shape
    s = slopes.float().to(q.device)[:, None, None]  # [H, 1, 1]
    idx = torch.arange(block_size, device=q.device, dtype=torch.float32)
    q_decay = torch.exp(-s * (idx[None, :, None] + 1))  # query t sees the carried state decayed t+1 times
    k_decay = torch.exp(-s * (block_size - 1 - idx)[None, :, None])  # key j reaches the block's end
    diff = idx[:, None] - idx[None, :]
    intra_decay = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), device=q.device))
    out = torch.empty_like(q)
    qf, kf, vf = q.float(), k.float(), v.float()
    for start in range(0, T, block_size):
        m = min(block_size, T - start)
        qb, kb, vb = qf[:, start:start + m], kf[:, start:start + m], vf[:, start:start + m]
        inter = (qb * q_decay[:, :m]) @ state
        intra = ((qb @ kb.transpose(1, 2)) * intra_decay[:, :m, :m]) @ vb
        out[:, start:start + m] = (inter + intra).to(q.dtype)
        # A short last block uses the last m key decays, so its last key also gets weight 1.
        kd = k_decay[:, block_size - m:]
        state.mul_(torch.exp(-s * m)).add_((kb * kd).transpose(1, 2) @ vb)
    return out


def lightning_decode(q, k, v, slopes, states):
    """One token for each of B sequences. q/k/v [B, H, D], states [B, H, D, D] fp32 (updated in place)."""
    decay = torch.exp(-slopes.float().to(q.device))[None, :, None, None]
    states.mul_(decay).add_(k.float()[..., :, None] * v.float()[..., None, :])
    return torch.einsum("bhd,bhde->bhe", q.float(), states).to(q.dtype)


def lightning_attention(q, k, v, slopes, state_pool, seq_lens: list[int], slot_ids, block_size: int = 256):
    """Packed variable-length batch: the op the model calls (the Triton kernels implement the same contract).

    q/k/v [T, H, D] with sequences packed back to back (lengths seq_lens), state_pool [slots, H, D, D] fp32,
    slot_ids [B] (one state slot per sequence; a fresh sequence's slot must be zero). Updates the pool in place.
    """
    out = torch.empty_like(q)
    slots = slot_ids.tolist() if torch.is_tensor(slot_ids) else list(slot_ids)
    if all(n == 1 for n in seq_lens):  # pure decode step: one batched update
        idx = torch.as_tensor(slots, device=state_pool.device)
        states = state_pool[idx]
        out = lightning_decode(q, k, v, slopes, states)
        state_pool[idx] = states
        return out
    start = 0
    for n, slot in zip(seq_lens, slots):
        sl = slice(start, start + n)
        state = state_pool[slot]
        if n == 1:
            out[sl] = lightning_decode(q[sl], k[sl], v[sl], slopes, state[None])[0:1]
        else:
            o = lightning_prefill(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1), slopes,
                                  state, block_size)
            out[sl] = o.transpose(0, 1)
        start += n
    return out
