"""RMSNorm as Qwen3 defines it: variance in fp32, cast back, then scale (no `1 + w`).

`forward(x, residual)` is the fused "add, then norm" of a pre-norm decoder: it returns
(norm(x + residual), x + residual). On the CPU with fp32 activations both forms run as one
native pass (in place on x and residual when fused); elsewhere as plain torch, the reference."""

from __future__ import annotations

import torch
from torch import nn

from inference_pio.kernels import cpu as native_cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(x + residual), x + residual), which may reuse x's
        and residual's storage."""
        if residual is None:
            if native_cpu.fused_ok(x) and self.weight.dtype == torch.float32:
                return native_cpu.rms_norm(x, self.weight, self.eps)
            return self.reference(x)
        if (native_cpu.fused_ok(x) and residual.dtype == x.dtype and x.is_contiguous()
                and residual.is_contiguous() and self.weight.dtype == torch.float32):
            return native_cpu.add_rms_norm_(x, residual, self.weight, self.eps)
        h = x + residual
        return self.reference(h), h

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
