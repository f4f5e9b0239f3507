"""Native int4 / int8 / bf16 / fp16 CPU kernels (inference_pio.kernels.cpu) against the other
ways to multiply the same weights, at Qwen3-Coder-30B-A3B's shapes, and the machine's memory
bandwidth.

    PYTHONPATH=src python benchmarks/bench_kernels.py                # everything, T = 1
    PYTHONPATH=src python benchmarks/bench_kernels.py --quick        # skip the slowest baselines
    PYTHONPATH=src python benchmarks/bench_kernels.py --tokens 1 16 --threads 1
    PYTHONPATH=src python benchmarks/bench_kernels.py --groups float --tokens 1 16

Linear layers [rows x cols] (experts 768x2048 and 2048x768, attention 4096x2048, lm_head
151936x2048), `--tokens` rows of fp32 activations:
- `native`: cpu.int4_linear (groups 32 / 64 / 128) and cpu.int8_linear;
- `plain`: the package's plain-torch path (Int4Method / Int8Method.apply: dequantize, matmul);
- `int4pack`: torch's _weight_int4pack_mm_for_cpu (bf16 activations: its fp32 path is far
  slower), `int8pack`: torch's _weight_int8pack_mm (fp32 activations);
- `fp32`: F.linear with the float32 weight (4 bytes a weight).

Float weights (group `float`: a 2048x2048 attention-size weight and the lm_head, 2 bytes a
weight): `bf16_native` / `fp16_native` cpu.float_linear (weights widened in registers),
`bf16_amx` cpu.amx_bf16_linear (AMX tiles, bf16-rounded activations; CPUs with AMX-BF16
only), `bf16_chunked` the plain path of FloatMethod.apply (chunked_linear: 16 MiB of rows converted to
fp32 at a time, then F.linear); `x_native_time` against bf16_native.
`GBps` is the bytes of the weight as the method stores it (qweight + scales for the quantized
ones) over the fastest time; `x_bw` that over the measured bandwidth; `x_native_time` (and the
JSON's `speedup_*`) the baseline's time over the native kernel's for the same weight (fp32:
over int4 g64's), both from this run. Output: a table, the run's context, one JSON line.

Routed experts: the 8-of-128 MoE call of one layer (hidden 2048, expert width 768), the
experts' weights stacked as QuantExperts holds them: `native` cpu.int4_moe / int8_moe (one
call), `plain` QuantExperts.forward (a loop over experts, three apply calls each). GBps counts
the bytes of the distinct experts the tokens route to.

`bandwidth_GBps`: the best of torch's and numpy's float32 sum and torch.mv over 1 GiB
(read-only), taken before and after the timings (the larger counts: contention only lowers it). Weights
are random codes and scales of the real layouts (timing does not depend on their values);
each figure rotates through copies of its weight adding up to 48 MiB (the MoE through 16
routings), so weights come from memory, not from the 8 MiB L3, as in a decode step.
Each figure is the minimum over repeats within a time budget (median in the `_median` keys).
See benchmarks/README.md about shared machines: check cpu_stall_pct."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import _common as common
import torch
import torch.nn.functional as F

from inference_pio.kernels import cpu
from inference_pio.layers.quantization import QuantExperts
from inference_pio.layers.quantization.formats import padded_cols, unpack_nibbles
from inference_pio.layers.quantization.methods import (
    FloatMethod,
    Int4Method,
    Int8Method,
    chunked_linear,
)

SHAPES = {"expert_gate": (768, 2048), "expert_down": (2048, 768), "attn": (4096, 2048),
          "lm_head": (151936, 2048)}
FLOAT_SHAPES = {"attn_2048": (2048, 2048), "lm_head": (151936, 2048)}  # bf16 / fp16 weights
GROUPS_RUN = ("quant", "float", "moe")  # --groups
GROUPS = (32, 64, 128)
EXPERTS, HIDDEN, INTER, TOP_K = 128, 2048, 768, 8
STREAM_BYTES = 48 << 20  # weight copies per figure add up to this (> the 8 MiB L3)


def timeit(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> tuple[float, float]:
    """(fastest, median) seconds of fn() over repeats until budget_s has passed (one warm-up;
    a single call longer than the budget ends it)."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if times[-1] > budget_s:
            break
    times.sort()
    return times[0], times[len(times) // 2]


def cycling(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One call of the next fn each time: weights rotate through copies larger than the
    caches, so every call streams its weight from memory, as a decode step does."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def copies_for(size: int) -> int:
    return max(1, min(64, -(-STREAM_BYTES // size)))


def bandwidth() -> float:
    """Read bandwidth in GB/s over 1 GiB of float32: the best of torch's sum, numpy's sum and
    torch.mv (MKL's streaming matrix-vector product, the figure decode kernels can aim at)."""
    a = torch.ones(2**28, dtype=torch.float32)
    m, v = a.view(2**13, 2**15), torch.ones(2**15)
    b = a.numpy()
    best = max(a.nbytes / timeit(a.sum, 1.0)[0], b.nbytes / timeit(b.sum, 1.0)[0],
               a.nbytes / timeit(lambda: torch.mv(m, v), 1.0)[0])
    return best / 1e9


def random_int4(rows: int, cols: int, group: int, g: torch.Generator,
                lead: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    cols_p = padded_cols(cols, group)
    q = torch.randint(0, 256, (*lead, rows, cols_p // 2), dtype=torch.uint8, generator=g)
    s = (torch.rand(*lead, rows, cols_p // group, generator=g) * 0.01 + 0.001).half()
    return {"qweight": q, "scales": s}


def random_int8(rows: int, cols: int, g: torch.Generator,
                lead: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    q = torch.randint(-127, 128, (*lead, rows, cols), dtype=torch.int8, generator=g)
    return {"qweight": q, "scales": torch.rand(*lead, rows, generator=g) * 0.01 + 0.001}


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in parts.values())


def native_int4(x: torch.Tensor, parts: dict[str, torch.Tensor], cols: int
                ) -> Callable[[], object]:
    return lambda: cpu.int4_linear(x, parts["qweight"], parts["scales"], cols)


def native_int8(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> Callable[[], object]:
    return lambda: cpu.int8_linear(x, parts["qweight"], parts["scales"])


def plain(method: Any, x: torch.Tensor, parts: dict[str, torch.Tensor], cols: int
          ) -> Callable[[], object]:
    return lambda: method.apply(parts, x, cols)


def int8pack(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> Callable[[], object]:
    return lambda: torch.ops.aten._weight_int8pack_mm(x, parts["qweight"], parts["scales"])


def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    return lambda: F.linear(x, w)


def int4pack(x: torch.Tensor, parts: dict[str, torch.Tensor], group: int
             ) -> Callable[[], object] | None:
    """torch's own int4 CPU kernel on the same codes (bf16 activations), or None if refused."""
    try:
        codes = unpack_nibbles(parts["qweight"]).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        rows, cols_p = codes.shape
        sz = torch.zeros(cols_p // group, rows, 2, dtype=torch.bfloat16)
        sz[..., 0] = parts["scales"].T.to(torch.bfloat16)
        xb = F.pad(x, (0, cols_p - x.shape[-1])).bfloat16()

        def fn() -> object:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, sz)
        fn()
        return fn
    except (RuntimeError, TypeError):
        return None


class Recorder:
    """Times one shape's variants into `out` under `{key}.{label}_*` keys."""

    def __init__(self, out: dict[str, Any], key: str, budget: float) -> None:
        self.out, self.key, self.budget = out, key, budget

    def __call__(self, label: str, fns: list[Callable[[], object]], size: int) -> float:
        best, median = timeit(cycling(fns), self.budget)
        k = f"{self.key}.{label}"
        self.out[f"{k}_ms"] = round(best * 1e3, 3)
        self.out[f"{k}_ms_median"] = round(median * 1e3, 3)
        self.out[f"{k}_GBps"] = round(size / best / 1e9, 2)
        return best

    def ratio(self, label: str, baseline: float, native: float) -> None:
        self.out[f"{self.key}.{label}"] = round(baseline / native, 1)


def bench_linear(name: str, rows: int, cols: int, T: int, budget: float, quick: bool,
                 out: dict[str, Any], g: torch.Generator) -> None:
    """One shape: native int4 (every group) / int8 and the baselines, into `out`."""
    x = torch.randn(T, cols, generator=g)
    slow_ok = not (quick and name == "lm_head")
    rec = Recorder(out, f"{name}_{rows}x{cols}_T{T}", budget)
    for group in GROUPS:
        cols_p = padded_cols(cols, group)
        size = rows * (cols_p // 2 + cols_p // group * 2)
        weights = [random_int4(rows, cols, group, g) for _ in range(copies_for(size))]
        native = rec(f"int4_g{group}_native", [native_int4(x, p, cols) for p in weights], size)
        if slow_ok:
            t = rec(f"int4_g{group}_plain",
                    [plain(Int4Method(group), x, p, cols) for p in weights], size)
            rec.ratio(f"int4_g{group}_speedup_vs_plain", t, native)
            packs = [int4pack(x, p, group) for p in weights[:copies_for(size)]]
            if all(fn is not None for fn in packs):
                t = rec(f"int4_g{group}_int4pack_bf16", packs, size)  # type: ignore[arg-type]
                rec.ratio(f"int4_g{group}_speedup_vs_int4pack", t, native)
    size = rows * cols + rows * 4
    weights = [random_int8(rows, cols, g) for _ in range(copies_for(size))]
    native = rec("int8_native", [native_int8(x, p) for p in weights], size)
    if slow_ok:
        t = rec("int8_plain", [plain(Int8Method(), x, p, cols) for p in weights], size)
        rec.ratio("int8_speedup_vs_plain", t, native)
        t = rec("int8_int8pack", [int8pack(x, p) for p in weights], size)
        rec.ratio("int8_speedup_vs_int8pack", t, native)
        size = rows * cols * 4
        floats = [torch.randn(rows, cols, generator=g) for _ in range(copies_for(size))]
        rec("fp32_linear", [fp32_linear(x, w) for w in floats], size)


def native_float(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    return lambda: cpu.float_linear(x, w)


def amx_float(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    return lambda: cpu.amx_bf16_linear(x, w)


def chunked(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    """FloatMethod.apply's plain path for fp32 activations (what it runs without the kernels)."""
    return lambda: chunked_linear(x, {"weight": w}, lambda p: p["weight"].to(x.dtype))


def bench_float(name: str, rows: int, cols: int, T: int, budget: float, quick: bool,
                out: dict[str, Any], g: torch.Generator) -> None:
    """One float-weight shape: native bf16 / fp16 and the chunked fp32 path, into `out`."""
    x = torch.randn(T, cols, generator=g)
    rec = Recorder(out, f"{name}_{rows}x{cols}_T{T}", budget)
    size = rows * cols * 2
    for dtype in (torch.bfloat16, torch.float16):
        label = FloatMethod(dtype).name
        weights = [(torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
                   for _ in range(copies_for(size))]
        native = rec(f"{label}_native", [native_float(x, w) for w in weights], size)
        if dtype == torch.bfloat16 and cpu.amx_bf16_supported():
            amx = rec(f"{label}_amx", [amx_float(x, w) for w in weights], size)
            rec.ratio(f"{label}_amx_speedup_vs_native", native, amx)
        if dtype == torch.bfloat16 and not (quick and name == "lm_head"):
            t = rec(f"{label}_chunked", [chunked(x, w) for w in weights], size)
            rec.ratio(f"{label}_speedup_vs_chunked", t, native)


def _experts_module(method: Any, parts: dict[str, dict[str, torch.Tensor]]) -> QuantExperts:
    m = QuantExperts(EXPERTS, HIDDEN, INTER, method)
    for proj, p in parts.items():
        for part, t in p.items():
            getattr(m, f"{proj}__{part}").copy_(t)
    return m


def routings(T: int, g: torch.Generator, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n random top-k routings of T tokens (calls rotate through them: different experts)."""
    out = []
    for _ in range(n):
        ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(T)])
        out.append((torch.softmax(torch.randn(T, TOP_K, generator=g), dim=-1), ids))
    return out


def fused_call(fused: Callable[..., torch.Tensor], x: torch.Tensor, stacked: list,
               route: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], object]:
    return lambda: fused(x, *stacked, *route)


def module_call(module: QuantExperts, x: torch.Tensor,
                route: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], object]:
    return lambda: module(x, *route)


def bench_moe(T: int, budget: float, quick: bool, out: dict[str, Any],
              g: torch.Generator) -> None:
    """The fused routed-experts call against QuantExperts.forward, int4 g64 and int8."""
    x = torch.randn(T, HIDDEN, generator=g)
    routes = routings(T, g)
    used = sum(len(ids.unique()) for _, ids in routes) / len(routes)
    shapes = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER)}
    rec = Recorder(out, f"moe_{EXPERTS}e_top{TOP_K}_T{T}", budget)
    out[f"{rec.key}.mean_experts_used"] = used
    for label, method in (("int4_g64", Int4Method(64)), ("int8", Int8Method())):
        int4 = label.startswith("int4")
        parts = {proj: random_int4(r, c, 64, g, (EXPERTS,)) if int4
                 else random_int8(r, c, g, (EXPERTS,)) for proj, (r, c) in shapes.items()}
        size = int(sum(nbytes(p) for p in parts.values()) * used / EXPERTS)
        stacked = [t for proj in shapes for t in (parts[proj]["qweight"], parts[proj]["scales"])]
        fused = cpu.int4_moe if int4 else cpu.int8_moe
        stacked_pairs = [tuple(stacked[i:i + 2]) for i in range(0, 6, 2)]
        native = rec(f"{label}_native", [fused_call(fused, x, stacked_pairs, r) for r in routes],
                     size)
        if quick and T > 1:
            continue
        module = _experts_module(method, parts)
        t = rec(f"{label}_plain", [module_call(module, x, r) for r in routes], size)
        rec.ratio(f"{label}_speedup_vs_plain", t, native)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1],
                    help="activation rows of the linear benchmarks (default: 1)")
    ap.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES) + ["attn_2048"],
                    choices=list(SHAPES) + ["attn_2048"],
                    help="linear shapes (quant: all but attn_2048; float: attn_2048, lm_head)")
    ap.add_argument("--groups", nargs="+", default=list(GROUPS_RUN), choices=GROUPS_RUN,
                    help="quant: int4 / int8 linear; float: bf16 / fp16 linear; moe: routed "
                         "experts (default: all)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per figure")
    ap.add_argument("--quick", action="store_true",
                    help="skip the slow baselines: lm_head's (plain, int4pack, int8pack, fp32, "
                         "bf16 chunked) "
                         "and the plain MoE loop beyond one token")
    args = common.parse_args_with_threads(ap)
    if not cpu.available():
        raise SystemExit(f"native kernels unavailable: {cpu.reason()}")
    contention = common.Contention()
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"threads": torch.get_num_threads(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    before = bandwidth()
    for T in args.tokens:
        for name in args.shapes:
            if "quant" in args.groups and name in SHAPES:
                bench_linear(name, *SHAPES[name], T, args.budget, args.quick, out, g)
            if "float" in args.groups and name in FLOAT_SHAPES:
                bench_float(name, *FLOAT_SHAPES[name], T, args.budget, args.quick, out, g)
    for T in args.moe_tokens if "moe" in args.groups else ():
        bench_moe(T, args.budget, args.quick, out, g)
    after = bandwidth()
    bw = max(before, after)  # a disturbed measurement is only ever too low
    out["bandwidth_GBps"] = round(bw, 2)
    out["bandwidth_GBps_before_after"] = [round(before, 2), round(after, 2)]
    for key in [k for k in out if k.endswith("_GBps") and k != "bandwidth_GBps"]:
        out[key[:-len("_GBps")] + "_x_bw"] = round(out[key] / bw, 2)
    out.update(contention.report())
    common.print_table(table_rows(out))
    for key, value in out.items():
        if "." not in key:  # the run's context
            print(f"{key:<28}  {value}")
    print(json.dumps(out))


def table_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per timed figure: fastest and median ms, GB/s, x_bw, and for a baseline how
    many times slower it is than the native kernel of the same weight."""
    rows = []
    for key in [k for k in out if k.endswith("_ms")]:
        base = key[:-len("_ms")]
        figure, variant = base.split(".", 1)
        weight = re.match(r"int4_g\d+|int8|bf16|fp16", variant)
        kind = weight.group(0) if weight else "int4_g64"
        native = f"{figure}.{'bf16' if kind == 'fp16' else kind}_native_ms"
        slower = out[key] / out[native] if native in out and native != key else None
        rows.append({"figure": figure, "variant": variant, "ms": out[key],
                     "ms_median": out[f"{base}_ms_median"], "GBps": out[f"{base}_GBps"],
                     "x_bw": out[f"{base}_x_bw"],
                     "x_native_time": "-" if slower is None else round(slower, 1)})
    return rows


if __name__ == "__main__":
    main()
