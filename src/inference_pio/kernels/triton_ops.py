"""The small per-layer ops of the GPU path as one Triton launch each, where plain torch takes
5-15 (each launch a few microseconds of host time in an eager decode step):

- `rms_norm`: Qwen3's RMSNorm, optionally fused with the residual add before it;
- `qk_norm_rope`: the per-head RMSNorm of q and k, then rotate-half RoPE;
- `silu_mul`: silu(gate) * up of a [rows, 2I] gate_up tensor (the fused MoE's middle step);
- `route_topk`: the router's softmax, top-k and renormalisation.

Each rounds where its plain-torch reference rounds (`layers.norm.RMSNorm.forward_native`,
`layers.rotary.QKNormRope.forward_native`, `F.silu(gate) * up`): statistics in fp32, results
cast to the activation dtype at the same points, so a bf16 model sees what the reference
computes. Runs on CUDA tensors, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how CI tests it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:  # h = x + residual, rounded to the activation dtype as torch's add does
        r = tl.load(res_ptr + row * hidden + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * hidden + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) for x [..., H]; with `residual`, (norm(x + residual), x + residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden).contiguous()
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows, hidden, dtype=out_dtype, device=x.device)
    h = torch.empty_like(x2) if residual is not None else x2
    res = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    if rows:
        _rms_norm_kernel[(rows,)](x2, res, weight, out, h, hidden, eps,
                                  HAS_RESIDUAL=residual is not None,
                                  BLOCK=triton.next_power_of_2(hidden))
    out = out.view(*x.shape[:-1], hidden)
    return out if residual is None else (out, h.view(x.shape))


@triton.jit
def _head_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, eps,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """One (token, head) row: RMSNorm over the head dim, then x * cos + rotate_half(x) * sin."""
    pid = tl.program_id(0).to(tl.int64)
    token = pid // num_heads
    base = pid * HEAD_DIM
    d = tl.arange(0, HALF)
    lo = tl.load(x_ptr + base + d)
    hi = tl.load(x_ptr + base + HALF + d)
    dtype = lo.dtype
    lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(lo_f * lo_f, axis=0) + tl.sum(hi_f * hi_f, axis=0)) / HEAD_DIM
                         + eps)
    w_lo = tl.load(w_ptr + d).to(tl.float32)
    w_hi = tl.load(w_ptr + HALF + d).to(tl.float32)
    n_lo = (w_lo * (lo_f * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n_hi = (w_hi * (hi_f * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c_lo = tl.load(cos_ptr + token * HEAD_DIM + d).to(tl.float32)
    c_hi = tl.load(cos_ptr + token * HEAD_DIM + HALF + d).to(tl.float32)
    s_lo = tl.load(sin_ptr + token * HEAD_DIM + d).to(tl.float32)
    s_hi = tl.load(sin_ptr + token * HEAD_DIM + HALF + d).to(tl.float32)
    # rotate_half: (-hi, lo); each product rounded, then the sum, as torch does in the dtype
    out_lo = (n_lo * c_lo).to(dtype).to(tl.float32) + (-n_hi * s_lo).to(dtype).to(tl.float32)
    out_hi = (n_hi * c_hi).to(dtype).to(tl.float32) + (n_lo * s_hi).to(dtype).to(tl.float32)
    tl.store(out_ptr + base + d, out_lo.to(dtype))
    tl.store(out_ptr + base + HALF + d, out_hi.to(dtype))


def _head_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    eps: float) -> torch.Tensor:
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton qk_norm_rope needs a power-of-two head_dim, got {head_dim}")
    if weight.dtype != x.dtype:
        raise ValueError(f"the norm weight is {weight.dtype} but the activations are {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if tokens:
        _head_norm_rope_kernel[(tokens * heads,)](
            x, weight, cos.contiguous(), sin.contiguous(), out, heads, eps,
            HEAD_DIM=head_dim, HALF=head_dim // 2)
    return out


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, Hd], k [T, Hk, Hd]; cos/sin [T, Hd] in the activation dtype -> (q, k) normed
    per head and rotated (new tensors)."""
    return (_head_norm_rope(q, q_weight, cos, sin, eps),
            _head_norm_rope(k, k_weight, cos, sin, eps))


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(x_ptr + row * 2 * inter + cols, mask=ok, other=0.0)
    u = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * u.to(tl.float32)).to(g.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2I] (gate columns first) -> silu(gate) * up [rows, I]."""
    rows, two_i = gate_up.shape
    inter = two_i // 2
    gate_up = gate_up.contiguous()
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block)
    return out


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, top_k,
                       RENORMALIZE: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    """One token: softmax over the experts in fp32, the top_k largest (ties to the lower id),
    optionally renormalised to sum to one."""
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, EP)
    x = tl.load(logits_ptr + row * num_experts + experts, mask=experts < num_experts,
                other=float("-inf"))
    xf = x.to(tl.float32)
    e = tl.exp(xf - tl.max(xf, axis=0))
    p = e / tl.sum(e, axis=0)
    p = tl.where(experts < num_experts, p, -1.0)
    slots = tl.arange(0, KP)
    chosen_w = tl.zeros((KP,), dtype=tl.float32)
    chosen_id = tl.zeros((KP,), dtype=tl.int64)
    for i in range(top_k):
        best = tl.max(p, axis=0)
        pick = tl.min(tl.where(p == best, experts, EP), axis=0)
        chosen_w = tl.where(slots == i, best, chosen_w)
        chosen_id = tl.where(slots == i, pick.to(tl.int64), chosen_id)
        p = tl.where(experts == pick, -1.0, p)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
    ok = slots < top_k
    tl.store(weights_ptr + row * top_k + slots, chosen_w.to(x.dtype), mask=ok)
    tl.store(ids_ptr + row * top_k + slots, chosen_id, mask=ok)


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in the logits' dtype, ids int64 [T, k])."""
    tokens, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _route_topk_kernel[(tokens,)](logits, weights, ids, num_experts, top_k,
                                      RENORMALIZE=renormalize,
                                      EP=triton.next_power_of_2(num_experts),
                                      KP=triton.next_power_of_2(top_k))
    return weights, ids
