"""`QuantConfig`: which weight format, for which modules; parsed from a user's option or from a
checkpoint's `quantization_config`, and written back into the config.json of `pio quantize`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from inference_pio.layers.quantization.methods import (
    FloatMethod,
    FP8Method,
    Int4Method,
    Int8Method,
    NF4Method,
    QuantMethod,
)

QUANTIZATIONS = ("fp32", "bf16", "fp16", "int8", "int4", "nf4", "fp8")
PIO_QUANT_METHOD = "inference_pio"  # quant_method of checkpoints written by `pio quantize`
DEFAULT_GROUP_SIZE = {"int4": 64, "nf4": 64}
# Formats whose lm_head is quantized too unless asked otherwise: those with native kernels that
# read the quantized head faster than bf16 (int4: 6-8 ms a token instead of ~30 ms on a 2-core
# Zen 4), for a small share of the body's error (bench_quant_fidelity.py: mean KL to fp32 0.092
# -> 0.101 for int4 g64, 0.00148 -> 0.00153 for int8; benchmarks/README.md).
QUANTIZED_HEAD_BY_DEFAULT = ("int4", "int8")
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QuantizationError(ValueError):
    """An unknown format, a bad option, or a checkpoint whose quantization we cannot load."""


@dataclass(frozen=True)
class QuantConfig:
    """`method` applies to attention projections, experts and dense MLPs; routers and norms
    stay in the activation dtype; embeddings (and the lm_head unless `quantize_lm_head`) are
    stored in `embedding_dtype`: by default the format's own dtype for fp32/fp16/bf16, and
    bf16 (the checkpoint's) for the quantized formats. `quantize_lm_head=None` (the default)
    resolves to True for QUANTIZED_HEAD_BY_DEFAULT (int4, int8), else False."""

    method: str
    group_size: int | None = None  # int4 group / nf4 block; None: the format's default
    quantize_lm_head: bool | None = None
    embedding_dtype: str = ""  # "": the format's own for fp32/fp16/bf16, else bf16
    # whether quantize_lm_head was given (not the format's default): a checkpoint that is
    # already quantized keeps its own head unless one was asked for
    head_explicit: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise QuantizationError(
                f"unknown quantization {self.method!r}; choose one of {', '.join(QUANTIZATIONS)}")
        object.__setattr__(self, "head_explicit", self.quantize_lm_head is not None)
        if self.quantize_lm_head is None:
            object.__setattr__(self, "quantize_lm_head", self.method in QUANTIZED_HEAD_BY_DEFAULT)
        if not self.embedding_dtype:
            object.__setattr__(self, "embedding_dtype",
                               self.method if self.method in _FLOAT else "bf16")
        if self.group_size is not None and self.method not in DEFAULT_GROUP_SIZE:
            raise QuantizationError(
                f"group_size applies to int4 and nf4, not to {self.method}; drop it")
        if self.embedding_dtype not in _FLOAT:
            raise QuantizationError(f"embedding_dtype must be one of {', '.join(_FLOAT)}, got "
                                    f"{self.embedding_dtype!r}")
        self.weight_method()  # validates the group size

    def weight_method(self) -> QuantMethod:
        group = self.group_size if self.group_size is not None else DEFAULT_GROUP_SIZE.get(
            self.method)
        try:
            if self.method in _FLOAT:
                return FloatMethod(_FLOAT[self.method])
            if self.method == "int8":
                return Int8Method()
            if self.method == "int4":
                return Int4Method(group)
            if self.method == "nf4":
                return NF4Method(group)
            return FP8Method()
        except ValueError as e:
            raise QuantizationError(str(e)) from None

    def lm_head_method(self) -> QuantMethod:
        return self.weight_method() if self.quantize_lm_head else FloatMethod(
            _FLOAT[self.embedding_dtype])

    @property
    def embedding_torch_dtype(self) -> torch.dtype:
        return _FLOAT[self.embedding_dtype]

    def describe(self) -> str:
        head = "quantized" if self.quantize_lm_head else f"in {self.embedding_dtype}"
        return f"{self.weight_method().describe()}, lm_head {head}"

    # ---- config.json ------------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The quantization_config `pio quantize` writes."""
        return {"quant_method": PIO_QUANT_METHOD, "format": self.method,
                "group_size": (self.group_size if self.group_size is not None
                               else DEFAULT_GROUP_SIZE.get(self.method)),
                "quantize_lm_head": self.quantize_lm_head,
                "embedding_dtype": self.embedding_dtype}

    @classmethod
    def from_hf(cls, qc: dict[str, Any], source: str = "config.json") -> QuantConfig:
        """A checkpoint's quantization_config: ours, or Qwen's block FP8."""
        method = str(qc.get("quant_method", "")).lower()
        if method == PIO_QUANT_METHOD:
            try:
                return cls(method=str(qc.get("format")), group_size=qc.get("group_size") if
                           qc.get("format") in DEFAULT_GROUP_SIZE else None,
                           quantize_lm_head=bool(qc.get("quantize_lm_head", False)),
                           embedding_dtype=str(qc.get("embedding_dtype", "bf16")))
            except QuantizationError as e:
                raise QuantizationError(f"{source}: quantization_config: {e}") from None
        if method == "fp8":
            block = qc.get("weight_block_size")
            if block not in ([128, 128], (128, 128)):
                raise QuantizationError(
                    f"{source}: FP8 with weight_block_size {block} is not supported; "
                    "inference_pio loads Qwen's block FP8 (weight_block_size [128, 128])")
            fmt = str(qc.get("fmt", "e4m3")).lower()
            if fmt != "e4m3":
                raise QuantizationError(f"{source}: FP8 format {fmt!r} is not supported (e4m3 is)")
            return cls(method="fp8")
        raise QuantizationError(
            f"{source} declares quant_method {method or '(none)'!r}, which inference_pio cannot "
            "load; use the bfloat16 checkpoint, Qwen's FP8 checkpoint, or one written by "
            "`pio quantize`")


def parse_quantization(value: str | QuantConfig | None, group_size: int | None = None,
                       quantize_lm_head: bool | None = None) -> QuantConfig | None:
    """A user's `quantization=` option ("int4", "nf4", ... or None) as a QuantConfig."""
    if value is None or isinstance(value, QuantConfig):
        return value
    return QuantConfig(method=str(value).lower(), group_size=group_size,
                       quantize_lm_head=quantize_lm_head)
