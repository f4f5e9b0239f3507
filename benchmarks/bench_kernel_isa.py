"""The int4 / int8 kernels' two builds against each other in one run: AVX2 and AVX-512 VNNI.

    python benchmarks/bench_kernel_isa.py                 # both builds, alternating, 2 rounds
    python benchmarks/bench_kernel_isa.py --rounds 3 --tokens 1 4 16

Each round runs each build (INFERENCE_PIO_CPU_ISA=avx2, then avx512vnni; each has its own cache
entry, built on first use) in its own process, which times, at Qwen3-Coder-30B-A3B's shapes
with int4 g64 and int8 weights: `cpu.int4_linear` / `int8_linear` on the expert (768x2048,
2048x768), attention (4096x2048) and lm_head (151936x2048) shapes for `--tokens` activation
rows, rotating through copies of each weight adding up to 48 MiB (so weights come from memory,
as in a decode step); and the fused 8-of-128 MoE of one layer (`cpu.int4_moe` / `int8_moe`)
for 1, 4 and 16 tokens, each token routed to 8 random experts (16 routings in rotation). A figure is the fastest call within a
time budget; the table gives the median over rounds of each build's ms and the ratio
AVX2 / VNNI (above 1: VNNI faster). Needs a CPU with AVX-512 F/BW/VL and VNNI."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(768, 2048), (2048, 768), (4096, 2048), (151936, 2048)]
E, H, I, K = 128, 2048, 768, 8


def fastest(fn: Callable[[], None], budget: float) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def rotating(call: Callable[..., object], argsets: list[tuple[Any, ...]]) -> Callable[[], None]:
    """A call that takes its arguments from `argsets` in turn (so weights come from memory)."""
    i = 0

    def run() -> None:
        nonlocal i
        call(*argsets[i % len(argsets)])
        i += 1
    return run


def worker(tokens: list[int], budget: float) -> None:
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from inference_pio.kernels import cpu
    from inference_pio.layers.quantization import formats

    torch.manual_seed(0)
    res: dict[str, float] = {}
    quant = {"int4": (lambda w: formats.quantize_int4(w, 64), 0.5),
             "int8": (formats.quantize_int8, 1.0)}
    for fmt, (q, bytes_per) in quant.items():
        linear = cpu.int4_linear if fmt == "int4" else cpu.int8_linear
        for rows, cols in SHAPES:
            copies = max(1, min(64, int((48 << 20) // (rows * cols * bytes_per))))
            ws = [q(torch.randn(rows, cols) * 0.02) for _ in range(copies)]
            extra = (cols,) if fmt == "int4" else ()
            for T in tokens:
                x = torch.randn(T, cols)
                lin = rotating(linear, [(x, p["qweight"], p["scales"], *extra) for p in ws])
                res[f"{fmt} linear {rows}x{cols} T{T}"] = fastest(lin, budget) * 1e3
        experts = [q(torch.randn(E, r, c) * 0.02) for r, c in ((I, H), (I, H), (H, I))]
        parts = [(p["qweight"], p["scales"]) for p in experts]
        moe_op = cpu.int4_moe if fmt == "int4" else cpu.int8_moe
        for T in (1, 4, 16):
            x, w = torch.randn(T, H), torch.full((T, K), 1.0 / K)
            routes = [torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(16)]
            moe = rotating(moe_op, [(x, *parts, w, ids) for ids in routes])
            res[f"{fmt} moe 8 of 128, T{T}"] = fastest(moe, 2 * budget) * 1e3
    print("RESULT " + json.dumps({"isa": cpu.isa(), "ms": res}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per figure")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.tokens, args.budget)
        return
    runs: dict[str, list[dict[str, float]]] = {"avx2": [], "avx512vnni": []}
    for rnd in range(args.rounds):
        for isa, results in runs.items():
            env = dict(os.environ, INFERENCE_PIO_CPU_ISA=isa)
            proc = subprocess.run([sys.executable, __file__, "--worker", "--budget",
                                   str(args.budget), "--tokens", *map(str, args.tokens)],
                                  capture_output=True, text=True, env=env, timeout=3600,
                                  check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"the {isa} build failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            if r["isa"] != isa:
                raise SystemExit(f"asked for {isa}, the kernels are {r['isa']}")
            results.append(r["ms"])
            print(f"[round {rnd + 1} {time.strftime('%H:%M:%S')}] {isa} done", flush=True)
    med = {isa: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for isa, rs in runs.items()}
    print(f"\n{'call':39} {'avx2 ms':>9} {'vnni ms':>9} {'avx2/vnni':>9}")
    for k in med["avx2"]:
        a, v = med["avx2"][k], med["avx512vnni"][k]
        print(f"{k:39} {a:9.3f} {v:9.3f} {a / v:9.2f}")
    print(json.dumps({"rounds": args.rounds, "ms": med}))


if __name__ == "__main__":
    main()
