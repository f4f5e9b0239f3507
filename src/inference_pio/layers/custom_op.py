"""CustomOp: a layer op with a plain-torch reference and faster implementations, one of which
is chosen for the whole model once, when it is built (vLLM's CustomOp idea), so no layer asks
at every call whether a kernel applies.

- `forward_native`: plain torch, any device and dtype; the reference every kernel is tested
  against, and what runs when nothing faster applies.
- `forward_cpu`: the native CPU kernels (fp32 activations, kernels built); `choose_impl` picks
  it only when they apply.
- `forward_cuda`: the GPU path in torch ops; the reference until a GPU kernel replaces it.
- `forward_triton`: Triton kernels (`kernels/triton_*.py`); `forward_cuda` where an op has
  none. `choose_impl` picks it on a GPU when triton imports; on CPU tensors it runs only under
  Triton's interpreter (`TRITON_INTERPRET=1`, how CI tests the kernels).

`select_ops(model, impl)` sets every op of a model; `build_model` calls it with
`choose_impl(device, dtype)`. A module built directly (tests) starts on "native"."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import nn

from inference_pio.kernels import cpu as native_cpu

IMPLS = ("native", "cpu", "cuda", "triton")


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

    def forward_triton(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_cuda(*args, **kwargs)

    def select(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"unknown op implementation {impl!r}; choose one of "
                             f"{', '.join(IMPLS)}")
        if impl == "triton" and not triton_available():
            raise ValueError("op implementation 'triton' needs the triton package "
                             "(pip install triton); use 'cuda' or 'native'")
        self.impl = impl
        self._forward = getattr(self, f"forward_{impl}")


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (the GPU machine has it; PyPI has it for the CPU interpreter)."""
    return importlib.util.find_spec("triton") is not None


def choose_impl(device: str | torch.device, dtype: torch.dtype) -> str:
    """"triton" on a GPU when triton is installed, else "cuda"; "cpu" for fp32 activations on
    the CPU with the native kernels built; else "native"."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton" if triton_available() else "cuda"
    if device.type == "cpu" and dtype == torch.float32 and native_cpu.available():
        return "cpu"
    return "native"


def select_ops(model: nn.Module, impl: str) -> str:
    """Point every CustomOp of `model` at `impl`; returns it."""
    for module in model.modules():
        if isinstance(module, CustomOp):
            module.select(impl)
    return impl
