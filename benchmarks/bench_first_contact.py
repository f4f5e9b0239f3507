"""First contact: what a new user's first minutes cost on this machine.

1. Decode tok/s (batch 1, greedy, 64 tokens, best of 2) of the tiny default model and of a
   synthetic int4 model of the real Qwen3-Coder-30B-A3B dimensions (--num-layers of the 48;
   its per-token weight MiB is printed, and scaled to 48 layers), with the default thread
   policy ("auto") against each fixed thread count, idle and beside one CPU-burning process.
2. A cold start: `pio generate --prompt hi --max-tokens 8` as a subprocess (kernels already
   built): wall time, and time from spawn to the first byte of streamed output.
3. `pio info --preset qwen3-coder-30b` wall time.

Run: PYTHONPATH=src python benchmarks/bench_first_contact.py [--num-layers 4] [--skip-large]
Prints a table, then one JSON line. Timings depend on what else runs on the machine: the
load average is printed with each row."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

from inference_pio import LLM, SamplingParams
from inference_pio.runtime.threads import active_weight_bytes, choose_threads, usable_cpus

TOKENS = 64


def burner() -> subprocess.Popen:
    """One process spinning a core (what 'beside a busy process' means here)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def decode_tok_s(llm: LLM, threads: int) -> float:
    torch.set_num_threads(threads)
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    llm.generate([[1, 2, 3, 4]], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        llm.generate([[1, 2, 3, 4]], params, use_tqdm=False)
        best = max(best, TOKENS / (time.perf_counter() - start))
    return best


def thread_rows(name: str, llm: LLM) -> list[dict[str, Any]]:
    per_token = active_weight_bytes(llm.model, llm.config)
    rows = []
    for busy in (False, True):
        proc = burner() if busy else None
        try:
            time.sleep(1.0 if busy else 0.0)
            auto = choose_threads(None, per_token)  # the policy, as a load now would apply it
            speeds = {n: decode_tok_s(llm, n) for n in range(1, usable_cpus() + 1)}
            default = speeds[auto.threads]
            best = max(speeds.values())
            rows.append({"model": name, "per_token_mib": round(per_token / 2**20, 1),
                         "condition": "busy" if busy else "idle",
                         "load_avg": round(os.getloadavg()[0], 2), "auto_threads": auto.threads,
                         "auto_tok_s": round(default, 1),
                         "fixed_tok_s": {n: round(v, 1) for n, v in speeds.items()},
                         "auto_vs_best": round(default / best, 2)})
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    return rows


def large_model(num_layers: int) -> LLM:
    from inference_pio.layers.quantization import QuantConfig
    from inference_pio.models.default_model import default_model_dir
    from inference_pio.testing import PRESETS, random_model
    from inference_pio.tokenizer import Tokenizer

    config = PRESETS["qwen3-coder-30b"](num_layers)
    model = random_model(config, torch.float32, QuantConfig("int4"))
    return LLM.from_model(model, config, Tokenizer.from_pretrained(default_model_dir()),
                          dtype=torch.float32, kv_cache_memory=64 * 2**20)


def pio_cmd() -> list[str]:
    pio = shutil.which("pio")
    return [pio] if pio else [sys.executable, "-m", "inference_pio"]


def cold_start() -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([*pio_cmd(), "generate", "--prompt", "hi", "--max-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.wait()
    return {"first_output_s": round(first, 2), "wall_s": round(time.perf_counter() - start, 2)}


def info_time() -> float:
    start = time.perf_counter()
    subprocess.run([*pio_cmd(), "info", "--preset", "qwen3-coder-30b"], check=True,
                   capture_output=True)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=4, help="layers of the int4 model (48: "
                    "the real model, ~17 GB of memory)")
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"cpus": usable_cpus(), "load_avg_start": os.getloadavg()[0]}
    out["cold_start"] = [cold_start() for _ in range(3)]
    out["pio_info_s"] = [info_time() for _ in range(2)]
    rows = thread_rows("tiny default", LLM(progress=False))
    if not args.skip_large:
        rows += thread_rows(f"int4 real dims, {args.num_layers} layers", large_model(args.num_layers))
    out["decode"] = rows
    print(f"{'model':32} {'MiB/tok':>8} {'cond':5} {'load':>5} {'auto':>4} "
          f"{'auto tok/s':>10} {'fixed tok/s':24} {'auto/best':>9}")
    for r in rows:
        fixed = ", ".join(f"{n}t {v}" for n, v in r["fixed_tok_s"].items())
        print(f"{r['model']:32} {r['per_token_mib']:8} {r['condition']:5} {r['load_avg']:5} "
              f"{r['auto_threads']:4} {r['auto_tok_s']:10} {fixed:24} {r['auto_vs_best']:9}")
    print("cold start `pio generate --prompt hi --max-tokens 8` (first output / wall, s):",
          ", ".join(f"{c['first_output_s']} / {c['wall_s']}" for c in out["cold_start"]))
    print("`pio info --preset qwen3-coder-30b` wall, s:", out["pio_info_s"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
