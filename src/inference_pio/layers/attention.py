"""Causal GQA attention over a flat batch of sequences, reading and writing the KV cache
through the current ForwardContext, with swappable kernels behind `AttentionBackend`. A layer
writes the step's K/V with one call and attends each `AttentionGroup` of the batch (decoding
sequences, prefill chunks) with one backend call; the backend is chosen once per engine.

Semantics are transformers': query head h reads KV head h // (H / Hkv); a query at position i
sees keys j with i - window < j <= i; softmax in fp32."""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.config import ConfigError
from inference_pio.forward_context import (
    AttentionGroup,
    KVCacheStore,
    get_forward_context,
    visible,
    window_start,  # noqa: F401 - re-exported
)
from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.custom_op import triton_available


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
    return visible(q_pos, k_pos, window)


def causal_mask(
    num_new: int, num_cached: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [num_new, num_cached + num_new] for keys from position 0 (never None)."""
    mask = attention_mask(num_new, num_cached, num_cached + num_new, 0, window, device)
    if mask is None:
        return torch.ones(num_new, num_cached + num_new, dtype=torch.bool, device=device)
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The oracle: q [..., n, H, Hd], k/v [..., m, Hkv, Hd], mask [..., n, m] or None ->
    [..., n, H, Hd] (leading batch dimensions optional)."""
    group = q.shape[-2] // k.shape[-2]
    k = k.repeat_interleave(group, dim=-2)  # [..., m, H, Hd]
    v = v.repeat_interleave(group, dim=-2)
    scores = torch.einsum("...nhd,...mhd->...hnm", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("...hnm,...mhd->...nhd", probs, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Same contract as `reference_attention` through torch's fused SDPA (mask None = no mask)."""
    out = F.scaled_dot_product_attention(
        q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
        attn_mask=None if mask is None else mask.unsqueeze(-3), scale=scale, enable_gqa=True,
    )
    return out.transpose(-3, -2)


class AttentionBackend(Protocol):
    """Attention for one `AttentionGroup` of a step: q/k/v [T, *, Hd] are the step's flat new
    rows (post-RoPE; k/v already written to `cache`, when there is one) -> [n, H, Hd] for the
    group's tokens in `group.token_rows` order, in q's dtype."""

    name: str

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCacheStore | None, group: AttentionGroup, scale: float
               ) -> torch.Tensor: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        """One sequence: q [n, H, Hd] at positions q_start.., k/v [m, Hkv, Hd] at positions
        k_start.. (k covers q's own positions) -> [n, H, Hd]."""
        ...


class DenseBackend:
    """Gathers each group's visible K/V into a padded [N, K, Hkv, Hd] batch (one index per
    layer) and runs `dense` on it with the group's mask."""

    name = "dense"

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_decode: bool, scale: float) -> torch.Tensor:
        """q [N, Q, H, Hd], k/v [N, K, Hkv, Hd], mask [N, Q, K] or None -> [N, Q, H, Hd]."""
        raise NotImplementedError

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCacheStore | None, group: AttentionGroup, scale: float
               ) -> torch.Tensor:
        if cache is not None:
            keys, values = cache.gather(layer_idx, group.key_index)
        else:
            keys, values = k[group.key_index], v[group.key_index]
        out = self.dense(q[group.q_index], keys, values, group.mask, group.is_decode, scale)
        # one sequence, or one query each: no padding rows to drop
        return out.flatten(0, 1) if 1 in out.shape[:2] else out.flatten(0, 1)[group.valid_rows]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        mask = attention_mask(q.shape[0], q_start, k.shape[0], k_start, window, q.device)
        return self.dense(q[None], k[None], v[None], None if mask is None else mask[None],
                          q.shape[0] == 1, scale)[0]


class ReferenceBackend(DenseBackend):
    """Plain einsum with repeated KV heads: slow, obviously right, the oracle in tests."""

    name = "reference"

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_decode: bool, scale: float) -> torch.Tensor:
        return reference_attention(q, k, v, mask, scale)


class SdpaBackend(DenseBackend):
    """torch's fused SDPA (GQA without copies via enable_gqa): the prefill path."""

    name = "sdpa"

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_decode: bool, scale: float) -> torch.Tensor:
        return sdpa_attention(q, k, v, mask, scale)


class TorchBackend(DenseBackend):
    """Two batched fp32 matmuls over KV heads, the query heads of a group stacked as rows so
    no KV head is repeated: cheap for decode (Q = 1), correct for any Q."""

    name = "torch"

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_decode: bool, scale: float) -> torch.Tensor:
        (b, n, num_heads, head_dim), (m, num_kv) = q.shape, k.shape[1:3]
        group = num_heads // num_kv
        # head h = kv * group + g: [B, n, H, Hd] -> [B, Hkv, n * group, Hd]
        qg = q.float().view(b, n, num_kv, group, head_dim).permute(0, 2, 1, 3, 4)
        qg = qg.reshape(b, num_kv, n * group, head_dim)
        scores = qg @ k.float().permute(0, 2, 3, 1) * scale  # [B, Hkv, n * group, m]
        if mask is not None:
            scores = scores.view(b, num_kv, n, group, m).masked_fill(
                ~mask[:, None, :, None, :], float("-inf")).view(b, num_kv, n * group, m)
        probs = torch.softmax(scores, dim=-1)
        out = probs @ v.float().transpose(1, 2)  # [B, Hkv, n * group, Hd]
        out = out.view(b, num_kv, n, group, head_dim).permute(0, 2, 1, 3, 4)
        return out.reshape(q.shape).to(q.dtype)


class AutoBackend(DenseBackend):
    """SDPA for prefill chunks, the matmul backend for decoding sequences."""

    name = "auto"

    def __init__(self) -> None:
        self.prefill, self.decode = SdpaBackend(), TorchBackend()

    def dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, is_decode: bool, scale: float) -> torch.Tensor:
        backend = self.decode if is_decode else self.prefill
        return backend.dense(q, k, v, mask, is_decode, scale)


class NativeCpuBackend(AutoBackend):
    """"auto" on the CPU over an fp32 paged cache with the native kernels: every decoding
    sequence of a step in one native call that reads the cache rows in place (no gather);
    prefill chunks through SDPA."""

    name = "auto"

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCacheStore | None, group: AttentionGroup, scale: float
               ) -> torch.Tensor:
        if not group.is_decode or cache is None:
            return super().attend(layer_idx, q, k, v, cache, group, scale)
        rows = cache.native_rows(layer_idx)  # type: ignore[attr-defined]
        queries = q if group.whole_batch else q[group.token_rows]
        out = native_cpu.decode_attention(queries, *rows, group.key_slots, group.key_offsets,
                                          scale)
        return out.to(q.dtype)


class TritonBackend:
    """One Triton launch per group (`kernels.triton_attention`): every sequence's queries
    against its keys read in place from the paged cache (`kv_cache.paged_rows`: any float,
    int8 or fp8 format), causal and sliding-window masks applied in the kernel; no gather, no
    padding, no host synchronisation. A cache without `paged_rows` is gathered first."""

    name = "triton"

    def __init__(self) -> None:
        from inference_pio.kernels.triton_attention import paged_attention  # triton is optional
        self._kernel = paged_attention

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCacheStore | None, group: AttentionGroup, scale: float
               ) -> torch.Tensor:
        slots, k_scale, v_scale = group.key_slots, None, None
        paged_rows = getattr(cache, "paged_rows", None)
        if cache is None:
            k_rows, v_rows = k, v  # the keys are the step's own rows
        elif paged_rows is not None:
            k_rows, v_rows, k_scale, v_scale = paged_rows(layer_idx)
        else:
            k_rows, v_rows = cache.gather(layer_idx, slots)
            slots = torch.arange(slots.numel(), device=slots.device)
        return self._kernel(q, k_rows, v_rows, k_scale, v_scale, group.token_rows,
                            group.q_offsets, group.q_starts, slots, group.key_offsets,
                            group.k_starts, group.q_index.shape[1], group.window, scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
                k_start: int, window: int | None, scale: float) -> torch.Tensor:
        dev, n, m = q.device, q.shape[0], k.shape[0]
        return self._kernel(q, k, v, None, None, torch.arange(n, device=dev),
                            torch.tensor([0, n], device=dev), torch.tensor([q_start], device=dev),
                            torch.arange(m, device=dev), torch.tensor([0, m], device=dev),
                            torch.tensor([k_start], device=dev), n, window, scale)


# Names only, so choosing a backend never touches a device.
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "auto": AutoBackend, "reference": ReferenceBackend, "sdpa": SdpaBackend, "torch": TorchBackend,
    "triton": TritonBackend,
}


def get_attention_backend(name: str, kv_cache: object = None) -> AttentionBackend:
    """The backend of option `attention_backend` ("auto" | "reference" | "sdpa" | "torch" |
    "triton"), chosen once: "auto" over a CUDA cache with triton installed is the Triton
    backend; over a cache whose fp32 rows the native CPU kernels can read in place
    (`kv_cache.native_rows`) it is the native decode backend."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention_backend {name!r}; choose one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    device = getattr(kv_cache, "device", None)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if name == "triton" or (name == "auto" and on_gpu and triton_available()):
        check_triton_backend(on_gpu)
        return TritonBackend()
    native_rows = getattr(kv_cache, "native_rows", None)
    if name == "auto" and native_rows is not None and native_rows(0) is not None \
            and native_cpu.available():
        return NativeCpuBackend()
    return ATTENTION_BACKENDS[name]()


def check_attention_backend(name: str, device: str | torch.device) -> None:
    """ConfigError unless backend `name` can run on `device` (cheap: for callers that check
    before loading a model; `get_attention_backend` checks again when it builds one)."""
    if name == "triton":
        check_triton_backend(torch.device(device).type == "cuda")


def check_triton_backend(on_gpu: bool) -> None:
    """ConfigError unless the Triton backend can run here."""
    if not triton_available():
        raise ConfigError("attention_backend 'triton' needs the triton package "
                          "(pip install triton); use attention_backend 'auto'")
    if not on_gpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ConfigError("attention_backend 'triton' runs on a GPU (--device cuda); on the "
                          "CPU use 'auto' (or set TRITON_INTERPRET=1 to run the kernels "
                          "through Triton's slow interpreter, as the tests do)")


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
        layout = ctx.layout(ctx.sliding_window or self.sliding_window)
        cache, backend = ctx.kv_cache, ctx.attention_backend or _AUTO
        if cache is not None:
            cache.write_slots(self.layer_idx, layout.slot_mapping, k, v)  # type: ignore[arg-type]
        first = layout.groups[0]
        if first.whole_batch:
            return backend.attend(self.layer_idx, q, k, v, cache, first, self.scale)
        out = torch.empty_like(q)
        for group in layout.groups:  # decoding sequences, then prefill chunks
            out[group.token_rows] = backend.attend(self.layer_idx, q, k, v, cache, group,
                                                   self.scale)
        return out
