"""The native bf16 / fp16-weight linear kernel (inference_pio.kernels.cpu.float_linear) against
the plain-torch product x @ weight.float().T (in float64: the widening of bf16 / fp16 is exact,
so the only error is the kernel's float32 summation):

1. odd rows and columns (every tail of the 16-column steps), 1..70 tokens (every register tile,
   the row-blocked and the widened-block paths, past one token block), bf16 and fp16, empty
   shapes;
2. batch invariance: a token's output does not depend on the other tokens, bit for bit;
3. the wrapper: leading dims, bf16 / non-contiguous activations, non-contiguous weights;
4. clear errors for wrong dtypes, shapes, layouts and devices;
5. FloatMethod.apply: the kernel for fp32 activations on bf16 / fp16 weights up to
   FLOAT_NATIVE_MAX_TOKENS tokens, equal to the chunked fp32 path within fp32 error; the
   chunked path beyond, and for other dtypes;
6. on CPUs with AMX-BF16, the AMX kernel (shapes on its tiles, batch invariance, exact for the
   bf16-rounded activations within fp32 error), taken by bf16 weights from AMX_MIN_TOKENS
   tokens.

Everything skips, with the reason, where the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch

from inference_pio.kernels import cpu
from inference_pio.layers.quantization import methods
from inference_pio.layers.quantization.methods import FloatMethod

DTYPES = [torch.bfloat16, torch.float16]
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if not cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu.reason()}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=_gen(seed)) * 0.5).to(dtype)


def _acts(T: int, cols: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(T, cols, generator=_gen(seed))
    x[:, ::7] *= 20.0  # outlier channels, as real hidden states have
    return x


def _assert_close_to_exact(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """|y - x @ w^T| <= gamma_n * sum_i |x_i w_i|: n = the roundings of one output (one FMA per
    column, padded to 16, and the 3 adds of the horizontal sum), a rigorous bound that is still
    far below one missing or doubled term."""
    cols = x.shape[-1]
    n = 2 * -(-cols // 16) + 3
    gamma = n * U / (1 - n * U)
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    err = (y.double() - exact).abs()
    assert (err <= gamma * mag).all(), \
        f"max error {(err / (mag + 1e-300)).max().item():.3g} x sum|x w| > {gamma:.3g}"


# ---- shapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 1000])
@pytest.mark.parametrize("cols", [1, 7, 8, 15, 16, 33, 2048])
def test_float_linear_shapes(rows: int, cols: int, dtype: torch.dtype) -> None:
    w = _weight(rows, cols, dtype, seed=rows + cols)
    for T in (1, 2, 3, 4, 5, 7, 16, 33, 64):
        if rows * cols * T > 1 << 24:  # keeps the module fast; the biggest shape gets T <= 7
            continue
        x = _acts(T, cols, seed=T)
        y = cpu.float_linear(x, w)
        assert y.shape == (T, rows) and y.dtype == torch.float32
        _assert_close_to_exact(y, x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,T", [(100, 2048, 70), (1000, 33, 13), (37, 300, 130),
                                         (2, 5, 200), (49, 2056, 12)])
def test_float_linear_row_and_token_blocks(rows: int, cols: int, T: int,
                                           dtype: torch.dtype) -> None:
    """Several row blocks per thread, more tokens than one token block, fp16's widened blocks."""
    w = _weight(rows, cols, dtype, seed=T)
    x = _acts(T, cols, seed=T + 1)
    _assert_close_to_exact(cpu.float_linear(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_linear_empty_and_zero(dtype: torch.dtype) -> None:
    w = _weight(5, 24, dtype)
    assert cpu.float_linear(torch.zeros(0, 24), w).shape == (0, 5)
    assert cpu.float_linear(_acts(3, 24), w[:0]).shape == (3, 0)
    assert torch.equal(cpu.float_linear(torch.ones(2, 0), torch.ones(4, 0, dtype=dtype)),
                       torch.zeros(2, 4))
    x = _acts(4, 24)
    x[1] = 0.0
    y = cpu.float_linear(x, w)
    assert torch.equal(y[1], torch.zeros(5))
    assert torch.equal(cpu.float_linear(x, torch.zeros(5, 24, dtype=dtype)), torch.zeros(4, 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_linear_special_values(dtype: torch.dtype) -> None:
    """inf and nan propagate as in the float product (no masking or padding artifacts)."""
    w = _weight(3, 19, dtype)
    x = _acts(2, 19)
    x[0, 18] = float("inf")  # in the partial last step
    x[1, 3] = float("nan")
    want = x.double() @ w.double().T
    y = cpu.float_linear(x, w)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())


# ---- batch invariance ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(100, 2048), (61, 45), (7, 16)])
def test_float_linear_outputs_do_not_depend_on_the_batch(rows: int, cols: int,
                                                         dtype: torch.dtype) -> None:
    w = _weight(rows, cols, dtype, seed=3)
    x = _acts(70, cols, seed=4)
    single = torch.cat([cpu.float_linear(x[t:t + 1], w) for t in range(70)])
    for T in (2, 3, 4, 5, 9, 16, 33, 70):
        assert torch.equal(cpu.float_linear(x[:T], w), single[:T]), f"T={T}"


# ---- the wrapper --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_float_linear_wrapper_inputs(dtype: torch.dtype) -> None:
    w = _weight(9, 40, dtype)
    x = _acts(6, 40)
    flat = cpu.float_linear(x, w)
    y3 = cpu.float_linear(x.reshape(2, 3, 40), w)  # leading dims
    assert y3.shape == (2, 3, 9) and torch.equal(y3.reshape(6, 9), flat)
    xt = x.T.contiguous().T  # non-contiguous activations
    assert not xt.is_contiguous() and torch.equal(cpu.float_linear(xt, w), flat)
    wide = torch.zeros(9, 50, dtype=dtype)
    wide[:, :40] = w  # non-contiguous weight
    assert torch.equal(cpu.float_linear(x, wide[:, :40]), flat)
    xb = x.bfloat16()  # activations in another float dtype come back in it
    yb = cpu.float_linear(xb.reshape(3, 2, 40), w)
    assert yb.dtype == torch.bfloat16 and yb.shape == (3, 2, 9)
    assert torch.equal(yb.reshape(6, 9), cpu.float_linear(xb.float(), w).bfloat16())
    yd = cpu.float_linear(x.double(), w)
    assert yd.dtype == torch.float64 and torch.equal(yd, flat.double())


# ---- errors -------------------------------------------------------------------------------------

def test_float_linear_rejects_bad_inputs() -> None:
    op = cpu.module().float_linear  # type: ignore[attr-defined]
    w = _weight(4, 32, torch.bfloat16)
    x = _acts(2, 32)
    with pytest.raises(RuntimeError, match="weight must be BFloat16 or Half, got Float"):
        cpu.float_linear(x, w.float())
    with pytest.raises(RuntimeError, match="weight must be BFloat16 or Half, got Char"):
        cpu.float_linear(x, w.to(torch.int8))
    with pytest.raises(RuntimeError, match="x must be Float"):
        op(x.double(), w)
    with pytest.raises(RuntimeError, match="x has 31 columns, the weight has 32"):
        cpu.float_linear(x[:, :31].contiguous(), w)
    with pytest.raises(ValueError, match="columns"):
        cpu.float_linear(x[:, :31], w)  # the converting path checks before the kernel
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        cpu.float_linear(x, w[0])
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        op(x[0], w)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(x.T.contiguous().T, w)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(x, torch.zeros(32, 4, dtype=torch.bfloat16).T)
    with pytest.raises(RuntimeError, match="must be on the CPU"):
        op(x.to("meta"), w)


# ---- FloatMethod.apply ------------------------------------------------------------------------

@pytest.fixture()
def native_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Token counts of the calls FloatMethod makes to the native kernel."""
    calls: list[int] = []
    real = cpu.float_linear

    def spy(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(x.numel() // x.shape[-1])
        return real(x, weight)

    monkeypatch.setattr(cpu, "float_linear", spy)
    monkeypatch.setattr(methods, "AMX_MIN_TOKENS", 1 << 30)  # the fp32 kernel's rules
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 64])
def test_float_method_uses_native_kernel(dtype: torch.dtype, T: int,
                                         native_calls: list[int]) -> None:
    method = FloatMethod(dtype)
    parts = method.quantize(torch.randn(150, 97, generator=_gen(5)) * 0.05)
    x = _acts(T, 97, seed=T)
    got = method.apply_cpu(parts, x, 97)
    assert native_calls == [T]
    assert got.dtype == torch.float32 and torch.equal(got, cpu.float_linear(x, parts["weight"]))
    chunked = method.apply(parts, x, 97)  # the reference
    assert native_calls == [T, T]  # the check above; none for the chunked path
    scale = chunked.abs().amax()
    torch.testing.assert_close(got / scale, chunked / scale, rtol=1e-5, atol=1e-5)
    _assert_close_to_exact(got, x, parts["weight"])


def test_float_method_dispatch_rules(native_calls: list[int],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = FloatMethod(torch.bfloat16)
    parts = bf16.quantize(torch.randn(20, 33, generator=_gen(6)))
    x = _acts(5, 33)
    monkeypatch.setattr(methods, "FLOAT_NATIVE_MAX_TOKENS", 4)
    y = bf16.apply_cpu(parts, x, 33)  # past the threshold: the chunked fp32 GEMM
    assert native_calls == []
    _assert_close_to_exact(y, x, parts["weight"])
    bf16.apply_cpu(parts, x[:4].reshape(2, 2, 33), 33)  # tokens are all rows of x
    assert native_calls == [4]
    assert bf16.apply_cpu(parts, x.bfloat16(), 33).dtype == torch.bfloat16  # same dtype: F.linear
    fp32 = FloatMethod(torch.float32)
    fp32.apply_cpu(fp32.quantize(torch.randn(20, 33)), x, 33)
    assert native_calls == [4]


def test_amx_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, isa in [({"avx2", "avx512f", "avx512_bf16"}, "auto"),
                       ({"avx2", "avx512f", "amx_bf16"}, "avx2")]:
        monkeypatch.setenv("INFERENCE_PIO_CPU_ISA", isa)
        assert cpu.amx_bf16_supported.__wrapped__(frozenset(flags)) is False


needs_amx = pytest.mark.skipif(not cpu.amx_bf16_supported(),
                               reason="the CPU has no AMX-BF16 (or Linux does not grant it)")


def _assert_bf16_products(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Exact for the bf16-rounded activations within fp32 sums (at most one rounding a column,
    whatever order the tiles sum in), and within one bf16 rounding of x of the fp32 product."""
    n = x.shape[-1] + 1
    xr = x.bfloat16().double()
    mag = xr.abs() @ w.double().abs().T
    err = (y.double() - xr @ w.double().T).abs()
    assert (err <= n * U / (1 - n * U) * mag).all(), f"max {(err / (mag + 1e-300)).max():.3g}"
    mag = x.double().abs() @ w.double().abs().T
    assert ((y.double() - x.double() @ w.double().T).abs() <= 2.0**-8 * mag).all()


@needs_amx
@pytest.mark.parametrize("rows", [16, 48, 160])
@pytest.mark.parametrize("cols", [32, 96, 2048])
def test_amx_linear_shapes_and_batch_invariance(rows: int, cols: int) -> None:
    w = _weight(rows, cols, torch.bfloat16, seed=rows + cols)
    x = _acts(83, cols, seed=cols)  # 6 token blocks: a pass of 4, then one of 2 (the last partial)
    y = cpu.amx_bf16_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (83, rows)
    _assert_bf16_products(y, x, w)
    for T in (1, 5, 16, 17, 64, 65):  # every token tile: the same bits for each token
        assert torch.equal(cpu.amx_bf16_linear(x[:T], w), y[:T])
    assert cpu.amx_bf16_linear(x[:0], w).shape == (0, rows)
    assert cpu.amx_bf16_linear(x[:6].reshape(3, 2, cols), w).shape == (3, 2, rows)


@needs_amx
def test_amx_linear_refuses_shapes_off_the_tiles() -> None:
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu.amx_bf16_linear(_acts(4, 33), _weight(16, 33, torch.bfloat16))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu.amx_bf16_linear(_acts(4, 32), _weight(17, 32, torch.bfloat16))


@needs_amx
def test_bf16_weights_take_amx_from_the_threshold(native_calls: list[int],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "AMX_MIN_TOKENS", 8)
    bf16 = FloatMethod(torch.bfloat16)
    parts = bf16.quantize(torch.randn(320, 96, generator=_gen(7)) * 0.05)
    for T in (8, 40):
        x = _acts(T, 96, seed=T)
        y = bf16.apply_cpu(parts, x, 96)
        assert torch.equal(y, cpu.amx_bf16_linear(x, parts["weight"]))
        _assert_bf16_products(y, x, parts["weight"])
    assert native_calls == []
    bf16.apply_cpu(parts, _acts(7, 96), 96)  # under the threshold: the fp32 kernel
    odd = bf16.quantize(torch.randn(300, 97, generator=_gen(8)) * 0.05)
    bf16.apply_cpu(odd, _acts(8, 97), 97)  # off the tiles: the fp32 kernel
    fp16 = FloatMethod(torch.float16)
    fp16.apply_cpu(fp16.quantize(parts["weight"].float()), _acts(16, 96), 96)  # fp16 weights
    assert native_calls == [7, 8, 16]


# ---- fused routed experts (float_moe) ------------------------------------------------------

def _moe_ref(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor,
             w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The MoE in float64 from the widened weights, slot by slot."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e < 0:
                continue
            xt = x[t].double()
            h = torch.nn.functional.silu(g[e].double() @ xt) * (u[e].double() @ xt)
            out[t] += w[t, s].double() * (d[e].double() @ h)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 9, 40])
def test_float_moe_matches_float64(dtype: torch.dtype, T: int) -> None:
    """Odd hidden / intermediate sizes (step tails), repeated experts, a skipped slot, experts
    with 1..many tokens (the decode tiles and the row-blocked path); within float32 error of
    the float64 product (SiLU's vectorized exp adds ~2e-7 relative), and batch invariant."""
    E, H, I, k = 12, 200, 90, 4
    g = (torch.randn(E, I, H, generator=_gen(1)) / H ** 0.5).to(dtype)
    u = (torch.randn(E, I, H, generator=_gen(2)) / H ** 0.5).to(dtype)
    d = (torch.randn(E, H, I, generator=_gen(3)) / I ** 0.5).to(dtype)
    x = torch.randn(T, H, generator=_gen(4))
    ids = torch.randint(0, E, (T, k), generator=_gen(5))
    ids[0, -1] = -1
    if T > 1:
        ids[1, 2] = ids[1, 0]  # one token routed to the same expert twice
    w = torch.softmax(torch.randn(T, k, generator=_gen(6)), -1)
    y = cpu.float_moe(x, g, u, d, w, ids)
    ref = _moe_ref(x, g, u, d, w, ids)
    assert y.dtype == torch.float32 and y.shape == (T, H)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    for t in range(T):
        assert torch.equal(cpu.float_moe(x[t:t + 1], g, u, d, w[t:t + 1], ids[t:t + 1]),
                           y[t:t + 1])


def test_float_moe_rejects_bad_inputs() -> None:
    g = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    d = torch.zeros(4, 16, 8, dtype=torch.bfloat16)
    x, w = torch.zeros(2, 16), torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="only 4 experts"):
        cpu.float_moe(x, g, g, d, w, torch.tensor([[0], [4]]))
    with pytest.raises(RuntimeError, match="BFloat16 or Half"):
        cpu.float_moe(x, g.float(), g.float(), d.float(), w, torch.tensor([[0], [1]]))
    with pytest.raises(RuntimeError, match="expected gate and up"):
        cpu.float_moe(x, g, g, g, w, torch.tensor([[0], [1]]))
    assert torch.equal(cpu.float_moe(x, g, g, d, w, torch.full((2, 1), -1)), torch.zeros(2, 16))


@needs_amx
def test_float_moe_on_amx_from_the_threshold() -> None:
    """bf16 experts routed >= amx_min_tokens tokens run on AMX tiles: within one bf16 rounding
    of the activations and of the hidden vectors of the float64 MoE; experts under the
    threshold keep the fp32 kernel's result bit for bit; a token's output does not depend on
    the others of its expert's tile."""
    E, H, I, k, T = 6, 96, 64, 2, 40
    g = (torch.randn(E, I, H, generator=_gen(1)) / H ** 0.5).bfloat16()
    u = (torch.randn(E, I, H, generator=_gen(2)) / H ** 0.5).bfloat16()
    d = (torch.randn(E, H, I, generator=_gen(3)) / I ** 0.5).bfloat16()
    x = torch.randn(T, H, generator=_gen(4))
    ids = torch.randint(0, E - 1, (T, k), generator=_gen(5))
    ids[0, 1] = E - 1  # one expert gets one token: under the threshold
    w = torch.softmax(torch.randn(T, k, generator=_gen(6)), -1)
    y = cpu.float_moe(x, g, u, d, w, ids, amx_min_tokens=8)
    fp32 = cpu.float_moe(x, g, u, d, w, ids)
    ref = _moe_ref(x, g, u, d, w, ids)
    assert not torch.equal(y, fp32)  # the AMX path ran
    assert (y.double() - ref).abs().max().item() <= 2.0**-6 * ref.abs().max().item()
    lone = torch.full_like(ids, -1)
    lone[0, 1] = E - 1  # the under-threshold expert alone: the fp32 kernel either way
    assert torch.equal(cpu.float_moe(x, g, u, d, w, lone, amx_min_tokens=8),
                       cpu.float_moe(x, g, u, d, w, lone))
    with pytest.raises(RuntimeError, match="pass amx_min_tokens=0"):
        cpu.float_moe(x, g.half(), u.half(), d.half(), w, ids, amx_min_tokens=8)
