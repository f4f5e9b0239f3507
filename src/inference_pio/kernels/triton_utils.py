"""What the Triton kernels share: the matmul of a tile, in the precision the reference has."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import, as triton reads it (the kernels are decorated then); not per launch.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """Keyword constexprs for `tile_dot` with inputs of `dtype`:
    PRECISION: true fp32 ("ieee") for fp32 inputs, which would otherwise round to tf32 on a
    GPU and miss the fp32 reference; the native type for 16-bit ones.
    UPCAST: multiply in fp32. Triton's interpreter keeps bf16 as raw int16 bits and its dot
    multiplies those as integers, so on CPU tensors bf16 tiles go up to fp32 first: exact (a
    bf16 product fits fp32), so the result is what the GPU's bf16 dot with fp32 accumulation
    gives."""
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRETED and dtype == torch.bfloat16}


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32 [M, N]."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out
