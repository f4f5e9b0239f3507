"""int4 / int8 weights stored in the AVX-512 VNNI kernels' tile order (formats.pack_vnni,
csrc/int4_vnni.h, int8_vnni.h), which `process_weights_after_loading` of Int4Method and
Int8Method applies to a model's resident weights on the avx512vnni build:

1. the layout: each byte lands where the kernel's vectors want it; unpack inverts pack; the
   native in-place packer (what loading uses) equals the torch one; shapes off the 16-row
   tiles are refused with the reason;
2. the packed kernels (linear and fused MoE) give the unpacked kernels' results bit for bit, at
   token counts on every register-tile path, groups 32 / 64 / 128, padded columns;
3. the method and its modules: a loaded int4 model's linears and experts are packed (and say
   so), their outputs equal an unpacked copy's bit for bit, and the plain-torch path (the
   oracle) reads packed weights correctly.

The kernel tests skip off the avx512vnni build (the AVX2 kernels keep the plain layout)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from inference_pio.kernels import cpu
from inference_pio.layers.quantization import QuantConfig, formats
from inference_pio.layers.quantization.methods import Int4Method, Int8Method
from inference_pio.layers.quantization.modules import QuantExperts, QuantLinear
from inference_pio.testing import PRESETS, random_model

needs_vnni = pytest.mark.skipif(not cpu.available() or cpu.isa() != "avx512vnni",
                                reason="packed int4 runs on the avx512vnni kernels only")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4(lead: tuple[int, ...], rows: int, cols: int, group: int, seed: int = 0
          ) -> dict[str, torch.Tensor]:
    return formats.quantize_int4(torch.randn(*lead, rows, cols, generator=_gen(seed)), group)


def test_each_byte_lands_in_its_lane() -> None:
    q = torch.randint(0, 256, (2, 48, 64), dtype=torch.uint8, generator=_gen(0))
    p = formats.pack_vnni(q)
    assert p.shape == q.shape and p.dtype == torch.uint8
    flat = p.reshape(2, 3, 16 * 64)  # each 16-row tile is one contiguous run of bytes
    for e, tile, b, j, lane, byte in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 7, 15, 3), (0, 1, 0, 3, 4, 2),
                                      (1, 0, 1, 5, 9, 1)]:
        row = 16 * tile + formats.VNNI_LANE_ROWS[lane]
        assert flat[e, tile, 512 * b + 64 * j + 4 * lane + byte] == q[e, row, 32 * b + 4 * j + byte]
    assert torch.equal(formats.unpack_vnni(p), q)
    assert sorted(formats.VNNI_LANE_ROWS[i] for i in formats.VNNI_LANE_ROWS) == list(range(16))
    with pytest.raises(ValueError, match="multiples of 16 and rows of whole"):
        formats.pack_vnni(q[:, :40])


@pytest.mark.skipif(not cpu.available(), reason="native CPU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_the_native_packer_equals_the_torch_one(dtype: torch.dtype) -> None:
    q = torch.randint(-128 if dtype == torch.int8 else 0, 128 if dtype == torch.int8 else 256,
                      (3, 64, 96), dtype=dtype, generator=_gen(1))
    packed = cpu.vnni_pack_(q.clone())
    assert torch.equal(packed, formats.pack_vnni(q))
    assert torch.equal(cpu.vnni_pack_(packed, unpack=True), q)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        cpu.vnni_pack_(q[:, :40].contiguous())


@needs_vnni
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("cols", [64, 100, 2048])
def test_packed_linear_equals_plain_layout(group: int, cols: int) -> None:
    parts = _int4((), 48, cols, group, seed=cols + group)
    packed = formats.pack_vnni(parts["qweight"])
    for T in (1, 3, 4, 5, 17, 70):
        x = torch.randn(T, cols, generator=_gen(T))
        want = cpu.int4_linear(x, parts["qweight"], parts["scales"], cols)
        assert torch.equal(cpu.int4_linear(x, packed, parts["scales"], cols, packed=True), want)


@needs_vnni
@pytest.mark.parametrize("cols", [32, 96, 2048])
def test_packed_int8_linear_equals_plain_layout(cols: int) -> None:
    parts = formats.quantize_int8(torch.randn(48, cols, generator=_gen(cols)))
    packed = formats.pack_vnni(parts["qweight"])
    assert packed.dtype == torch.int8
    for T in (1, 3, 4, 5, 17, 70):
        x = torch.randn(T, cols, generator=_gen(T))
        want = cpu.int8_linear(x, parts["qweight"], parts["scales"])
        assert torch.equal(cpu.int8_linear(x, packed, parts["scales"], packed=True), want)


@needs_vnni
def test_packed_linear_refuses_rows_off_the_tiles() -> None:
    parts = _int4((), 40, 64, 64)
    with pytest.raises(RuntimeError, match="rows in multiples of 16"):
        cpu.int4_linear(torch.randn(1, 64), parts["qweight"], parts["scales"], 64, packed=True)


@needs_vnni
@pytest.mark.parametrize("method", ["int4", "int8"])
@pytest.mark.parametrize("T", [1, 4, 9, 40])
def test_packed_moe_equals_plain_layout(method: str, T: int) -> None:
    E, H, inter, k = 6, 128, 64, 3
    if method == "int4":
        gate, up = _int4((E,), inter, H, 64, 1), _int4((E,), inter, H, 64, 2)
        down = _int4((E,), H, inter, 32, 3)
    else:
        gate, up, down = (formats.quantize_int8(torch.randn(E, r, c, generator=_gen(i)))
                          for i, (r, c) in enumerate([(inter, H), (inter, H), (H, inter)]))
    moe = cpu.int4_moe if method == "int4" else cpu.int8_moe
    x = torch.randn(T, H, generator=_gen(4))
    ids = torch.randint(0, E, (T, k), generator=_gen(5))
    w = torch.rand(T, k, generator=_gen(6))
    stacked = [(p["qweight"], p["scales"]) for p in (gate, up, down)]
    want = moe(x, *stacked, w, ids)
    packed = [(formats.pack_vnni(q), s) for q, s in stacked]
    assert torch.equal(moe(x, *packed, w, ids, packed=True), want)


@pytest.fixture(scope="module", params=["int4", "int8"])
def quant_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return random_model(PRESETS["tiny"](2), torch.float32,
                        QuantConfig(request.param, quantize_lm_head=True))


def _quant_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))
            and isinstance(m.method, (Int4Method, Int8Method))]


@needs_vnni
def test_a_loaded_model_runs_packed_and_equals_the_plain_layout(quant_model: torch.nn.Module
                                                                ) -> None:
    modules = _quant_modules(quant_model)
    assert modules and all(m.method.vnni_packed for m in modules)
    assert "VNNI tiles" in modules[0].method.describe()
    for module in (next(m for m in modules if isinstance(m, QuantLinear)),
                   next(m for m in modules if isinstance(m, QuantExperts))):
        plain = copy.deepcopy(module)
        for name, buf in plain.named_buffers():
            if name.endswith("qweight"):
                buf.copy_(formats.unpack_vnni(buf))
        plain.method = dataclasses.replace(module.method, vnni_packed=False)
        if isinstance(module, QuantLinear):
            x = torch.randn(5, module.in_features, generator=_gen(7))
            args: tuple[torch.Tensor, ...] = (x,)
        else:
            x = torch.randn(5, module.hidden_size, generator=_gen(7))
            ids = torch.randint(0, module.num_experts, (5, 2), generator=_gen(8))
            args = (x, torch.rand(5, 2, generator=_gen(9)), ids)
        got = module(*args)
        assert torch.equal(got, plain(*args))  # the packed kernel, bit for bit
        oracle = module.forward_native(*args)  # dequantize unpacks: the plain-torch path
        torch.testing.assert_close(oracle, plain.forward_native(*args), rtol=0, atol=0)
        assert (got - oracle).abs().max() <= 0.05 * oracle.abs().max()  # activation rounding


def test_the_method_packs_only_for_the_vnni_kernels(quant_model: torch.nn.Module) -> None:
    module = copy.deepcopy(next(m for m in _quant_modules(quant_model)
                                if isinstance(m, QuantLinear)))
    module.method = dataclasses.replace(module.method, vnni_packed=False)
    before = module.qweight.clone()
    module.select("native")  # another implementation: the layout stays
    module.method.process_weights_after_loading(module)
    assert torch.equal(module.qweight, before) and not module.method.vnni_packed
    module.select("cpu")
    module.method.process_weights_after_loading(module)
    packs = cpu.available() and cpu.isa() == "avx512vnni"
    assert module.method.vnni_packed is packs
    assert torch.equal(module.qweight, formats.pack_vnni(before) if packs else before)
    w = torch.randn(module.out_features, module.in_features, generator=_gen(10))
    plain = dataclasses.replace(module.method, vnni_packed=False).quantize(w)["qweight"]
    assert plain.dtype == module.qweight.dtype
    stored = module.method.quantize(w)["qweight"]  # what loading a weight now writes
    assert torch.equal(stored, formats.pack_vnni(plain) if packs else plain)
