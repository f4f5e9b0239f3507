"""Next tokens from a batch of logits: plain torch, fp32, one code path for the whole batch.

Order (transformers' for penalties and warpers): drop ids beyond the tokenizer -> raw logprobs
-> suppress ids (min_tokens) -> repetition/presence/frequency penalties -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> sample. Mask functions work in place on fp32 [B, V]
logits and return them, so they chain and test alone."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from inference_pio.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token id: logprob} for the sampled token plus the top-k raw tokens, or None
    # when that row did not ask for logprobs.
    logprobs: list[dict[int, float] | None]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A per-request RNG; keep it for the request's whole life so its draws continue."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _token_counts(logits: torch.Tensor, ids_per_row: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, V] fp32: how often each id occurs in each row's list, built with one scatter."""
    counts = torch.zeros_like(logits)
    lengths = torch.tensor([len(ids) for ids in ids_per_row])
    if int(lengths.sum()) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths).to(logits.device)
    ids = torch.tensor(list(chain.from_iterable(ids_per_row)), dtype=torch.long)
    ones = torch.ones(rows.shape, dtype=counts.dtype, device=logits.device)
    return counts.index_put_((rows, ids.to(logits.device)), ones, accumulate=True)


def _per_row(logits: torch.Tensor, values: Sequence[float],
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(logits.device)  # [B] per-request settings


def suppress_tokens(logits: torch.Tensor,
                    suppress_ids: Sequence[Collection[int] | None]) -> torch.Tensor:
    """Set each row's listed ids to -inf (e.g. eos while a request is under min_tokens)."""
    id_lists = [sorted(ids or ()) for ids in suppress_ids]
    return logits.masked_fill_(_token_counts(logits, id_lists) > 0, _NEG_INF)


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]],
                    params: Sequence[SamplingParams]) -> torch.Tensor:
    """Repetition penalty over prompt + output ids (transformers: a positive logit is divided
    by it, a negative one multiplied); presence/frequency over output ids only (OpenAI/vLLM:
    logit -= presence * [count > 0] + frequency * count). In place."""
    if any(p.repetition_penalty != 1.0 for p in params):
        id_lists = [[*p, *o] for p, o in zip(prompt_ids, output_ids, strict=True)]
        seen = _token_counts(logits, id_lists) > 0
        penalty = _per_row(logits, [p.repetition_penalty for p in params]).unsqueeze(1)
        scale = torch.where(logits > 0, 1.0 / penalty, penalty)
        logits.mul_(torch.where(seen, scale, 1.0))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        counts = _token_counts(logits, output_ids)
        presence = _per_row(logits, [p.presence_penalty for p in params]).unsqueeze(1)
        frequency = _per_row(logits, [p.frequency_penalty for p in params]).unsqueeze(1)
        logits.sub_(frequency * counts + presence * (counts > 0))
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's `top_k` highest logits (ties at the k-th value kept); top_k [B] int,
    <= 0 or >= V means off. In place."""
    enabled = (top_k > 0) & (top_k < logits.shape[-1])  # [B]
    k = torch.where(enabled, top_k, 1).to(torch.long)
    values = logits.topk(int(k.max()), dim=-1).values  # [B, k_max], descending
    kth = values.gather(1, (k - 1).unsqueeze(1)).masked_fill_(~enabled.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= top_p,
    and always the top token; top_p [B] in (0, 1], 1 = off. In place."""
    # Only finite logits can survive (few after top-k): sorting just those spares a full sort.
    num_candidates = int(torch.isfinite(logits).sum(dim=-1).max().clamp_min(1))
    values, ids = logits.topk(num_candidates, dim=-1)  # [B, n], descending
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # of the strictly more likely tokens
    limit = torch.where(top_p >= 1.0, torch.inf, top_p.to(torch.float32)).unsqueeze(1)
    keep_sorted = mass_before < limit
    keep_sorted[:, 0] = True  # a top_p that rounds to 0 in float32 must not drop the top token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, keep_sorted)
    return logits.masked_fill_(~keep, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability;
    min_p [B] in [0, 1], 0 = off. In place."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.to(torch.float32).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def sample_from_probs(probs: torch.Tensor,
                      generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B] token ids by the exponential race, argmax(p / q) with q ~ Exp(1), which samples p.

    A row with a generator draws its own q from it alone, so a seeded request gets the same
    tokens whatever else is in the batch. Rows without one share the global RNG."""
    q = torch.empty_like(probs)  # [B, V]
    if any(g is None for g in generators):
        q.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    # NOTE: q may be exactly 0; the floor keeps a masked token (p = 0) at 0 instead of NaN.
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: Sequence[int | None]) -> list[dict[int, float] | None]:
    """Per row {sampled id: logprob, then the top-k ids by logprob}, or None where not asked."""
    k_max = max((k for k in num_logprobs if k is not None), default=0)
    top = raw_logprobs.topk(k_max, dim=-1)
    top_values, top_ids = top.values.tolist(), top.indices.tolist()
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    out: list[dict[int, float] | None] = []
    for row, (k, token_id) in enumerate(zip(num_logprobs, token_ids.tolist(), strict=True)):
        top_k = zip(top_ids[row][:k or 0], top_values[row][:k or 0], strict=True)
        out.append(None if k is None else {token_id: sampled[row], **dict(top_k)})
    return out


def _choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                   generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[B] ids: argmax of the penalised logits for greedy rows, a sample for the rest."""
    greedy_ids = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        return greedy_ids
    # Greedy rows ride along (at temperature 1, not 0, to avoid a division by zero) and their
    # samples are discarded: one code path for the batch.
    temperature = [1.0 if p.is_greedy else p.temperature for p in params]
    logits.div_(_per_row(logits, temperature).unsqueeze(1))
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        # top_k >= the vocabulary keeps every token (vLLM's rule); clamping first keeps a huge
        # value (2**63) out of the int64 tensor.
        apply_top_k(logits, _per_row(logits, [min(p.top_k, vocab) for p in params], torch.long))
    if any(p.top_p < 1.0 for p in params):
        apply_top_p(logits, _per_row(logits, [p.top_p for p in params]))
    if any(p.min_p > 0.0 for p in params):
        apply_min_p(logits, _per_row(logits, [p.min_p for p in params]))
    sampled_ids = sample_from_probs(logits.softmax(dim=-1), generators)
    is_greedy = _per_row(logits, [p.is_greedy for p in params], torch.bool)
    return torch.where(is_greedy, greedy_ids, sampled_ids)


def _check_rows(logits: torch.Tensor, **per_row: Sequence[object]) -> None:
    # A short list would silently pair one request's settings with another's logits.
    for name, values in per_row.items():
        if len(values) != logits.shape[0]:
            raise ValueError(f"Sampler: {name} has {len(values)} entries for "
                             f"{logits.shape[0]} rows of logits")


class Sampler:
    """Samples one next token per row. Logprobs are vLLM's default "raw logprobs": the model's
    log_softmax before suppression, penalties, temperature and top-k/p/min-p, so they describe
    the model, not the sampling settings.

    `num_valid_tokens` is the tokenizer's vocabulary size: the model's padded ids at and above
    it (151669..151935 for Qwen3) are never sampled nor reported, and carry no probability."""

    def __init__(self, num_valid_tokens: int | None = None) -> None:
        self.num_valid_tokens = num_valid_tokens

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                 generators: Sequence[torch.Generator | None],
                 suppress_ids: Sequence[Collection[int] | None] | None = None) -> SamplerOutput:
        """logits [B, V] of any float dtype; every other argument has one entry per row."""
        _check_rows(logits, params=params, prompt_ids=prompt_ids, output_ids=output_ids,
                    generators=generators, suppress_ids=suppress_ids or [None] * len(params))
        logits = logits.to(torch.float32, copy=True)  # the caller's tensor stays untouched
        if self.num_valid_tokens is not None:
            logits[:, self.num_valid_tokens:] = _NEG_INF
        num_logprobs = [p.logprobs for p in params]
        want_logprobs = any(k is not None for k in num_logprobs)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None  # [B, V]
        if suppress_ids is not None and any(suppress_ids):
            suppress_tokens(logits, suppress_ids)
        apply_penalties(logits, prompt_ids, output_ids, params)
        token_ids = _choose_tokens(logits, params, generators)
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, num_logprobs)
        return SamplerOutput(token_ids.tolist(), logprobs)
