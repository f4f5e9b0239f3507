"""The runtime contract: a step's flat metadata is built once (per sliding window) and an
attention layer makes one cache write and one attention call per group (decoding sequences,
prefill chunks), whatever the number of sequences."""

from __future__ import annotations

import torch

from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.layers.attention import (
    Attention,
    causal_mask,
    get_attention_backend,
    reference_attention,
)
from inference_pio.runtime.kv_cache import PagedKVCache
from inference_pio.testing import tiny_dense_config

NUM_KV, NUM_HEADS, HEAD_DIM = 2, 4, 8


def _cache(num_blocks: int = 32, block_size: int = 4) -> PagedKVCache:
    config = tiny_dense_config(num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV,
                               head_dim=HEAD_DIM, num_hidden_layers=2, vocab_size=300)
    return PagedKVCache(config, num_blocks, block_size, "fp32", torch.float32)


class _CountingCache(PagedKVCache):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[str] = []

    def write_slots(self, *args: object) -> None:
        self.calls.append("write")
        super().write_slots(*args)  # type: ignore[arg-type]

    def gather(self, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append("gather")
        return super().gather(*args)  # type: ignore[arg-type]

    def read(self, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("attention must not read sequence by sequence")


def test_layout_groups_decode_and_prefill_once_per_window() -> None:
    cache = _cache().bind([[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]])
    ctx = ForwardContext((1, 3, 1, 6), (9, 0, 5, 4), cache)
    layout = ctx.layout(None)
    assert ctx.layout(None) is layout  # built once, shared by every layer
    decode, prefill = layout.groups
    assert decode.is_decode and decode.token_rows.tolist() == [0, 4]
    assert prefill.token_rows.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert not decode.whole_batch and not prefill.whole_batch
    assert decode.key_offsets.tolist() == [0, 10, 16]  # 9 + 1 and 5 + 1 keys
    assert decode.mask is not None and decode.mask.sum().item() == 16  # padding masked
    assert prefill.q_index.shape == (2, 6) and prefill.q_valid.sum().item() == 9
    assert layout.slot_mapping is not None
    assert layout.slot_mapping.tolist() == [9, 12, 13, 14, 21, 28, 29, 30, 31, 32, 33]
    windowed = ctx.layout(3)
    assert windowed is not layout and torch.equal(windowed.slot_mapping, layout.slot_mapping)
    assert windowed.groups[0].key_offsets.tolist() == [0, 3, 6]


def test_equal_decode_lengths_need_no_mask_and_cover_the_batch() -> None:
    cache = _cache().bind([[0, 1], [2, 3], [4, 5]])
    (group,) = ForwardContext((1, 1, 1), (6, 6, 6), cache).layout(None).groups
    assert group.whole_batch and group.mask is None and group.key_index.shape == (3, 7)


def test_one_write_and_one_call_per_group_for_any_batch() -> None:
    g = torch.Generator().manual_seed(0)
    for backend in ("torch", "sdpa", "reference"):
        cache = _CountingCache(tiny_dense_config(
            num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV, head_dim=HEAD_DIM,
            num_hidden_layers=1, vocab_size=300), 64, 4, "fp32", torch.float32)
        tables = [[4 * i + j for j in range(4)] for i in range(12)]
        new, cached = (1,) * 10 + (5, 3), (7,) * 10 + (0, 2)
        cache.bind(tables)
        old = [torch.randn(2, c, NUM_KV, HEAD_DIM, generator=g) for c in cached]
        for i, (kc, vc) in enumerate(old):  # the earlier steps' keys
            cache.write_slots(0, cache.slots(i, 0, cached[i]), kc, vc)
        cache.calls.clear()
        ctx = ForwardContext(new, cached, cache,
                             attention_backend=get_attention_backend(backend))
        total = sum(new)
        q = torch.randn(total, NUM_HEADS, HEAD_DIM, generator=g)
        k, v = torch.randn(2, total, NUM_KV, HEAD_DIM, generator=g)
        with forward_context(ctx):
            out = Attention(0, NUM_HEADS, NUM_KV, HEAD_DIM)(q, k, v)
        assert cache.calls == ["write", "gather", "gather"], (backend, cache.calls)
        start = 0
        for (kc, vc), c, n in zip(old, cached, new, strict=True):  # each sequence alone
            keys, values = torch.cat([kc, k[start:start + n]]), torch.cat([vc, v[start:start + n]])
            mask = causal_mask(n, c, None, q.device)
            want = reference_attention(q[start:start + n], keys, values, mask, HEAD_DIM**-0.5)
            torch.testing.assert_close(out[start:start + n], want, atol=1e-5, rtol=0)
            start += n


def test_native_backend_is_chosen_once_for_an_fp32_cpu_cache() -> None:
    from inference_pio.kernels import cpu

    cache = _cache()
    backend = get_attention_backend("auto", cache)
    expected = "NativeCpuBackend" if cpu.available() else "AutoBackend"
    assert type(backend).__name__ == expected
    assert type(get_attention_backend("auto")).__name__ == "AutoBackend"  # no cache: no native
    assert type(get_attention_backend("torch", cache)).__name__ == "TorchBackend"
