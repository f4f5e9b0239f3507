"""int4 / int8 weights in the VNNI kernels' tile order (what a loaded model runs on the
avx512vnni build) against the same weights in the plain layout, in one process: the synthetic
model of the real dimensions (`--num-layers`, default 48), `--quantization` int4 (g64) or int8
with its quantized lm_head, batch-1 greedy decode and a 16-stream decode, alternating the two
layouts `--rounds` times (each switch permutes every weight in place, so both layouts read the
very same pages).

    PYTHONPATH=src python3 benchmarks/bench_vnni_packing.py [--num-layers 48] [--rounds 3]
    PYTHONPATH=src python3 benchmarks/bench_vnni_packing.py --quantization int8

Prints one line a measurement, the medians, the read bandwidth, one JSON line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from inference_pio import LLM
from inference_pio.bench import measure_read_bandwidth, time_decode, time_streams
from inference_pio.kernels import cpu
from inference_pio.layers.quantization import QuantConfig, formats
from inference_pio.layers.quantization.methods import Int4Method, Int8Method
from inference_pio.models.default_model import default_model_dir
from inference_pio.testing import PRESETS, random_model
from inference_pio.tokenizer import Tokenizer


def set_layout(model: torch.nn.Module, packed: bool) -> None:
    """Every int4 / int8 module of `model` into the packed (or the plain) layout, in place."""
    for module in model.modules():
        method = getattr(module, "method", None)
        if not isinstance(method, (Int4Method, Int8Method)) or method.vnni_packed == packed:
            continue
        convert = formats.pack_vnni if packed else formats.unpack_vnni
        for name, buf in module.named_buffers(recurse=False):
            if name.endswith("qweight"):
                buf.copy_(convert(buf))
        module.method = dataclasses.replace(method, vnni_packed=packed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantization", choices=("int4", "int8"), default="int4")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--streams", type=int, default=16)
    args = ap.parse_args()
    if cpu.isa() != "avx512vnni":
        raise SystemExit(f"the packed layout runs on the avx512vnni kernels; this machine loads "
                         f"{cpu.isa() or 'none'} ({cpu.reason() or 'no AVX-512 VNNI'})")
    config = PRESETS["qwen3-coder-30b"](args.num_layers)
    model = random_model(config, torch.float32, QuantConfig(args.quantization, group_size=64 if args.quantization == "int4" else None))
    llm = LLM.from_model(model, config, Tokenizer.from_pretrained(default_model_dir()),
                         dtype=torch.float32, max_num_seqs=args.streams)
    time_decode(llm, 2)  # warm-up
    runs: dict[str, dict[str, list[float]]] = {k: {"decode": [], "streams": []}
                                               for k in ("plain", "packed")}
    bandwidth = measure_read_bandwidth()
    for r in range(args.rounds):
        for layout in ("plain", "packed") if r % 2 == 0 else ("packed", "plain"):
            with torch.inference_mode():  # the weights are inference tensors once used
                set_layout(model, layout == "packed")
            start = time.perf_counter()
            decode, _ = time_decode(llm, args.tokens)
            _, streams = time_streams(llm, args.streams, args.tokens)
            runs[layout]["decode"].append(decode)
            runs[layout]["streams"].append(streams)
            print(f"round {r}  {layout:6}  batch 1 {decode:6.2f} tok/s  {args.streams} streams "
                  f"{streams:6.2f} tok/s  ({time.perf_counter() - start:.0f} s)", flush=True)
    bandwidth = max(bandwidth, measure_read_bandwidth())
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in runs.items()}
    for m in ("decode", "streams"):
        print(f"median {m}: plain {med['plain'][m]:.2f}, packed {med['packed'][m]:.2f} tok/s "
              f"({med['packed'][m] / med['plain'][m]:.3f}x)")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(json.dumps({"layers": args.num_layers, "quantization": args.quantization, "runs": runs, "median": med,
                      "bandwidth_GBps": round(bandwidth / 1e9, 1)}))


if __name__ == "__main__":
    main()
