"""Mixture of experts: softmax top-k router and stacked expert weights.

Expert weights are stacked per layer as the loader packs them from the checkpoint's
`mlp.experts.E.{gate,up,down}_proj.weight`: gate_up_proj [E, 2I, H] (gate rows first) and
down_proj [E, H, I]. `moe_reference` is the plain-torch oracle every faster kernel must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.custom_op import CustomOp


class TopKRouting(CustomOp):
    """Softmax over all experts in fp32, keep top_k, optionally renormalise: router logits
    [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k]). The "cpu" and "triton"
    implementations are one call each (ties go to the lower expert id there; torch.topk does
    not promise an order)."""

    def __init__(self, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize

    def forward_native(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(router_logits.dtype), ids

    def forward_cpu(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return native_cpu.route_topk(router_logits, self.top_k, self.renormalize)

    def forward_triton(self, router_logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        from inference_pio.kernels.triton_ops import route_topk  # triton is optional
        return route_topk(router_logits, self.top_k, self.renormalize)


class SiluAndMul(CustomOp):
    """silu(gate) * up; one native pass with the "cpu" implementation."""

    def forward_native(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def forward_cpu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return native_cpu.silu_mul(gate, up)


def moe_reference(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    """y[t] = sum_k weights[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t,k].
    x [T, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; weights/ids [T, k]."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        token_idx, slot = torch.where(ids == expert)
        gate, up = F.linear(x[token_idx], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert])  # [n, H]
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
    return out


GATHER_MAX_ROWS = 64  # token x expert pairs up to which moe_gathered copies expert weights


def moe_gathered(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`moe_reference` without a host synchronisation (no unique / where / tolist): every
    (token, slot) pair gathers its expert's weights and runs as one batched matmul. It reads
    the routed experts' bytes and copies them once, so it suits decode-sized batches (up to
    GATHER_MAX_ROWS pairs); the GPU path, where a sync costs more than the copy."""
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)  # [T*k]
    xs = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
    gate, up = torch.bmm(gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [T*k, I] each
    y = torch.bmm(down_proj[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [T*k, H]
    y = y.view(num_tokens, top_k, -1) * weights.unsqueeze(-1).to(y.dtype)
    return y.sum(dim=1).to(x.dtype)


class Experts(CustomOp):
    """Stacked expert weights; forward(x [T, H], weights [T, k], ids [T, k]) -> [T, H].
    `forward_native` is `moe_reference`; `forward_cuda` runs decode-sized batches through
    `moe_gathered` (no host synchronisation) and larger ones through the reference;
    `forward_triton` is the fused MoE of `kernels.triton_moe` (any batch, no host sync)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def checkpoint_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint name -> view: `{prefix}.{e}.{gate_proj,up_proj,down_proj}.weight`."""
        inter, views = self.intermediate_size, {}
        for e in range(self.num_experts):
            views[f"{prefix}.{e}.gate_proj.weight"] = self.gate_up_proj.data[e, :inter]
            views[f"{prefix}.{e}.up_proj.weight"] = self.gate_up_proj.data[e, inter:]
            views[f"{prefix}.{e}.down_proj.weight"] = self.down_proj.data[e]
        return views

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                       ) -> torch.Tensor:
        return moe_reference(x, self.gate_up_proj, self.down_proj, weights, ids)

    def forward_cuda(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                     ) -> torch.Tensor:
        if ids.numel() <= GATHER_MAX_ROWS:
            return moe_gathered(x, self.gate_up_proj, self.down_proj, weights, ids)
        return moe_reference(x, self.gate_up_proj, self.down_proj, weights, ids)

    def forward_triton(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                       ) -> torch.Tensor:
        # imported here: triton is optional, and its interpreter flag is read at import
        from inference_pio.kernels.triton_moe import fused_moe
        return fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)


class SparseMoeBlock(nn.Module):
    """`mlp` of a MoE layer: `gate` is the router ([E, H] weight), `experts` the stacked experts."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.routing = TopKRouting(top_k, norm_topk_prob)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.routing(self.gate(x))  # [T, k]
        return self.experts(x, weights, ids)


class DenseMLP(nn.Module):
    """The SwiGLU MLP of dense Qwen3 layers (and of `mlp_only_layers`)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))
