"""Paged attention in Triton: every sequence of an attention group (the decoding sequences of a
step, or its prefill chunks) in one launch, reading K/V rows where the paged cache keeps them
(no gather), int8 / fp8 rows dequantized in the kernel. The shape of FlashAttention with a
block table, written from its description:

- grid (sequences, query blocks, KV heads): one program takes BLOCK_Q queries of one sequence
  and the G = H / Hkv query heads that share KV head h, stacked as BLOCK_Q * G rows of one
  tile, so each K/V row is loaded once for the whole group (GQA without repeats);
- keys are visited in BLOCK_N chunks through the sequence's slot list (`key_slots`), skipping
  chunks no query of the block can see (the causal end, the sliding window's start);
- online softmax in fp32 (running max and sum), masked by causality, window and validity.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how CI tests it. Oracle: `layers.attention.reference_attention`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inference_pio.kernels.triton_utils import dot_flags, tile_dot


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr,
    token_rows_ptr, q_offsets_ptr, q_starts_ptr, key_slots_ptr, key_offsets_ptr, k_starts_ptr,
    scale, window, head_dim,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ss, stride_ot,
    stride_oh,
    GROUP: tl.constexpr, QUANT: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq, q_block, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    block_q: tl.constexpr = BLOCK_M // GROUP
    q_first = tl.load(q_offsets_ptr + seq)
    num_q = tl.load(q_offsets_ptr + seq + 1) - q_first
    if q_block * block_q >= num_q:
        return
    rows = tl.arange(0, BLOCK_M)
    qi = q_block * block_q + rows // GROUP  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < block_q * GROUP) & (qi < num_q)
    q_pos = tl.load(q_starts_ptr + seq) + qi  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < head_dim
    token = tl.load(token_rows_ptr + q_first + qi, mask=row_ok, other=0).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    key_first = tl.load(key_offsets_ptr + seq)
    num_k = tl.load(key_offsets_ptr + seq + 1) - key_first
    k_start = tl.load(k_starts_ptr + seq)
    # keys the block's queries can see: up to its last query's position, from the window
    # start of its first query
    q_hi = tl.load(q_starts_ptr + seq) + tl.minimum(q_block * block_q + block_q, num_q) - 1
    k_end = tl.minimum(num_k, q_hi - k_start + 1)
    k_begin = 0
    if WINDOWED:
        q_lo = tl.load(q_starts_ptr + seq) + q_block * block_q
        k_begin = tl.maximum(0, q_lo - window + 1 - k_start) // BLOCK_N * BLOCK_N

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(k_begin, k_end, BLOCK_N):
        kj = n0 + tl.arange(0, BLOCK_N)
        k_ok = kj < k_end
        slot = tl.load(key_slots_ptr + key_first + kj, mask=k_ok, other=0).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        if QUANT:  # per-(slot, head) scales; rows dequantized to q's dtype
            k_scale = tl.load(ks_ptr + slot * stride_ss + kv_head, mask=k_ok, other=0.0)
            v_scale = tl.load(vs_ptr + slot * stride_ss + kv_head, mask=k_ok, other=0.0)
            k = (k.to(tl.float32) * k_scale.to(tl.float32)[:, None]).to(q.dtype)
            v = (v.to(tl.float32) * v_scale.to(tl.float32)[:, None]).to(q.dtype)
        else:  # a storage dtype other than q's (a bf16 cache under an fp32 model)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tile_dot(q, tl.trans(k), PRECISION, UPCAST) * scale  # [BLOCK_M, BLOCK_N]
        k_pos = k_start + kj
        seen = row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOWED:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = (q_first + qi).to(tl.int64)
    tl.store(out_ptr + o_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    token_rows: torch.Tensor, q_offsets: torch.Tensor, q_starts: torch.Tensor,
                    key_slots: torch.Tensor, key_offsets: torch.Tensor, k_starts: torch.Tensor,
                    max_q: int, window: int | None, scale: float) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention of N sequences in one launch.

    q [T, H, Hd]: the step's flat queries; sequence b's are rows
    token_rows[q_offsets[b]:q_offsets[b + 1]], at positions q_starts[b]... k_rows/v_rows
    [S, Hkv, Hd]: the cache's rows (any float dtype, or int8 / fp8 with k_scale/v_scale [S, Hkv]);
    sequence b's keys are slots key_slots[key_offsets[b]:key_offsets[b + 1]], at positions
    k_starts[b]... `max_q` (a host int) bounds any sequence's query count.
    -> [n, H, Hd] in q's dtype, in token_rows order (n = q_offsets[-1])."""
    num_seqs = q_offsets.numel() - 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_rows.shape[1]
    group = num_heads // num_kv
    # rows of a tile = queries x the KV head's query heads: >= 16 (tl.dot), more for prefill
    block_m = max(16, triton.next_power_of_2(group))
    if max_q > 1:
        block_m = max(block_m, 64)
    block_q = block_m // group
    out = torch.empty(token_rows.numel(), num_heads, head_dim, dtype=q.dtype, device=q.device)
    quant = k_scale is not None
    scales = (k_scale, v_scale) if quant else (out, out)
    grid = (num_seqs, triton.cdiv(max_q, block_q), num_kv)
    _paged_attention_kernel[grid](
        q, k_rows, v_rows, scales[0], scales[1], out,
        token_rows, q_offsets, q_starts, key_slots, key_offsets, k_starts,
        scale, window or 0, head_dim,
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), v_rows.stride(0),
        v_rows.stride(1), scales[0].stride(0) if quant else 0, out.stride(0), out.stride(1),
        GROUP=group, QUANT=quant, WINDOWED=window is not None, **dot_flags(q.dtype),
        BLOCK_M=block_m, BLOCK_N=32 if max_q == 1 else 64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return out
