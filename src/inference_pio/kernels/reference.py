"""Plain-torch references of the native kernels in `cpu.py`.

With `quantize_acts=True` (the default) they emulate the kernels exactly up to summation order:
activations are quantized per row in blocks of ACT_BLOCK columns (llama.cpp Q8_0:
d = amax / 127, q = round_half_even(x * (1 / d)), q = 0 where d == 0), dequantized (q * d), and
multiplied by the dequantized weight (formats.dequantize_*) in float64. With
`quantize_acts=False` they are the exact float products the formats define, which the kernels
match only up to the activation quantization error."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from inference_pio.layers.quantization import formats

ACT_BLOCK = 32  # activation columns per fp32 scale


def act_cols(cols: int) -> int:
    """Columns of an activation row once padded to whole ACT_BLOCK blocks."""
    return -(-cols // ACT_BLOCK) * ACT_BLOCK


def quantize_acts(x: torch.Tensor, cols_p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, cols] -> (codes as float32 [T, cols_p], scales float32 [T, cols_p / ACT_BLOCK]),
    zero padded to cols_p (a multiple of ACT_BLOCK), exactly as the kernels do it."""
    x = x.float()
    if cols_p % ACT_BLOCK or cols_p < x.shape[-1]:
        raise ValueError(f"cols_p={cols_p} must be a multiple of {ACT_BLOCK} and >= "
                         f"{x.shape[-1]}")
    blocks = F.pad(x, (0, cols_p - x.shape[-1])).unflatten(-1, (-1, ACT_BLOCK))
    d = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None])
    return q.flatten(-2), d


def fake_quantize_acts(x: torch.Tensor) -> torch.Tensor:
    """x [T, cols] -> the float64 values the kernels actually multiply (q * d), [T, cols]."""
    cols = x.shape[-1]
    q, d = quantize_acts(x, act_cols(cols))
    deq = q.double().unflatten(-1, (-1, ACT_BLOCK)) * d.double()[..., None]
    return deq.flatten(-2)[..., :cols]


def _acts(x: torch.Tensor, quantize: bool) -> torch.Tensor:
    return fake_quantize_acts(x) if quantize else x.double()


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, cols: int,
                quantize_acts: bool = True) -> torch.Tensor:
    """x [T, cols] @ W^T, W the int4 weight -> float32 [T, rows]."""
    w = formats.dequantize_int4({"qweight": qweight, "scales": scales}, cols)
    return F.linear(_acts(x, quantize_acts), w.double()).float()


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                quantize_acts: bool = True) -> torch.Tensor:
    """x [T, cols] @ W^T, W the int8 weight -> float32 [T, rows]."""
    w = formats.dequantize_int8({"qweight": qweight, "scales": scales}, qweight.shape[-1])
    return F.linear(_acts(x, quantize_acts), w.double()).float()


def _linear(method: str, x: torch.Tensor, pair: Sequence[torch.Tensor], cols: int,
            quantize: bool) -> torch.Tensor:
    if method == "int4":
        return int4_linear(x, pair[0], pair[1], cols, quantize)
    if method == "int8":
        return int8_linear(x, pair[0], pair[1], quantize)
    raise ValueError(f"method must be 'int4' or 'int8', got {method!r}")


def moe(method: str, x: torch.Tensor, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
        down: Sequence[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        quantize_acts: bool = True) -> torch.Tensor:
    """Routed experts as the native `int4_moe` / `int8_moe` compute them: for each (t, k),
    y = down_e(q(silu(gate_e(q(x_t))) * up_e(q(x_t)))) with q the activation quantization
    (the identity when quantize_acts is False), then out[t] = sum over k in slot order of
    topk_weights[t,k] * y. gate / up / down: (qweight, scales) stacked [E, ...]."""
    T, k = topk_ids.shape
    H, inter = x.shape[-1], gate[0].shape[1]
    ys = torch.zeros(T, k, H, dtype=torch.float64)
    for e in topk_ids.unique().tolist():
        tok, slot = torch.where(topk_ids == e)
        xe = x[tok].float()
        g = _linear(method, xe, (gate[0][e], gate[1][e]), H, quantize_acts).double()
        u = _linear(method, xe, (up[0][e], up[1][e]), H, quantize_acts).double()
        h = (F.silu(g) * u).float()
        ys[tok, slot] = _linear(method, h, (down[0][e], down[1][e]), inter,
                                quantize_acts).double()
    out = torch.zeros(T, H, dtype=torch.float64)
    for s in range(k):
        out += topk_weights[:, s, None].double() * ys[:, s]
    return out.float()
