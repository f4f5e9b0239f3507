"""The one place INFERENCE_PIO_* environment variables are read, typed, with defaults."""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """INFERENCE_PIO_CACHE, else $XDG_CACHE_HOME/inference_pio, else ~/.cache/inference_pio."""
    explicit = os.environ.get("INFERENCE_PIO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "inference_pio"


def default_model() -> str | None:
    """INFERENCE_PIO_MODEL: the model used when none is given (a path or an ORG/NAME id)."""
    return os.environ.get("INFERENCE_PIO_MODEL") or None


def offline_flag() -> str | None:
    """INFERENCE_PIO_OFFLINE=1 (or true/yes/on) forbids hub downloads, as HF_HUB_OFFLINE=1
    does; returns the value as set (for messages), or None when downloads are allowed."""
    value = os.environ.get("INFERENCE_PIO_OFFLINE", "")
    return value if value.strip().lower() in _TRUE else None


def api_key() -> str | None:
    """INFERENCE_PIO_API_KEY: the key `pio serve` requires from clients (unset or empty: none)."""
    return os.environ.get("INFERENCE_PIO_API_KEY") or None


def native_kernels_enabled() -> bool:
    """INFERENCE_PIO_NATIVE: 0/false/no/off turns the native CPU kernels off (default on)."""
    return os.environ.get("INFERENCE_PIO_NATIVE", "1").strip().lower() not in {
        "0", "false", "no", "off"}


CPU_ISAS = ("auto", "avx2", "avx512vnni")


def cpu_isa() -> str:
    """INFERENCE_PIO_CPU_ISA: which instruction set the native int4 / int8 kernels are built for:
    "auto" (default: AVX-512 VNNI where the CPU has it, else AVX2), "avx2" or "avx512vnni"."""
    value = os.environ.get("INFERENCE_PIO_CPU_ISA", "auto").strip().lower() or "auto"
    if value not in CPU_ISAS:
        raise ValueError(f"INFERENCE_PIO_CPU_ISA={value!r} is not one of {', '.join(CPU_ISAS)}")
    return value
