"""CustomOp: a layer op with a plain-torch reference and faster implementations, one of which
is chosen for the whole model once, when it is built (vLLM's CustomOp idea), so no layer asks
at every call whether a kernel applies.

- `forward_native`: plain torch, any device and dtype; the reference every kernel is tested
  against, and what runs when nothing faster applies.
- `forward_cpu`: the native CPU kernels (fp32 activations, kernels built); `choose_impl` picks
  it only when they apply.
- `forward_cuda`: the GPU path; the reference until a GPU kernel replaces it.

`select_ops(model, impl)` sets every op of a model; `build_model` calls it with
`choose_impl(device, dtype)`. A module built directly (tests) starts on "native"."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inference_pio.kernels import cpu as native_cpu

IMPLS = ("native", "cpu", "cuda")


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.impl = "native"
        self._forward = self.forward_native

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_cpu(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def forward_cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_native(*args, **kwargs)

    def select(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"unknown op implementation {impl!r}; choose one of "
                             f"{', '.join(IMPLS)}")
        self.impl = impl
        self._forward = getattr(self, f"forward_{impl}")


def choose_impl(device: str | torch.device, dtype: torch.dtype) -> str:
    """"cuda" on a GPU; "cpu" for fp32 activations on the CPU with the native kernels built;
    else "native"."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu" and dtype == torch.float32 and native_cpu.available():
        return "cpu"
    return "native"


def select_ops(model: nn.Module, impl: str) -> str:
    """Point every CustomOp of `model` at `impl`; returns it."""
    for module in model.modules():
        if isinstance(module, CustomOp):
            module.select(impl)
    return impl
