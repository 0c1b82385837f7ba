"""The batched sampler: greedy rows take the argmax, the others draw on the logits' device within their temperature,
top-k and top-p, all rows at once (what lets the engine launch decode steps ahead for sampled requests too)."""

from __future__ import annotations

import torch

from cluster.engine.sampling import SamplingParams, sample, sample_on_device

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, -2.0, -3.0])
N = 4000


def frequencies(draws: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(draws, minlength=V).float() / draws.numel()


def test_rows_follow_their_own_temperature_top_k_and_top_p():
    torch.manual_seed(0)
    V = LOGITS.numel()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.7),
              SamplingParams(temperature=1.0, top_k=3, top_p=0.8)]
    logits = LOGITS.repeat(len(params), 1)
    draws = torch.stack([sample_on_device(logits, params) for _ in range(N)])  # [N, rows]
    assert (draws[:, 0] == 0).all()  # greedy
    p = LOGITS.softmax(-1)
    top2 = torch.zeros(V)
    top2[:2] = p[:2] / p[:2].sum()
    assert (frequencies(draws[:, 1], V) - top2).abs().max() < 0.04
    assert (draws[:, 2] == 0).all()  # token 0 alone holds 54% >= top_p 0.5
    assert (frequencies(draws[:, 3], V) - (LOGITS / 0.7).softmax(-1)).abs().max() < 0.04
    # top-3 renormalised: 0.63 / 0.23 / 0.14; tokens 0 and 1 reach 0.8 first, token 2 is dropped
    top = torch.zeros(V)
    top[:2] = p[:2] / p[:2].sum()
    assert (frequencies(draws[:, 4], V) - top).abs().max() < 0.04


def test_sample_keeps_seeded_rows_reproducible_next_to_batched_ones():
    logits = LOGITS.repeat(3, 1)
    seeded = SamplingParams(temperature=1.0, seed=7)
    params = [seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)]

    def run():
        gen = torch.Generator().manual_seed(7)
        return [sample(logits, params, [gen, None, None], [[], [], []])[0] for _ in range(20)]

    a, b = run(), run()
    assert [t[0] for t in a] == [t[0] for t in b]  # the seeded row: the same draws
    assert all(t[2] == 0 for t in a)
    assert len({t[0] for t in a}) > 1  # and it does sample
