"""Causal GQA attention over a flat batch of sequences, reading and writing the KV cache
through the current ForwardContext. Softmax in fp32; optional sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.forward_context import get_forward_context


def causal_mask(
    num_new: int, num_cached: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean [num_new, num_cached + num_new]: True where query i may read key j."""
    q_pos = torch.arange(num_cached, num_cached + num_new, device=device)[:, None]
    k_pos = torch.arange(num_cached + num_new, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The oracle: q [n, H, Hd], k/v [m, Hkv, Hd], mask [n, m] -> [n, H, Hd]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("hnm,mhd->nhd", probs, v)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Same contract as `reference_attention` through torch's fused SDPA (mask None = no mask)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


class Attention(nn.Module):
    """Stores this step's K/V, then attends every sequence's new queries to its whole cache."""

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
        window = ctx.sliding_window or self.sliding_window
        out = torch.empty_like(q)
        start = 0
        for i, (num_new, num_cached) in enumerate(zip(ctx.num_new_tokens, ctx.num_cached_tokens)):
            end = start + num_new
            k_i, v_i = k[start:end], v[start:end]
            if ctx.kv_cache is not None:
                ctx.kv_cache.write(self.layer_idx, i, num_cached, k_i, v_i)
                if num_cached:
                    k_i, v_i = ctx.kv_cache.read(self.layer_idx, i, num_cached + num_new)
            needs_mask = num_new > 1 or (window is not None and num_cached + 1 > window)
            mask = causal_mask(num_new, num_cached, window, q.device) if needs_mask else None
            out[start:end] = sdpa_attention(q[start:end], k_i, v_i, mask, self.scale)
            start = end
        return out
