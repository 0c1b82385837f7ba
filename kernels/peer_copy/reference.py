"""Plain PyTorch: the row copies of the router <-> shard direct writes (cluster/peer_links.py), the reference for
the Triton kernels beside it. A token is routed to a shard when one of its expert ids lies in the shard's [lo, hi)."""

from __future__ import annotations

import torch


def routed(ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[T] bool: the tokens with an expert in [lo, hi) (padding rows' id -1 is no shard's)."""
    return ((ids >= lo) & (ids < hi)).any(-1)


def send_rows(rows: torch.Tensor, dsts: list[torch.Tensor], ids: torch.Tensor, first: int, per: int,
              meta: int) -> None:
    """dsts[d][:T] gets every row's first `meta` columns (its routing) and the rest (its hidden state) only for the
    rows routed to shard d, which holds experts [first + d * per, first + (d + 1) * per): a shard needs every token's
    routing, to know which are its own, and only its own tokens' hidden states."""
    T = rows.shape[0]
    for d, dst in enumerate(dsts):
        dst[:T, :meta] = rows[:, :meta]
        mask = routed(ids, first + d * per, first + (d + 1) * per)
        dst[:T, meta:][mask] = rows[:, meta:][mask]


def send_answer(y: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> None:
    """dst[t] = y[t] for the tokens routed to [lo, hi); the other rows of dst are left as they are."""
    mask = routed(ids, lo, hi)
    dst[:y.shape[0]][mask] = y[mask]


def sum_answers(share: torch.Tensor | None, answers: torch.Tensor, ids: torch.Tensor, first: int, per: int,
                num_shards: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = share[t] (zeros if None) + the sum over shards s of answers[s, t] where t is routed to shard s, which
    holds experts [first + s * per, first + (s + 1) * per); rows of answers that no shard wrote this step may hold
    anything. Summed in fp32. answers [N, >=T, H]."""
    T = ids.shape[0]
    acc = answers.new_zeros(T, answers.shape[2], dtype=torch.float32) if share is None else share.float()
    for s in range(num_shards):
        lo, hi = first + s * per, first + (s + 1) * per
        acc = acc + torch.where(routed(ids, lo, hi)[:, None], answers[s, :T].float(), 0.0)
    if out is None:
        return acc.to(answers.dtype)
    return out.copy_(acc)
