"""KV cache dtypes (int8 / fp8 error bounds, bytes per token), memory budgets and sizing."""

from __future__ import annotations

import pytest
import torch

from inference_pio.config import ConfigError, ModelConfig
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.layers.attention import Attention
from inference_pio.runtime import kv_cache as kv_cache_module
from inference_pio.runtime import kv_quant
from inference_pio.runtime.kv_cache import (
    ContiguousKVCache,
    KVCachePlan,
    PagedKVCache,
    kv_bytes_per_token,
    plan_kv_cache,
)
from inference_pio.runtime.kv_quant import KV_CACHE_DTYPES, resolve_kv_cache_format
from inference_pio.testing import qwen3_coder_30b_config, tiny_dense_config
from inference_pio.utils.memory import available_ram_from_meminfo, format_bytes, free_memory_bytes

GiB = 1024**3


def _rows(seed: int = 0, n: int = 64) -> torch.Tensor:
    """[n, 4, 128] rows whose magnitudes span 1e-3..1e3, plus an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 128, generator=g)
    x = x * 10 ** (torch.rand(n, 4, 1, generator=g) * 6 - 3)
    x[0, 0] = 0
    return x


def test_int8_error_is_at_most_half_a_step() -> None:
    fmt = resolve_kv_cache_format("int8", torch.float32)
    x = _rows()
    data, scale = fmt.quantize(x)
    assert data.dtype == torch.int8 and scale is not None and scale.dtype == torch.float16
    assert scale.shape == x.shape[:2]  # one scale per (token, KV head)
    err = (fmt.dequantize(data, scale, torch.float32) - x).abs()
    step = scale.float()[..., None]
    assert (err <= step / 2 * (1 + 1e-6)).all()
    # relative to the row's largest value: <= 1/254, plus fp16 rounding of the scale
    amax = x.abs().amax(-1, keepdim=True)
    assert (err <= amax / 254 * (1 + 2**-10) + 2**-15).all()
    assert (fmt.dequantize(data, scale, torch.float32)[0, 0] == 0).all()


def test_fp8_error_is_within_three_mantissa_bits() -> None:
    fmt = resolve_kv_cache_format("fp8_e4m3", torch.float32)
    x = _rows(seed=1)
    data, scale = fmt.quantize(x)
    assert data.dtype == torch.float8_e4m3fn and scale is not None
    err = (fmt.dequantize(data, scale, torch.float32) - x).abs()
    # round-to-nearest with 3 mantissa bits: 2^-4 relative; subnormal spacing is 2^-9 * scale
    assert (err <= x.abs() * 2**-4 + scale.float()[..., None] * 2**-9).all()


def test_fp8_unsupported_names_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device) -> None:
        raise NotImplementedError('"index_put" not implemented for Float8_e4m3fn')

    monkeypatch.setattr(kv_quant, "_fp8_round_trip", broken)
    with pytest.raises(ConfigError, match=r"fp8_e4m3.*not supported.*use kv_cache_dtype 'int8'"):
        PagedKVCache(tiny_dense_config(), 2, 4, "fp8_e4m3", torch.float32)


def test_kv_cache_dtype_names() -> None:
    assert resolve_kv_cache_format("auto", torch.bfloat16).name == "bf16"
    assert resolve_kv_cache_format("auto", torch.float32).storage_dtype == torch.float32
    assert resolve_kv_cache_format("FP16", torch.float32).storage_dtype == torch.float16
    with pytest.raises(ConfigError, match="auto, fp16, bf16, fp32, int8, fp8_e4m3"):
        resolve_kv_cache_format("int4", torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp16", "bf16", "fp32", "int8", "fp8_e4m3"])
def test_paged_read_returns_model_dtype(kv_dtype: str) -> None:
    config = tiny_dense_config(num_key_value_heads=4, head_dim=128, num_attention_heads=8)
    cache = PagedKVCache(config, 4, 5, kv_dtype, torch.bfloat16).bind([[3, 1, 0]])
    x = torch.randn(12, 4, 128).bfloat16()
    cache.write(1, 0, 0, x, -x)
    k, v = cache.read(1, 0, 12, start=2)
    assert k.dtype == torch.bfloat16 and k.shape == (10, 4, 128)
    fmt = cache.format
    expected = fmt.dequantize(*fmt.quantize(x[2:]), torch.bfloat16)
    assert torch.equal(k, expected) and torch.equal(v, -expected)


def test_bytes_per_token_for_qwen3_coder() -> None:
    """Real dims (48 layers, 4 KV heads x 128): scales included, int8 stays near half of bf16."""
    config = qwen3_coder_30b_config()
    size = {name: kv_bytes_per_token(config, resolve_kv_cache_format(name, torch.bfloat16))
            for name in KV_CACHE_DTYPES}
    assert size["bf16"] == size["auto"] == size["fp16"] == 98304  # 96 KiB (docs/model.md)
    assert size["fp32"] == 2 * size["bf16"]
    assert size["int8"] == size["fp8_e4m3"] == 2 * 48 * 4 * (128 + 2)
    assert size["int8"] <= 0.52 * size["bf16"]


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp32", "int8", "fp8_e4m3"])
def test_allocated_bytes_match_bytes_per_token(kv_dtype: str) -> None:
    config = qwen3_coder_30b_config(num_layers=2)
    cache = PagedKVCache(config, 3, 16, kv_dtype, torch.bfloat16)
    assert cache.num_bytes == 3 * 16 * cache.bytes_per_token()
    plan = plan_kv_cache(config, cache.num_bytes + 100, 16, kv_dtype, torch.bfloat16)
    assert plan.num_blocks == 3 and plan.total_bytes == cache.num_bytes
    assert PagedKVCache.from_plan(config, plan, torch.bfloat16).num_bytes == plan.total_bytes


def _attention_error(kv_dtype: str, num_cached: int = 512) -> float:
    """Max |out(kv_dtype) - out(fp32)| of one decode step with Qwen3-Coder's head layout."""
    config = tiny_dense_config(num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 128, generator=g)
    k, v = torch.randn(2, num_cached + 1, 4, 128, generator=g)
    table = [list(range((num_cached + 16) // 16))]
    outs = []
    for name in ("fp32", kv_dtype):
        cache = PagedKVCache(config, len(table[0]), 16, name, torch.float32).bind(table)
        cache.write(0, 0, 0, k[:num_cached], v[:num_cached])
        with forward_context(ForwardContext((1,), (num_cached,), cache)):
            outs.append(Attention(0, 32, 4, 128)(q, k[num_cached:], v[num_cached:]))
    return (outs[0] - outs[1]).abs().max().item()


def test_report_quantized_kv_attention_error() -> None:
    """Run with -s to see the numbers; the bounds catch a broken scale, not noise."""
    int8, fp8 = _attention_error("int8"), _attention_error("fp8_e4m3")
    print(f"\nmax |attention out diff| vs fp32 KV, 512 tokens, randn q/k/v: "
          f"int8 {int8:.2e}, fp8_e4m3 {fp8:.2e}, bf16 {_attention_error('bf16'):.2e}")
    assert int8 < 2e-2 and fp8 < 6e-2


def _qwen() -> ModelConfig:
    return qwen3_coder_30b_config()


def test_plan_from_bytes_and_describe() -> None:
    plan = plan_kv_cache(_qwen(), 2 * GiB, 16, "int8", torch.bfloat16)
    assert plan == KVCachePlan(2 * GiB // (16 * 49920), 16, 49920, "int8")
    assert plan.total_bytes == plan.num_blocks * 16 * 49920 <= 2 * GiB
    assert plan.describe() == ("KV cache: 2688 blocks x 16 tokens = 43008 tokens, 2.00 GiB, "
                               "int8 (48.8 KiB/token)")
    auto = plan_kv_cache(_qwen(), GiB, 16, "auto", torch.bfloat16)
    assert auto.kv_cache_dtype == "bf16" and auto.num_blocks == 682
    assert "bf16 (96.0 KiB/token)" in auto.describe()


def test_plan_from_fraction_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache_module, "free_memory_bytes", lambda device: 10 * GiB)
    plan = plan_kv_cache(_qwen(), 0.5, 32, "bf16", torch.bfloat16)
    assert plan.num_blocks == 5 * GiB // (32 * 98304)
    whole = plan_kv_cache(_qwen(), 1.0, 32, "bf16", torch.bfloat16)
    assert whole.num_blocks == 10 * GiB // (32 * 98304)


def test_plan_errors_name_the_numbers_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"less than one KV block of 16 tokens.*1572864 bytes.*"
                                          r"raise kv_cache_memory.*'int8'"):
        plan_kv_cache(_qwen(), 1_000_000, 16, "bf16", torch.bfloat16)
    for bad in (1.5, 0.0, -3, 0, True, "1GB"):
        with pytest.raises(ConfigError, match="kv_cache_memory"):
            plan_kv_cache(_qwen(), bad, 16, "bf16", torch.bfloat16)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_size"):
        plan_kv_cache(_qwen(), GiB, 0, "bf16", torch.bfloat16)


def test_memory_probe() -> None:
    assert free_memory_bytes("cpu") > 0
    text = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n"
    assert available_ram_from_meminfo(text) == 2048 * 1024
    with pytest.raises(RuntimeError, match="MemAvailable"):
        available_ram_from_meminfo("MemTotal: 1 kB\n")
    assert [format_bytes(n) for n in (512, 49920, 1.81 * GiB, 1023 * 1024**2)] == [
        "512 B", "48.8 KiB", "1.81 GiB", "1023 MiB"]


def test_contiguous_cache_reads_from_start() -> None:
    cache = ContiguousKVCache(tiny_dense_config(), torch.float32)
    cache.allocate(0, 4)
    x = torch.randn(9, 2, 16)
    cache.bind((0,)).write(1, 0, 0, x, x)
    assert torch.equal(cache.read(1, 0, 9, start=3)[0], x[3:])


def test_advise_huge_pages_covers_whole_huge_pages_of_large_tensors() -> None:
    import sys
    from pathlib import Path

    from inference_pio.utils.memory import HUGE_PAGE, advise_huge_pages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform != "linux" or not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages here")
    big, small = torch.empty(5 * HUGE_PAGE, dtype=torch.uint8), torch.empty(1000)
    advised = advise_huge_pages([big, big[HUGE_PAGE:], small])  # a view of big counts once
    assert advised % HUGE_PAGE == 0 and 4 * HUGE_PAGE <= advised <= 5 * HUGE_PAGE
    assert advise_huge_pages([small]) == 0
