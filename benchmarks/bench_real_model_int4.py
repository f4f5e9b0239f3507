"""The real model's size on a 24 GiB machine: a random-weight checkpoint of the real
Qwen3-Coder-30B-A3B dimensions (48 layers, 128 experts) stored in int4, loaded by `LLM` and
run greedily: write time, load time, peak RSS, time to first token and decode tokens/s.

    python benchmarks/bench_real_model_int4.py                     # /tmp/pio-48L-int4, ~17 GB
    python benchmarks/bench_real_model_int4.py --max-tokens 16 --json out.json
    python benchmarks/bench_real_model_int4.py --model DIR         # an existing checkpoint

The checkpoint is written once into `--dir` by `inference_pio.testing.write_random_checkpoint(
..., quantization=QuantConfig("int4", group_size=G))`, which draws the int4 codes and scales
directly, shard by shard (never a float copy of the model), and is reused while its marker file
matches the arguments. The measurement runs in a fresh subprocess, so its VmHWM (peak resident
set, /proc/self/status, file-backed pages of the mmapped shards included) is that of loading and
generating alone: `LLM(dir)` loads the checkpoint's own int4 layout (float32 activations on the
CPU), with a `--kv-cache-memory` KV cache (256 MiB) and `max_num_seqs=1`; then one greedy
request (`ignore_eos`) of `--max-tokens` (8) tokens after a short code prompt. Time to first
token is the prefill plus the first sample; decode tokens/s counts the tokens after the first
over the time after it. Peak RSS is checked against `--rss-limit-gib` (20) and the script exits
non-zero when it is not below. Weights are random, so the generated text is noise.

Memory: the run needs the weights (~17.5 GB at group 64) plus activations; the script refuses
to start when MemAvailable is below `--min-available-gib` (21) unless `--force`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as common

GIB = 1024 ** 3
MARKER = "bench_real_model_int4.json"
PROMPT = "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def meminfo(key: str, path: str = "/proc/meminfo") -> int:
    """A /proc meminfo or status field in bytes (the files give kB)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def status_bytes(key: str) -> int:
    return meminfo(key, "/proc/self/status")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def write_checkpoint(args: Any) -> tuple[Path, float | None]:
    """(the checkpoint in --dir, seconds spent writing it or None when reused)."""
    from inference_pio.layers.quantization import QuantConfig
    from inference_pio.testing import qwen3_coder_30b_config, write_random_checkpoint

    config = qwen3_coder_30b_config(num_layers=args.num_layers)
    quant = QuantConfig("int4", group_size=args.group_size)
    spec = {"config": config.to_hf(), "quantization": quant.to_hf(), "seed": args.seed}
    spec = json.loads(json.dumps(spec))
    marker = args.dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return args.dir, None
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_random_checkpoint(args.dir, config, quantization=quant, seed=args.seed,
                            max_shard_bytes=args.shard_bytes)
    marker.write_text(json.dumps(spec))  # written last: a checkpoint without it is incomplete
    return args.dir, time.perf_counter() - t0


def child(args: Any) -> None:
    """Load and generate in this (fresh) process; print one JSON line of figures."""
    import torch

    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    contention = common.Contention()
    rss_start = status_bytes("VmHWM")
    t0 = time.perf_counter()
    llm = LLM(str(args.model), progress=False, kv_cache_memory=args.kv_cache_memory,
              max_num_seqs=1, max_model_len=args.max_model_len, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    rss_load, hwm_load = status_bytes("VmRSS"), status_bytes("VmHWM")
    prompt_ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.perf_counter()
    out = llm.generate([prompt_ids], params, use_tqdm=False)[0]
    gen_s = time.perf_counter() - t1
    m = out.metrics
    assert m is not None and m.first_token_time is not None and m.finished_time is not None
    n = len(out.outputs[0].token_ids)
    decode_s = m.finished_time - m.first_token_time
    plan = llm.weight_plan
    print(json.dumps({
        "weights": plan.describe() if plan is not None else None,
        "weight_bytes": plan.total_bytes if plan is not None else None,
        "kv_cache": llm.kv_cache_plan.describe(), "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 1), "rss_before_load_gib": round(rss_start / GIB, 2),
        "rss_after_load_gib": round(rss_load / GIB, 2),
        "peak_rss_after_load_gib": round(hwm_load / GIB, 2),
        "prompt_tokens": len(prompt_ids), "generated_tokens": n,
        "ttft_s": round(common.ttft(out), 2), "generate_s": round(gen_s, 2),
        "decode_tok_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None,
        "s_per_decode_token": round(decode_s / (n - 1), 2) if n > 1 else None,
        "peak_rss_gib": round(status_bytes("VmHWM") / GIB, 2),
        "peak_rss_bytes": status_bytes("VmHWM"),
        "rss_file_end_gib": round(status_bytes("RssFile") / GIB, 2),
        "rss_anon_end_gib": round(status_bytes("RssAnon") / GIB, 2),
        "token_ids": out.outputs[0].token_ids, **contention.report()}), flush=True)


def main() -> None:
    ap = common.make_parser(__doc__, preset_default=None, num_layers_default=48)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pio-48L-int4"),
                    help="where the int4 checkpoint is written once and reused")
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=1_000_000_000,
                    help="max bytes per safetensors shard of the written checkpoint")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-memory", type=int, default=256 * 1024 ** 2)
    ap.add_argument("--rss-limit-gib", type=float, default=20.0)
    ap.add_argument("--min-available-gib", type=float, default=21.0)
    ap.add_argument("--force", action="store_true", help="run even when memory looks short")
    ap.add_argument("--write-only", action="store_true",
                    help="write (or check) the checkpoint, then stop")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--child", action="store_true",
                    help="(internal) measure --model in this process")
    args = common.parse_args_with_threads(ap)
    if args.child:
        child(args)
        return
    if args.preset:
        raise SystemExit("--preset is not supported: the checkpoint is the real dims in int4")
    result: dict[str, Any] = {}
    if args.model is None:
        contention = common.Contention()
        path, write_s = write_checkpoint(args)
        result["checkpoint"] = (f"random int4 (group {args.group_size}) Qwen3-Coder-30B-A3B "
                                f"dims, {args.num_layers} layers: {path}")
        result["checkpoint_write_s"] = None if write_s is None else round(write_s, 1)
        if write_s is not None:
            result["write_cpu_stall_pct"] = contention.report()["cpu_stall_pct"]
    else:
        path = args.model
        result["checkpoint"] = str(path)
    result["checkpoint_gb_on_disk"] = round(dir_bytes(path) / 1e9, 2)
    if args.write_only:
        common.print_result(result)
        return
    available = meminfo("MemAvailable")
    result["mem_available_before_gib"] = round(available / GIB, 1)
    if available < args.min_available_gib * GIB and not args.force:
        common.print_result(result)
        raise SystemExit(f"only {available / GIB:.1f} GiB available (< {args.min_available_gib}):"
                         " another big process is running? (--force runs anyway)")
    cmd = [sys.executable, __file__, "--child", "--model", str(path), "--max-tokens",
           str(args.max_tokens), "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory", str(args.kv_cache_memory)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True, env=os.environ)
    result["child_wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        hint = (" (SIGKILL: the OOM killer? check `dmesg` and that nothing else big ran)"
                if proc.returncode == -9 else "")
        raise SystemExit(f"the measuring subprocess failed (exit {proc.returncode}){hint}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    token_ids = figures.pop("token_ids")
    result.update(figures)
    result["rss_limit_gib"] = args.rss_limit_gib
    result["peak_rss_below_limit"] = figures["peak_rss_bytes"] < args.rss_limit_gib * GIB
    common.print_result({k: v for k, v in result.items() if k != "peak_rss_bytes"},
                        [f"generated token ids: {token_ids}"])
    if args.json is not None:
        args.json.write_text(json.dumps({**result, "token_ids": token_ids}, indent=2) + "\n")
    if not result["peak_rss_below_limit"]:
        sys.exit(f"peak RSS {figures['peak_rss_gib']} GiB is not below {args.rss_limit_gib} GiB")


if __name__ == "__main__":
    main()
