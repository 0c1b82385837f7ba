"""The plain-PyTorch lightning attention and SwiGLU references against exact (fp64 / naive) ground truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from kernels.experts.reference import grouped_swiglu
from kernels.lightning.reference import (lightning_attention, lightning_decode, lightning_prefill,
                                         lightning_recurrence)
from model_shards.config import lightning_slopes

H, D = 8, 32
pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-5


def qkv(T, seed, heads=H, d=D, layout="htd"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (F.silu(torch.randn(heads, T, d, generator=g)) for _ in range(3))
    if layout == "thd":
        return q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    return q, k, v


def slopes(heads=H, layer=0, layers=8):
    return torch.tensor(lightning_slopes(heads, layer, layers), dtype=torch.float32)


def init_state(seed, heads=H, d=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(heads, d, d, generator=g)


def naive_lightning(q, k, v, s, state=None):
    """Closed form o_t = sum_{p<=t} exp(-s (t-p)) (q_t . k_p) v_p + exp(-s (t+1)) q_t S_0, in fp64 (independent
    of lightning_recurrence)."""
    q, k, v, s = q.double(), k.double(), v.double(), s.double()
    T = q.shape[1]
    t = torch.arange(T, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    decay = torch.where(diff >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)), torch.zeros(()))
    out = ((q @ k.transpose(1, 2)) * decay) @ v
    if state is not None:
        out = out + torch.exp(-s[:, None, None] * (t[None, :, None] + 1)) * (q @ state.double())
    return out


# ---- the ground truth itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrence_matches_closed_form(with_state):
    q, k, v = qkv(300, 0)
    s = slopes()
    S0 = init_state(1) if with_state else None
    o, S = lightning_recurrence(q, k, v, s, S0)
    assert rel_err(o, naive_lightning(q, k, v, s, S0)) < 1e-12
    # final state by its closed form: sum_p exp(-s (T-1-p)) k_p^T v_p + exp(-s T) S0
    T = q.shape[1]
    w = torch.exp(-s.double()[:, None] * (T - 1 - torch.arange(T, dtype=torch.float64)))
    S_ref = torch.einsum("ht,htd,hte->hde", w, k.double(), v.double())
    if S0 is not None:
        S_ref = S_ref + torch.exp(-s.double() * T)[:, None, None] * S0.double()
    assert rel_err(S, S_ref) < 1e-12


# ---- prefill ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 255, 256, 257, 600])
@pytest.mark.parametrize("with_state", [False, True])
def test_prefill_matches_recurrence(T, with_state):
    q, k, v = qkv(T, T)
    s = slopes()
    S0 = init_state(T + 1) if with_state else torch.zeros(H, D, D)
    state = S0.clone()
    o = lightning_prefill(q, k, v, s, state)
    o_ref, S_ref = lightning_recurrence(q, k, v, s, S0)
    assert o.dtype == torch.float32 and o.shape == (H, T, D)
    assert state.dtype == torch.float32
    assert rel_err(o, o_ref) < TOL
    assert rel_err(state, S_ref) < TOL
    # per-position check too, so late tokens (after a block edge) cannot hide behind a big early maximum
    err_t = (o.double() - o_ref).abs().amax(dim=(0, 2)) / o_ref.abs().amax(dim=(0, 2))
    assert err_t.max() < 1e-4


@pytest.mark.parametrize("layer", [0, 6, 7])
def test_prefill_other_layers_and_m1_heads(layer):
    """64 heads with M1's slope schedule (layer 0 head 0: s = 0.917; layer 79: s ~ 1e-5) over 2+ blocks."""
    q, k, v = qkv(300, layer, heads=64, d=16)
    s = torch.tensor(lightning_slopes(64, [0, 40, 79][[0, 6, 7].index(layer)], 80), dtype=torch.float32)
    S0 = init_state(3, heads=64, d=16)
    state = S0.clone()
    o = lightning_prefill(q, k, v, s, state)
    o_ref, S_ref = lightning_recurrence(q, k, v, s, S0)
    assert rel_err(o, o_ref) < TOL and rel_err(state, S_ref) < TOL


@pytest.mark.parametrize("block", [16, 64, 100])
def test_prefill_block_size_is_not_semantic(block):
    q, k, v = qkv(257, 9)
    s = slopes()
    S0 = init_state(4)
    st = S0.clone()
    o = lightning_prefill(q, k, v, s, st, block_size=block)
    o_ref, S_ref = lightning_recurrence(q, k, v, s, S0)
    assert rel_err(o, o_ref) < TOL and rel_err(st, S_ref) < TOL


@pytest.mark.parametrize("chunks", [[100, 300, 200], [256, 256, 88], [1, 255, 1, 257, 86], [600]])
def test_chunked_prefill_equals_one_prefill(chunks):
    T = sum(chunks)
    q, k, v = qkv(T, 11)
    s = slopes()
    S0 = init_state(12)
    one_state = S0.clone()
    one = lightning_prefill(q, k, v, s, one_state)
    state = S0.clone()
    outs, start = [], 0
    for n in chunks:
        outs.append(lightning_prefill(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], s, state))
        start += n
    chunked = torch.cat(outs, dim=1)
    o_ref, S_ref = lightning_recurrence(q, k, v, s, S0)
    assert rel_err(chunked, o_ref) < TOL and rel_err(state, S_ref) < TOL
    assert rel_err(chunked, one) < TOL and rel_err(state, one_state) < TOL


def test_prefill_bf16_inputs_keep_fp32_state():
    q, k, v = qkv(300, 21)
    s = slopes()
    state = torch.zeros(H, D, D)
    o = lightning_prefill(q.bfloat16(), k.bfloat16(), v.bfloat16(), s, state)
    o_ref, S_ref = lightning_recurrence(q.bfloat16(), k.bfloat16(), v.bfloat16(), s)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-2  # bf16 output rounding only
    assert rel_err(state, S_ref) < TOL  # the state is exact to fp32


# ---- decode -----------------------------------------------------------------------------------------------------
def test_decode_steps_equal_recurrence():
    B, T = 3, 20
    g = torch.Generator().manual_seed(5)
    q, k, v = (F.silu(torch.randn(B, T, H, D, generator=g)) for _ in range(3))
    s = slopes()
    S0 = torch.randn(B, H, D, D, generator=g)
    states = S0.clone()
    outs = []
    for t in range(T):
        outs.append(lightning_decode(q[:, t], k[:, t], v[:, t], s, states))
    o = torch.stack(outs, dim=1)  # [B, T, H, D]
    for b in range(B):
        o_ref, S_ref = lightning_recurrence(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), s,
                                            S0[b])
        assert rel_err(o[b].transpose(0, 1), o_ref) < TOL
        assert rel_err(states[b], S_ref) < TOL


def test_prefill_then_decode():
    q, k, v = qkv(262, 8)
    s = slopes()
    state = torch.zeros(H, D, D)
    o = [lightning_prefill(q[:, :257], k[:, :257], v[:, :257], s, state)]
    for t in range(257, 262):
        o.append(lightning_decode(q[:, t][None], k[:, t][None], v[:, t][None], s, state[None])[0][:, None])
    o_ref, S_ref = lightning_recurrence(q, k, v, s)
    assert rel_err(torch.cat(o, 1), o_ref) < TOL and rel_err(state, S_ref) < TOL


# ---- packed variable-length batches -----------------------------------------------------------------------------
def _pool(num_slots, seed, nonzero_slots):
    g = torch.Generator().manual_seed(seed)
    pool = torch.zeros(num_slots, H, D, D)
    for sl in nonzero_slots:
        pool[sl] = torch.randn(H, D, D, generator=g)
    return pool


@pytest.mark.parametrize("lens, slots", [
    ([1, 300, 1, 17, 256], [4, 1, 6, 0, 3]),
    ([600, 1], [2, 5]),
    ([257, 255], [7, 0]),
    ([2, 1, 1, 3], [1, 3, 5, 7]),
])
def test_packed_batch_equals_per_sequence(lens, slots):
    T = sum(lens)
    q, k, v = qkv(T, 31, layout="thd")  # [T, H, D]
    s = slopes(layer=3)
    pool = _pool(8, 32, nonzero_slots=slots[::2] + [2])
    untouched = [i for i in range(8) if i not in slots]
    before = pool.clone()
    out = lightning_attention(q, k, v, s, pool, lens, torch.tensor(slots))
    assert out.shape == q.shape
    start = 0
    for n, sl in zip(lens, slots):
        seg = slice(start, start + n)
        # per-sequence call through the same op, on a private copy of its state
        alone_pool = before[sl:sl + 1].clone()
        alone = lightning_attention(q[seg], k[seg], v[seg], s, alone_pool, [n], torch.tensor([0]))
        assert rel_err(out[seg], alone) < TOL
        assert rel_err(pool[sl], alone_pool[0]) < TOL
        # and the fp64 ground truth
        o_ref, S_ref = lightning_recurrence(q[seg].transpose(0, 1), k[seg].transpose(0, 1), v[seg].transpose(0, 1),
                                            s, before[sl])
        assert rel_err(out[seg].transpose(0, 1), o_ref) < TOL
        assert rel_err(pool[sl], S_ref) < TOL
        start += n
    for sl in untouched:
        assert torch.equal(pool[sl], before[sl])


def test_pure_decode_batch_scattered_slots():
    slots = [6, 0, 3]
    q, k, v = qkv(3, 41, layout="thd")  # one token per sequence
    s = slopes(layer=2)
    pool = _pool(8, 42, nonzero_slots=range(8))
    before = pool.clone()
    out = lightning_attention(q, k, v, s, pool, [1, 1, 1], slots)
    for i, sl in enumerate(slots):
        o_ref, S_ref = lightning_recurrence(q[i:i + 1].transpose(0, 1), k[i:i + 1].transpose(0, 1),
                                            v[i:i + 1].transpose(0, 1), s, before[sl])
        assert rel_err(out[i:i + 1].transpose(0, 1), o_ref) < TOL
        assert rel_err(pool[sl], S_ref) < TOL
    for sl in set(range(8)) - set(slots):
        assert torch.equal(pool[sl], before[sl])


# ---- numerics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [256, 600])
def test_large_slope_no_overflow(T):
    """s = 0.92 (M1 layer 0 head 0): exp(s * 255) = 1e102 overflows fp32 if any decay is formed as exp(+s n)."""
    s = torch.tensor([0.92, 0.917, 0.5, 0.1, 0.01, 1e-3, 1e-5, 0.0])
    q, k, v = qkv(T, 51, heads=8)
    S0 = init_state(52, heads=8)
    state = S0.clone()
    o = lightning_prefill(q, k, v, s, state, block_size=256)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    o_ref, S_ref = lightning_recurrence(q, k, v, s, S0)
    assert rel_err(o, o_ref) < TOL and rel_err(state, S_ref) < TOL


def test_decay_actually_forgets():
    """With s = 0.92 the initial state's contribution is ~exp(-0.92 * 100) = 0 after 100 tokens: output equals a
    zero-state run; with s = 0 nothing is forgotten (guards sign errors in the decay)."""
    q, k, v = qkv(120, 61, heads=2)
    S0 = init_state(62, heads=2, scale=100.0)
    for s_val, should_match in ((0.92, True), (0.0, False)):
        s = torch.full((2,), s_val)
        a = lightning_prefill(q, k, v, s, S0.clone())
        b = lightning_prefill(q, k, v, s, torch.zeros(2, D, D))
        late = (a[:, 100:] - b[:, 100:]).abs().max() / b[:, 100:].abs().max()
        assert (late < 1e-6) == should_match


# ---- grouped SwiGLU -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [0, 0, 7], [1], [0, 4, 0, 0, 2]])
@pytest.mark.parametrize("with_weights", [False, True])
def test_grouped_swiglu_equals_naive_loop(sizes, with_weights):
    Hd, Ff = 24, 40
    g = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    E, N = len(sizes), sum(sizes)
    x = torch.randn(N, Hd, generator=g)
    w1 = torch.randn(E, Ff, Hd, generator=g) / Hd ** 0.5
    w3 = torch.randn(E, Ff, Hd, generator=g) / Hd ** 0.5
    w2 = torch.randn(E, Hd, Ff, generator=g) / Ff ** 0.5
    wts = torch.rand(N, generator=g) if with_weights else None
    out = grouped_swiglu(x, sizes, torch.cat([w1, w3], dim=1), w2, wts)
    ref = torch.empty(N, Hd, dtype=torch.float64)
    expert_of = [e for e, n in enumerate(sizes) for _ in range(n)]
    for i, e in enumerate(expert_of):  # one token at a time, textbook SwiGLU in fp64
        xi = x[i].double()
        h = F.silu(w1[e].double() @ xi) * (w3[e].double() @ xi)
        ref[i] = (w2[e].double() @ h) * (wts[i].double() if wts is not None else 1.0)
    assert out.shape == (N, Hd) and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5


def test_grouped_swiglu_gate_is_first_half():
    """w13 = [w1 (gate, silu) ; w3 (up)]: swapping the halves must change the result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    w13 = torch.randn(1, 12, 8, generator=g)
    w2 = torch.randn(1, 8, 6, generator=g)
    out = grouped_swiglu(x, [4], w13, w2)
    ref = (F.silu(x @ w13[0, :6].T) * (x @ w13[0, 6:].T)) @ w2[0].T
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    swapped = grouped_swiglu(x, [4], torch.cat([w13[:, 6:], w13[:, :6]], 1), w2)
    assert not torch.allclose(out, swapped, rtol=1e-2, atol=1e-2)
