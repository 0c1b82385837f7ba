"""The row copies of the router <-> shard direct writes: Triton on GPU, the reference elsewhere."""

from __future__ import annotations

from . import reference

try:
    from .triton_copy import send_answer_triton, send_rows_triton, sum_answers_triton
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton
    HAVE_TRITON = False


def send_rows(rows, dsts, ids, first: int, per: int, meta: int) -> None:
    (send_rows_triton if HAVE_TRITON and rows.is_cuda else reference.send_rows)(rows, dsts, ids, first, per, meta)


def send_answer(y, dst, ids, lo: int, hi: int) -> None:
    (send_answer_triton if HAVE_TRITON and y.is_cuda else reference.send_answer)(y, dst, ids, lo, hi)


def sum_answers(share, answers, ids, first: int, per: int, num_shards: int, out=None):
    fn = sum_answers_triton if HAVE_TRITON and answers.is_cuda else reference.sum_answers
    return fn(share, answers, ids, first, per, num_shards, out)


__all__ = ["send_answer", "send_rows", "sum_answers"]
