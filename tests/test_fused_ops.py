"""The fused decoder-layer ops (kernels/csrc/cpu_fused.cpp) against the plain-torch layers they
replace, and the layers' dispatch: RMSNorm (with and without the residual add), per-head
q/k RMSNorm + RoPE (plain and YaRN tables), softmax top-k routing and SiLU-mul, on odd shapes;
then a whole model on its native ops equals the same model on its plain-torch ops
(`select_ops(model, "native")`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference_pio.config import RopeScaling
from inference_pio.kernels import cpu
from inference_pio.layers.moe import TopKRouting
from inference_pio.layers.norm import RMSNorm
from inference_pio.layers.rotary import QKNormRope, RotaryEmbedding, apply_rotary

RTOL, ATOL = 2e-6, 2e-6


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if not cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu.reason()}")


def route(logits: torch.Tensor, top_k: int, renormalize: bool, impl: str = "native"
          ) -> tuple[torch.Tensor, torch.Tensor]:
    op = TopKRouting(top_k, renormalize)
    op.select(impl)
    return op(logits)  # type: ignore[no-any-return]


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm,
                 cos: torch.Tensor, sin: torch.Tensor, impl: str = "native"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    op = QKNormRope()
    op.select(impl)
    return op(q, k, q_norm, k_norm, cos, sin)  # type: ignore[no-any-return]


def _norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 8), (5, 33), (4, 2048), (2, 3, 128)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm(shape: tuple[int, ...], eps: float) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x, w = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    _close(cpu.rms_norm(x, w, eps), _norm_ref(x, w, eps))


@pytest.mark.parametrize("shape", [(1, 5), (3, 64), (7, 2048), (700, 64)])
def test_add_rms_norm_in_place(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(shape[0])
    x, r, w = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(
        shape[-1], generator=g)
    x2, r2 = x.clone(), r.clone()
    out, res = cpu.add_rms_norm_(x2, r2, w, 1e-6)
    assert out.data_ptr() == x2.data_ptr() and res.data_ptr() == r2.data_ptr()
    assert torch.equal(res, x + r)  # one fp32 add: exact
    _close(out, _norm_ref(x + r, w, 1e-6))


def test_rms_norm_module_dispatch_matches_reference() -> None:
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(4, 96), torch.randn(4, 96)
    ref_h = x + r
    assert norm.impl == "native"  # built directly: the reference until select()
    plain = norm(x)
    plain_out, plain_res = norm(x.clone(), r.clone())
    norm.select("cpu")
    _close(norm(x), plain)
    fused_out, fused_res = norm(x.clone(), r.clone())
    assert torch.equal(fused_res, ref_h) and torch.equal(plain_res, ref_h)
    _close(fused_out, plain_out)
    # non-contiguous inputs are made contiguous and still agree
    xt = torch.randn(96, 4).t()
    _close(norm(xt, r.clone())[0], norm.reference(xt + r))
    norm.select("native")
    bf = norm.to(torch.bfloat16)
    out = bf(x.bfloat16())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("head_dim", [2, 6, 16, 128])
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("yarn", [False, True])
def test_qk_norm_rope(head_dim: int, tokens: int, yarn: bool) -> None:
    scaling = RopeScaling(factor=4.0, original_max_position_embeddings=32) \
        if yarn else None
    rope = RotaryEmbedding(head_dim, 10_000.0, scaling)
    g = torch.Generator().manual_seed(head_dim * 100 + tokens)
    positions = torch.randint(0, 300, (tokens,), generator=g)
    cos, sin = rope(positions, torch.float32, num_positions=300)
    q, k = torch.randn(tokens, 5, head_dim, generator=g), torch.randn(tokens, 1, head_dim,
                                                                       generator=g)
    qn, kn = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
    with torch.no_grad():
        qn.weight.normal_(generator=g)
        kn.weight.normal_(generator=g)
    ref_q = apply_rotary(_norm_ref(q, qn.weight, 1e-6), cos, sin)
    ref_k = apply_rotary(_norm_ref(k, kn.weight, 1e-6), cos, sin)
    q2, k2 = q.clone(), k.clone()
    out_q, out_k = qk_norm_rope(q2, k2, qn, kn, cos, sin, impl="cpu")
    assert out_q.data_ptr() == q2.data_ptr()  # in place
    _close(out_q, ref_q, atol=1e-5)
    _close(out_k, ref_k, atol=1e-5)
    plain_q, plain_k = qk_norm_rope(q.clone(), k.clone(), qn, kn, cos, sin)
    _close(out_q, plain_q, atol=1e-5)
    _close(out_k, plain_k, atol=1e-5)


@pytest.mark.parametrize(("tokens", "experts", "k"), [(1, 128, 8), (5, 8, 2), (3, 7, 7),
                                                      (40, 64, 1), (2, 1, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_topk(tokens: int, experts: int, k: int, renormalize: bool) -> None:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts))
    w, ids = cpu.route_topk(logits, k, renormalize)
    ref_w, ref_ids = route(logits, k, renormalize)  # the plain-torch reference
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    _close(w, ref_w)
    assert torch.equal(route(logits, k, renormalize, impl="cpu")[0], w)  # the layer's "cpu" op


def test_route_topk_ties_go_to_the_lower_id() -> None:
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0]])
    _, ids = cpu.route_topk(logits, 2, True)
    assert ids.tolist() == [[1, 2]]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 768), (65, 40)])
def test_silu_mul(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(shape[1])
    gate, up = torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g)
    _close(cpu.silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: cpu.module().rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4),
                                   1e-6), "float32"),  # the wrappers convert; the ops check
    (lambda: cpu.add_rms_norm_(torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4),
                               torch.ones(4), 1e-6), "float32"),
    (lambda: cpu.rms_norm(torch.ones(2, 4), torch.ones(5), 1e-6), "weight has 5 values"),
    (lambda: cpu.add_rms_norm_(torch.ones(2, 4), torch.ones(3, 4), torch.ones(4), 1e-6),
     "residual has shape"),
    (lambda: cpu.qk_norm_rope_(torch.ones(1, 2, 5), torch.ones(1, 1, 5), torch.ones(5),
                               torch.ones(5), torch.ones(1, 5), torch.ones(1, 5), 1e-6),
     "head_dim must be even"),
    (lambda: cpu.qk_norm_rope_(torch.ones(2, 2, 4), torch.ones(2, 1, 4), torch.ones(4),
                               torch.ones(4), torch.ones(1, 4), torch.ones(1, 4), 1e-6),
     "cos and sin must be"),
    (lambda: cpu.route_topk(torch.ones(2, 4), 5, True), "top_k must be in 1..4"),
    (lambda: cpu.silu_mul(torch.ones(2, 4), torch.ones(2, 3)), "gate is"),
])
def test_bad_arguments_name_the_problem(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


def test_model_native_equals_plain() -> None:
    """A tiny fp32 MoE model: the fused ops path and the plain-torch path give the same logits
    (the transformers comparison in test_model_vs_hf runs the fused path too)."""
    from inference_pio.testing import random_model, tiny_moe_config

    model = random_model(tiny_moe_config(), torch.float32, seed=3)
    fused, plain = _native_and_plain_logits(model, 9, vocab=1000)
    _close(fused, plain, rtol=1e-4, atol=1e-4)


def _native_and_plain_logits(model: torch.nn.Module, tokens: int, vocab: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one prompt of random ids below `vocab`, through the native ops (as built) and
    through the plain-torch ops (`select_ops(model, "native")`, the quantized matmuls too with
    `cpu.disabled()`)."""
    from inference_pio.forward_context import ForwardContext, forward_context
    from inference_pio.layers.custom_op import select_ops

    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(tokens))
    pos = torch.arange(tokens)
    ctx = ForwardContext(num_new_tokens=(tokens,), num_cached_tokens=(0,))
    with torch.inference_mode():
        assert select_ops(model, "cpu") == "cpu"
        with forward_context(ctx):
            native = model.compute_logits(model(ids, pos))
        select_ops(model, "native")
        with cpu.disabled(), forward_context(ctx):
            plain = model.compute_logits(model(ids, pos))
        select_ops(model, "cpu")
    return native, plain


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "keys"),
                         [(1, 1, 8, (1,)), (4, 2, 16, (5, 1, 9)), (8, 1, 12, (33,)),
                          (32, 4, 128, (300, 7, 1, 64))])
def test_decode_attention_reads_rows_in_place(heads: int, kv_heads: int, head_dim: int,
                                              keys: tuple[int, ...]) -> None:
    """A batch of sequences, each with its own rows of one cache, in one call."""
    from inference_pio.layers.attention import reference_attention

    g = torch.Generator().manual_seed(sum(keys))
    rows = 2 * sum(keys) + 3
    k_rows, v_rows = (torch.randn(rows, kv_heads, head_dim, generator=g) for _ in range(2))
    slots = [torch.randperm(rows, generator=g)[:m] for m in keys]
    offsets = torch.tensor([0, *keys]).cumsum(0)
    q = torch.randn(len(keys), heads, head_dim, generator=g)
    scale = head_dim**-0.5
    out = cpu.decode_attention(q, k_rows, v_rows, torch.cat(slots), offsets, scale)
    for b, s in enumerate(slots):
        ref = reference_attention(q[b:b + 1].double(), k_rows[s].double(), v_rows[s].double(),
                                  None, scale).float()
        _close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_kv_store_and_decode_attention_errors() -> None:
    k_rows, v_rows = torch.zeros(6, 2, 4), torch.zeros(6, 2, 4)
    k, v = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    cpu.kv_store_(k_rows, v_rows, torch.tensor([4, 1]), k, v)
    assert torch.equal(k_rows[4], k[0]) and torch.equal(v_rows[1], v[1])
    assert torch.equal(k_rows[0], torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="slot 6 is outside the cache's 6 rows"):
        cpu.kv_store_(k_rows, v_rows, torch.tensor([6, 1]), k, v)
    one = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="slot -1 is outside"):
        cpu.decode_attention(torch.randn(1, 4, 4), k_rows, v_rows, torch.tensor([0, -1]),
                             torch.tensor([0, 2]), 0.5)
    with pytest.raises(RuntimeError, match="offsets must have B"):
        cpu.decode_attention(torch.randn(2, 4, 4), k_rows, v_rows, torch.tensor([0]), one, 0.5)
    with pytest.raises(RuntimeError, match="at least one key per sequence"):
        cpu.decode_attention(torch.randn(2, 4, 4), k_rows, v_rows, torch.tensor([0]),
                             torch.tensor([0, 0, 1]), 0.5)
    with pytest.raises(RuntimeError, match="3 query heads cannot share 2 KV heads"):
        cpu.decode_attention(torch.randn(1, 3, 4), k_rows, v_rows, torch.tensor([0]), one, 0.5)


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("preset", ["tiny-dense", "tiny"])
def test_quantized_model_native_path_tracks_the_exact_path(method: str, preset: str) -> None:
    """A whole quantized model through the native kernels (int8-quantized activations, fused
    ops, the fused MoE) against the same weights through the exact plain-torch path. They
    differ only by the activations' 8-bit quantization (kernel-level equality with emulating
    references is test_kernels.py's job): the greedy token agrees at nearly every position, and
    without routers to flip, the dense model's logits stay within 10% of their range (a wrong
    kernel is off by about 100%)."""
    from inference_pio.layers.quantization import QuantConfig
    from inference_pio.testing import PRESETS, random_model

    quant = QuantConfig(method, group_size=32 if method == "int4" else None,
                        quantize_lm_head=True)
    model = random_model(PRESETS[preset](None), torch.float32, quant, seed=5)
    native, plain = _native_and_plain_logits(model, 64, vocab=150000)
    agree = (native.argmax(-1) == plain.argmax(-1)).float().mean().item()
    assert agree >= 0.85, agree
    if preset == "tiny-dense":
        assert (native - plain).abs().max() <= 0.1 * plain.abs().max()


def test_build_model_chooses_each_op_once() -> None:
    """build_model picks every CustomOp's implementation from the device and dtype: the native
    CPU kernels for fp32 on the CPU, the plain-torch reference for bf16; unknown names fail."""
    from inference_pio.layers.custom_op import CustomOp, choose_impl, select_ops, triton_available
    from inference_pio.testing import random_model, tiny_moe_config

    def impls(model: torch.nn.Module) -> set[str]:
        return {m.impl for m in model.modules() if isinstance(m, CustomOp)}

    fp32 = random_model(tiny_moe_config(), torch.float32, seed=1)
    kinds = {type(m).__name__ for m in fp32.modules() if isinstance(m, CustomOp)}
    assert kinds == {"RMSNorm", "QKNormRope", "TopKRouting", "Experts"}
    assert impls(fp32) == {"cpu"}
    assert impls(random_model(tiny_moe_config(), torch.bfloat16, seed=1)) == {"native"}
    assert choose_impl("cuda", torch.bfloat16) == ("triton" if triton_available() else "cuda")
    with cpu.disabled():
        assert choose_impl("cpu", torch.float32) == "native"
    with pytest.raises(ValueError, match="unknown op implementation 'gpu'"):
        select_ops(fp32, "gpu")


@pytest.mark.parametrize(("tokens", "top_k"), [(1, 8), (3, 2), (8, 8), (9, 8)])
def test_moe_without_host_sync_matches_the_reference(tokens: int, top_k: int) -> None:
    """Experts' cuda implementation (a gathered batched matmul up to GATHER_MAX_ROWS pairs,
    the reference beyond) equals moe_reference; it runs on CPU tensors too."""
    from inference_pio.layers.moe import GATHER_MAX_ROWS, Experts, moe_reference

    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    experts = Experts(16, 24, 10)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g)
        experts.down_proj.normal_(generator=g)
    x = torch.randn(tokens, 24, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    experts.select("cuda")
    with torch.no_grad():
        got = experts(x, weights, ids)
        ref = moe_reference(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    assert (tokens * top_k <= GATHER_MAX_ROWS) == (tokens < 9)
    _close(got, ref, rtol=1e-5, atol=1e-4)
