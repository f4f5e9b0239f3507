"""Free-memory probing for KV cache sizing, without adding dependencies: torch on CUDA,
psutil when it happens to be installed, else /proc/meminfo."""

from __future__ import annotations

from pathlib import Path

import torch

MEMINFO_PATH = Path("/proc/meminfo")


def free_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes that can still be allocated on `device` (CUDA: free device memory; CPU: available
    RAM, which counts reclaimable page cache, as the kernel's MemAvailable does)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        raise RuntimeError(f"cannot probe free memory on {device}; give kv_cache_memory in bytes")
    try:
        import psutil  # optional: not a dependency
    except ImportError:
        return available_ram_from_meminfo(MEMINFO_PATH.read_text())
    return int(psutil.virtual_memory().available)


def available_ram_from_meminfo(text: str) -> int:
    """Bytes of `MemAvailable` in the text of /proc/meminfo ("MemAvailable:  123 kB")."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemAvailable":
            amount, *unit = value.split()
            return int(amount) * (1024 if unit == ["kB"] else 1)
    raise RuntimeError("/proc/meminfo has no MemAvailable line; give kv_cache_memory in bytes")


def format_bytes(num_bytes: float) -> str:
    """Human-readable binary size with about three digits: 512 B, 48.8 KiB, 1.81 GiB."""
    value, unit = float(num_bytes), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    if unit == "B":
        return f"{value:.0f} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {unit}"
