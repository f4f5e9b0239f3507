"""Causal GQA attention over a flat batch of sequences, reading and writing the KV cache
through the current ForwardContext, with swappable kernels behind `AttentionBackend`.

Semantics are transformers': query head h reads KV head h // (H / Hkv); a query at position i
sees keys j with i - window < j <= i; softmax in fp32."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.config import ConfigError
from inference_pio.forward_context import get_forward_context
from inference_pio.kernels import cpu as native_cpu


def attention_mask(num_q: int, q_start: int, num_k: int, k_start: int, window: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean [num_q, num_k]: True where query q_start + i may read key k_start + j; None when
    every query may read every key (a decode step whose keys start at its window), so backends
    can skip masking."""
    q_last, k_last = q_start + num_q - 1, k_start + num_k - 1
    if k_last <= q_start and (window is None or k_start > q_last - window):
        return None
    q_pos = torch.arange(q_start, q_start + num_q, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + num_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def causal_mask(
    num_new: int, num_cached: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [num_new, num_cached + num_new] for keys from position 0 (never None)."""
    mask = attention_mask(num_new, num_cached, num_cached + num_new, 0, window, device)
    if mask is None:
        return torch.ones(num_new, num_cached + num_new, dtype=torch.bool, device=device)
    return mask


def window_start(num_cached: int, window: int | None) -> int:
    """First key position the first new query (at `num_cached`) can see."""
    return 0 if window is None else max(0, num_cached + 1 - window)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The oracle: q [n, H, Hd], k/v [m, Hkv, Hd], mask [n, m] or None -> [n, H, Hd]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [m, H, Hd]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("hnm,mhd->nhd", probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Same contract as `reference_attention` through torch's fused SDPA (mask None = no mask)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


class AttentionBackend(Protocol):
    """One sequence's attention: q [n, H, Hd] at positions q_start.., k/v [m, Hkv, Hd] at
    positions k_start.. (NOTE: k must cover q's own positions) -> [n, H, Hd] in q's dtype."""

    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor: ...


class ReferenceBackend:
    """Plain einsum with repeated KV heads: slow, obviously right, the oracle in tests."""

    name = "reference"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        mask = attention_mask(q.shape[0], q_start, k.shape[0], k_start, window, q.device)
        return reference_attention(q, k, v, mask, scale)


class SdpaBackend:
    """torch's fused SDPA (GQA without copies via enable_gqa): the prefill path."""

    name = "sdpa"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        mask = attention_mask(q.shape[0], q_start, k.shape[0], k_start, window, q.device)
        return sdpa_attention(q, k, v, mask, scale)


class TorchBackend:
    """Two batched fp32 matmuls over KV heads, the query heads of a group stacked as rows so
    no KV head is repeated: cheap for decode (n = 1), correct for any n."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        (n, num_heads, head_dim), (m, num_kv, _) = q.shape, k.shape
        group = num_heads // num_kv
        # head h = kv * group + g, so [n, H, Hd] -> [Hkv, n * group, Hd]
        qg = q.float().view(n, num_kv, group, head_dim).transpose(0, 1)
        qg = qg.reshape(num_kv, n * group, head_dim)
        scores = torch.bmm(qg, k.float().permute(1, 2, 0)) * scale  # [Hkv, n * group, m]
        mask = attention_mask(n, q_start, m, k_start, window, q.device)
        if mask is not None:
            scores = scores.view(num_kv, n, group, m).masked_fill(~mask[None, :, None, :],
                                                                   float("-inf"))
        probs = torch.softmax(scores.view(num_kv, n * group, m), dim=-1)
        out = torch.bmm(probs, v.float().transpose(0, 1))  # [Hkv, n * group, Hd]
        return out.view(num_kv, n, group, head_dim).transpose(0, 1).reshape(q.shape).to(q.dtype)


class AutoBackend:
    """SDPA for prefill chunks, the matmul backend for single-token decode. (On the CPU with
    an fp32 paged cache, `Attention` runs decode through the native kernel instead, which
    reads the cache in place.)"""

    name = "auto"

    def __init__(self) -> None:
        self.prefill, self.decode = SdpaBackend(), TorchBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        backend = self.decode if q.shape[0] == 1 else self.prefill
        return backend.forward(q, k, v, q_start, k_start, window, scale)


# NOTE: a flash-attn backend would register here when `flash_attn` is importable; names only,
# so choosing a backend never touches a device.
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "auto": AutoBackend, "reference": ReferenceBackend, "sdpa": SdpaBackend, "torch": TorchBackend,
}


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend of option `attention_backend` ("auto" | "reference" | "sdpa" | "torch")."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention_backend {name!r}; choose one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


_AUTO = AutoBackend()


class Attention(nn.Module):
    """Stores this step's K/V, then attends every sequence's new queries to the cached keys
    they can see (all of them, or those inside the sliding window)."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, Hd], k/v [T, Hkv, Hd] (post-norm, post-RoPE) -> [T, H, Hd]."""
        ctx = get_forward_context()
        if len(ctx.num_new_tokens) == 1:  # one sequence (batch-1 decode, one prompt): no copy
            return self._attend_one(0, ctx.num_cached_tokens[0], q, k, v)
        out = torch.empty_like(q)
        start = 0
        for i, num_new in enumerate(ctx.num_new_tokens):
            end = start + num_new
            out[start:end] = self._attend_one(i, ctx.num_cached_tokens[i], q[start:end],
                                              k[start:end], v[start:end])
            start = end
        return out

    def _attend_one(self, seq_idx: int, num_cached: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        """One sequence: q [n, H, Hd] and its new k/v [n, Hkv, Hd] -> [n, H, Hd]."""
        ctx = get_forward_context()
        window = ctx.sliding_window or self.sliding_window
        k_start = 0
        backend = ctx.attention_backend or _AUTO
        cache = ctx.kv_cache
        if cache is not None:
            cache.write(self.layer_idx, seq_idx, num_cached, k, v)
            if num_cached:
                k_start = window_start(num_cached, window)
                end = num_cached + q.shape[0]
                rows = self._native_decode_rows(cache, q, backend)
                if rows is not None:
                    slots = cache.slots(seq_idx, k_start, end)  # type: ignore[attr-defined]
                    return native_cpu.decode_attention(q, *rows, slots, self.scale)
                k, v = cache.read(self.layer_idx, seq_idx, end, start=k_start)
        return backend.forward(q, k, v, num_cached, k_start, window, self.scale)

    def _native_decode_rows(self, cache: object, q: torch.Tensor, backend: AttentionBackend
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cache's fp32 K/V rows when this is a one-token decode under the "auto" backend
        on the CPU and the native kernels are available; None means the backend path."""
        if q.shape[0] != 1 or backend.name != "auto" or not native_cpu.fused_ok(q):
            return None
        native_rows = getattr(cache, "native_rows", None)
        return None if native_rows is None else native_rows(self.layer_idx)
