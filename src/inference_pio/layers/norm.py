"""RMSNorm as Qwen3 defines it: variance in fp32, cast back, then scale (no `1 + w`).

`forward(x, residual)` is the fused "add, then norm" of a pre-norm decoder: it returns
(norm(x + residual), x + residual). With the "cpu" implementation (fp32 activations) both forms
run as one native pass (in place on x and residual when fused), with "triton" as one Triton
launch; `forward_native` is plain torch, the reference."""

from __future__ import annotations

import torch
from torch import nn

from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(x + residual), x + residual)."""
        if residual is None:
            return self.reference(x)
        h = x + residual
        return self.reference(h), h

    def forward_cpu(self, x: torch.Tensor, residual: torch.Tensor | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The same in one native pass; with `residual`, in place on x's and residual's
        storage (contiguous copies when they are not)."""
        if residual is None:
            return native_cpu.rms_norm(x, self.weight, self.eps)
        return native_cpu.add_rms_norm_(x.contiguous(), residual.contiguous(), self.weight,
                                        self.eps)

    def forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The same in one Triton launch (`kernels.triton_ops.rms_norm`; new tensors)."""
        from inference_pio.kernels.triton_ops import rms_norm  # triton is optional
        return rms_norm(x, self.weight, self.eps, residual)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
