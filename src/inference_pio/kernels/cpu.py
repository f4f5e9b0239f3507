"""Native CPU kernels (AVX2 + FMA, OpenMP; AVX-512 VNNI for int4 / int8 where the CPU has it),
built on first use.

`csrc/*.cpp` (cpu_quant: int4 / int8 weights; cpu_float: bf16 / fp16 weights; cpu_fused: the
small fused ops of a decoder layer) are compiled with torch.utils.cpp_extension the first time
a kernel is needed, once per process (thread-safe), into `<cache>/kernels/<name>` where
`<cache>` is `envs.cache_dir()` (INFERENCE_PIO_CACHE, else ~/.cache/inference_pio) and `<name>`
carries a hash of the sources, the compile flags and the torch version: a later process loads
the cached build in well under a second (straight from the .so: a read-only cache works).
`kernels/build.py` handles the cache: build locks that die with their process, an unwritable
cache falling back to a per-user temporary one, progress lines with an estimate. When the kernels cannot be used (INFERENCE_PIO_NATIVE=0, no AVX2, not
x86-64, no C++ compiler or ninja, or a failed build) `available()` is False, `reason()` says
why, one warning is logged, and callers use the plain-torch path.

The build targets the CPU it runs on: where /proc/cpuinfo reports AVX-512 F/BW/VL and VNNI,
cpu_quant.cpp is compiled with those instructions and int4 / int8 weights go through
`csrc/int4_vnni.h` / `int8_vnni.h` (16-row tiles, vpdpbusd); elsewhere through the AVX2 kernels.
INFERENCE_PIO_CPU_ISA=avx2 forces the AVX2 build (`isa()` says which one is loaded); each
target has its own cache entry.

The int4 / int8 kernels take fp32 activations and quantize them inside, per row in blocks of 32
columns (llama.cpp Q8_0); `reference.py` holds plain-torch functions that do exactly the same.
The bf16 / fp16 kernels widen the weights to fp32 in registers (fp32 arithmetic throughout)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from inference_pio import envs

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_quant.cpp", CSRC / "cpu_float.cpp", CSRC / "cpu_fused.cpp",
           CSRC / "cpu_amx.cpp")
HEADERS = (CSRC / "int4_vnni.h", CSRC / "int8_vnni.h", CSRC / "moe_routing.h",
           CSRC / "vec_math.h", CSRC / "amx_bf16.h")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")
VNNI_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})  # /proc/cpuinfo
VNNI_CFLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
LDFLAGS = ("-fopenmp",)
ENV_SWITCH = "INFERENCE_PIO_NATIVE"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": object | None, "reason": str | None
_disabled = [0]  # > 0 inside `disabled()` blocks


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be used here; the message says why."""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is missing)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def target_isa(flags: frozenset[str] | None = None) -> str:
    """The instruction set the build targets: INFERENCE_PIO_CPU_ISA, "auto" resolved against
    the CPU's `flags` (default: this CPU's): "avx512vnni" where they hold AVX-512 F/BW/VL and
    VNNI, else "avx2"."""
    wanted = envs.cpu_isa()
    if wanted != "auto":
        return wanted
    return "avx512vnni" if VNNI_CPU_FLAGS <= (cpu_flags() if flags is None else flags) else "avx2"


@functools.cache
def amx_bf16_supported(flags: frozenset[str] | None = None) -> bool:
    """`amx_bf16_linear` can run: the CPU's `flags` (default: this CPU's) list amx_bf16,
    INFERENCE_PIO_CPU_ISA does not force the AVX2 kernels, the kernels load, and Linux grants
    the process the AMX tile state."""
    if ("amx_bf16" not in (cpu_flags() if flags is None else flags)
            or envs.cpu_isa() == "avx2" or not available()):
        return False
    return bool(module().amx_bf16_usable())  # type: ignore[attr-defined]


def isa_problem(flags: frozenset[str] | None = None) -> str | None:
    """Why INFERENCE_PIO_CPU_ISA cannot be honoured on a CPU with `flags` (default: this
    CPU's): a bad value, or avx512vnni without the instructions; None when it can."""
    try:
        isa = target_isa(flags)
    except ValueError as e:
        return str(e)
    missing = VNNI_CPU_FLAGS - (cpu_flags() if flags is None else flags)
    if isa == "avx512vnni" and missing:
        return (f"INFERENCE_PIO_CPU_ISA=avx512vnni, but the CPU lacks {', '.join(sorted(missing))}"
                " (unset it, or set it to avx2)")
    return None


def cflags() -> tuple[str, ...]:
    return CFLAGS + (VNNI_CFLAGS if target_isa() == "avx512vnni" else ())


def build_name() -> str:
    """Extension name: a hash of the sources, flags and torch version (a new one rebuilds)."""
    h = hashlib.sha256()
    for source in SOURCES + HEADERS:
        h.update(source.read_bytes())
    h.update(" ".join(cflags() + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return f"pio_cpu_quant_{h.hexdigest()[:12]}"


def build_dir() -> Path:
    """Where the extension is built and cached."""
    return envs.cache_dir() / "kernels" / build_name()


def _prebuilt() -> bool:
    """The library is already in the cache (or its per-user fallback): no compiler needed."""
    from inference_pio.kernels.build import fallback_dir, library_path

    name = build_name()
    return any(library_path(d, name).is_file() for d in (build_dir(), fallback_dir(name)))


def _precheck() -> str | None:
    """Why the kernels cannot be built here, or None when a build (or a load) may be tried."""
    if not envs.native_kernels_enabled():
        return f"disabled by {ENV_SWITCH}=0"
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"not an x86-64 CPU ({platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in {"AVX2", "AVX512"}:
        return f"the CPU lacks AVX2 (torch reports {capability})"
    problem = isa_problem()
    if problem is not None:
        return problem
    if _prebuilt():
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found on PATH)"
    from torch.utils.cpp_extension import is_ninja_available
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build() -> object:
    """Load the cached build, or compile it first (kernels/build.py: a stale lock is cleared, a
    read-only cache holding the library is used, an unwritable one falls back to a per-user
    temporary directory); its ops are registered as torch.ops.inference_pio.*."""
    from inference_pio.kernels.build import load_library

    _state["directory"], _state["built"] = load_library(build_dir(), build_name(), SOURCES,
                                                        cflags(), LDFLAGS)
    return torch.ops.inference_pio


def _load() -> object | None:
    """Build or load the extension once per process; None (with a warning) when impossible."""
    if "reason" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "reason" in _state:
            return _state["module"]  # type: ignore[return-value]
        module, reason = None, _precheck()
        if reason is None:
            try:
                module = _build()
            except Exception as exc:  # any build failure means: fall back
                logger.debug("native CPU kernel build failed", exc_info=True)
                lines = str(exc).strip().splitlines()
                reason = f"the build failed ({lines[-1] if lines else type(exc).__name__})"
        if reason is not None and not reason.startswith("disabled"):
            logger.warning("native CPU kernels unavailable: %s; using the plain-torch path",
                           reason)
        _state["module"], _state["reason"] = module, reason
        return module


def available() -> bool:
    """True when the native kernels can be used (builds them on the first call); False inside
    a `disabled()` block."""
    return _disabled[0] == 0 and _load() is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block `available()` is False in the whole process (engine threads included),
    so callers take their plain-torch path: for comparisons with exact float references."""
    with _lock:
        _disabled[0] += 1
    try:
        yield
    finally:
        with _lock:
            _disabled[0] -= 1


def warmup() -> dict[str, object]:
    """Build or load the kernels now (what `pio warmup` and the server's start-up call):
    {"available", "directory" (where the library is; None if unavailable), "built" (compiled
    by this call, not loaded from the cache), "isa" (the quantized kernels' instruction set),
    "reason" (None if available), "seconds" (this call's time)}."""
    import time

    start = time.perf_counter()
    ok = available()
    return {"available": ok, "directory": str(library_dir()) if ok else None,
            "built": bool(_state.get("built")), "isa": isa() if ok else None,
            "reason": None if ok else reason(), "seconds": time.perf_counter() - start}


def isa() -> str | None:
    """The instruction set of the loaded int4 / int8 kernels ("avx512vnni" or "avx2"); None when
    the kernels are unavailable."""
    mod = _load()
    return None if mod is None else str(mod.kernel_isa())  # type: ignore[attr-defined]


def library_dir() -> Path | None:
    """The directory the library was loaded from (None when the kernels are unavailable)."""
    _load()
    return _state.get("directory") if _state["module"] is not None else None  # type: ignore


def reason() -> str | None:
    """Why the native kernels are unavailable (None when they are available)."""
    _load()
    return _state["reason"]  # type: ignore[return-value]


def module() -> object:
    """The compiled ops (torch.ops.inference_pio); raises KernelUnavailable (with the reason)
    when there are none."""
    mod = _load()
    if mod is None:
        raise KernelUnavailable(f"native CPU kernels unavailable: {_state['reason']}")
    return mod


# ---- entry points ------------------------------------------------------------------------

def _acts(x: torch.Tensor, cols: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x [..., cols] in any float dtype -> contiguous fp32 [T, cols], and the leading shape."""
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight has {cols}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, cols).to(torch.float32).contiguous(), lead


def quantize_q8(x: torch.Tensor, cols_p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activation quantizer (for tests): x [T, cols] fp32 -> codes int8
    [T, cols_p], scales fp32 [T, cols_p/32], code sums fp32 [T, cols_p/32]."""
    q, d, s = module().quantize_q8(x.to(torch.float32).contiguous(), cols_p)  # type: ignore
    return q, d, s


def _plain(x: torch.Tensor) -> bool:
    """x can go to the kernel as it is: 2-D, float32, contiguous."""
    return x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                cols: int, packed: bool = False) -> torch.Tensor:
    """x [..., cols] @ W^T for an int4 weight (formats.py layout; with `packed`, qweight in the
    VNNI tile order of formats.pack_vnni, avx512vnni build only) -> [..., rows] in x's
    dtype."""
    ops = _state.get("module") or module()
    fn = ops.int4_linear_packed if packed else ops.int4_linear  # type: ignore[attr-defined]
    if _plain(x) and qweight.is_contiguous() and scales.is_contiguous():
        return fn(x, qweight, scales, cols)  # the decode path: no copies
    x2, lead = _acts(x, cols)
    y = fn(x2, qweight.contiguous(), scales.contiguous(), cols)
    return y.reshape(*lead, -1).to(x.dtype)


def vnni_pack_(qweight: torch.Tensor, unpack: bool = False) -> torch.Tensor:
    """An int4 / int8 qweight [..., rows, bytes] into the VNNI tile order in place (or back):
    formats.pack_vnni's layout, tiles in parallel. Returns qweight."""
    (_state.get("module") or module()).vnni_pack_(qweight, unpack)  # type: ignore[attr-defined]
    return qweight


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                packed: bool = False) -> torch.Tensor:
    """x [..., cols] @ W^T for an int8 weight (per-row fp32 scales; with `packed`, qweight in
    the VNNI tile order of formats.pack_vnni, avx512vnni build only) -> [..., rows]."""
    ops = _state.get("module") or module()
    fn = ops.int8_linear_packed if packed else ops.int8_linear  # type: ignore[attr-defined]
    if (_plain(x) and qweight.is_contiguous() and scales.dtype == torch.float32
            and scales.is_contiguous()):
        return fn(x, qweight, scales)
    x2, lead = _acts(x, qweight.shape[-1])
    y = fn(x2, qweight.contiguous(), scales.float().contiguous())
    return y.reshape(*lead, -1).to(x.dtype)


def _routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden], got {list(x.shape)}")
    return (x.to(torch.float32).contiguous(), topk_weights.to(torch.float32).contiguous(),
            topk_ids.to(torch.int64).contiguous())


def int4_moe(x: torch.Tensor, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
             down: Sequence[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             per_slot: bool = False, packed: bool = False) -> torch.Tensor:
    """All routed experts of a layer in one call, int4 weights:
    out[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t,k],
    summed in slot order k = 0, 1, ... (deterministic; a token's output does not depend on the
    other tokens); a slot whose id is -1 is skipped. gate / up / down are (qweight, scales)
    pairs stacked [E, ...] ([E, I, H_p/2] and [E, I, groups] for gate and up, [E, H, I_p/2]
    and [E, H, groups] for down). x [T, H]; topk_weights, topk_ids [T, k]. Returns [T, H] in
    x's dtype; with `per_slot`, [T, k, H] float32: each slot's unweighted expert output (zeros
    where skipped), for `slot_sum`. `packed`: the qweights in the VNNI tile order
    (formats.pack_vnni; avx512vnni build only)."""
    return _moe("int4_moe_packed" if packed else "int4_moe", x, (*gate, *up, *down),
                topk_weights, topk_ids, False, per_slot)


def int8_moe(x: torch.Tensor, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
             down: Sequence[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             per_slot: bool = False, packed: bool = False) -> torch.Tensor:
    """`int4_moe` for int8 experts: (qweight int8 [E, rows, cols], scales fp32 [E, rows])."""
    return _moe("int8_moe_packed" if packed else "int8_moe", x, (*gate, *up, *down),
                topk_weights, topk_ids, True, per_slot)


def _moe(op: str, x: torch.Tensor, weights: tuple[torch.Tensor, ...],
         topk_weights: torch.Tensor, topk_ids: torch.Tensor, float_scales: bool,
         per_slot: bool) -> torch.Tensor:
    fn = getattr(_state.get("module") or module(), op)
    if (_plain(x) and topk_weights.dtype == torch.float32 and topk_ids.dtype == torch.int64
            and topk_weights.is_contiguous() and topk_ids.is_contiguous()
            and all(t.is_contiguous() for t in weights)):
        return fn(x, *weights, topk_weights, topk_ids, per_slot)  # the decode path: no copies
    xf, w, ids = _routing(x, topk_weights, topk_ids)
    parts = [t.contiguous() if i % 2 == 0 or not float_scales else t.float().contiguous()
             for i, t in enumerate(weights)]
    out = fn(xf, *parts, w, ids, per_slot)
    return out if per_slot else out.to(x.dtype)


def moe_from_list(method: str, x: torch.Tensor,
                  experts: Sequence[dict[str, dict[str, torch.Tensor]]],
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  per_slot: bool = False) -> torch.Tensor:
    """Routed experts whose weights are separate tensors (e.g. paged in by an expert cache):
    `experts[i]` holds {"gate_proj"|"up_proj"|"down_proj": {"qweight", "scales"}} of the expert
    that `topk_ids` calls i (ids index this list; -1 skips a slot). `method` is "int4" or
    "int8". Same results, bit for bit, as int4_moe / int8_moe on stacked weights."""
    if method not in ("int4", "int8"):
        raise ValueError(f"method must be 'int4' or 'int8', got {method!r}")
    xf, w, ids = _routing(x, topk_weights, topk_ids)
    lists = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lists.append([e[proj]["qweight"].contiguous() for e in experts])
        scales = [e[proj]["scales"].contiguous() for e in experts]
        lists.append([s.float() for s in scales] if method == "int8" else scales)
    ops = _state.get("module") or module()
    fn = ops.int4_moe_list if method == "int4" else ops.int8_moe_list
    out = fn(xf, *lists, w, ids, per_slot)
    return out if per_slot else out.to(x.dtype)


def slot_sum(per_slot: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, k, H] per-slot expert outputs -> [T, H] float32: sum over k in slot order of
    topk_weights[t, k] * out[t, k], the same float operations in the same order as the fused
    call, so paged experts (one `per_slot` call per batch of experts, summed into one [T, k, H]
    tensor: each slot is filled by exactly one call) give the resident result bit for bit."""
    w = topk_weights.to(torch.float32)
    out = torch.zeros(per_slot.shape[0], per_slot.shape[2], dtype=torch.float32)
    for s in range(per_slot.shape[1]):
        out += w[:, s, None] * per_slot[:, s]
    return out


# ---- float weights -------------------------------------------------------------------------

def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight^T for a bf16 or fp16 weight [N, K] -> [..., N] in x's dtype. The
    weight is widened to fp32 in registers and every product and sum is fp32; a token's output
    does not depend on the other tokens of the call (bit for bit)."""
    ops = _state.get("module") or module()
    if _plain(x) and weight.is_contiguous():
        return ops.float_linear(x, weight)  # type: ignore[attr-defined]  # decode: no copies
    x2, lead = _acts(x, weight.shape[-1])
    y = ops.float_linear(x2, weight.contiguous())  # type: ignore[attr-defined]
    return y.reshape(*lead, -1).to(x.dtype)


def amx_bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 @ weight^T for a bf16 weight [N, K] (K a multiple of 32, N of 16) ->
    [..., N] fp32 on AMX tiles (csrc/cpu_amx.cpp): the activations rounded to bf16, exact
    products, fp32 sums and output. Only where `amx_bf16_supported()`; a token's output does not
    depend on the other tokens."""
    ops = _state.get("module") or module()
    x2, lead = _acts(x, weight.shape[-1])
    y = ops.amx_bf16_linear(x2, weight.contiguous())  # type: ignore[attr-defined]
    return y.reshape(*lead, weight.shape[0])


def float_moe(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              amx_min_tokens: int = 0) -> torch.Tensor:
    """`int4_moe` for bf16 / fp16 experts stacked gate, up [E, I, H] and down [E, H, I] (one
    dtype): each routed expert runs once on all its tokens, weights widened in registers, fp32
    arithmetic. With `amx_min_tokens` > 0 (bf16 experts, H and I multiples of 32, only where
    `amx_bf16_supported()`), an expert routed that many tokens or more runs on AMX tiles
    instead (activations and hidden vectors rounded to bf16, fp32 sums). x [T, H]; returns
    [T, H] in x's dtype."""
    xf, w, ids = _routing(x, topk_weights, topk_ids)
    out = (_state.get("module") or module()).float_moe(  # type: ignore[attr-defined]
        xf, gate.contiguous(), up.contiguous(), down.contiguous(), w, ids, amx_min_tokens)
    return out.to(x.dtype)


# ---- fused decoder-layer ops (fp32 activations) -------------------------------------------

def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous fp32, without a dispatch when it already is (the decode path)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight for fp32 x [..., H]."""
    return (_state.get("module") or module()).rms_norm(  # type: ignore[attr-defined]
        _f32(x), _f32(weight), eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then x = rms_norm(residual), both in place on contiguous fp32 tensors;
    returns (x, residual)."""
    (_state.get("module") or module()).add_rms_norm_(  # type: ignore[attr-defined]
        x, residual, _f32(weight), eps)
    return x, residual


def qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                  k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> None:
    """In place on contiguous fp32 q [T, Hq, D] and k [T, Hk, D]: each head row RMS-normed
    with its weight [D], then rotated (rotate-half) by cos / sin [T, D]."""
    (_state.get("module") or module()).qk_norm_rope_(  # type: ignore[attr-defined]
        q, k, _f32(q_weight), _f32(k_weight), _f32(cos), _f32(sin), eps)


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts of fp32 logits [T, E], the top_k (descending, ties to the lower
    id), renormalized to sum 1 when asked: (weights fp32 [T, k], ids int64 [T, k])."""
    w, ids = (_state.get("module") or module()).route_topk(  # type: ignore[attr-defined]
        _f32(logits), top_k, renormalize)
    return w, ids


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for fp32 tensors of one shape."""
    return (_state.get("module") or module()).silu_mul(  # type: ignore[attr-defined]
        _f32(gate), _f32(up))


def decode_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                     slots: torch.Tensor, offsets: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence, q [B, H, D], against the fp32 KV rows k_rows / v_rows
    [S, Hkv, D]: sequence b reads the rows slots[offsets[b]:offsets[b + 1]] (int64, position
    order) in place -> [B, H, D]."""
    return (_state.get("module") or module()).decode_attention(  # type: ignore[attr-defined]
        _f32(q), k_rows, v_rows, slots, offsets, scale)


def kv_store_(k_rows: torch.Tensor, v_rows: torch.Tensor, slots: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
    """k_rows[slots] = k and v_rows[slots] = v for fp32 rows [S, Hkv, D], k / v [n, Hkv, D]."""
    (_state.get("module") or module()).kv_store_(  # type: ignore[attr-defined]
        k_rows, v_rows, slots, _f32(k), _f32(v))
