"""Fused MoE in Triton: tokens sorted by expert, one grouped GEMM launch per projection, no
host synchronisation (the grid is sized from an upper bound and blocks past the routed rows
return at once). The shape of vLLM's fused_moe, written from its description:

1. `align_by_expert`: the T*k (token, slot) pairs sorted by expert, each expert's run padded
   to a multiple of BLOCK_M with the sentinel T*k, so every BLOCK_M rows belong to one expert;
2. `grouped_gemm` (gate_up): C[p] = x[p // k] @ W_e^T for every routed pair p;
3. silu(gate) * up;
4. `grouped_gemm` (down), multiplied by the routing weight of each pair; the k pairs of a
   token summed.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how CI tests it. Oracle: `layers.moe.moe_reference`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_pio.kernels.triton_ops import silu_mul
from inference_pio.kernels.triton_utils import dot_flags, tile_dot


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, num_padded_ptr,
    N, K, num_valid, top_k,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    MUL_WEIGHT: tl.constexpr, A_PER_TOKEN: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C for BLOCK_M sorted pairs of one expert. A row of pair
    p is A[p // top_k] when A_PER_TOKEN (the layer input) else A[p] (the intermediate)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs_m)  # [BLOCK_M] pair ids; num_valid = padding
    row_ok = pairs < num_valid
    rows = pairs // top_k if A_PER_TOKEN else pairs
    rows = tl.where(row_ok, rows, 0)
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)  # [BLOCK_K, BLOCK_N]: W_e^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tile_dot(a, b, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs,
                  num_blocks, num_experts, block_m, EP: tl.constexpr, CHUNK: tl.constexpr):
    """One program: count the pairs of each expert, pad the counts to block_m, place every
    pair at its expert's start plus the number of earlier pairs of that expert (stable), and
    name each block's expert. Per-expert vectors live in registers ([EP] lanes); a chunk of
    pairs is matched against all experts as a [CHUNK, EP] one-hot tile."""
    experts = tl.arange(0, EP)
    counts = tl.zeros((EP,), dtype=tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, axis=0)
    seen = ends - padded  # each expert's next free position
    for c0 in range(0, num_pairs, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        ok = p < num_pairs
        ids = tl.load(ids_ptr + p, mask=ok, other=-1)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert
        pos = tl.sum(onehot * (seen[None, :] + before), axis=1)
        tl.store(sorted_ptr + pos, p, mask=ok)
        seen += tl.sum(onehot, axis=0)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        done = ((ends[None, :] <= (b * block_m)[:, None]) & (experts[None, :] < num_experts))
        expert = tl.minimum(tl.sum(done.to(tl.int32), axis=1), num_experts - 1)
        tl.store(block_expert_ptr + b, expert, mask=b < num_blocks)


def padded_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the aligned pairs can take: every expert's run rounded up to block_m
    adds at most block_m - 1 rows of padding."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs int32 [P], block_expert int32 [P // block_m],
    num_padded int32 [1]). P = T*k + E*(block_m - 1) rounded up to block_m bounds the padded
    length, so nothing is read back to the host. Pair p = t * k + slot; each expert's pairs
    are contiguous, in pair order, padded to a multiple of block_m with the sentinel T*k.
    Two launches (the sentinel fill, `_align_kernel`); `align_by_expert_torch` is the same in
    torch ops, the oracle."""
    flat = ids.reshape(-1).contiguous()
    num_pairs = flat.numel()
    bound = padded_bound(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((bound,), num_pairs, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(bound // block_m, dtype=torch.int32, device=flat.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=flat.device)
    ep = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](flat, sorted_pairs, block_expert, num_padded, num_pairs,
                        block_expert.numel(), num_experts, block_m, EP=ep,
                        CHUNK=max(16, 4096 // ep))
    return sorted_pairs, block_expert, num_padded


def align_by_expert_torch(ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_by_expert` in torch ops (about 15 launches, no host sync)."""
    flat = ids.reshape(-1).long()
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount syncs; this does not
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, in pair order
    first_of_expert = (counts.cumsum(0) - counts)[flat[order]]
    rank = torch.arange(num_pairs, device=device) - first_of_expert
    bound = padded_bound(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((bound,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[starts[flat[order]] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, bound, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], top_k: int,
                 a_per_token: bool, weights: torch.Tensor | None = None,
                 block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """out[p] = a[row(p)] @ w[expert(p)]^T (times weights[p] when given) for every routed
    pair p. a [rows, K]; w [E, N, K]; out [T*k, N]."""
    sorted_pairs, block_expert, num_padded = aligned
    num_n, n_dim, k_dim = triton.cdiv(w.shape[1], block_n), w.shape[1], w.shape[2]
    grid = (block_expert.numel() * num_n,)
    _grouped_gemm_kernel[grid](
        a, w, out, weights if weights is not None else out, sorted_pairs, block_expert,
        num_padded, n_dim, k_dim, out.shape[0], top_k,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        MUL_WEIGHT=weights is not None, A_PER_TOKEN=a_per_token,
        **dot_flags(a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: 16 (tl.dot's minimum) while experts see few tokens each, more once
    they see many (fewer tiles, each weight tile reused across more rows)."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_moe(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`layers.moe.moe_reference`'s contract: x [T, H]; gate_up_proj [E, 2I, H]; down_proj
    [E, H, I]; weights/ids [T, k] -> [T, H] in x's dtype (accumulation in fp32)."""
    num_tokens, top_k = ids.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    num_pairs = num_tokens * top_k
    block_m = block_m_for(num_pairs, num_experts)
    aligned = align_by_expert(ids, num_experts, block_m)
    x = x.contiguous()
    gate_up = torch.empty(num_pairs, two_i, dtype=x.dtype, device=x.device)
    grouped_gemm(x, gate_up_proj, gate_up, aligned, top_k, a_per_token=True, block_m=block_m)
    act = silu_mul(gate_up)
    out = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    grouped_gemm(act, down_proj, out, aligned, top_k, a_per_token=False,
                 weights=weights.reshape(-1).float().contiguous(), block_m=block_m)
    return out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
