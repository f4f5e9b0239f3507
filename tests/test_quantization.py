"""Weight quantization against plain references written here (loops over rows, groups, blocks
and bytes), never against the code under test:

1. round trips of each format (int8, int4, nf4, fp8 block scales) and their error bounds;
2. the 4-bit packing order and group / padding edges;
3. `QuantMethod.apply` equals dequantize-then-matmul;
4. models loaded with a quantization equal the float model whose weights went through the
   reference quantize -> dequantize (the whole replace-modules path), with routers, norms and
   embeddings left alone;
5. loading through `LLM`, option and quantization_config refusals, pre-quantized and FP8
   checkpoints;
6. the loaded model holds exactly the planned bytes (no float copy of a quantized weight)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inference_pio.config import ConfigError, ModelConfig
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.kernels import cpu as native_cpu
from inference_pio.layers.moe import Experts
from inference_pio.layers.norm import RMSNorm
from inference_pio.layers.quantization import (
    CompactEmbedding,
    QuantConfig,
    QuantExperts,
    QuantizationError,
    QuantLinear,
    formats,
)
from inference_pio.layers.quantization.methods import (
    FloatMethod,
    FP8Method,
    Int4Method,
    Int8Method,
    NF4Method,
    QuantMethod,
)
from inference_pio.llm import LLM
from inference_pio.models.loader import CheckpointError, LoadConfig, load_model
from inference_pio.models.quantize import quantize_checkpoint
from inference_pio.models.weight_plan import plan_weights
from inference_pio.runtime.kv_cache import ContiguousKVCache
from inference_pio.sampling_params import SamplingParams
from inference_pio.testing import tiny_dense_config, tiny_moe_config, write_random_checkpoint

# ==== plain references ======================================================================

# bitsandbytes' NormalFloat-4 code book (bitsandbytes.functional.get_4bit_type("nf4")), typed
# in again here so that a changed table in formats.py is noticed.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP8_BLOCK = 128
E4M3_MAX = 448.0


def ref_padded_cols(cols: int, group: int) -> int:
    step = max(64, group)
    return (cols + step - 1) // step * step


def ref_pack(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols_p] codes in [0, 16) -> bytes: byte i of 64-column block b holds column
    b*64+i in its low nibble and column b*64+i+32 in its high nibble."""
    rows = codes.tolist()
    out = []
    for row in rows:
        packed = []
        for b in range(len(row) // 64):
            for i in range(32):
                packed.append(row[b * 64 + i] | (row[b * 64 + i + 32] << 4))
        out.append(packed)
    return torch.tensor(out, dtype=torch.uint8).reshape(codes.shape[0], -1)


def ref_unpack(packed: torch.Tensor) -> torch.Tensor:
    out = []
    for row in packed.tolist():
        codes = []
        for b in range(len(row) // 32):
            block = row[b * 32:(b + 1) * 32]
            codes += [byte & 0xF for byte in block] + [byte >> 4 for byte in block]
        out.append(codes)
    return torch.tensor(out, dtype=torch.uint8).reshape(packed.shape[0], -1)


def ref_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: scale = absmax / 127 (float32), q = round(w / scale)."""
    w = w.float()
    q = torch.zeros(w.shape, dtype=torch.int8)
    scales = torch.zeros(w.shape[0], dtype=torch.float32)
    for r in range(w.shape[0]):
        s = w[r].abs().max() / 127.0
        scales[r] = s
        if s > 0:
            q[r] = torch.round(w[r] / s).clamp(-127, 127).to(torch.int8)
    return q, scales


def ref_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [rows, cols_p] uint8 = q + 8, scales fp16 [rows, cols_p / group]): per group,
    scale = (value of largest magnitude, first on ties) / -8 rounded to fp16, q = round(w /
    scale) clamped to [-8, 7]; padding columns are zero."""
    rows, cols = w.shape
    cols_p = ref_padded_cols(cols, group)
    wp = torch.zeros(rows, cols_p)
    wp[:, :cols] = w.float()
    codes = torch.zeros(rows, cols_p, dtype=torch.uint8)
    scales = torch.zeros(rows, cols_p // group, dtype=torch.float16)
    for g in range(cols_p // group):
        block = wp[:, g * group:(g + 1) * group]
        biggest = block.gather(1, block.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        s = (biggest / -8.0).to(torch.float16)
        scales[:, g] = s
        sf = s.float()[:, None]
        q = torch.where(sf != 0, torch.round(block / torch.where(sf != 0, sf, 1.0)), 0.0)
        codes[:, g * group:(g + 1) * group] = (q.clamp(-8, 7) + 8).to(torch.uint8)
    return codes, scales


def ref_int4_dequant(codes: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    group = codes.shape[1] // scales.shape[1]
    expanded = scales.float().repeat_interleave(group, dim=1)
    return ((codes.float() - 8.0) * expanded)[:, :cols]


def ref_nf4(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [rows, cols_p], absmax fp32 [rows, cols_p / block]): the nearest code book value
    to w / absmax of its block."""
    rows, cols = w.shape
    cols_p = ref_padded_cols(cols, block)
    wp = torch.zeros(rows, cols_p)
    wp[:, :cols] = w.float()
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    codes = torch.zeros(rows, cols_p, dtype=torch.uint8)
    absmax = torch.zeros(rows, cols_p // block)
    for b in range(cols_p // block):
        part = wp[:, b * block:(b + 1) * block]
        a = part.abs().amax(dim=1)
        absmax[:, b] = a
        normed = part / torch.where(a > 0, a, 1.0)[:, None]
        codes[:, b * block:(b + 1) * block] = (
            (normed[..., None] - table).abs().argmin(dim=-1).to(torch.uint8))
    return codes, absmax


def ref_nf4_dequant(codes: torch.Tensor, absmax: torch.Tensor, cols: int) -> torch.Tensor:
    block = codes.shape[1] // absmax.shape[1]
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    return (table[codes.long()] * absmax.repeat_interleave(block, dim=1))[:, :cols]


def ref_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block (edge blocks smaller): scale_inv = absmax / 448 (1 for an all-zero
    block), weight = float8_e4m3fn(w / scale_inv)."""
    w = w.float()
    rows, cols = w.shape
    nr, nc = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    scale_inv = torch.ones(nr, nc)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            rs, cs = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK,
                                                                     (j + 1) * FP8_BLOCK)
            tile = w[rs, cs]
            s = tile.abs().max() / E4M3_MAX
            if s > 0:
                scale_inv[i, j] = s
            q[rs, cs] = (tile / scale_inv[i, j]).to(torch.float8_e4m3fn)
    return q, scale_inv


def ref_fp8_dequant(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out = q.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] *= (
                scale_inv[i, j])
    return out


_FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ref_fake_quant(method: str, group: int | None, w: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(w)) by the references, float32."""
    cols = w.shape[1]
    if method in _FLOATS:
        return w.to(_FLOATS[method]).float()
    if method == "int8":
        q, s = ref_int8(w)
        return q.float() * s[:, None]
    if method == "int4":
        return ref_int4_dequant(*ref_int4(w, group or 64), cols)
    if method == "nf4":
        return ref_nf4_dequant(*ref_nf4(w, group or 64), cols)
    assert method == "fp8"
    return ref_fp8_dequant(*ref_fp8(w))


def ref_dequant_parts(method: str, parts: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    """A method's stored parts -> float32 weight, read by the references."""
    if method in _FLOATS:
        return parts["weight"].float()
    if method == "int8":
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    if method == "int4":
        return ref_int4_dequant(ref_unpack(parts["qweight"]), parts["scales"], cols)
    if method == "nf4":
        return ref_nf4_dequant(ref_unpack(parts["qweight"]), parts["absmax"], cols)
    return ref_fp8_dequant(parts["weight"], parts["weight_scale_inv"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """Tiny matmuls: with two threads on two cores shared with other work, OpenMP's spinning
    makes each forward seconds instead of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _plain_torch_kernels() -> object:
    """This file checks formats and module wiring against exact float references; the native
    kernels quantize activations to int8 (about 1% per matmul) and are tested against their
    own references in tests/test_kernels.py (and end to end below)."""
    with native_cpu.disabled():
        yield


def test_native_int4_apply_matches_its_reference() -> None:
    """With the native kernels on, Int4Method.apply_cpu is the kernel: equal to the reference that
    quantizes activations the same way (when the kernels can be built here)."""
    from inference_pio.kernels import reference as kernel_ref

    if not _native_available():
        pytest.skip(f"native kernels unavailable: {native_cpu.reason()}")
    method = Int4Method(32)
    parts = method.quantize(torch.randn(70, 100))
    x = torch.randn(3, 100)
    want = kernel_ref.int4_linear(x, parts["qweight"], parts["scales"], 100)
    torch.testing.assert_close(_enabled(lambda: method.apply_cpu(parts, x, 100)), want,
                               rtol=1e-4, atol=1e-4)


def _native_available() -> bool:
    return bool(_enabled(native_cpu.available))


def _enabled(fn: Callable[[], object]) -> object:
    """Run `fn` with the native kernels on, although this module turns them off."""
    token = native_cpu._disabled[0]
    native_cpu._disabled[0] = 0
    try:
        return fn()
    finally:
        native_cpu._disabled[0] = token


def _randn(*shape: int, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ==== 1. round trips ========================================================================

def test_nf4_table_is_bitsandbytes() -> None:
    assert formats.NF4_CODE == NF4_TABLE


def test_int8_round_trip() -> None:
    w = _randn(37, 100, seed=1) * torch.logspace(-3, 1, 37)[:, None]  # rows of many scales
    w[5] = 0.0
    parts = Int8Method().quantize(w)
    assert parts["qweight"].dtype == torch.int8 and parts["qweight"].shape == (37, 100)
    assert parts["scales"].dtype == torch.float32 and parts["scales"].shape == (37,)
    q, s = ref_int8(w)
    assert torch.equal(parts["qweight"], q)
    assert torch.equal(parts["scales"], s)
    deq = Int8Method().dequantize(parts, 100)
    assert not deq.isnan().any()
    assert torch.equal(deq[5], torch.zeros(100))
    err = (deq - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    # the absmax of each non-zero row is stored exactly as +-127
    nonzero = s > 0
    assert (q[nonzero].abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip(group: int) -> None:
    rows, cols = 9, 200  # 200 is a multiple of neither 64 nor 128
    w = _randn(rows, cols, seed=group) * torch.logspace(-2, 1, rows)[:, None]
    w[3] = 0.0
    w[4, 0], w[4, 1] = 0.5, -0.5  # +-absmax in one group: -0.5 lands on +8 and clamps to 7
    w[4, 2:group] = w[4, 2:group].clamp(-0.4, 0.4)
    method = Int4Method(group)
    parts = method.quantize(w)
    cols_p = ref_padded_cols(cols, group)
    assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape == (rows, cols_p // 2)
    assert parts["scales"].dtype == torch.float16
    assert parts["scales"].shape == (rows, cols_p // group)
    codes, scales = ref_int4(w, group)
    assert torch.equal(parts["scales"], scales)
    assert torch.equal(ref_unpack(parts["qweight"]), codes)
    deq = method.dequantize(parts, cols)
    assert deq.shape == (rows, cols) and not deq.isnan().any()
    assert torch.equal(deq, ref_int4_dequant(codes, scales, cols))
    assert torch.equal(deq[3], torch.zeros(cols))
    s = scales.float().abs().repeat_interleave(group, dim=1)[:, :cols]
    err = (deq - w).abs()
    clamped = w / scales.float().repeat_interleave(group, dim=1)[:, :cols] > 7.5
    assert clamped[4, 1] and not clamped[4, 0]
    assert (err[~clamped] <= s[~clamped] / 2 * (1 + 1e-3)).all()
    assert (err[clamped] <= s[clamped] * (1 + 1e-3)).all()
    torch.testing.assert_close(err[4, 1], s[4, 1], rtol=1e-3, atol=0)  # the clamp: one scale
    assert err[4, 0] <= s[4, 0] * 1e-2  # the group's value of largest magnitude: ~exact


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_exact_on_grid(group: int) -> None:
    """Weights already on an int4 grid (fp16 scale, a -8 in every group) come back exactly."""
    rows, cols = 6, 256
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-7, 8, (rows, cols), generator=g).float()
    groups = cols // group
    at = torch.randint(0, group, (rows, groups), generator=g)
    for r in range(rows):
        for k in range(groups):
            q[r, k * group + at[r, k]] = -8.0
    scales = (torch.rand(rows, groups, generator=g) * 0.1 + 1e-3).to(torch.float16)
    scales[::2] = -scales[::2]  # negative scales too (the largest value positive)
    w = q * scales.float().repeat_interleave(group, dim=1)
    parts = Int4Method(group).quantize(w)
    assert torch.equal(parts["scales"], scales)
    assert torch.equal(Int4Method(group).dequantize(parts, cols), w)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_nf4_round_trip(block: int) -> None:
    rows, cols = 7, 150
    w = _randn(rows, cols, seed=block) * torch.logspace(-2, 1, rows)[:, None]
    w[2] = 0.0
    method = NF4Method(block)
    parts = method.quantize(w)
    cols_p = ref_padded_cols(cols, block)
    assert parts["qweight"].shape == (rows, cols_p // 2) and parts["qweight"].dtype == torch.uint8
    assert parts["absmax"].dtype == torch.float32
    codes, absmax = ref_nf4(w, block)
    assert torch.equal(parts["absmax"], absmax)
    got_codes = ref_unpack(parts["qweight"])
    # each code is the nearest code book value (ties either way)
    table = torch.tensor(NF4_TABLE)
    normed = w / torch.where(absmax > 0, absmax, 1.0).repeat_interleave(block, dim=1)[:, :cols]
    dist = (normed[..., None] - table).abs()
    chosen = dist.gather(-1, got_codes[:, :cols, None].long()).squeeze(-1)
    assert (chosen <= dist.amin(dim=-1) + 1e-6).all()
    assert (got_codes == codes).float().mean() > 0.999
    # decoding: the bitsandbytes value of the code times its block's absmax
    deq = method.dequantize(parts, cols)
    assert deq.shape == (rows, cols) and not deq.isnan().any()
    assert torch.equal(deq, ref_nf4_dequant(got_codes, absmax, cols))
    assert torch.equal(deq[2], torch.zeros(cols))
    assert (got_codes[2] == 7).all()  # NF4_TABLE[7] == 0
    # every block's element of largest magnitude decodes exactly (code 0 or 15)
    for b in range(cols // block):
        piece = w[:, b * block:(b + 1) * block]
        at = piece.abs().argmax(dim=1)
        for r in range(rows):
            if absmax[r, b] > 0:
                assert deq[r, b * block + at[r]] == piece[r, at[r]]


@pytest.mark.parametrize("shape", [(200, 300), (5, 129), (129, 5), (128, 128), (256, 384)])
def test_fp8_block_scales(shape: tuple[int, int]) -> None:
    rows, cols = shape
    w = _randn(rows, cols, seed=rows + cols)
    # a different magnitude per 128x128 block, so a wrong block assignment shows
    r_idx = torch.arange(rows)[:, None] // 128
    c_idx = torch.arange(cols)[None, :] // 128
    w = w * 10.0 ** (-(r_idx * 3 + c_idx).float() / 2)
    if rows > 128 and cols > 128:
        w[128:256, 128:256] = 0.0  # an all-zero block
    parts = FP8Method().quantize(w)
    q, scale_inv = ref_fp8(w)
    assert parts["weight"].dtype == torch.float8_e4m3fn and parts["weight"].shape == shape
    assert parts["weight_scale_inv"].dtype == torch.float32
    assert parts["weight_scale_inv"].shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    assert torch.equal(parts["weight_scale_inv"], scale_inv)
    assert torch.equal(parts["weight"].view(torch.uint8), q.view(torch.uint8))
    deq = FP8Method().dequantize(parts, cols)
    assert not deq.isnan().any()
    assert torch.equal(deq, ref_fp8_dequant(q, scale_inv))
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 times the scale
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    err = (deq - w).abs()
    assert (err <= torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-5)).all()


def test_fp8_dequantize_checks_scale_grid() -> None:
    parts = FP8Method().quantize(_randn(200, 300))
    parts["weight_scale_inv"] = parts["weight_scale_inv"][:, :2]
    with pytest.raises(ValueError, match=r"weight_scale_inv .*\[2, 3\]"):
        FP8Method().dequantize(parts, 300)


# ==== 2. packing, group edges =============================================================

def test_pack_order_hand_example() -> None:
    codes = torch.tensor([[i % 16 for i in range(32)] + [15 - i % 16 for i in range(32)]],
                         dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert packed.shape == (1, 32)
    assert packed[0, 0] == 0xF0 and packed[0, 1] == 0xE1 and packed[0, 15] == 0x0F
    assert torch.equal(packed, ref_pack(codes))


def test_pack_unpack_random() -> None:
    codes = torch.randint(0, 16, (5, 192), generator=torch.Generator().manual_seed(3),
                          dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert torch.equal(packed, ref_pack(codes))
    assert torch.equal(formats.unpack_nibbles(packed), codes)
    assert torch.equal(formats.unpack_nibbles(ref_pack(codes)), ref_unpack(ref_pack(codes)))


FOUR_BIT = [("int4", Int4Method), ("nf4", NF4Method)]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("cols", [32, 64, 100, 129, 256])
@pytest.mark.parametrize("name,cls", FOUR_BIT, ids=[n for n, _ in FOUR_BIT])
def test_four_bit_layout(name: str, cls: Callable[[int], QuantMethod], group: int,
                         cols: int) -> None:
    rows = 4
    w = _randn(rows, cols, seed=cols)
    w[1] = 0.0  # a row of zeros
    method = cls(group)
    parts = method.quantize(w)
    cols_p = ref_padded_cols(cols, group)
    # part_specs (what modules allocate) agree with what quantize produces
    specs = method.part_specs(rows, cols)
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == specs
    assert method.nbytes(rows, cols) == sum(v.numel() * v.element_size() for v in parts.values())
    scale_name = "scales" if name == "int4" else "absmax"
    assert parts[scale_name].shape == (rows, cols_p // group)
    if name == "int4":
        codes, scales = ref_int4(w, group)
        pad_code = 8  # q = 0
    else:
        codes, scales = ref_nf4(w, group)
        pad_code = 7  # NF4 0.0
    assert torch.equal(parts["qweight"], ref_pack(codes))
    assert torch.equal(parts[scale_name], scales)
    got = ref_unpack(parts["qweight"])
    assert (got[:, cols:] == pad_code).all()  # padding columns encode zero
    assert (got[1] == pad_code).all()
    first_pad_group = -(-cols // group)
    assert (parts[scale_name][:, first_pad_group:] == 0).all()  # all-padding groups
    assert (parts[scale_name][1] == 0).all()
    deq = method.dequantize(parts, cols)
    assert deq.shape == (rows, cols) and not deq.isnan().any()
    assert torch.equal(deq[1], torch.zeros(cols))


METHODS: dict[str, Callable[[], QuantMethod]] = {
    "fp32": lambda: FloatMethod(torch.float32),
    "bf16": lambda: FloatMethod(torch.bfloat16),
    "fp16": lambda: FloatMethod(torch.float16),
    "int8": Int8Method,
    "int4-32": lambda: Int4Method(32),
    "int4-64": lambda: Int4Method(64),
    "int4-128": lambda: Int4Method(128),
    "nf4-32": lambda: NF4Method(32),
    "nf4-64": lambda: NF4Method(64),
    "nf4-128": lambda: NF4Method(128),
    "fp8": FP8Method,
}


@pytest.mark.parametrize("key", sorted(METHODS))
def test_zero_weight_every_method(key: str) -> None:
    method = METHODS[key]()
    parts = method.quantize(torch.zeros(3, 70))
    deq = method.dequantize(parts, 70)
    assert torch.equal(deq, torch.zeros(3, 70))
    y = method.apply(parts, torch.ones(2, 70), 70)
    assert torch.equal(y, torch.zeros(2, 3))


# ==== 3. apply ==============================================================================

@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("key", sorted(METHODS))
def test_apply_equals_dequantize_matmul(key: str, tokens: int) -> None:
    rows, cols = 72, 136  # int4/nf4 padding, two FP8 column blocks
    method = METHODS[key]()
    w = _randn(rows, cols, seed=11, std=0.05)
    x = _randn(tokens, cols, seed=tokens)
    parts = method.quantize(w)
    want = x.double() @ ref_dequant_parts(key.split("-")[0], parts, cols).double().T
    got = method.apply(parts, x, cols)
    assert got.dtype == torch.float32 and got.shape == (tokens, rows)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got16 = method.apply(parts, x.bfloat16(), cols)  # activations in bf16 stay bf16
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), want, rtol=3e-2, atol=5e-2)


# ==== models ===============================================================================

# Odd sizes: padding in every 4-bit weight (hidden 48, expert intermediate 20), two FP8
# column blocks in the dense layer's down_proj (136), a dense layer among MoE layers.
ODD_MOE = tiny_moe_config(
    vocab_size=512, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=3,
    moe_intermediate_size=20, intermediate_size=136, mlp_only_layers=(1,))
DENSE_TIED = tiny_dense_config(vocab_size=512)
PROMPT = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(0))
ATOL = 1e-4


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("q_moe"), ODD_MOE, seed=3,
                                   dtype="float32", num_shards=2, tokenizer=False, std=0.05)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("q_dense"), DENSE_TIED, seed=4,
                                   dtype="float32", tokenizer=False, std=0.05)


@torch.inference_mode()
def logits(model: nn.Module, config: ModelConfig, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    """Teacher-forced logits [T, V] through a float32 KV cache (the activation dtype)."""
    cache = ContiguousKVCache(config, torch.float32)
    cache.allocate(0, ids.numel())
    cache.bind((0,))
    with forward_context(ForwardContext((ids.numel(),), (0,), cache)):
        hidden = model(ids, torch.arange(ids.numel()))
    return model.compute_logits(hidden).float()


def _load(path: Path, qc: QuantConfig | None = None) -> tuple[nn.Module, ModelConfig]:
    return load_model(path, "float32", progress=False, load_config=LoadConfig(quantization=qc))


def _is_quantized_weight(name: str) -> bool:
    """Weights a QuantConfig's method stores (attention projections, experts, dense MLPs)."""
    return (name.endswith(".weight") and name.startswith("model.layers.")
            and not name.endswith("norm.weight") and not name.endswith("mlp.gate.weight"))


def fake_quant_model(path: Path, qc: QuantConfig) -> nn.Module:
    """The float32 model of `path` with every weight replaced by what `qc` stores, as the
    references compute it: quantized weights dequantize(quantize(w)); embedding and (unless
    quantize_lm_head) lm_head rounded to the embedding dtype; routers, norms, biases as is."""
    model, _ = _load(path)
    method, group = qc.method, qc.group_size
    emb_round = _FLOATS[qc.embedding_dtype]
    head_w = model.lm_head.weight.detach().clone()
    for name, view in model.checkpoint_views().items():
        if _is_quantized_weight(name):
            view.copy_(ref_fake_quant(method, group, view))
        elif name == "model.embed_tokens.weight":
            view.copy_(view.to(emb_round).float())
    head = (ref_fake_quant(method, group, head_w) if qc.quantize_lm_head
            else head_w.to(emb_round).float())
    model.lm_head.weight = nn.Parameter(head, requires_grad=False)  # unties a tied head
    return model


# (method, group_size, quantize_lm_head)
QCASES = [
    ("fp32", None, False), ("bf16", None, False), ("fp16", None, False), ("int8", None, False),
    ("int4", 32, False), ("int4", 64, False), ("int4", 128, False), ("nf4", 32, False),
    ("nf4", None, False), ("nf4", 128, False), ("fp8", None, False),
    ("fp32", None, True), ("bf16", None, True), ("int8", None, True), ("int4", 32, True),
    ("nf4", 64, True), ("fp8", None, True),
]


def _qid(case: tuple[str, int | None, bool]) -> str:
    method, group, head = case
    return f"{method}{'' if group is None else group}{'-head' if head else ''}"


def _check_module_types(model: nn.Module, qc: QuantConfig) -> None:
    method = qc.weight_method()
    float_same = isinstance(method, FloatMethod) and method.dtype == torch.float32
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
        elif name.endswith(("_proj", "mlp.experts")) and ".experts." not in name:
            if name.endswith("experts"):
                assert isinstance(module, QuantExperts), name
                assert module.method.name == method.name
            elif float_same:
                assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
            else:
                assert isinstance(module, QuantLinear), name
                assert module.method.name == method.name, name
        if isinstance(module, RMSNorm):
            assert module.weight.dtype == torch.float32, name
        assert not isinstance(module, Experts), name
    emb_dtype = _FLOATS[qc.embedding_dtype]  # the format's own for fp32/fp16/bf16, else bf16
    assert qc.embedding_dtype == (qc.method if qc.method in ("fp32", "fp16", "bf16") else "bf16")
    emb = model.model.embed_tokens
    if emb_dtype == torch.float32:
        assert type(emb) is nn.Embedding and emb.weight.dtype == torch.float32
    else:
        assert isinstance(emb, CompactEmbedding) and emb.weight.dtype == emb_dtype
    head = model.lm_head
    head_method = method if qc.quantize_lm_head else FloatMethod(emb_dtype)
    if isinstance(head_method, FloatMethod) and head_method.dtype == torch.float32:
        assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    else:
        assert isinstance(head, QuantLinear) and head.method.name == head_method.name


@pytest.mark.parametrize("case", QCASES, ids=_qid)
def test_quantized_moe_equals_fake_quant_float(moe_ckpt: Path,
                                               case: tuple[str, int | None, bool]) -> None:
    method, group, head = case
    qc = QuantConfig(method, group_size=group, quantize_lm_head=head)
    model, config = _load(moe_ckpt, qc)
    _check_module_types(model, qc)
    got = logits(model, config)
    want = logits(fake_quant_model(moe_ckpt, qc), config)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    if method in ("int8", "int4", "nf4", "fp8"):  # not vacuous: quantization changed the logits
        plain = logits(_load(moe_ckpt)[0], config)
        assert (plain - got).abs().max() > 20 * ATOL


@pytest.mark.parametrize("case", [("int8", None, False), ("int4", 32, True), ("nf4", None, True),
                                  ("fp8", None, False), ("bf16", None, True)], ids=_qid)
def test_quantized_tied_dense_equals_fake_quant_float(dense_ckpt: Path,
                                                      case: tuple[str, int | None, bool]) -> None:
    method, group, head = case
    qc = QuantConfig(method, group_size=group, quantize_lm_head=head)
    model, config = _load(dense_ckpt, qc)
    _check_module_types(model, qc)
    got = logits(model, config)
    want = logits(fake_quant_model(dense_ckpt, qc), config)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_reference_prompt_logits_on_quantized_model(moe_ckpt: Path) -> None:
    from inference_pio.testing.reference import prompt_logits

    model, config = _load(moe_ckpt, QuantConfig("int4"))
    torch.testing.assert_close(prompt_logits(model, config, PROMPT, chunk=8),
                               logits(model, config), rtol=0, atol=1e-5)


def test_lm_head_and_embedding_untouched_without_option(moe_ckpt: Path) -> None:
    """Without quantize_lm_head, the lm_head and embedding hold the checkpoint's values in
    bf16, bit for bit; routers and norms hold them in float32."""
    written: dict[str, torch.Tensor] = {}
    for f in sorted(moe_ckpt.glob("*.safetensors")):
        written.update(load_file(str(f)))
    model, _ = _load(moe_ckpt, QuantConfig("int4", quantize_lm_head=False))
    assert torch.equal(model.lm_head.weight, written["lm_head.weight"].bfloat16())
    assert torch.equal(model.model.embed_tokens.weight,
                       written["model.embed_tokens.weight"].bfloat16())
    gate = "model.layers.0.mlp.gate.weight"
    assert torch.equal(model.model.layers[0].mlp.gate.weight, written[gate])
    norm = "model.layers.2.post_attention_layernorm.weight"
    assert torch.equal(model.model.layers[2].post_attention_layernorm.weight, written[norm])


# ==== 5. loading through LLM, refusals =====================================================

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
LLM_CASES = [("fp32", None), ("bf16", None), ("fp16", None), ("int8", None), ("int4", 32),
             ("int4", 64), ("int4", 128), ("nf4", None), ("fp8", None)]


def _greedy_reference(model: nn.Module, config: ModelConfig, prompt: list[int],
                      n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits(model, config, torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("case", LLM_CASES, ids=lambda c: f"{c[0]}{c[1] or ''}")
def test_llm_loads_and_generates(moe_ckpt: Path, case: tuple[str, int | None]) -> None:
    method, group = case
    llm = LLM(str(moe_ckpt), dtype="float32", progress=False, quantization=method,
              group_size=group, kv_cache_memory=1 << 20)
    assert method in llm.weight_plan.layout
    prompt = PROMPT[:9].tolist()
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    qc = QuantConfig(method, group_size=group)
    assert out == _greedy_reference(fake_quant_model(moe_ckpt, qc), ODD_MOE, prompt, 5)


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "fp8"])
def test_llm_bf16_activations(moe_ckpt: Path, method: str) -> None:
    llm = LLM(str(moe_ckpt), dtype="bfloat16", progress=False, quantization=method,
              kv_cache_memory=1 << 20)
    out = llm.generate([PROMPT[:9].tolist()], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == 5 and all(0 <= t < 512 for t in out)


@pytest.mark.parametrize("bad", ["int3", "q4_0", "float8", ""])
def test_quant_config_rejects_unknown_name(bad: str) -> None:
    with pytest.raises(QuantizationError) as info:
        QuantConfig(bad)
    for choice in ("fp32", "bf16", "fp16", "int8", "int4", "nf4", "fp8"):
        assert choice in str(info.value)


@pytest.mark.parametrize("method", ["int4", "nf4"])
@pytest.mark.parametrize("group", [0, 16, 48, 96, 256])
def test_quant_config_rejects_group_size(method: str, group: int) -> None:
    with pytest.raises(QuantizationError, match=r"32, 64 or 128"):
        QuantConfig(method, group_size=group)


@pytest.mark.parametrize("method", ["int8", "fp8", "bf16"])
def test_quant_config_rejects_group_size_of_other_formats(method: str) -> None:
    with pytest.raises(QuantizationError, match="int4 and nf4"):
        QuantConfig(method, group_size=64)


def test_llm_rejects_bad_options(moe_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="int4, nf4"):
        LLM(str(moe_ckpt), progress=False, quantization="int3")
    with pytest.raises(ValueError, match="32, 64 or 128"):
        LLM(str(moe_ckpt), progress=False, quantization="int4", group_size=100)


def _write_checkpoint(out: Path, config_src: Path, tensors: dict[str, torch.Tensor],
                      quantization_config: dict[str, object] | None) -> Path:
    """One model.safetensors plus the config.json of `config_src` with a quantization_config."""
    out.mkdir(parents=True)
    config = json.loads((config_src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(config_src / "generation_config.json", out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _written(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _prequantized_int4(src: Path, out: Path, group: int) -> Path:
    """A checkpoint in the documented `pio quantize` layout, written by the references."""
    tensors = {}
    for name, w in _written(src).items():
        if _is_quantized_weight(name):
            codes, scales = ref_int4(w, group)
            stem = name.removesuffix(".weight")
            tensors[f"{stem}.qweight"] = ref_pack(codes)
            tensors[f"{stem}.scales"] = scales
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = w.bfloat16()
        else:
            tensors[name] = w
    qc = {"quant_method": "inference_pio", "format": "int4", "group_size": group,
          "quantize_lm_head": False, "embedding_dtype": "bf16"}
    return _write_checkpoint(out, src, tensors, qc)


@pytest.fixture(scope="module")
def int4_ckpt(moe_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prequantized_int4(moe_ckpt, tmp_path_factory.mktemp("pre_int4") / "ckpt", 32)


def test_prequantized_checkpoint_loads_bit_identical(moe_ckpt: Path, int4_ckpt: Path) -> None:
    pre, config = _load(int4_ckpt)
    assert isinstance(pre.model.layers[0].self_attn.q_proj, QuantLinear)
    assert pre.model.layers[0].self_attn.q_proj.method.describe() == "int4 (group 32)"
    # the same format, and no word about the head: the checkpoint's own (bf16) head is kept
    same, _ = _load(int4_ckpt, QuantConfig("int4", group_size=32))
    on_load, _ = _load(moe_ckpt, QuantConfig("int4", group_size=32, quantize_lm_head=False))
    want = logits(on_load, config)
    assert torch.equal(logits(pre, config), want)
    assert torch.equal(logits(same, config), want)
    with pytest.raises(CheckpointError, match="lm_head in bf16.*lm_head quantized"):
        _load(int4_ckpt, QuantConfig("int4", group_size=32, quantize_lm_head=True))


@pytest.mark.parametrize("method,head", [("int4", True), ("int8", True), ("nf4", False),
                                         ("fp8", False), ("bf16", False), ("fp32", False)])
def test_lm_head_default_follows_the_format(method: str, head: bool) -> None:
    """int4 and int8 quantize the lm_head unless told not to (their kernels read it faster
    than bf16; bench_quant_fidelity.py measured the error it adds); an explicit choice wins and
    survives config.json."""
    qc = QuantConfig(method)
    assert qc.quantize_lm_head is head and not qc.head_explicit
    assert ("lm_head quantized" in qc.describe()) is head
    for explicit in (True, False):
        qc = QuantConfig(method, quantize_lm_head=explicit)
        assert qc.quantize_lm_head is explicit and qc.head_explicit
        if method not in ("bf16", "fp32", "fp8"):
            assert QuantConfig.from_hf(qc.to_hf()).quantize_lm_head is explicit


@pytest.mark.parametrize("wanted", [QuantConfig("int8"), QuantConfig("int4", group_size=64),
                                    QuantConfig("nf4", group_size=32), QuantConfig("bf16")])
def test_prequantized_checkpoint_refuses_other_quantization(int4_ckpt: Path,
                                                            wanted: QuantConfig) -> None:
    with pytest.raises(CheckpointError) as info:
        _load(int4_ckpt, wanted)
    msg = str(info.value)
    assert "already quantized" in msg and "int4 (group 32)" in msg
    assert wanted.weight_method().describe() in msg


def test_llm_refuses_other_quantization_of_prequantized(int4_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(int4_ckpt), progress=False, quantization="nf4")


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
    ({"quant_method": "awq"}, "'awq'"),
    ({"bits": 4}, "(none)"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}, r"[64, 64]"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 256]}, r"[128, 256]"),
    ({"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size None"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "'e5m2'"),
    ({"quant_method": "inference_pio", "format": "int3"}, "int3"),
    ({"quant_method": "inference_pio", "format": "int4", "group_size": 48}, "32, 64 or 128"),
], ids=["gptq", "awq", "no-method", "fp8-64", "fp8-128x256", "fp8-no-block", "e5m2",
        "pio-int3", "pio-group48"])
def test_unsupported_quantization_config_refused(moe_ckpt: Path, tmp_path: Path,
                                                 qc: dict[str, object], needle: str) -> None:
    out = tmp_path / "ckpt"
    shutil.copytree(moe_ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        _load(out)
    msg = str(info.value)
    assert needle in msg
    if qc.get("quant_method") != "inference_pio":
        assert "config.json" in msg
    if qc.get("quant_method") == "fp8":
        assert "[128, 128]" in msg or "e4m3" in msg
    with pytest.raises(ValueError, match=re.escape(needle)):
        LLM(str(out), progress=False)


@pytest.mark.parametrize("qc", [{"quant_method": "inference_pio", "format": "int3"},
                                {"quant_method": "inference_pio", "format": "int4",
                                 "group_size": 48}], ids=["int3", "group48"])
def test_bad_pio_quantization_config_names_the_file(moe_ckpt: Path, tmp_path: Path,
                                                    qc: dict[str, object]) -> None:
    out = tmp_path / "ckpt"
    shutil.copytree(moe_ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        _load(out)


# ---- FP8 (Qwen's layout) ---------------------------------------------------------------

def _fp8_from_float(src: Path, out: Path) -> tuple[Path, Path]:
    """(Qwen-layout FP8 checkpoint, float32 checkpoint of the values it stands for): every
    attention / expert / MLP weight as float8_e4m3fn `X.weight` + float32 `X.weight_scale_inv`
    per 128x128 block; routers, norms, embedding and lm_head in bf16."""
    fp8, dequant = {}, {}
    for name, w in _written(src).items():
        if _is_quantized_weight(name):
            q, s = ref_fp8(w)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequant[name] = ref_fp8_dequant(q, s)
        else:
            fp8[name] = w.bfloat16()
            dequant[name] = w.bfloat16().float()
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
          "activation_scheme": "dynamic"}
    return (_write_checkpoint(out / "fp8", src, fp8, qc),
            _write_checkpoint(out / "dequant", src, dequant, None))


@pytest.fixture(scope="module")
def fp8_ckpts(moe_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _fp8_from_float(moe_ckpt, tmp_path_factory.mktemp("fp8"))


@pytest.mark.parametrize("wanted", [None, "fp8"])
def test_fp8_checkpoint_loads_as_fp8(fp8_ckpts: tuple[Path, Path], wanted: str | None) -> None:
    fp8_dir, dequant_dir = fp8_ckpts
    model, config = _load(fp8_dir, None if wanted is None else QuantConfig(wanted))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.method.name == "fp8"
    assert q_proj.weight.dtype == torch.float8_e4m3fn
    written = _written(fp8_dir)
    name = "model.layers.1.mlp.down_proj"  # [48, 136]: two column blocks
    down = model.model.layers[1].mlp.down_proj
    assert torch.equal(down.weight.view(torch.uint8), written[name + ".weight"].view(torch.uint8))
    assert torch.equal(down.weight_scale_inv, written[name + ".weight_scale_inv"])
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.method.name == "fp8"
    assert torch.equal(experts.up_proj__weight[3].view(torch.uint8),
                       written["model.layers.0.mlp.experts.3.up_proj.weight"].view(torch.uint8))
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    reference, _ = _load(dequant_dir, QuantConfig("fp32", quantize_lm_head=True))
    torch.testing.assert_close(logits(model, config), logits(reference, config),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 64), ("bf16", None)])
def test_fp8_checkpoint_requantized(fp8_ckpts: tuple[Path, Path], method: str,
                                    group: int | None) -> None:
    """quantization=X on an FP8 checkpoint: dequantize each weight, then quantize it to X."""
    fp8_dir, dequant_dir = fp8_ckpts
    qc = QuantConfig(method, group_size=group)
    model, config = _load(fp8_dir, qc)
    _check_module_types(model, qc)
    assert not any(t.dtype == torch.float8_e4m3fn for t in model.state_dict().values())
    torch.testing.assert_close(logits(model, config),
                               logits(fake_quant_model(dequant_dir, qc), config),
                               rtol=0, atol=ATOL)


def test_llm_generates_from_fp8_checkpoint(fp8_ckpts: tuple[Path, Path]) -> None:
    fp8_dir, dequant_dir = fp8_ckpts
    llm = LLM(str(fp8_dir), dtype="float32", progress=False, kv_cache_memory=1 << 20)
    assert "fp8" in llm.weight_plan.layout
    prompt = PROMPT[:9].tolist()
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    reference, _ = _load(dequant_dir, QuantConfig("fp32", quantize_lm_head=True))
    assert out == _greedy_reference(reference, ODD_MOE, prompt, 5)


def test_fp8_checkpoint_missing_scale_refused(fp8_ckpts: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    fp8_dir, _ = fp8_ckpts
    tensors = _written(fp8_dir)
    del tensors["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    config = json.loads((fp8_dir / "config.json").read_text())
    out = _write_checkpoint(tmp_path / "ckpt", fp8_dir, tensors, config["quantization_config"])
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv"):
        _load(out)


# ==== 6. memory: the loaded model holds the planned bytes, no float copies ==================

def _weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False),
                   *(b for n, b in module.named_buffers(recurse=False)
                     if n not in module._non_persistent_buffers_set)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _expected_bytes(config: ModelConfig, qc: QuantConfig) -> int:
    """From the config and the documented layouts, by hand."""
    def stored(rows: int, cols: int, method: str, group: int | None) -> int:
        if method in _FLOATS:
            return rows * cols * _FLOATS[method].itemsize
        if method == "int8":
            return rows * cols + rows * 4
        if method in ("int4", "nf4"):
            g = group or 64
            cols_p = ref_padded_cols(cols, g)
            return rows * cols_p // 2 + rows * (cols_p // g) * (2 if method == "int4" else 4)
        return rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4

    c = config
    h, hd, m, g = c.hidden_size, c.head_dim, qc.method, qc.group_size
    q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
    total = c.vocab_size * h * 2  # embedding, bf16
    total += (stored(c.vocab_size, h, m, g) if qc.quantize_lm_head
              else c.vocab_size * h * 2)
    total += h * 4  # final norm
    for layer in range(c.num_hidden_layers):
        total += (stored(q_out, h, m, g) + 2 * stored(kv_out, h, m, g) + stored(h, q_out, m, g))
        total += 2 * hd * 4 + 2 * h * 4  # q/k norms, two layer norms
        if c.is_moe_layer(layer):
            inter = c.moe_intermediate_size
            total += c.num_experts * h * 4  # router, float32
            total += c.num_experts * (2 * stored(inter, h, m, g) + stored(h, inter, m, g))
        else:
            inter = c.intermediate_size
            total += 2 * stored(inter, h, m, g) + stored(h, inter, m, g)
    return total


MEMORY_CASES = [("int8", None, False), ("int4", 32, False), ("int4", 128, True),
                ("nf4", None, False), ("fp8", None, True), ("bf16", None, False)]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=_qid)
def test_loaded_model_holds_planned_bytes(moe_ckpt: Path,
                                          case: tuple[str, int | None, bool]) -> None:
    method, group, head = case
    qc = QuantConfig(method, group_size=group, quantize_lm_head=head)
    model, config = _load(moe_ckpt, qc)
    expected = _expected_bytes(config, qc)
    assert plan_weights(config, torch.float32, qc, None).total_bytes == expected
    assert model.weight_plan.total_bytes == expected
    assert _weight_bytes(model) == expected
    # quantized modules hold exactly their parts: no float `weight` kept beside them
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            specs = module.method.part_specs(1, 1)
            buffers = dict(module.named_buffers(recurse=False))
            assert len(buffers) == len(specs) * (3 if isinstance(module, QuantExperts) else 1)
            for bname, buf in buffers.items():
                assert buf.dtype == specs[bname.split("__")[-1]][1], (name, bname)
            params = [n for n, _ in module.named_parameters(recurse=False)]
            assert params == (["bias"] if getattr(module, "bias", None) is not None else [])


# ==== round trip through a written checkpoint (models.quantize) ============================

@pytest.mark.parametrize("qc", [QuantConfig("int4", group_size=32), QuantConfig("int4",
                                group_size=128, quantize_lm_head=True), QuantConfig("nf4"),
                                QuantConfig("int8", quantize_lm_head=True), QuantConfig("bf16")],
                         ids=["int4-32", "int4-128-head", "nf4", "int8-head", "bf16"])
def test_quantize_checkpoint_round_trip(moe_ckpt: Path, tmp_path: Path, qc: QuantConfig) -> None:
    """Write, then load without an option: the logits of quantizing while loading, bit for bit."""
    out = quantize_checkpoint(moe_ckpt, tmp_path / "out", qc, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "inference_pio"
    pre, cfg = _load(out)
    on_load, _ = _load(moe_ckpt, qc)
    assert torch.equal(logits(pre, cfg), logits(on_load, cfg))
    if qc.method == "int4":  # the documented layout, checked against the references
        written, source = _written(out), _written(moe_ckpt)
        stem = "model.layers.0.mlp.experts.5.down_proj"  # [48, 20]: padded to 64 columns
        codes, scales = ref_int4(source[stem + ".weight"], qc.group_size or 64)
        assert torch.equal(written[stem + ".qweight"], ref_pack(codes))
        assert torch.equal(written[stem + ".scales"], scales)
        assert stem + ".weight" not in written


@pytest.mark.parametrize("qc", [QuantConfig("int4", group_size=64),
                                QuantConfig("nf4", quantize_lm_head=True)], ids=["int4", "nf4-head"])
def test_quantize_checkpoint_round_trip_tied(dense_ckpt: Path, tmp_path: Path,
                                             qc: QuantConfig) -> None:
    out = quantize_checkpoint(dense_ckpt, tmp_path / "out", qc, progress=False)
    pre, cfg = _load(out)
    on_load, _ = _load(dense_ckpt, qc)
    assert torch.equal(logits(pre, cfg), logits(on_load, cfg))


def test_quantize_checkpoint_fp8(moe_ckpt: Path, tmp_path: Path) -> None:
    """QuantConfig("fp8") writes Qwen's FP8 layout: it loads as fp8 and, with quantization=int8,
    is dequantized and quantized again."""
    out = quantize_checkpoint(moe_ckpt, tmp_path / "fp8", QuantConfig("fp8"), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                             "weight_block_size": [128, 128],
                                             "activation_scheme": "dynamic"}
    written, source = _written(out), _written(moe_ckpt)
    dequant = {}
    for name, w in source.items():
        if _is_quantized_weight(name):
            q, s = ref_fp8(w)
            assert written[name].dtype == torch.float8_e4m3fn, name
            assert torch.equal(written[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(written[name + "_scale_inv"], s), name
            dequant[name] = ref_fp8_dequant(q, s)
        else:
            assert written[name].is_floating_point() and written[name].dtype != torch.float8_e4m3fn
            assert name + "_scale_inv" not in written
            dequant[name] = written[name].float()
    model, cfg = _load(out)
    assert model.model.layers[0].self_attn.q_proj.method.name == "fp8"
    on_load, _ = _load(moe_ckpt, QuantConfig("fp8"))
    assert torch.equal(logits(model, cfg), logits(on_load, cfg))
    dequant_dir = _write_checkpoint(tmp_path / "dequant", moe_ckpt, dequant, None)
    requant, _ = _load(out, QuantConfig("int8"))
    assert requant.model.layers[0].self_attn.q_proj.method.name == "int8"
    torch.testing.assert_close(logits(requant, cfg),
                               logits(fake_quant_model(dequant_dir, QuantConfig("int8")), cfg),
                               rtol=0, atol=ATOL)


def test_quantize_checkpoint_fp8_with_lm_head(moe_ckpt: Path, tmp_path: Path) -> None:
    qc = QuantConfig("fp8", quantize_lm_head=True)
    try:
        out = quantize_checkpoint(moe_ckpt, tmp_path / "fp8", qc, progress=False)
    except (ValueError, ConfigError) as e:  # refusing up front would be fine too
        assert "lm_head" in str(e)
        return
    pre, cfg = _load(out)
    on_load, _ = _load(moe_ckpt, qc)
    assert torch.equal(logits(pre, cfg), logits(on_load, cfg))
