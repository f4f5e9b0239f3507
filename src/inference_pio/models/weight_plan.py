"""Weight memory planning: bytes of a model in a storage layout, split into what stays resident
and the routed experts (the bulk), and whether they fit a weight-memory budget or must be
paged from disk. Used at load time and by `pio info`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from inference_pio.config import ModelConfig
from inference_pio.layers.quantization import QuantConfig
from inference_pio.utils.memory import format_bytes

EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


class WeightBudgetError(ValueError):
    """The weights cannot fit the budget, even with every expert paged from disk."""


@dataclass(frozen=True)
class WeightPlan:
    layout: str  # e.g. "int4 (group 64), lm_head in bf16"
    resident_bytes: int  # attention, routers, norms, embedding, lm_head, dense MLPs
    expert_bytes: int  # all routed experts
    bytes_per_expert: int
    num_experts_total: int  # layers x experts
    budget: int | None
    offload: bool
    cache_experts: int  # experts the paging cache holds (all of them when not offloading)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes

    @property
    def cache_bytes(self) -> int:
        return self.cache_experts * self.bytes_per_expert

    def describe(self) -> str:
        text = (f"weights {format_bytes(self.total_bytes)} as {self.layout}: "
                f"{format_bytes(self.resident_bytes)} resident, "
                f"{format_bytes(self.expert_bytes)} in {self.num_experts_total} experts")
        if not self.offload:
            return text + (f" (fits the {format_bytes(self.budget)} budget)"
                           if self.budget is not None else "")
        return text + (f"; budget {format_bytes(self.budget)}: experts paged from disk through "
                       f"a cache of {self.cache_experts} experts "
                       f"({format_bytes(self.cache_bytes)})")


def layout_specs(config: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint name -> (shape, dtype) of every tensor in this storage layout (meta: free)."""
    from inference_pio.models.qwen3_moe import build_model_meta

    return build_model_meta(config, dtype, quant).checkpoint_specs()


def _nbytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    return math.prod(spec[0]) * spec[1].itemsize


def plan_weights(config: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None,
                 budget: int | None, min_cache_experts: int | None = None) -> WeightPlan:
    """Resident vs expert bytes; with a budget below the total, page experts through a cache
    of whatever the budget leaves (at least `min_cache_experts`, default top-k)."""
    specs = layout_specs(config, dtype, quant)
    expert_bytes, resident, experts = 0, 0, set()
    for name, spec in specs.items():
        m = EXPERT_NAME.match(name)
        if m is None:
            resident += _nbytes(spec)
        else:
            expert_bytes += _nbytes(spec)
            experts.add((int(m.group(1)), int(m.group(2))))
    n = len(experts)
    per_expert = expert_bytes // n if n else 0
    layout = quant.describe() if quant is not None else str(dtype).removeprefix("torch.")
    fits = budget is None or resident + expert_bytes <= budget
    if fits or n == 0:
        if not fits:
            raise WeightBudgetError(
                f"the weights need {format_bytes(resident)} as {layout} and the model has no "
                f"experts to page; the budget is {format_bytes(budget)}: raise weight_memory or "
                "choose a smaller quantization")
        return WeightPlan(layout, resident, expert_bytes, per_expert, n, budget, False, n)
    need = min_cache_experts if min_cache_experts is not None else config.num_experts_per_tok
    cache = (budget - resident) // per_expert if budget > resident else 0
    if cache < need:
        raise WeightBudgetError(
            f"weight_memory {format_bytes(budget)} is too small for {layout}: "
            f"{format_bytes(resident)} must stay resident (attention, routers, embedding, "
            f"lm_head) plus a cache of at least {need} experts of "
            f"{format_bytes(per_expert)} each; give at least "
            f"{format_bytes(resident + need * per_expert)}, or a smaller quantization")
    return WeightPlan(layout, resident, expert_bytes, per_expert, n, budget, True, min(cache, n))
