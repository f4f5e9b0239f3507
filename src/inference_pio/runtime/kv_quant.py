"""KV cache storage formats: plain float dtypes, or int8 / fp8-e4m3 with one scale per
(token, KV head), quantized on write and dequantized to the compute dtype on read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_pio.config import ConfigError

KV_CACHE_DTYPES = ("auto", "fp16", "bf16", "fp32", "int8", "fp8_e4m3")

_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_QUANT_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_QUANT_MAX = {"int8": 127.0, "fp8_e4m3": torch.finfo(torch.float8_e4m3fn).max}  # 448 for e4m3fn
# fp16 scales halve the scale overhead of fp32 ones (2 vs 4 bytes per 128-element head row).
SCALE_DTYPE = torch.float16
# NOTE: scales are clamped into fp16's normal range so a zero row never divides by zero and a
# huge row never overflows to inf; values beyond 127 * 65504 (int8) would saturate.
_SCALE_MIN, _SCALE_MAX = 2.0**-14, torch.finfo(torch.float16).max


@dataclass(frozen=True)
class KVCacheFormat:
    """How K/V rows are stored: `storage_dtype`, plus per-(token, head) scales when quantized."""

    name: str  # the resolved option name: "bf16", "int8", ...
    storage_dtype: torch.dtype
    is_quantized: bool

    def bytes_per_head_row(self, head_dim: int) -> int:
        """Bytes of one (token, KV head) row of K or V, its scale included."""
        scale_bytes = SCALE_DTYPE.itemsize if self.is_quantized else 0
        return head_dim * self.storage_dtype.itemsize + scale_bytes

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [n, Hkv, Hd] -> (data [n, Hkv, Hd] in storage_dtype, scale [n, Hkv] or None)."""
        if not self.is_quantized:
            return x.to(self.storage_dtype), None
        qmax = _QUANT_MAX[self.name]
        amax = x.detach().abs().amax(dim=-1).float()  # [n, Hkv]
        # Round the scale to its stored dtype first, so quantize and dequantize use the same one.
        scale = (amax / qmax).clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)
        scaled = x.float() / scale.float()[..., None]
        if self.storage_dtype == torch.int8:
            return scaled.round().clamp(-qmax, qmax).to(torch.int8), scale
        return scaled.clamp(-qmax, qmax).to(self.storage_dtype), scale

    def dequantize(self, data: torch.Tensor, scale: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
        """Inverse of `quantize`: data [m, Hkv, Hd], scale [m, Hkv] -> [m, Hkv, Hd] in dtype."""
        if scale is None:
            return data.to(dtype)
        return (data.float() * scale.float()[..., None]).to(dtype)


def resolve_kv_cache_format(kv_cache_dtype: str, model_dtype: torch.dtype,
                            device: str | torch.device = "cpu") -> KVCacheFormat:
    """The storage format of option `kv_cache_dtype` ("auto" = the model dtype)."""
    name = kv_cache_dtype.lower()
    if name == "auto":
        by_dtype = {v: k for k, v in _FLOAT_DTYPES.items()}
        if model_dtype not in by_dtype:
            raise ConfigError(f"kv_cache_dtype 'auto' needs a float model dtype, got {model_dtype}")
        return KVCacheFormat(by_dtype[model_dtype], model_dtype, is_quantized=False)
    if name in _FLOAT_DTYPES:
        return KVCacheFormat(name, _FLOAT_DTYPES[name], is_quantized=False)
    if name in _QUANT_DTYPES:
        if name == "fp8_e4m3":
            check_fp8_support(device)
        return KVCacheFormat(name, _QUANT_DTYPES[name], is_quantized=True)
    raise ConfigError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of "
                      f"{', '.join(KV_CACHE_DTYPES)}")


def check_fp8_support(device: str | torch.device) -> None:
    """Raise a ConfigError unless this torch can convert to, scatter and gather float8 here."""
    try:
        _fp8_round_trip(torch.device(device))
    except Exception as e:  # noqa: BLE001 - any failure means "not here"; the message says which
        raise ConfigError(
            f"kv_cache_dtype 'fp8_e4m3' is not supported by torch {torch.__version__} on "
            f"{torch.device(device)} ({type(e).__name__}: {e}); use kv_cache_dtype 'int8' "
            f"(same size) instead"
        ) from None


def _fp8_round_trip(device: torch.device) -> None:
    """The cache's write (index_put) and read (gather + convert) paths on a tiny buffer."""
    x = torch.randn(4, 2, 8, device=device)
    buf = torch.zeros(8, 2, 8, dtype=torch.float8_e4m3fn, device=device)
    idx = torch.tensor([1, 3, 5, 7], device=device)
    buf[idx] = x.to(torch.float8_e4m3fn)
    buf[idx].float()
