"""Per-request sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, seed, logprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """A client mistake: the message names the field. The APIs turn it into a 4xx."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob plus k alternatives
    # grammar-constrained decoding (cluster/engine/guided.py GuidedSpec: json_schema / json_object / regex / forced
    # tool call); None: unconstrained. min_tokens does not apply to guided requests (the grammar decides the end).
    guided: "GuidedSpec | None" = None  # noqa: F821

    def validate(self, max_logprobs: int = 20) -> "SamplingParams":
        def check(ok, name, message):
            if not ok:
                raise InvalidRequest(f"{name}: {message}", name)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x

        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature", "must be in [0, 100]")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k", "must be -1 or >= 1")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed", "must be an integer >= 0")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
              "stop", "must be a list of at most 16 non-empty strings")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be a list of token ids")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "must be an integer between 0 and max_tokens")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= max_logprobs), "logprobs",
              f"must be an integer between 0 and {max_logprobs}")
        if self.guided is not None:
            from .guided import GuidedSpec

            check(isinstance(self.guided, GuidedSpec), "guided", "must be a GuidedSpec")
            self.guided.validate()
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_ARGMAX = SamplingParams(temperature=0.0)  # stands in for seeded rows in the batched draw


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # alternatives, best first


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def device_tensor(values: list, device: torch.device, dtype=None) -> torch.Tensor:
    """A small host list on `device` without waiting for the GPU (a pageable copy would)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """One token per row [B] (int64), left on the logits' device with no host sync: greedy rows take the argmax, the
    others draw from softmax(logits / temperature) within their top-k / top-p, all rows at once, from the device's
    default generator (rows with a seed have their own generator: `sample` draws those one by one)."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev = logits.device
    picked = [params[i] for i in rows]
    index = device_tensor(rows, dev)
    sub = logits[index] / device_tensor([p.temperature for p in picked], dev, torch.float32)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in picked):
        V = sub.shape[-1]
        ranked, order = sub.sort(-1, descending=True)
        rank = torch.arange(V, device=dev)
        k = device_tensor([p.top_k if p.top_k > 0 else V for p in picked], dev)
        ranked = ranked.masked_fill(rank >= k[:, None], float("-inf"))
        probs = ranked.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the best one always stays)
        top_p = device_tensor([p.top_p for p in picked], dev, torch.float32)
        ranked = ranked.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter(1, order, ranked)
    tokens[index] = torch.multinomial(sub.softmax(-1), 1).squeeze(-1)
    return tokens


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           banned: list[list[int]]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits [B, V] fp32 -> one token per row. banned[i]: token ids row i may not pick yet (min_tokens)."""
    logits = logits.float()
    for i, ids in enumerate(banned):
        if ids:
            logits[i, ids] = float("-inf")
    tokens = sample_on_device(logits, [p if g is None else _ARGMAX for p, g in zip(params, generators)])
    for i, (p, gen) in enumerate(zip(params, generators)):  # seeded rows: each from its own generator
        if p.greedy or gen is None:
            continue
        probs = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
        tokens[i] = torch.multinomial(probs.to(gen.device), 1, generator=gen).item()
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        lp = torch.log_softmax(logits[wanted], -1)
        for row, i in enumerate(wanted):
            k = params[i].logprobs
            top = lp[row].topk(k) if k else None
            alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs[i] = TokenLogprobs(token_list[i], lp[row, token_list[i]].item(), alternatives)
    return token_list, logprobs
