"""The one channel through which the runner tells attention layers the batch's layout and where
its KV lives.

The model's signature stays `forward(input_ids, positions)`; everything about sequences, caches
and slots rides in a `ForwardContext` set with `with forward_context(ctx):` (no nesting). The
context turns its per-sequence counts into flat batch metadata once per step (per sliding
window): the slot of every new token (`slot_mapping`) and at most two `AttentionGroup`s, the
decoding sequences (one new token each) and the prefill chunks, each padded into one batch, so
an attention layer makes one cache write and one attention call per group, never a Python loop
over sequences."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from inference_pio.layers.attention import AttentionBackend


class KVCacheStore(Protocol):
    """What attention needs of a KV cache: rows addressed by flat slot ids.

    `slots(i, start, end)` are batch sequence i's slots for positions start..end (int64, on the
    cache's device); `write_slots` stores new K/V [n, Hkv, Hd] there; `gather` reads K and V at
    slot ids of any shape S -> [*S, Hkv, Hd] in the compute dtype."""

    device: torch.device

    def slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor: ...

    def write_slots(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None: ...

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class AttentionGroup:
    """N sequences of one step padded into one attention batch: Q = their most new tokens,
    K = their most visible keys. Rows index the step's flat token batch."""

    token_rows: torch.Tensor  # int64 [n]: the group's tokens, sequence by sequence
    q_index: torch.Tensor  # int64 [N, Q]: flat rows (padding repeats the sequence's first row)
    q_valid: torch.Tensor  # bool [N, Q]
    valid_rows: torch.Tensor  # int64 [n]: q_valid's true entries of the flattened [N * Q]
    #                           (index, not mask: no host sync), in token_rows order
    key_index: torch.Tensor  # int64 [N, K]: cache slots, or flat rows without a cache
    mask: torch.Tensor | None  # bool [N, Q, K] (causal, window, padding); None: all visible
    #                             (decoding sequences with equal key counts, no window)
    key_slots: torch.Tensor  # int64 [sum of key counts]: key_index unpadded, concatenated
    key_offsets: torch.Tensor  # int64 [N + 1]: sequence b's keys are key_slots[o[b]:o[b + 1]]
    q_offsets: torch.Tensor  # int64 [N + 1]: sequence b's tokens are token_rows[o[b]:o[b + 1]]
    q_starts: torch.Tensor  # int64 [N]: position of sequence b's first new token
    k_starts: torch.Tensor  # int64 [N]: position of sequence b's first key (key_slots[o[b]])
    window: int | None  # the sliding window the group was built for
    is_decode: bool  # one new token per sequence
    whole_batch: bool  # token_rows is 0..T-1: the group's output is the layer's output


@dataclass(frozen=True)
class BatchLayout:
    slot_mapping: torch.Tensor | None  # int64 [T]: where each new token's K/V is written
    groups: tuple[AttentionGroup, ...]  # decode group first; at most two


@dataclass(frozen=True)
class ForwardContext:
    """Layout of a flat token batch: sequence i owns `num_new_tokens[i]` consecutive tokens of
    input_ids, which follow `num_cached_tokens[i]` tokens already in `kv_cache`.

    `attention_backend` is the kernel every Attention layer of the pass uses (None = "auto");
    build it once with `layers.attention.get_attention_backend(name, kv_cache)`."""

    num_new_tokens: tuple[int, ...]
    num_cached_tokens: tuple[int, ...]
    kv_cache: KVCacheStore | None = None
    sliding_window: int | None = None
    attention_backend: AttentionBackend | None = None
    device: torch.device | str = "cpu"
    _layouts: dict[int | None, BatchLayout] = field(default_factory=dict, compare=False,
                                                    repr=False)

    def __post_init__(self) -> None:
        if len(self.num_new_tokens) != len(self.num_cached_tokens):
            raise ValueError(
                "num_new_tokens and num_cached_tokens must have one entry per sequence")
        if self.kv_cache is None and any(self.num_cached_tokens):
            raise ValueError("cached tokens need a kv_cache")

    @property
    def num_positions(self) -> int:
        """One past the largest position in the batch."""
        return max((c + n for c, n in zip(self.num_cached_tokens, self.num_new_tokens,
                                          strict=True)), default=0)

    def layout(self, window: int | None) -> BatchLayout:
        """The step's metadata for layers with sliding window `window` (built on first use,
        then shared by every such layer of the pass)."""
        if window not in self._layouts:
            self._layouts[window] = self._build(window)
        return self._layouts[window]

    def _build(self, window: int | None) -> BatchLayout:
        cache = self.kv_cache
        device = cache.device if cache is not None else torch.device(self.device)
        slot_mapping = None
        if self._layouts:  # the same for every window
            slot_mapping = next(iter(self._layouts.values())).slot_mapping
        elif cache is not None:
            slot_mapping = _cat([cache.slots(i, c, c + n) for i, (c, n) in
                                 enumerate(zip(self.num_cached_tokens, self.num_new_tokens))],
                                device)
        firsts = [0]
        for n in self.num_new_tokens:
            firsts.append(firsts[-1] + n)
        decode = [i for i, n in enumerate(self.num_new_tokens) if n == 1]
        prefill = [i for i, n in enumerate(self.num_new_tokens) if n != 1]
        groups = tuple(self._group(ids, firsts, window, device, ids is decode)
                       for ids in (decode, prefill) if ids)
        return BatchLayout(slot_mapping, groups)

    def _group(self, ids: list[int], firsts: list[int], window: int | None,
               device: torch.device, is_decode: bool) -> AttentionGroup:
        cache = self.kv_cache
        news = [self.num_new_tokens[i] for i in ids]
        q_starts = [self.num_cached_tokens[i] for i in ids]
        k_starts = [window_start(c, window) if cache is not None else 0 for c in q_starts]
        ends = [c + n for c, n in zip(q_starts, news, strict=True)]
        if cache is not None:
            keys = [cache.slots(i, s, e) for i, s, e in zip(ids, k_starts, ends, strict=True)]
        else:  # no cache (so nothing cached): the keys are the sequence's own new tokens
            keys = [torch.arange(firsts[i], firsts[i + 1], device=device) for i in ids]
        rows = [torch.arange(firsts[i], firsts[i + 1], device=device) for i in ids]
        key_counts = [e - s for s, e in zip(k_starts, ends, strict=True)]
        num_q, num_k = max(news), max(key_counts)
        q_index, q_valid = _pad(rows, num_q, device)
        key_index, k_valid = _pad(keys, num_k, device)
        mask = None
        if any(k != num_k for k in key_counts) or not is_decode or window is not None:
            q_pos = torch.tensor(q_starts, device=device)[:, None] + torch.arange(num_q,
                                                                                  device=device)
            k_pos = torch.tensor(k_starts, device=device)[:, None] + torch.arange(num_k,
                                                                                  device=device)
            allowed = k_valid[:, None, :] & visible(q_pos[:, :, None], k_pos[:, None, :], window)
            allowed[:, :, 0] |= ~q_valid  # a padding query row sees one key: no NaN rows
            mask = allowed
        offsets = torch.tensor([0, *key_counts], device=device).cumsum(0)
        q_offsets = torch.tensor([0, *news], device=device).cumsum(0)
        whole = ids == list(range(len(self.num_new_tokens)))
        valid_rows = torch.tensor([b * num_q + j for b, n in enumerate(news) for j in range(n)],
                                  device=device)
        return AttentionGroup(_cat(rows, device), q_index, q_valid, valid_rows, key_index, mask,
                              _cat(keys, device), offsets, q_offsets,
                              torch.tensor(q_starts, device=device),
                              torch.tensor(k_starts, device=device), window, is_decode, whole)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query at q_pos may read a key at k_pos (broadcast): transformers' rule,
    k <= q and, with a window, k > q - window."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def window_start(num_cached: int, window: int | None) -> int:
    """First key position the first new query (at `num_cached`) can see."""
    return 0 if window is None else max(0, num_cached + 1 - window)


def _cat(parts: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    return torch.cat(list(parts)) if parts else torch.empty(0, dtype=torch.long, device=device)


def _pad(parts: list[torch.Tensor], width: int, device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `width`, each part padded with its own first entry; and which entries are real."""
    index = torch.stack([torch.cat([p, p[:1].expand(width - len(p))]) for p in parts])
    valid = torch.arange(width, device=device)[None, :] < torch.tensor(
        [len(p) for p in parts], device=device)[:, None]
    return index, valid


_CURRENT: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("forward_context does not nest: a forward pass is already running")
    _CURRENT = ctx
    try:
        yield ctx
    finally:
        _CURRENT = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("no forward context: run the model inside `with forward_context(ctx):`")
    return _CURRENT
