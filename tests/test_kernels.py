"""Native CPU kernels (inference_pio.kernels.cpu) against their plain-torch references:

1. the activation quantizer is bit-exact with reference.quantize_acts;
2. int4 / int8 linear equal the reference that emulates the activation quantization, within
   float32 summation error (a per-element bound: 2e-6 * sum_i |x_i w_i|), and equal the exact
   float product (formats.dequantize_* then matmul) within the activation quantization error
   (a rigorous bound: sum_i |w_i| * amax(block of i) / 254);
3. odd rows, padded columns, every group size, batches 1..64 and past one token block, zeros;
4. the fused MoE call (int4, int8; stacked and per-expert lists) against the reference, with
   repeated experts, one expert for every token, a token routed to the same expert twice;
   skipped slots (id -1); experts run one call at a time (per_slot + slot_sum, as an expert
   cache would) equal the single call bit for bit;
5. batch invariance: a token's output does not depend on the other tokens of the call;
6. loading: INFERENCE_PIO_NATIVE=0, a missing compiler (reason + one warning, no build),
   `disabled()` blocks, the build cached under the cache dir.

The kernels are built once per test session (module fixture); everything skips, with the
reason, where they cannot be built."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inference_pio.kernels import cpu, reference
from inference_pio.layers.quantization import formats

SUM_RTOL = 2e-6  # float32 accumulation error, relative to sum |x_i w_i|


@pytest.fixture(scope="module")
def native() -> None:
    if not cpu.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu.reason()}")


@pytest.fixture(autouse=True)
def _needs_native(request: pytest.FixtureRequest) -> None:
    """Every test but TestLoading's (which never builds) needs the kernels."""
    if request.cls is not TestLoading:
        request.getfixturevalue("native")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4(rows: int, cols: int, group: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return formats.quantize_int4(torch.randn(rows, cols, generator=_gen(seed)), group)


def _int8(rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return formats.quantize_int8(torch.randn(rows, cols, generator=_gen(seed)))


def _acts(T: int, cols: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(T, cols, generator=_gen(seed))
    x[:, ::7] *= 20.0  # outlier channels, as real hidden states have
    return x


def _assert_matches_emulation(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                              ref: torch.Tensor) -> None:
    """y within float32 summation error of ref; w is the dequantized weight."""
    mag = reference.fake_quantize_acts(x).abs() @ w.double().abs().T
    err = (y.double() - ref.double()).abs()
    assert (err <= SUM_RTOL * mag + 1e-30).all(), \
        f"max error {(err / (mag + 1e-30)).max().item():.3g} x sum|x w|"


def _assert_within_act_quant_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y within the activation quantization error of the exact x @ w^T."""
    cols = x.shape[-1]
    blocks = F.pad(x.double(), (0, reference.act_cols(cols) - cols)).unflatten(-1, (-1, 32))
    half_step = (blocks.abs().amax(-1, keepdim=True) / 254).expand_as(blocks).flatten(-2)
    bound = half_step[:, :cols] @ w.double().abs().T
    exact = x.double() @ w.double().T
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T)
    err = (y.double() - exact).abs()
    assert (err <= bound * 1.001 + slack + 1e-30).all()


def _check_int4(rows: int, cols: int, group: int, T: int, seed: int = 0) -> None:
    p = _int4(rows, cols, group, seed)
    x = _acts(T, cols, seed + 1)
    y = cpu.int4_linear(x, p["qweight"], p["scales"], cols)
    assert y.shape == (T, rows) and y.dtype == torch.float32
    w = formats.dequantize_int4(p, cols)
    _assert_matches_emulation(y, x, w, reference.int4_linear(x, p["qweight"], p["scales"], cols))
    _assert_within_act_quant_error(y, x, w)


def _check_int8(rows: int, cols: int, T: int, seed: int = 0) -> None:
    p = _int8(rows, cols, seed)
    x = _acts(T, cols, seed + 1)
    y = cpu.int8_linear(x, p["qweight"], p["scales"])
    assert y.shape == (T, rows)
    w = formats.dequantize_int8(p, cols)
    _assert_matches_emulation(y, x, w, reference.int8_linear(x, p["qweight"], p["scales"]))
    _assert_within_act_quant_error(y, x, w)


# ---- activation quantizer -------------------------------------------------------------------

@pytest.mark.parametrize("T,cols,cols_p", [(1, 32, 32), (3, 100, 128), (5, 2048, 2048),
                                           (2, 64, 256), (4, 1, 64)])
def test_activation_quantizer_is_bit_exact(T: int, cols: int, cols_p: int) -> None:
    x = _acts(T, cols)
    x[0, : min(cols, 40)] = 0.0  # an all-zero block
    q, d, s = cpu.quantize_q8(x, cols_p)
    rq, rd = reference.quantize_acts(x, cols_p)
    assert q.dtype == torch.int8 and q.shape == (T, cols_p)
    assert torch.equal(q.float(), rq)
    assert torch.equal(d, rd)
    assert torch.equal(s, rq.unflatten(-1, (-1, 32)).sum(-1))


# ---- int4 linear ----------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows,cols", [(1, 100), (3, 2048), (768, 2048), (2049, 768),
                                       (7, 4096 + 32), (2, 64), (5, 4096)])
def test_int4_linear_shapes(rows: int, cols: int, group: int) -> None:
    for T in (1, 7):
        _check_int4(rows, cols, group, T)


@pytest.mark.parametrize("rows,cols,group", [
    (33, 64, 64),     # one scale group per row (no pair of groups to gather), a 1-row tail
    (40, 100, 128),   # the same with padding; 8 rows past the last 16-row tile
    (48, 192, 64),    # an odd number of groups: the last pairs with the one before
    (64, 2048, 32),   # two groups per 64-column block
    (16, 4096, 128),  # one tile exactly
])
def test_int4_linear_tile_edges(rows: int, cols: int, group: int) -> None:
    """Shapes at the edges of the AVX-512 VNNI kernel's 16-row tiles and scale gathers (on an
    AVX2 build they are plain shapes)."""
    for T in (1, 5):
        _check_int4(rows, cols, group, T, seed=rows)


@pytest.mark.parametrize("rows,cols", [(33, 70), (16, 100), (48, 2048), (40, 4096 + 16)])
def test_int8_linear_tile_edges(rows: int, cols: int) -> None:
    """The VNNI int8 kernel's 16-row tiles, the rows past them, and a partial last 32-column
    block read with a byte mask."""
    for T in (1, 6):
        _check_int8(rows, cols, T, seed=rows)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64])
def test_int4_linear_batches(T: int, group: int) -> None:
    _check_int4(37, 300, group, T, seed=T)


def test_int4_linear_past_one_token_block() -> None:
    _check_int4(5, 200, 64, 300)


def test_int4_linear_zeros() -> None:
    p = _int4(9, 160, 32)
    x = _acts(4, 160)
    x[1] = 0.0
    y = cpu.int4_linear(x, p["qweight"], p["scales"], 160)
    assert torch.equal(y[1], torch.zeros(9))
    zero = formats.quantize_int4(torch.zeros(9, 160), 32)
    assert torch.equal(cpu.int4_linear(x, zero["qweight"], zero["scales"], 160),
                       torch.zeros(4, 9))


def test_int4_linear_dtype_and_leading_dims() -> None:
    p = _int4(6, 96, 32)
    x = _acts(6, 96).reshape(2, 3, 96)
    y = cpu.int4_linear(x.bfloat16(), p["qweight"], p["scales"], 96)
    assert y.shape == (2, 3, 6) and y.dtype == torch.bfloat16
    flat = cpu.int4_linear(x.bfloat16().float().reshape(6, 96), p["qweight"], p["scales"], 96)
    assert torch.equal(y.reshape(6, 6), flat.bfloat16())


def test_int4_linear_rejects_bad_shapes() -> None:
    p = _int4(4, 128, 64)
    with pytest.raises((ValueError, RuntimeError), match="columns"):
        cpu.int4_linear(torch.zeros(1, 100), p["qweight"], p["scales"], 128)
    with pytest.raises((ValueError, RuntimeError), match="columns"):
        cpu.int4_linear(torch.zeros(2, 1, 100), p["qweight"], p["scales"], 128)
    with pytest.raises(RuntimeError, match="padded"):
        cpu.int4_linear(torch.zeros(1, 40), p["qweight"], p["scales"], 40)  # 128 is not 40's pad
    with pytest.raises(RuntimeError, match="group"):
        cpu.int4_linear(torch.zeros(1, 128), p["qweight"], p["scales"].repeat(1, 4), 128)


# ---- int8 linear ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(1, 100), (3, 31), (4, 33), (768, 2048), (2049, 768),
                                       (5, 4096 + 32)])
@pytest.mark.parametrize("T", [1, 3, 16, 64])
def test_int8_linear(rows: int, cols: int, T: int) -> None:
    _check_int8(rows, cols, T)


def test_int8_linear_past_one_token_block_and_zeros() -> None:
    _check_int8(3, 70, 200)
    p = _int8(5, 70)
    assert torch.equal(cpu.int8_linear(torch.zeros(2, 70), p["qweight"], p["scales"]),
                       torch.zeros(2, 5))


# ---- batch invariance -----------------------------------------------------------------------

def test_linear_outputs_do_not_depend_on_the_batch() -> None:
    p4, p8 = _int4(11, 300, 64), _int8(11, 300)
    x = _acts(9, 300)
    y4 = cpu.int4_linear(x, p4["qweight"], p4["scales"], 300)
    y8 = cpu.int8_linear(x, p8["qweight"], p8["scales"])
    for t in range(9):
        row = x[t:t + 1]
        assert torch.equal(cpu.int4_linear(row, p4["qweight"], p4["scales"], 300), y4[t:t + 1])
        assert torch.equal(cpu.int8_linear(row, p8["qweight"], p8["scales"]), y8[t:t + 1])


# ---- fused experts --------------------------------------------------------------------------

E, HIDDEN, INTER = 8, 200, 96  # hidden and intermediate both need padding for int4


def _experts(method: str, group: int = 64) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    def quant(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(E, rows, cols, generator=_gen(seed)) / cols ** 0.5
        p = formats.quantize_int4(w, group) if method == "int4" else formats.quantize_int8(w)
        return p["qweight"], p["scales"]
    return quant(INTER, HIDDEN, 10), quant(INTER, HIDDEN, 11), quant(HIDDEN, INTER, 12)


def _routing(T: int, k: int, case: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    if case == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    elif case == "one_expert":
        ids = torch.full((T, k), 5, dtype=torch.int64)
    elif case == "repeated_in_token":
        ids = torch.randint(0, E, (T, k), generator=g)
        ids[:, -1] = ids[:, 0]
    else:
        raise ValueError(case)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return weights, ids


def _moe(method: str, x: torch.Tensor, experts: tuple, weights: torch.Tensor,
         ids: torch.Tensor) -> torch.Tensor:
    fn = cpu.int4_moe if method == "int4" else cpu.int8_moe
    return fn(x, *experts, weights, ids)


def _check_moe(method: str, T: int, k: int, case: str, group: int = 64) -> torch.Tensor:
    experts = _experts(method, group)
    x = _acts(T, HIDDEN)
    weights, ids = _routing(T, k, case)
    y = _moe(method, x, experts, weights, ids)
    assert y.shape == (T, HIDDEN) and y.dtype == torch.float32
    ref = reference.moe(method, x, *experts, weights, ids)
    exact = reference.moe(method, x, *experts, weights, ids, quantize_acts=False)
    scale = ref.abs().max().item()
    err = (y - ref).abs()
    # the hidden vector is re-quantized: a float32-rounding difference can move one of its
    # codes by one step (rare), hence a max bound looser than the mean's
    assert err.max().item() <= 2e-3 * scale
    assert err.mean().item() <= 1e-5 * scale
    assert (y - exact).abs().max().item() <= 0.03 * scale
    return y


@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("T", [1, 3, 16, 64])
@pytest.mark.parametrize("case", ["random", "one_expert", "repeated_in_token"])
def test_moe_matches_reference(method: str, T: int, case: str) -> None:
    _check_moe(method, T, 4, case)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("k", [1, 8])
def test_int4_moe_groups_and_top_k(group: int, k: int) -> None:
    _check_moe("int4", 5, k, "random", group)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_moe_list_equals_stacked_and_is_batch_invariant(method: str) -> None:
    experts = _experts(method)
    x = _acts(6, HIDDEN)
    weights, ids = _routing(6, 4, "repeated_in_token")
    y = _moe(method, x, experts, weights, ids)
    per_expert = [{proj: {"qweight": q[e], "scales": s[e]}
                   for proj, (q, s) in zip(("gate_proj", "up_proj", "down_proj"), experts)}
                  for e in range(E)]
    assert torch.equal(cpu.moe_from_list(method, x, per_expert, weights, ids), y)
    for t in range(6):
        assert torch.equal(_moe(method, x[t:t + 1], experts, weights[t:t + 1], ids[t:t + 1]),
                           y[t:t + 1])


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_moe_paged_one_expert_at_a_time_equals_resident(method: str) -> None:
    """What an expert cache does: one per_slot call per expert (the others' slots -1), the
    slots added up, then slot_sum: bit for bit the single fused call."""
    experts = _experts(method)
    x = _acts(7, HIDDEN)
    weights, ids = _routing(7, 4, "repeated_in_token")
    fused = _moe(method, x, experts, weights, ids)
    slots = torch.zeros(7, 4, HIDDEN)
    for e in ids.unique().tolist():
        parts = {proj: {"qweight": q[e], "scales": s[e]}
                 for proj, (q, s) in zip(("gate_proj", "up_proj", "down_proj"), experts)}
        local = torch.where(ids == e, 0, -1)
        slots += cpu.moe_from_list(method, x, [parts], weights, local, per_slot=True)
    assert torch.equal(cpu.slot_sum(slots, weights), fused)


def test_moe_skipped_slots_count_as_zero_weight() -> None:
    experts = _experts("int4")
    x = _acts(5, HIDDEN)
    weights, ids = _routing(5, 4, "random")
    skipped, zeroed = ids.clone(), weights.clone()
    skipped[:, 1] = -1
    zeroed[:, 1] = 0.0
    assert torch.equal(cpu.int4_moe(x, *experts, weights, skipped),
                       cpu.int4_moe(x, *experts, zeroed, ids))
    assert torch.equal(cpu.int4_moe(x, *experts, weights, torch.full_like(ids, -1)),
                       torch.zeros(5, HIDDEN))


def test_moe_takes_bf16_and_non_contiguous_inputs() -> None:
    experts = _experts("int4")
    x = _acts(3, HIDDEN).bfloat16()
    weights, ids = _routing(3, 4, "random")
    y = cpu.int4_moe(x, *experts, weights.bfloat16(), ids.int())
    assert y.dtype == torch.bfloat16
    ref = cpu.int4_moe(x.float(), *experts, weights.bfloat16().float(), ids)
    assert torch.equal(y, ref.bfloat16())
    wide = torch.zeros(3, 2 * HIDDEN)
    wide[:, ::2] = x.float()  # a strided view of the same values
    assert torch.equal(cpu.int4_moe(wide[:, ::2], *experts, weights.bfloat16().float(), ids),
                       ref)


def test_moe_rejects_bad_ids() -> None:
    experts = _experts("int4")
    with pytest.raises(RuntimeError, match="expert"):
        cpu.int4_moe(torch.zeros(1, HIDDEN), *experts, torch.ones(1, 1),
                     torch.tensor([[E]]))


# ---- loading --------------------------------------------------------------------------------

class TestLoading:
    """The fallback paths; no build happens here."""

    def test_disabled_by_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(cpu, "_state", {})
        monkeypatch.setenv("INFERENCE_PIO_NATIVE", "0")
        assert not cpu.available()
        assert "INFERENCE_PIO_NATIVE" in (cpu.reason() or "")
        with pytest.raises(cpu.KernelUnavailable, match="INFERENCE_PIO_NATIVE"):
            cpu.int8_linear(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int8),
                            torch.ones(1))

    def test_missing_compiler_warns_once(self, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture,
                                         tmp_path: Path) -> None:
        """No compiler and no prebuilt library (a prebuilt one loads without a compiler:
        test_kernel_cache.py)."""
        monkeypatch.setattr(cpu, "_state", {})
        monkeypatch.setenv("INFERENCE_PIO_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the fallback cache
        monkeypatch.delenv("INFERENCE_PIO_NATIVE", raising=False)
        monkeypatch.setenv("CXX", "no-such-compiler-xyz")
        with caplog.at_level(logging.WARNING, logger=cpu.__name__):
            assert not cpu.available()
            assert not cpu.available()
        assert "no C++ compiler" in (cpu.reason() or "")
        warnings = [r for r in caplog.records if "plain-torch" in r.getMessage()]
        assert len(warnings) == 1


def test_disabled_block() -> None:
    with cpu.disabled():
        assert not cpu.available()
        with cpu.disabled():
            assert not cpu.available()
        assert not cpu.available()
    assert cpu.available()


def test_build_is_cached_under_the_cache_dir() -> None:
    assert cpu.build_dir().is_dir()
    assert cpu.build_dir().name == cpu.build_name()
