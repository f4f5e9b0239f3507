"""Quantization methods: one object per weight format, behind one small interface.

A method describes the tensors ("parts") that store a [rows, cols] weight, turns a float weight
into those parts (`quantize`), back into float (`dequantize`, the oracle), and multiplies
activations by the stored weight (`apply`). Modules that hold quantized weights
(`QuantLinear`, `QuantExperts`) call `create_weights` to allocate the parts and `apply` in
forward; the model file never branches on the format. Faster kernels override `apply` (and
repack in `process_weights_after_loading`) behind the same interface."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.quantization import formats

PartSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class QuantMethod(ABC):
    name: str

    @abstractmethod
    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        """Name -> (shape, dtype) of each stored tensor of one [rows, cols] weight."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float weight [..., rows, cols] -> parts (leading dims kept)."""

    @abstractmethod
    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        """Parts -> float32 weight [..., rows, cols]."""

    def apply(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int) -> torch.Tensor:
        """x [T, cols] -> x @ W^T [T, rows], in x's dtype. Reference: dequantize, then matmul,
        a block of rows at a time (a whole lm_head in fp32 would be a 1.2 GB temporary)."""
        return chunked_linear(x, parts, lambda p: self.dequantize(p, cols).to(x.dtype))

    def apply_cpu(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int
                  ) -> torch.Tensor:
        """`apply` through the native CPU kernels where they help (a module's "cpu"
        implementation: chosen once, when the model is built; shape limits stay per call)."""
        return self.apply(parts, x, cols)

    def create_weights(self, module: nn.Module, rows: int, cols: int,
                       leading: tuple[int, ...] = (), prefix: str = "") -> list[str]:
        """Register the parts as (uninitialised) buffers `{prefix}{part}` of `module`, with
        `leading` extra dims (the expert index); returns the buffer names."""
        names = []
        for part, (shape, dtype) in self.part_specs(rows, cols).items():
            module.register_buffer(prefix + part, torch.empty(*leading, *shape, dtype=dtype))
            names.append(prefix + part)
        return names

    def process_weights_after_loading(self, module: nn.Module) -> None:
        """Hook for kernels that repack weights once loading is done (none here)."""

    def nbytes(self, rows: int, cols: int) -> int:
        return sum(math.prod(shape) * dtype.itemsize
                   for shape, dtype in self.part_specs(rows, cols).values())

    def describe(self) -> str:
        return self.name


CHUNK_ELEMENTS = 4 << 20  # weight elements converted at a time (16 MiB in fp32)


def chunked_linear(x: torch.Tensor, parts: dict[str, torch.Tensor],
                   weight_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """x @ W^T where `weight_of(parts)` materialises W, done over blocks of rows (every part is
    stored row-major with rows first, except fp8's block scales) so the temporary stays small."""
    rows = next(iter(parts.values())).shape[0]
    cols = x.shape[-1]
    step = max(FP8_ROWS, (CHUNK_ELEMENTS // max(cols, 1)) // FP8_ROWS * FP8_ROWS)
    if rows <= step:
        return F.linear(x, weight_of(parts))
    out = x.new_empty(*x.shape[:-1], rows)
    for r in range(0, rows, step):
        out[..., r:r + step] = F.linear(x, weight_of(_row_block(parts, r, step)))
    return out


FP8_ROWS = formats.FP8_BLOCK  # row blocks are multiples of the fp8 scale block


def _row_block(parts: dict[str, torch.Tensor], start: int, step: int) -> dict[str, torch.Tensor]:
    block = {}
    for name, t in parts.items():
        if name == "weight_scale_inv":  # [rows/128, cols/128]
            block[name] = t[start // FP8_ROWS:(start + step) // FP8_ROWS]
        else:
            block[name] = t[start:start + step]
    return block


@dataclass(frozen=True, eq=False)
class FloatMethod(QuantMethod):
    """Weights stored in a float dtype (fp32, bf16, fp16), multiplied in the activation dtype."""

    dtype: torch.dtype

    @property
    def name(self) -> str:  # type: ignore[override]
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        return {"weight": ((rows, cols), self.dtype)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": w.to(self.dtype)}

    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        return parts["weight"].float()

    def apply(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int) -> torch.Tensor:
        w = parts["weight"]
        if w.dtype == x.dtype:
            return F.linear(x, w)
        return chunked_linear(x, parts, lambda p: p["weight"].to(x.dtype))

    def apply_cpu(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int
                  ) -> torch.Tensor:
        # Native: bf16 / fp16 weights widened in registers, fp32 activations, read once per
        # call (a bf16 lm_head decode step: ~33 ms instead of ~230 ms).
        w = parts["weight"]
        tokens = x.numel() // max(cols, 1)
        if x.dtype == torch.float32 and amx_takes(tokens, w):
            return native_cpu.amx_bf16_linear(x, w)
        if (x.dtype == torch.float32 and w.dtype in (torch.bfloat16, torch.float16)
                and tokens <= FLOAT_NATIVE_MAX_TOKENS):
            return native_cpu.float_linear(x, w)
        return self.apply(parts, x, cols)


# Tokens (x rows) up to which FloatMethod uses the native kernel. Measured on 2 Zen 1 cores,
# native over chunked_linear's fp32 GEMM, bf16 2048 x 2048 at T = 1, 4, 16, 64, 256, 512, 1024:
# 7.1, 12.7, 4.5, 2.0, 1.31, 1.15, 1.07 times faster (151936 x 2048 to T = 512: the same); from
# a few hundred tokens both run near the FMA peak (T = 2048: 1.02), where a GEMM on more cores
# or AVX-512 pulls ahead.
FLOAT_NATIVE_MAX_TOKENS = 1024

# Tokens from which bf16 weights go to AMX tiles (`native_cpu.amx_bf16_linear`: activations
# rounded to bf16, exact products, fp32 sums, as vLLM's and llama.cpp's bf16 paths compute) on
# CPUs that have AMX-BF16. Below it the fp32 kernel reads the weight at the same pace; from it
# the fp32 FMAs are the bound (the bf16 lm_head at 16 tokens: benchmarks/README.md, "AMX").
AMX_MIN_TOKENS = 8


def amx_takes(tokens: int, w: torch.Tensor) -> bool:
    """`tokens` rows of fp32 activations on the bf16 weight `w` [N, K] go to AMX tiles."""
    return (tokens >= AMX_MIN_TOKENS and w.dtype == torch.bfloat16 and w.shape[-1] % 32 == 0
            and w.shape[0] % 16 == 0 and native_cpu.amx_bf16_supported())


class VnniPackable:
    """Int4Method / Int8Method: with `vnni_packed`, each qweight holds the same bytes in the
    AVX-512 VNNI kernels' tile order (formats.pack_vnni). `process_weights_after_loading` packs
    a module's resident weights once they are loaded, where its ops run the native kernels of
    the avx512vnni build and the weights come in whole tiles (a permutation within each 16-row
    tile, in place: no memory added), and gives the module the packed variant of its method;
    the plain-torch paths unpack (`_plain_parts`), so they stay the oracle."""

    vnni_packed: bool

    def _stored_parts(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Freshly quantized parts -> as this method stores them."""
        if self.vnni_packed:
            parts["qweight"] = formats.pack_vnni(parts["qweight"])
        return parts

    def _plain_parts(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored parts -> the plain layout of formats.py."""
        if self.vnni_packed:
            return {**parts, "qweight": formats.unpack_vnni(parts["qweight"])}
        return parts

    def process_weights_after_loading(self, module: nn.Module) -> None:
        qweights = [b for name, b in module.named_buffers(recurse=False)
                    if name.endswith("qweight")]
        if (self.vnni_packed or getattr(module, "impl", None) != "cpu" or not qweights
                or native_cpu.isa() != "avx512vnni"
                or any(q.shape[-2] % 16 or q.shape[-1] % 32 for q in qweights)):
            return
        for q in qweights:
            native_cpu.vnni_pack_(q)  # formats.pack_vnni's layout, in place, ~30x its speed
        module.method = dataclasses.replace(self, vnni_packed=True)  # type: ignore[type-var]


@dataclass(frozen=True, eq=False)
class Int8Method(VnniPackable, QuantMethod):
    """Symmetric int8, one float32 scale per output channel; `vnni_packed`: VnniPackable."""

    vnni_packed: bool = False
    name = "int8"

    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        return {"qweight": ((rows, cols), torch.int8), "scales": ((rows,), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._stored_parts(formats.quantize_int8(w))

    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        return formats.dequantize_int8(self._plain_parts(parts), cols)

    def apply(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int) -> torch.Tensor:
        # scales factor out of the dot product: (x @ q^T) * scale, no dequantized copy of W.
        y = F.linear(x, self._plain_parts(parts)["qweight"].to(x.dtype))
        return y * parts["scales"].to(x.dtype)

    def describe(self) -> str:
        return "int8 (VNNI tiles)" if self.vnni_packed else "int8"

    def apply_cpu(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int
                  ) -> torch.Tensor:
        # Native: int8 x int8 dot products; it loses to the plain path on big prefills.
        if x.numel() // cols <= 128:
            return native_cpu.int8_linear(x, parts["qweight"], parts["scales"],
                                          packed=self.vnni_packed)
        return self.apply(parts, x, cols)


@dataclass(frozen=True, eq=False)
class Int4Method(VnniPackable, QuantMethod):
    """Symmetric int4 in groups of `group_size` columns, fp16 scales, two codes per byte;
    `vnni_packed`: VnniPackable."""

    group_size: int = 64
    vnni_packed: bool = False
    name = "int4"

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"int4 group_size must be 32, 64 or 128, got {self.group_size}")

    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        cols_p = formats.padded_cols(cols, self.group_size)
        return {"qweight": ((rows, cols_p // 2), torch.uint8),
                "scales": ((rows, cols_p // self.group_size), torch.float16)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._stored_parts(formats.quantize_int4(w, self.group_size))

    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        return formats.dequantize_int4(self._plain_parts(parts), cols)

    def apply_cpu(self, parts: dict[str, torch.Tensor], x: torch.Tensor, cols: int
                  ) -> torch.Tensor:
        """The native kernel (AVX2, or AVX-512 VNNI where built; int8-quantized activations)."""
        return native_cpu.int4_linear(x, parts["qweight"], parts["scales"], cols,
                                      packed=self.vnni_packed)

    def describe(self) -> str:
        return f"int4 (group {self.group_size}{', VNNI tiles' if self.vnni_packed else ''})"


@dataclass(frozen=True, eq=False)
class NF4Method(QuantMethod):
    """bitsandbytes NormalFloat-4: code book values times a float32 absmax per block."""

    block_size: int = 64
    name = "nf4"

    def __post_init__(self) -> None:
        if self.block_size not in (32, 64, 128):
            raise ValueError(f"nf4 block size must be 32, 64 or 128, got {self.block_size}")

    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        cols_p = formats.padded_cols(cols, self.block_size)
        return {"qweight": ((rows, cols_p // 2), torch.uint8),
                "absmax": ((rows, cols_p // self.block_size), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return formats.quantize_nf4(w, self.block_size)

    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        return formats.dequantize_nf4(parts, cols)

    def describe(self) -> str:
        return f"nf4 (block {self.block_size})"


@dataclass(frozen=True, eq=False)
class FP8Method(QuantMethod):
    """float8_e4m3fn weights with a float32 scale per block x block tile (Qwen's FP8 release)."""

    block_size: int = formats.FP8_BLOCK
    name = "fp8"

    def part_specs(self, rows: int, cols: int) -> PartSpecs:
        b = self.block_size
        return {"weight": ((rows, cols), torch.float8_e4m3fn),
                "weight_scale_inv": ((-(-rows // b), -(-cols // b)), torch.float32)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return formats.quantize_fp8(w, self.block_size)

    def dequantize(self, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
        return formats.dequantize_fp8(parts, cols, self.block_size)

    def describe(self) -> str:
        return f"fp8 (e4m3, {self.block_size}x{self.block_size} blocks)"
