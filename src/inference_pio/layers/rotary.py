"""Rotary position embedding (rotate-half / NeoX layout) with optional YaRN scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from inference_pio.config import RopeScaling
from inference_pio.forward_context import get_forward_context
from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.custom_op import CustomOp
from inference_pio.layers.norm import RMSNorm


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32 on the CPU (also inside a meta-device build,
    where meta arithmetic would import torch._dynamo); YaRN blends interpolated and
    extrapolated ones."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    pos_freqs = theta**exponents
    inv_freq = 1.0 / pos_freqs
    if scaling is None:
        return inv_freq
    low, high = _yarn_correction_range(scaling, head_dim, theta)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for high-frequency pairs (kept), 0 for low (interpolated)
    interpolated = 1.0 / (scaling.factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def _yarn_correction_range(scaling: RopeScaling, dim: int, base: float) -> tuple[float, float]:
    def correction_dim(num_rotations: float) -> float:
        max_pos = scaling.original_max_position_embeddings
        return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


class RotaryEmbedding(nn.Module):
    """Holds a cos/sin table in fp32, grown on demand. `forward(positions, dtype)` returns
    cos/sin [T, Hd] cast to the activation dtype, as transformers does."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.mscale = scaling.mscale if scaling is not None else 1.0
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)

    def reset_buffers(self) -> None:
        """Recompute inv_freq (needed after `Module.to_empty`)."""
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)
        self._cos = torch.empty(0)

    def _table(self, needed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < needed or self._cos.device != device:
            size = max(needed, 2 * self._cos.shape[0], 256)
            pos = torch.arange(size, device=device, dtype=torch.int64).float()
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]  # [P, Hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, Hd]
            self._cos, self._sin = emb.cos() * self.mscale, emb.sin() * self.mscale
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                num_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Hd] at `positions`, all below `num_positions` (default: the forward
        context's, known on the host, so no device sync)."""
        if num_positions is None:
            num_positions = get_forward_context().num_positions
        cos_t, sin_t = self._table(num_positions, positions.device)
        return cos_t[positions].to(dtype), sin_t[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Hd]; cos/sin [T, Hd]. Rotate-half: pair (i, i + Hd/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class QKNormRope(CustomOp):
    """Qwen3's per-head RMSNorm of q [T, Hq, Hd] and k [T, Hk, Hd], then RoPE:
    `apply_rotary(norm(x))`, or with the "cpu" implementation one native pass in place (fp32;
    the norms' weights are the attention module's, passed in), with "triton" one launch each
    for q and k."""

    def forward_native(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                       cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return (apply_rotary(q_norm.forward_native(q), cos, sin),
                apply_rotary(k_norm.forward_native(k), cos, sin))

    def forward_cpu(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                    cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = q.contiguous(), k.contiguous()
        native_cpu.qk_norm_rope_(q, k, q_norm.weight, k_norm.weight, cos, sin, q_norm.eps)
        return q, k

    def forward_triton(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm,
                       k_norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Triton launch for q and one for k (`kernels.triton_ops.qk_norm_rope`); head
        sizes that are not a power of two, or norm weights in another dtype than the
        activations, take the torch path."""
        head_dim = q.shape[-1]
        if head_dim & (head_dim - 1) or not (q.dtype == k.dtype == q_norm.weight.dtype
                                              == k_norm.weight.dtype == cos.dtype):
            return self.forward_cuda(q, k, q_norm, k_norm, cos, sin)
        from inference_pio.kernels.triton_ops import qk_norm_rope  # triton is optional
        return qk_norm_rope(q, k, q_norm.weight, k_norm.weight, cos, sin, q_norm.eps)

