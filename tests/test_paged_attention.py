"""Paged attention against dense attention on the full, un-paged K/V: ragged batches, odd block
sizes, shared prefix blocks, sliding windows with freed blocks, every backend."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from inference_pio.config import ConfigError, ModelConfig
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.layers.attention import (
    ATTENTION_BACKENDS,
    Attention,
    attention_mask,
    causal_mask,
    get_attention_backend,
    reference_attention,
    sdpa_attention,
    window_start,
)
from inference_pio.models.qwen3_moe import Qwen3MoeForCausalLM
from inference_pio.runtime.kv_cache import ContiguousKVCache, PagedKVCache
from inference_pio.testing import tiny_dense_config

NUM_KV, GROUP, HEAD_DIM = 2, 3, 8  # 6 query heads over 2 KV heads
NUM_HEADS = NUM_KV * GROUP
SCALE = HEAD_DIM**-0.5
ATOL = 1e-5
BACKENDS = sorted(ATTENTION_BACKENDS)

# (num_cached, num_new): decode steps, a fresh prefill, prefill chunks after a cached prefix
RAGGED = [(0, 7), (13, 1), (5, 4), (30, 1), (17, 9), (1, 1)]


def _config(num_layers: int = 1) -> ModelConfig:
    return tiny_dense_config(num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV,
                             head_dim=HEAD_DIM, num_hidden_layers=num_layers, vocab_size=300)


@dataclass
class Seq:
    num_cached: int
    num_new: int
    q: torch.Tensor  # [num_new, H, Hd]
    k: torch.Tensor  # [num_cached + num_new, Hkv, Hd]: the full, un-paged keys
    v: torch.Tensor


def _seqs(shapes: list[tuple[int, int]], seed: int = 0) -> list[Seq]:
    g = torch.Generator().manual_seed(seed)
    return [Seq(c, n, torch.randn(n, NUM_HEADS, HEAD_DIM, generator=g),
                torch.randn(c + n, NUM_KV, HEAD_DIM, generator=g),
                torch.randn(c + n, NUM_KV, HEAD_DIM, generator=g)) for c, n in shapes]


def _block_tables(seqs: list[Seq], block_size: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Scattered (shuffled) block ids, so that neighbouring positions never share memory."""
    counts = [math.ceil((s.num_cached + s.num_new) / block_size) for s in seqs]
    ids = list(range(sum(counts) + 3))
    random.Random(seed).shuffle(ids)
    tables, used = [], 0
    for count in counts:
        tables.append(ids[used: used + count])
        used += count
    return tables, len(ids)


def _run_layer(seqs: list[Seq], cache: PagedKVCache | ContiguousKVCache | None, backend: str,
               window: int | None = None, layer_idx: int = 0) -> list[torch.Tensor]:
    """The new tokens of every sequence as one flat batch through the Attention layer."""
    layer = Attention(layer_idx, NUM_HEADS, NUM_KV, HEAD_DIM, window)
    ctx = ForwardContext(tuple(s.num_new for s in seqs), tuple(s.num_cached for s in seqs),
                         cache, attention_backend=get_attention_backend(backend, cache))
    with forward_context(ctx):
        out = layer(torch.cat([s.q for s in seqs]), torch.cat([s.k[s.num_cached:] for s in seqs]),
                    torch.cat([s.v[s.num_cached:] for s in seqs]))
    return list(out.split([s.num_new for s in seqs]))


def _fill(cache: PagedKVCache, seqs: list[Seq], layer_idx: int = 0) -> None:
    """Write each sequence's already-cached tokens (a previous step's work)."""
    for i, s in enumerate(seqs):
        if s.num_cached:
            cache.write(layer_idx, i, 0, s.k[: s.num_cached], s.v[: s.num_cached])


def _dense(s: Seq, window: int | None, sdpa: bool = False) -> torch.Tensor:
    mask = causal_mask(s.num_new, s.num_cached, window, s.q.device)
    fn = sdpa_attention if sdpa else reference_attention
    return fn(s.q, s.k, s.v, mask, SCALE)


def _assert_matches_dense(seqs: list[Seq], outs: list[torch.Tensor], window: int | None) -> None:
    for s, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out, _dense(s, window), atol=ATOL, rtol=0)
        torch.testing.assert_close(out, _dense(s, window, sdpa=True), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [3, 5, 16])
@pytest.mark.parametrize("window", [None, 4, 11])
def test_ragged_batch_matches_dense(backend: str, block_size: int, window: int | None) -> None:
    seqs = _seqs(RAGGED, seed=block_size)
    tables, num_blocks = _block_tables(seqs, block_size, seed=block_size)
    cache = PagedKVCache(_config(), num_blocks, block_size, "fp32", torch.float32).bind(tables)
    _fill(cache, seqs)
    _assert_matches_dense(seqs, _run_layer(seqs, cache, backend, window), window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_cache_matches_dense(backend: str) -> None:
    seqs = _seqs(RAGGED, seed=7)
    cache = ContiguousKVCache(_config(), torch.float32)
    for i in range(len(seqs)):
        cache.allocate(i, 4)
    cache.bind(tuple(range(len(seqs))))
    for i, s in enumerate(seqs):
        if s.num_cached:
            cache.write(0, i, 0, s.k[: s.num_cached], s.v[: s.num_cached])
    _assert_matches_dense(seqs, _run_layer(seqs, cache, backend, window=6), window=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_hit_shares_leading_blocks(backend: str) -> None:
    """B's first two blocks are A's (a prefix-cache hit): B computes only its suffix."""
    block_size, prefix = 4, 8
    a, b = _seqs([(10, 3), (prefix, 6)], seed=3)
    b.k[:prefix], b.v[:prefix] = a.k[:prefix], a.v[:prefix]
    tables = [[5, 2, 7, 0], [5, 2, 6, 1]]  # blocks 5 and 2 hold the shared prefix
    cache = PagedKVCache(_config(), 8, block_size, "fp32", torch.float32).bind(tables)
    _fill(cache, [a])  # only A's tokens were ever written; B finds its prefix already there
    before = cache.k[0][[5, 2]].clone()
    _assert_matches_dense([a, b], _run_layer([a, b], cache, backend), window=None)
    assert torch.equal(cache.k[0][[5, 2]], before)  # B's suffix went to its own blocks


def _free_before_window(table: list[int], num_cached: int, window: int, block_size: int
                        ) -> list[int]:
    """What the block manager does: free blocks wholly before the first query's window."""
    first = window_start(num_cached, window)
    return [-1 if (b + 1) * block_size <= first else bid for b, bid in enumerate(table)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [3, 5])
def test_sliding_window_with_freed_blocks(backend: str, block_size: int) -> None:
    window = 7
    seqs = _seqs([(40, 1), (23, 4), (6, 1), (31, 9)], seed=11)
    tables, num_blocks = _block_tables(seqs, block_size)
    cache = PagedKVCache(_config(), num_blocks, block_size, "fp32", torch.float32).bind(tables)
    _fill(cache, seqs)
    freed = [_free_before_window(t, s.num_cached, window, block_size)
             for t, s in zip(tables, seqs, strict=True)]
    assert sum(t.count(-1) for t in freed) >= 10
    cache.bind(freed)
    _assert_matches_dense(seqs, _run_layer(seqs, cache, backend, window), window)


def test_freed_or_missing_blocks_are_never_touched() -> None:
    cache = PagedKVCache(_config(), 4, 4, "fp32", torch.float32).bind([[-1, 2, 3]])
    k = torch.randn(2, NUM_KV, HEAD_DIM)
    with pytest.raises(ValueError, match="-1 marks a freed"):
        cache.write(0, 0, 2, k, k)
    with pytest.raises(ValueError, match="-1 marks a freed"):
        cache.read(0, 0, 6, start=3)
    with pytest.raises(IndexError, match="block table has 3 blocks"):
        cache.read(0, 0, 13, start=4)
    cache.write(0, 0, 4, k, k)
    torch.testing.assert_close(cache.read(0, 0, 6, start=4)[0], k)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.3"):
        cache.bind([[9]]).read(0, 0, 1)


class _SpyCache(PagedKVCache):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads: list[tuple[int, int, int]] = []

    def read(self, layer_idx: int, seq_idx: int, end: int,
             start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append((seq_idx, start, end))
        return super().read(layer_idx, seq_idx, end, start)

    def slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor:
        self.reads.append((seq_idx, start, end))  # the native decode kernel reads these rows
        return super().slots(seq_idx, start, end)


def test_decode_reads_only_the_window() -> None:
    seqs = _seqs([(50, 1), (9, 1), (3, 1)], seed=2)
    tables, num_blocks = _block_tables(seqs, 4)
    cache = _SpyCache(_config(), num_blocks, 4, "fp32", torch.float32).bind(tables)
    _fill(cache, seqs)
    _run_layer(seqs, cache, "auto", window=8)
    writes, reads = [(0, 50, 51), (1, 9, 10), (2, 3, 4)], [(0, 43, 51), (1, 2, 10), (2, 0, 4)]
    assert cache.reads == writes + reads  # the new tokens' slots, then the windows


def test_layers_do_not_share_storage() -> None:
    seqs = _seqs([(6, 2)], seed=4)
    other = _seqs([(6, 2)], seed=5)
    cache = PagedKVCache(_config(2), 3, 4, "fp32", torch.float32).bind([[2, 0]])
    _fill(cache, seqs, layer_idx=0)
    _fill(cache, other, layer_idx=1)
    _assert_matches_dense(seqs, _run_layer(seqs, cache, "torch", layer_idx=0), None)
    _assert_matches_dense(other, _run_layer(other, cache, "torch", layer_idx=1), None)


# ---- backends alone ---------------------------------------------------------------------

# (num_q, q_start, num_k, k_start, window): k always ends where q ends
BACKEND_CASES = [(1, 0, 1, 0, None), (1, 20, 21, 0, None), (1, 20, 6, 15, 6), (1, 20, 21, 0, 6),
                 (5, 0, 5, 0, None), (4, 9, 13, 0, None), (4, 9, 10, 3, 7), (8, 30, 12, 26, 5)]


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("group", [1, 4])
def test_backends_agree(case: tuple[int, int, int, int, int | None], group: int) -> None:
    num_q, q_start, num_k, k_start, window = case
    g = torch.Generator().manual_seed(num_q * 100 + num_k)
    q = torch.randn(num_q, NUM_KV * group, HEAD_DIM, generator=g)
    k, v = torch.randn(2, num_k, NUM_KV, HEAD_DIM, generator=g)
    mask = attention_mask(num_q, q_start, num_k, k_start, window, q.device)
    expected = reference_attention(q, k, v, mask, SCALE)
    for name in BACKENDS:
        out = get_attention_backend(name).forward(q, k, v, q_start, k_start, window, SCALE)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_attention_mask_is_transformers_window(case: tuple[int, int, int, int, int | None]
                                               ) -> None:
    num_q, q_start, num_k, k_start, window = case
    mask = attention_mask(num_q, q_start, num_k, k_start, window, torch.device("cpu"))
    brute = torch.tensor([[j <= i and (window is None or i - window < j)
                           for j in range(k_start, k_start + num_k)]
                          for i in range(q_start, q_start + num_q)])
    assert torch.equal(brute, torch.ones_like(brute)) if mask is None else torch.equal(mask, brute)


def test_bf16_backends_stay_close() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, NUM_HEADS, HEAD_DIM, generator=g).bfloat16()
    k, v = torch.randn(2, 40, NUM_KV, HEAD_DIM, generator=g).bfloat16()
    expected = reference_attention(q.float(), k.float(), v.float(), None, SCALE)
    for name in BACKENDS:
        out = get_attention_backend(name).forward(q, k, v, 39, 0, None, SCALE)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0, msg=name)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, reference, sdpa, torch"):
        get_attention_backend("flash")


# ---- the whole model: paged decode == one full forward -----------------------------------

def _model(config: ModelConfig) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("window", [None, 5])
@torch.inference_mode()
def test_model_paged_steps_match_full_forward(window: int | None) -> None:
    """Two prompts: chunked prefill in a ragged batch, then joint decode steps, through a
    paged cache (with freed window blocks) against a cache-free forward of each sequence."""
    config = tiny_dense_config(vocab_size=300, sliding_window=window)
    model, bs = _model(config), 3
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 300, (n,), generator=g) for n in (14, 11)]
    cache = PagedKVCache(config, 16, bs, "auto", torch.float32)
    tables = [[3, 9, 0, 12, 6, 1], [4, 8, 15, 2]]
    steps = [((0, 0), (8, 4)), ((8, 4), (4, 5)), ((12, 9), (1, 1)), ((13, 10), (1, 1))]
    for cached, new in steps:  # (num_cached per seq, num_new per seq)
        live = [t if window is None else _free_before_window(t, c, window, bs)
                for t, c in zip(tables, cached, strict=True)]
        ctx = ForwardContext(new, cached, cache.bind(live))
        ids = torch.cat([t[c: c + n] for t, c, n in zip(tokens, cached, new, strict=True)])
        pos = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)])
        with forward_context(ctx):
            hidden = model(ids, pos).split(list(new))
        for t, c, n, h in zip(tokens, cached, new, hidden, strict=True):
            with forward_context(ForwardContext((c + n,), (0,))):
                full = model(t[: c + n], torch.arange(c + n))
            torch.testing.assert_close(h, full[c:], atol=1e-4, rtol=0)
