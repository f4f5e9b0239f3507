"""The Triton kernels against their plain-torch oracles on odd shapes: the fused MoE
(`moe_reference`) and its expert alignment, paged attention over quantized KV formats (the
reference backend reading the same cache). Without a GPU they run on CPU tensors through
Triton's interpreter (conftest sets TRITON_INTERPRET=1); where CUDA is present, there."""

from __future__ import annotations

import pytest
import torch

from inference_pio.config import ConfigError

pytest.importorskip("triton")

from inference_pio.cli_common import ATTENTION_BACKEND_NAMES
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.kernels.triton_moe import align_by_expert, align_by_expert_torch, fused_moe
from inference_pio.layers.attention import (
    ATTENTION_BACKENDS,
    Attention,
    get_attention_backend,
)
from inference_pio.layers.moe import moe_reference
from inference_pio.runtime.kv_cache import PagedKVCache
from inference_pio.testing import tiny_dense_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(tokens: int, experts: int, top_k: int, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter"), [
    (1, 8, 2, 32, 16),  # decode, one token
    (5, 8, 3, 48, 40),  # K and N not multiples of the tiles
    (37, 16, 4, 64, 96),  # several 16-row blocks per expert
    (3, 128, 8, 64, 32),  # the real expert count: most experts see nothing
    (70, 4, 4, 24, 72),  # every expert sees many tokens: 64-row blocks
])
def test_fused_moe_matches_the_reference(tokens: int, experts: int, top_k: int, hidden: int,
                                         inter: int) -> None:
    g = torch.Generator().manual_seed(tokens * 1000 + experts)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = _routing(tokens, experts, top_k, g)
    expected = moe_reference(x, gate_up, down, weights, ids)
    args = [t.to(DEVICE) for t in (x, gate_up, down, weights, ids)]
    torch.testing.assert_close(fused_moe(*args).cpu(), expected, atol=2e-5, rtol=1e-5)


def test_fused_moe_bf16_tracks_fp32() -> None:
    """bf16 in and out, fp32 accumulation: within bf16 rounding of the fp32 reference."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 64, generator=g)
    gate_up = torch.randn(16, 64, 64, generator=g) / 8
    down = torch.randn(16, 64, 32, generator=g) / 32**0.5
    weights, ids = _routing(9, 16, 4, g)
    bf = [t.to(torch.bfloat16) for t in (x, gate_up, down, weights)]
    expected = moe_reference(*[t.float() for t in bf], ids)
    out = fused_moe(*[t.to(DEVICE) for t in bf], ids.to(DEVICE)).cpu()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"),
                         [(1, 8, 8, 16), (13, 8, 3, 16), (40, 4, 2, 32), (5, 128, 8, 16),
                          (70, 100, 6, 64)])  # more pairs than a chunk; E not a power of 2
def test_align_by_expert_sorts_pads_and_bounds(tokens: int, experts: int, top_k: int,
                                               block_m: int) -> None:
    """Every routed pair appears once; every block holds pairs of one expert (its
    block_expert) or padding; padding is the sentinel T*k; num_padded covers every expert's
    run rounded up to the block."""
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    pairs, block_expert, num_padded = (t.cpu() for t in align_by_expert(ids.to(DEVICE),
                                                                         experts, block_m))
    for got, want in zip((pairs, block_expert, num_padded),
                         align_by_expert_torch(ids, experts, block_m), strict=True):
        assert torch.equal(got, want)  # the kernel and the torch oracle agree exactly
    flat, sentinel = ids.reshape(-1), ids.numel()
    counts = torch.bincount(flat, minlength=experts)
    assert num_padded.item() == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert pairs.numel() % block_m == 0 and block_expert.numel() == pairs.numel() // block_m
    real = pairs[pairs != sentinel]
    assert sorted(real.tolist()) == list(range(sentinel))
    assert (pairs[num_padded.item():] == sentinel).all()
    for b in range(num_padded.item() // block_m):
        block = pairs[b * block_m:(b + 1) * block_m]
        block = block[block != sentinel]
        assert block.numel() > 0  # no all-padding block below num_padded
        assert (flat[block.long()] == block_expert[b]).all()
        assert block.tolist() == sorted(block.tolist())  # pair order within an expert


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "bf16"])
@pytest.mark.parametrize("window", [None, 6])
def test_triton_attention_reads_quantized_pages_in_place(kv_dtype: str, window: int | None
                                                         ) -> None:
    """int8 / fp8 rows with their per-(slot, head) scales dequantized in the kernel equal the
    reference backend over the same cache (which gathers and dequantizes in torch)."""
    if kv_dtype == "fp8_e4m3":
        from inference_pio.runtime.kv_quant import check_fp8_support
        try:
            check_fp8_support(DEVICE)
        except ConfigError as e:
            pytest.skip(str(e))
    num_kv, group, head_dim, block_size = 2, 4, 16, 4
    config = tiny_dense_config(num_attention_heads=num_kv * group, num_key_value_heads=num_kv,
                               head_dim=head_dim, num_hidden_layers=1, vocab_size=300)
    shapes = [(9, 1), (0, 6), (21, 1), (7, 5)]  # (cached, new): decodes and prefill chunks
    tables, used = [], 0
    for cached, new in shapes:
        blocks = -(-(cached + new) // block_size)
        tables.append([(used + i) * 3 % 64 for i in range(blocks)])  # scattered block ids
        used += blocks
    g = torch.Generator().manual_seed(3)
    outs = {}
    for backend in ("reference", "triton"):
        cache = PagedKVCache(config, 64, block_size, kv_dtype, torch.float32, DEVICE).bind(tables)
        for i, (cached, _) in enumerate(shapes):
            if cached:
                g.manual_seed(100 + i)
                cache.write(0, i, 0, torch.randn(cached, num_kv, head_dim, generator=g).to(DEVICE),
                            torch.randn(cached, num_kv, head_dim, generator=g).to(DEVICE))
        g.manual_seed(5)
        tokens = sum(n for _, n in shapes)
        q = torch.randn(tokens, num_kv * group, head_dim, generator=g).to(DEVICE)
        k = torch.randn(tokens, num_kv, head_dim, generator=g).to(DEVICE)
        v = torch.randn(tokens, num_kv, head_dim, generator=g).to(DEVICE)
        ctx = ForwardContext(tuple(n for _, n in shapes), tuple(c for c, _ in shapes), cache,
                             attention_backend=get_attention_backend(backend, cache))
        layer = Attention(0, num_kv * group, num_kv, head_dim, window)
        with forward_context(ctx):
            outs[backend] = layer(q, k, v).cpu()
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_cli_offers_every_attention_backend() -> None:
    assert sorted(ATTENTION_BACKEND_NAMES) == sorted(ATTENTION_BACKENDS)


def test_triton_backend_off_the_gpu_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter flag, the Triton backend on a CPU cache is a clear ConfigError
    when the engine is built, not a crash inside the first step."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache = PagedKVCache(tiny_dense_config(), 4, 4, "fp32", torch.float32, "cpu")
    with pytest.raises(ConfigError, match="runs on a GPU .*use 'auto'"):
        get_attention_backend("triton", cache)
    assert get_attention_backend("auto", cache).name == "auto"  # the CPU keeps its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (7, 48), (3, 2048)])
def test_triton_rms_norm_matches_the_reference(dtype: torch.dtype, rows: int, hidden: int
                                               ) -> None:
    """RMSNorm alone and fused with the residual add: what forward_native computes, rounded
    at the same points (bf16 equal up to one rounding step of the result)."""
    from inference_pio.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(rows * hidden)
    norm = RMSNorm(hidden, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    expected, (expected_n, expected_h) = norm.forward_native(x), norm.forward_native(x, res)
    norm.to(DEVICE).select("triton")
    out = norm(x.to(DEVICE)).cpu()
    out_n, out_h = (t.cpu() for t in norm(x.to(DEVICE), res.to(DEVICE)))
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(out_n, expected_n, **tol)
    # the add rounded once (Triton's interpreter rounds fp32 -> bf16 toward zero, a GPU to
    # nearest: up to one bf16 step apart there)
    torch.testing.assert_close(out_h, expected_h, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim"),
                         [(1, 4, 2, 16), (5, 32, 4, 128), (3, 6, 2, 64)])
def test_triton_qk_norm_rope_matches_the_reference(dtype: torch.dtype, tokens: int, heads: int,
                                                   kv_heads: int, head_dim: int) -> None:
    from inference_pio.layers.norm import RMSNorm
    from inference_pio.layers.rotary import QKNormRope, RotaryEmbedding

    g = torch.Generator().manual_seed(tokens * heads + head_dim)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
    with torch.no_grad():
        q_norm.weight.copy_(1 + 0.1 * torch.randn(head_dim, generator=g))
        k_norm.weight.copy_(1 + 0.1 * torch.randn(head_dim, generator=g))
    positions = torch.tensor([3, 700, 41, 0, 9][:tokens])
    cos, sin = RotaryEmbedding(head_dim, 1e6, None).forward(positions, dtype, num_positions=701)
    op = QKNormRope()
    expected = op.forward_native(q, k, q_norm, k_norm, cos, sin)
    op.select("triton")
    q_norm.to(DEVICE), k_norm.to(DEVICE)
    out = op(q.to(DEVICE), k.to(DEVICE), q_norm, k_norm, cos.to(DEVICE), sin.to(DEVICE))
    # bf16: four roundings of the reference's, each up to one bf16 step off in the interpreter
    # (it rounds fp32 -> bf16 toward zero, a GPU to nearest): a few steps apart at most
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 7e-2, "rtol": 0}
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.cpu(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    from inference_pio.kernels.triton_ops import silu_mul

    g = torch.Generator().manual_seed(11)
    gate_up = (3 * torch.randn(9, 2 * 1100, generator=g)).to(dtype)  # I = 1100: two blocks
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    # bf16: two roundings, each up to one bf16 step (2**-7 relative) off in the interpreter
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(silu_mul(gate_up.to(DEVICE)).cpu(), expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "renormalize"),
                         [(1, 128, 8, True), (6, 8, 2, True), (5, 100, 6, False), (3, 4, 4, True)])
def test_triton_route_topk_matches_the_reference(dtype: torch.dtype, tokens: int, experts: int,
                                                 top_k: int, renormalize: bool) -> None:
    from inference_pio.layers.moe import TopKRouting

    g = torch.Generator().manual_seed(experts + top_k)
    logits = torch.randn(tokens, experts, generator=g).to(dtype)
    op = TopKRouting(top_k, renormalize)
    want_w, want_ids = op.forward_native(logits)
    op.select("triton")
    got_w, got_ids = (t.cpu() for t in op(logits.to(DEVICE)))
    assert got_ids.dtype == torch.int64 and got_w.dtype == dtype
    # the same experts in the same order (random logits: no ties)
    assert torch.equal(got_ids, want_ids)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(got_w, want_w, **tol)
