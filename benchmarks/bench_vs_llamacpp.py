"""Batch-1 decode and 512-token prefill against llama.cpp, in one run on this machine.

    bash ../shared/tools/llamacpp_anchor.sh          # once: llama.cpp + GGUF files (~12 min)
    python benchmarks/bench_vs_llamacpp.py           # int4 vs Q4_K_M, int8 vs Q8_0, 2 rounds
    python benchmarks/bench_vs_llamacpp.py --rounds 3 --pairs int4:Q4_K_M --json out.json

The anchor (`--anchor`, default $PIO_ANCHOR, else ~/.cache/pio-llamacpp-anchor) holds random
bf16 Qwen3-MoE checkpoints of the real dimensions with 2 and 6 layers (`ckpt-L2`, `ckpt-L6`),
llama.cpp built natively from the tree in the llama-cpp-python sdist, and llama.cpp's own GGUF
conversions and quantizations of the same checkpoints (`gguf/L{2,6}-{Q4_K_M,Q8_0}.gguf`).

Each round runs, for each depth and each pair (our format : llama.cpp's type), llama.cpp's
`llama-bench -p 512 -n 64 -t THREADS` and then `pio bench --model ckpt-L{n} --quantization FMT
--prompt-len 512 --streams 1 --decode-tokens 64` (our defaults: thread policy, lm_head format),
each in its own process, alternating, so both see the same machine state. Figures are medians
over the rounds. Decode time per token is fitted as t = a + b * layers for each engine and
format (two depths: exact) and extrapolated to the model's 48 layers; the ratios are ours over
llama.cpp's tok/s. Printed: the table, the CPU model and the instruction sets that matter, our
bench's measured read bandwidth and CPU stall share (see benchmarks/README.md on shared
machines), and one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8")
LAYERS_FULL = 48


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in text.splitlines()
                  if ln.startswith("flags")), set())
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def run_llamacpp(anchor: Path, layers: int, qtype: str, threads: int, prompt: int,
                 tokens: int) -> dict[str, float]:
    exe = anchor / "llama.cpp" / "build" / "bin" / "llama-bench"
    gguf = anchor / "gguf" / f"L{layers}-{qtype}.gguf"
    out = subprocess.run([str(exe), "-m", str(gguf), "-p", str(prompt), "-n", str(tokens),
                          "-t", str(threads), "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=1800)
    rows = json.loads(out.stdout)
    res = {}
    for r in rows:
        key = "prefill_tok_s" if r.get("n_prompt", 0) > 0 else "decode_tok_s"
        res[key] = float(r["avg_ts"])
    return res


def run_ours(anchor: Path, layers: int, fmt: str, prompt: int, tokens: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-m", "inference_pio", "bench", "--model",
                          str(anchor / f"ckpt-L{layers}"), "--quantization", fmt,
                          "--prompt-len", str(prompt), "--streams", "1", "--decode-tokens",
                          str(tokens), "--json"],
                         capture_output=True, text=True, check=True, timeout=3600, env=env)
    r = json.loads(out.stdout)
    return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
            "read_gb_s": r["machine"]["read_gb_s"], "cpu_stall_pct": r["cpu_stall_pct"],
            "layout": r["quantization"]}


def fit(ms: dict[int, float]) -> tuple[float, float]:
    """(a, b) of ms per token = a + b * layers through the two depths."""
    (l0, t0), (l1, t1) = sorted(ms.items())[:1] + sorted(ms.items())[-1:]
    b = (t1 - t0) / (l1 - l0)
    return t0 - b * l0, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", type=Path, default=Path(os.environ.get(
        "PIO_ANCHOR", Path.home() / ".cache" / "pio-llamacpp-anchor")))
    ap.add_argument("--pairs", default="int4:Q4_K_M,int8:Q8_0",
                    help="our format : llama.cpp type, comma separated")
    ap.add_argument("--layers", default="2,6")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="llama.cpp's -t (ours: its own thread policy)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if not (args.anchor / "llama.cpp" / "build" / "bin" / "llama-bench").exists():
        raise SystemExit(f"no llama.cpp build in {args.anchor}: run "
                         "../shared/tools/llamacpp_anchor.sh first (about 12 minutes)")
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    depths = [int(x) for x in args.layers.split(",")]
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    start = time.time()
    for rnd in range(args.rounds):
        for layers in depths:
            for fmt, qtype in pairs:
                for engine in ("llama.cpp", "ours"):
                    r = (run_llamacpp(args.anchor, layers, qtype, args.threads, args.prompt,
                                      args.tokens) if engine == "llama.cpp"
                         else run_ours(args.anchor, layers, fmt, args.prompt, args.tokens))
                    runs.setdefault((engine, fmt, layers), []).append(r)
                    print(f"[round {rnd + 1} {time.strftime('%H:%M:%S')}] {engine:9} "
                          f"{fmt if engine == 'ours' else qtype:7} L{layers}: decode "
                          f"{r['decode_tok_s']:.2f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s",
                          flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tok_s", "prefill_tok_s")}
           for k, v in runs.items()}
    rows = []
    for fmt, qtype in pairs:
        row: dict[str, Any] = {"ours": fmt, "llama.cpp": qtype}
        for layers in depths:
            o, ll = med[("ours", fmt, layers)], med[("llama.cpp", fmt, layers)]
            row[f"L{layers}"] = {"ours": o, "llama.cpp": ll,
                                 "decode_ratio": o["decode_tok_s"] / ll["decode_tok_s"],
                                 "prefill_ratio": o["prefill_tok_s"] / ll["prefill_tok_s"]}
        for engine in ("ours", "llama.cpp"):
            a, b = fit({n: 1000.0 / med[(engine, fmt, n)]["decode_tok_s"] for n in depths})
            row[f"{engine}_ms_const"], row[f"{engine}_ms_per_layer"] = a, b
            row[f"{engine}_tok_s_48"] = 1000.0 / (a + LAYERS_FULL * b)
        row["decode_ratio_48"] = row["ours_tok_s_48"] / row["llama.cpp_tok_s_48"]
        row["layout"] = runs[("ours", fmt, depths[-1])][-1]["layout"]
        rows.append(row)
    ours_runs = [r for (e, _, _), v in runs.items() if e == "ours" for r in v]
    result = {**cpu_info(), "rounds": args.rounds, "tokens": args.tokens, "prompt": args.prompt,
              "threads_llamacpp": args.threads, "rows": rows,
              "read_gb_s": max(r["read_gb_s"] for r in ours_runs),
              "cpu_stall_pct_max": max(r["cpu_stall_pct"] for r in ours_runs),
              "wall_s": round(time.time() - start, 1)}
    print(f"\n{result['cpu']} ({result['cores']} CPUs; {' '.join(result['flags'])}), read "
          f"{result['read_gb_s']:.1f} GB/s, CPU stall up to {result['cpu_stall_pct_max']:.1f}%")
    for row in rows:
        print(f"\n{row['ours']} ({row['layout']}) vs llama.cpp {row['llama.cpp']}, medians of "
              f"{args.rounds} rounds:")
        for layers in depths:
            c = row[f"L{layers}"]
            print(f"  {layers} layers: decode {c['ours']['decode_tok_s']:.2f} vs "
                  f"{c['llama.cpp']['decode_tok_s']:.2f} tok/s ({c['decode_ratio']:.2f}x), "
                  f"prefill {c['ours']['prefill_tok_s']:.1f} vs "
                  f"{c['llama.cpp']['prefill_tok_s']:.1f} tok/s ({c['prefill_ratio']:.2f}x)")
        print(f"  per token: ours {row['ours_ms_const']:.1f} ms + {row['ours_ms_per_layer']:.2f} "
              f"ms/layer, llama.cpp {row['llama.cpp_ms_const']:.1f} ms + "
              f"{row['llama.cpp_ms_per_layer']:.2f} ms/layer")
        print(f"  48 layers (fit): {row['ours_tok_s_48']:.2f} vs {row['llama.cpp_tok_s_48']:.2f}"
              f" tok/s ({row['decode_ratio_48']:.2f}x)")
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
