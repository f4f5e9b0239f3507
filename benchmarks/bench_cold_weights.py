"""The int4 kernel on weights that are not in any cache, against a plain read of the same
bytes, per thread count: what decode of a model larger than the last-level cache sees.

`bench_kernels.py` repeats one weight, which a large L3 (480 MiB on some cloud Xeons) serves
after the first call; here N distinct weights of the attention projection's shape (4096 x 2048,
int4 g64, random codes) are multiplied in turn, N chosen so they exceed the cache, and the
figure is their bytes over the time of one pass (best of 4). `--count 10` uses few enough
weights to stay in the cache, for the kernel's compute bound. On the avx512vnni build the same
weights stored in the kernel's tile order (`int4 packed`, what a loaded model runs) are timed
too.

    PYTHONPATH=src python3 benchmarks/bench_cold_weights.py            # 1.05 GB of weights
    PYTHONPATH=src python3 benchmarks/bench_cold_weights.py --count 10 # in the cache

Prints one line per (threads, method) and one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import random_int4

from inference_pio.kernels import cpu
from inference_pio.layers.quantization import formats


def best_of(fn: Callable[[], object], repeats: int = 4) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=250, help="distinct weights (4.2 MB each)")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    rows, cols, group = 4096, 2048, 64
    g = torch.Generator().manual_seed(0)
    mats = [random_int4(rows, cols, group, g) for _ in range(args.count)]
    nbytes = sum(m["qweight"].nbytes + m["scales"].nbytes for m in mats)
    x = torch.randn(1, cols, generator=g)
    flat = torch.ones(nbytes // 4)
    result: dict[str, object] = {"isa": cpu.isa(), "weights_bytes": nbytes, "gb_s": {}}

    def kernel() -> None:
        for m in mats:
            cpu.int4_linear(x, m["qweight"], m["scales"], cols)

    methods: list[tuple[str, Callable[[], object]]] = [("int4_linear", kernel)]
    if cpu.isa() == "avx512vnni":  # the same weights in the kernel's tile order, alternated
        packed = [formats.pack_vnni(m["qweight"]) for m in mats]

        def kernel_packed() -> None:
            for q, m in zip(packed, mats):
                cpu.int4_linear(x, q, m["scales"], cols, packed=True)

        methods.append(("int4 packed", kernel_packed))
    methods.append(("fp32 sum", flat.sum))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, fn in methods:
            rate = nbytes / best_of(fn) / 1e9
            result["gb_s"][f"{name}, {threads} thread(s)"] = round(rate, 2)  # type: ignore[index]
            print(f"{threads} thread(s)  {name:12} {rate:6.1f} GB/s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
