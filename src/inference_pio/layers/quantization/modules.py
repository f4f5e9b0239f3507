"""Modules that hold weights through a QuantMethod, and `quantize_modules`, which swaps them in
for a model's nn.Linear / Experts / nn.Embedding modules (the model file stays plain torch).

Checkpoint layout: a QuantLinear at `p` stores `p.{part}` (e.g. `q_proj.qweight`,
`q_proj.scales`); experts keep the checkpoint's per-expert names,
`mlp.experts.{e}.{gate_proj,up_proj,down_proj}.{part}`, held stacked as [E, ...] buffers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.custom_op import CustomOp
from inference_pio.layers.moe import Experts
from inference_pio.layers.quantization import methods
from inference_pio.layers.quantization.config import QuantConfig
from inference_pio.layers.quantization.methods import (
    FloatMethod,
    Int4Method,
    Int8Method,
    QuantMethod,
)

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
ExpertParts = dict[str, dict[str, torch.Tensor]]  # proj -> part -> tensor of one expert


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                         f"{list(target.shape)}: config.json and the weights disagree")
    target.copy_(tensor)


class QuantLinear(CustomOp):
    """y = x W^T (+ b) with W stored by `method` (`method.apply`, or `apply_cpu` with the
    "cpu" implementation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 method: QuantMethod) -> None:
        super().__init__()
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.part_names = method.create_weights(self, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def parts(self) -> dict[str, torch.Tensor]:
        buffers = self._buffers  # parts are buffers (create_weights): no Module.__getattr__
        return {name: buffers[name] for name in self.part_names}  # type: ignore[misc]

    def load_float_weight(self, suffix: str, tensor: torch.Tensor) -> None:
        """Quantize a checkpoint's float `weight` into the parts."""
        if suffix != "weight":
            raise KeyError(suffix)
        if tuple(tensor.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {list(tensor.shape)}, expected "
                             f"{[self.out_features, self.in_features]}")
        for name, value in self.method.quantize(tensor).items():
            getattr(self, name).copy_(value)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self.parts(), x, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply_cpu(self.parts(), x, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.method.describe()}"


class ExpertSource(Protocol):
    """Where an experts module gets each expert's parts: resident buffers or a paging cache."""

    def fetch(self, experts: Sequence[int]) -> Iterator[tuple[int, ExpertParts]]:
        """Yield (expert, parts) for each id in `experts`, in that order."""
        ...


class _Resident:
    def __init__(self, module: QuantExperts) -> None:
        self.module = module

    def fetch(self, experts: Sequence[int]) -> Iterator[tuple[int, ExpertParts]]:
        for e in experts:
            yield e, self.module.resident_parts(e)


class QuantExperts(CustomOp):
    """Drop-in for `Experts` with weights stored by `method`. With `offloaded`, no expert
    weights are allocated: `source` (set by the loader) pages them in. The "cpu"
    implementation runs int4 / int8 and resident bf16 / fp16 experts through the fused native
    MoE (all routed experts in one call) and other formats through `method.apply_cpu`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 method: QuantMethod, offloaded: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size, self.method, self.offloaded = intermediate_size, method, offloaded
        self.shapes = {"gate_proj": (intermediate_size, hidden_size),
                       "up_proj": (intermediate_size, hidden_size),
                       "down_proj": (hidden_size, intermediate_size)}
        self.part_names = tuple(method.part_specs(1, 1))
        if not offloaded:
            for proj, (rows, cols) in self.shapes.items():
                method.create_weights(self, rows, cols, (num_experts,), prefix=f"{proj}__")
        self.source: ExpertSource | None = None if offloaded else _Resident(self)

    def resident_parts(self, expert: int) -> ExpertParts:
        return {proj: {part: getattr(self, f"{proj}__{part}")[expert] for part in self.part_names}
                for proj in EXPERT_PROJS}

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint name -> the view it fills: `{prefix}.{e}.{proj}.{part}`."""
        if self.offloaded:
            return {}
        return {f"{prefix}.{e}.{proj}.{part}": t
                for e in range(self.num_experts)
                for proj, parts in self.resident_parts(e).items() for part, t in parts.items()}

    def checkpoint_specs(self, prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every per-expert tensor of this module's checkpoint layout, resident or not."""
        return {f"{prefix}.{e}.{proj}.{part}": spec
                for e in range(self.num_experts)
                for proj, (rows, cols) in self.shapes.items()
                for part, spec in self.method.part_specs(rows, cols).items()}

    def load_float_weight(self, suffix: str, tensor: torch.Tensor) -> None:
        """Quantize checkpoint tensor `{e}.{proj}.weight` into expert e's parts."""
        expert, proj, part = suffix.split(".")
        if part != "weight" or proj not in self.shapes or self.offloaded:
            raise KeyError(suffix)
        e = int(expert)
        if not 0 <= e < self.num_experts:
            raise KeyError(suffix)
        if tuple(tensor.shape) != self.shapes[proj]:
            raise ValueError(f"{suffix} has shape {list(tensor.shape)}, expected "
                             f"{list(self.shapes[proj])}")
        for part, value in self.method.quantize(tensor).items():
            getattr(self, f"{proj}__{part}")[e].copy_(value)

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                       ) -> torch.Tensor:
        return self._per_expert(x, weights, ids, self.method.apply)

    def forward_cpu(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                    ) -> torch.Tensor:
        if self._float_fused():
            b = self._buffers
            return native_cpu.float_moe(x, *(b[f"{p}__weight"] for p in EXPERT_PROJS),
                                        weights, ids, amx_min_tokens=self._amx_min_tokens())
        if not isinstance(self.method, (Int4Method, Int8Method)):
            return self._per_expert(x, weights, ids, self.method.apply_cpu)
        self._check_source()
        if isinstance(self.source, _Resident):
            return self._resident_moe(x, weights, ids)
        return self._paged_moe(x, weights, ids)

    def _float_fused(self) -> bool:
        """Resident bf16 / fp16 experts: the fused native call (fp32 activations)."""
        return (not self.offloaded and isinstance(self.method, FloatMethod)
                and self.method.dtype in (torch.bfloat16, torch.float16))

    def _amx_min_tokens(self) -> int:
        """The fused bf16 MoE's AMX threshold (methods.AMX_MIN_TOKENS; 0: off): bf16 experts
        whose sizes fit the tiles, on a CPU with AMX-BF16."""
        fits = (isinstance(self.method, FloatMethod) and self.method.dtype == torch.bfloat16
                and self.hidden_size % 32 == 0
                and self.intermediate_size % 32 == 0)
        return methods.AMX_MIN_TOKENS if fits and native_cpu.amx_bf16_supported() else 0

    def _check_source(self) -> None:
        if self.source is None:
            raise RuntimeError("offloaded experts have no source: load the model through "
                               "inference_pio.models.loader.load_model")

    def _per_expert(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    apply: Callable[..., torch.Tensor]) -> torch.Tensor:
        self._check_source()
        assert self.source is not None
        out = torch.zeros_like(x)
        hidden, inter = self.hidden_size, self.intermediate_size
        for e, p in self.source.fetch(ids.unique().tolist()):
            token_idx, slot = torch.where(ids == e)
            xe = x[token_idx]
            h = F.silu(apply(p["gate_proj"], xe, hidden)) * apply(p["up_proj"], xe, hidden)
            y = apply(p["down_proj"], h, inter)
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        return out

    def _resident_moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                      ) -> torch.Tensor:
        b = self._buffers
        stacked = [(b[f"{p}__qweight"], b[f"{p}__scales"]) for p in EXPERT_PROJS]
        assert isinstance(self.method, (Int4Method, Int8Method))
        op = native_cpu.int4_moe if isinstance(self.method, Int4Method) else native_cpu.int8_moe
        return op(x, *stacked, weights, ids, packed=self.method.vnni_packed)

    def _paged_moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                   ) -> torch.Tensor:
        """Experts one at a time as the cache yields them (its parts live only until the next
        wave), summed per slot in the same order as the stacked call."""
        slots = torch.zeros(x.shape[0], ids.shape[1], x.shape[1])
        assert self.source is not None
        for e, p in self.source.fetch(ids.unique().tolist()):
            slots += native_cpu.moe_from_list(self.method.name, x, [p], weights,
                                              torch.where(ids == e, 0, -1), per_slot=True)
        return native_cpu.slot_sum(slots, weights).to(x.dtype)

    def extra_repr(self) -> str:
        where = "offloaded" if self.offloaded else "resident"
        return (f"{self.num_experts} experts, {self.hidden_size} <-> {self.intermediate_size}, "
                f"{self.method.describe()}, {where}")


class CompactEmbedding(nn.Module):
    """An embedding table stored in a compact float dtype, looked up into `out_dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)


def _same_as_activations(method: QuantMethod, act_dtype: torch.dtype) -> bool:
    return isinstance(method, FloatMethod) and method.dtype == act_dtype


def quantize_modules(model: nn.Module, qconfig: QuantConfig, act_dtype: torch.dtype,
                     offload_experts: bool = False) -> nn.Module:
    """Swap a (meta-device) model's modules for quantized ones, in place: every nn.Linear but
    the MoE routers (`mlp.gate`) and the lm_head (unless qconfig.quantize_lm_head), every
    Experts, and the embedding (stored in qconfig.embedding_dtype)."""
    method = qconfig.weight_method()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = _replacement(full, child, qconfig, method, act_dtype, offload_experts)
            if new is not None:
                setattr(parent, child_name, new)
    return model


def _replacement(name: str, module: nn.Module, qconfig: QuantConfig, method: QuantMethod,
                 act_dtype: torch.dtype, offload_experts: bool) -> nn.Module | None:
    if isinstance(module, Experts):
        return QuantExperts(module.num_experts, module.gate_up_proj.shape[-1],
                            module.intermediate_size, method, offload_experts)
    if isinstance(module, nn.Embedding):
        dtype = qconfig.embedding_torch_dtype
        return None if dtype == act_dtype else CompactEmbedding(
            module.num_embeddings, module.embedding_dim, dtype, act_dtype)
    if not isinstance(module, nn.Linear) or name.endswith("mlp.gate"):
        return None
    m = qconfig.lm_head_method() if name == "lm_head" else method
    if _same_as_activations(m, act_dtype):
        return None
    return QuantLinear(module.in_features, module.out_features, module.bias is not None, m)
