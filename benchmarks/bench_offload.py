"""Expert paging from disk against fully resident weights, on a bf16 checkpoint of the real
Qwen3-Coder-30B-A3B layer dims (128 experts of 768 x 2048, top-8; hidden 2048; real vocab) cut
to a few layers: load time, peak resident set, decode speed at batch 1, cache hits, misses and
bytes read, and whether the paged tokens equal the resident ones.

    python benchmarks/bench_offload.py                       # 4 layers, ~6.2 GB, cached in /tmp
    python benchmarks/bench_offload.py --num-layers 2 --budget-fraction 0.5
    python benchmarks/bench_offload.py --model /path/to/bf16/checkpoint --no-cold

Every configuration runs in a fresh subprocess, so its peak RSS (VmHWM) is its own:
`resident` (LLM(quantization="bf16"), no budget: bf16 weights, fp32 compute) and `paged`
(weight_memory = --budget-fraction of the bf16 weight bytes; experts paged from disk in bf16),
with and without prefetch; unless --no-cold, the paged runs are repeated after dropping the
shards from the page cache (posix_fadvise DONTNEED), so reads come from the disk. Each run
prefills one random --prompt-len prompt and decodes --max-tokens tokens (ignore_eos), greedy,
or with --sample at temperature 1 with a fixed seed (a random model's greedy output repeats
one token, so its experts hit the cache far more often than varied text would);
`decode_tok_s` is (tokens - 1) / (time from the first token to the last). `rss_minus_budget`
is the overhead above the weight budget (runtime, tokenizer, KV cache of --kv-cache-mib,
activations, transient fp32 copies of bf16 weights in the matmuls); for `resident` it is RSS
minus the bf16 weight bytes. Hits, misses and bytes are those of the decode steps (after the
first token); `wait_share` is the decode time spent waiting for expert reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
import torch

GIB = 2**30
MODES = {"resident": {}, "paged": {"prefetch": True}, "paged-no-prefetch": {"prefetch": False}}


# ---- the checkpoint ---------------------------------------------------------------------

def real_dims_checkpoint(root: Path, num_layers: int) -> Path:
    """A bf16 random checkpoint of the real dims, written once under `root` and reused."""
    from inference_pio.testing import qwen3_coder_30b_config, write_random_checkpoint

    out = root / f"qwen3-coder-30b-{num_layers}l-bf16"
    done = out / ".complete"
    if not done.is_file():
        print(f"writing {out} (once) ...", file=sys.stderr, flush=True)
        write_random_checkpoint(out, qwen3_coder_30b_config(num_layers), dtype="bfloat16",
                                max_shard_bytes=4_000_000_000)
        done.write_text("ok\n")
    return out


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of every shard (no root needed)."""
    for shard in path.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bf16 weight bytes of the model, minimum budget for paging) from the weight plan."""
    from inference_pio.config import ModelConfig
    from inference_pio.layers.quantization import QuantConfig
    from inference_pio.models.weight_plan import plan_weights

    config = ModelConfig.from_file(path / "config.json")
    plan = plan_weights(config, torch.float32, QuantConfig("bf16"), None)
    return plan.total_bytes, plan.resident_bytes + config.num_experts_per_tok * plan.bytes_per_expert


# ---- one run, in a child process --------------------------------------------------------

def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _decode(llm: Any, prompt: list[int], max_tokens: int, sample: bool) -> dict[str, Any]:
    """Stream one request (greedy, or sampled with a fixed seed); pager stats (if any) of the
    prefill and of the decode."""
    from inference_pio.sampling_params import SamplingParams

    pager = getattr(llm.model, "expert_pager", None)
    params = SamplingParams(temperature=1.0 if sample else 0.0, seed=0 if sample else None,
                            max_tokens=max_tokens, ignore_eos=True)
    t0, prefill_stats, t_first, out = time.perf_counter(), None, 0.0, None
    for out in llm.generate_stream(prompt, params):
        if t_first == 0.0:
            t_first = time.perf_counter()
            if pager is not None:
                prefill_stats = pager.stats()
                pager.reset_stats()
    t_end = time.perf_counter()
    assert out is not None
    tokens = out.outputs[0].token_ids
    return {"ttft_s": t_first - t0, "decode_s": t_end - t_first,
            "decode_tok_s": (len(tokens) - 1) / (t_end - t_first), "tokens": tokens,
            "prefill_stats": prefill_stats, "stats": pager.stats() if pager else None}


def child(args: Any) -> None:
    """Load with the mode's options, decode, print one JSON line."""
    from inference_pio.llm import LLM

    opts = MODES[args.child]
    kwargs: dict[str, Any] = ({"quantization": "bf16"} if args.child == "resident" else
                              {"weight_memory": args.budget, "prefetch_experts": opts["prefetch"]})
    t0 = time.perf_counter()
    llm = LLM(str(args.model), progress=False, kv_cache_memory=args.kv_cache_mib * 2**20,
              max_num_seqs=1, max_model_len=4096, enable_prefix_caching=False, **kwargs)
    load_s = time.perf_counter() - t0
    rss_after_load = _proc_status_kib("VmRSS") * 1024
    prompt = common.random_prompt(args.prompt_len, torch.Generator().manual_seed(0))
    result = _decode(llm, prompt, args.max_tokens, args.sample)
    result.update(load_s=load_s, rss_after_load=rss_after_load,
                  peak_rss=_proc_status_kib("VmHWM") * 1024,
                  plan=llm.weight_plan.describe(), threads=torch.get_num_threads())
    print(json.dumps(result))


def run_child(mode: str, path: Path, budget: int, args: Any, cold: bool) -> dict[str, Any]:
    if cold:
        drop_page_cache(path)
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(path), "--budget",
           str(budget), "--prompt-len", str(args.prompt_len), "--max-tokens",
           str(args.max_tokens), "--kv-cache-mib", str(args.kv_cache_mib)]
    cmd += ["--sample"] if args.sample else []
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"running {mode}{' (cold)' if cold else ''} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the table --------------------------------------------------------------------------

def row(name: str, r: dict[str, Any], budget: int, total: int,
        reference: list[int]) -> dict[str, Any]:
    s, paged = r["stats"] or {}, r["stats"] is not None
    pre = r["prefill_stats"] or {}
    return {"run": name, "load_s": round(r["load_s"], 1),
            "load_rss_gib": round(r["rss_after_load"] / GIB, 2),
            "peak_rss_gib": round(r["peak_rss"] / GIB, 2),
            "budget_gib": round((budget if paged else total) / GIB, 2),
            "rss_minus_budget_gib": round((r["peak_rss"] - (budget if paged else total)) / GIB, 2),
            "ttft_s": round(r["ttft_s"], 2), "prefill_misses": pre.get("misses", "-"),
            "prefill_wait_s": round(pre["wait_s"], 2) if paged else "-",
            "decode_tok_s": round(r["decode_tok_s"], 3),
            "hits": s.get("hits", "-"), "misses": s.get("misses", "-"),
            "hit_rate": s.get("hit_rate", "-"),
            "read_gib": round(s["bytes_read"] / GIB, 2) if paged else "-",
            "read_s": round(s["read_s"], 2) if paged else "-",
            "wait_share": round(s["wait_s"] / r["decode_s"], 3) if paged else "-",
            "same_tokens": r["tokens"] == reference}


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    res, out = runs["resident"], {}
    for name in [n for n in runs if n != "resident"]:
        out[f"{name}_decode_vs_resident"] = round(
            runs[name]["decode_tok_s"] / res["decode_tok_s"], 3)
        out[f"{name}_peak_rss_vs_resident"] = round(runs[name]["peak_rss"] / res["peak_rss"], 3)
    for temp in ("", "-cold"):
        on, off = runs.get("paged" + temp), runs.get("paged-no-prefetch" + temp)
        if on and off:
            out[f"prefetch_speedup{temp}"] = round(on["decode_tok_s"] / off["decode_tok_s"], 3)
    return out


def main() -> None:
    ap = common.make_parser(__doc__, preset_default=None, num_layers_default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pio-bench-offload"),
                    help="where the real-dims checkpoint is written once and reused")
    ap.add_argument("--budget-fraction", type=float, default=1 / 3,
                    help="weight_memory as a fraction of the bf16 weight bytes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-mib", type=int, default=64)
    ap.add_argument("--sample", action="store_true",
                    help="sample (temperature 1, seed 0) instead of greedy: varied tokens")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold page-cache runs")
    ap.add_argument("--child", choices=list(MODES), help=argparse_hidden())
    ap.add_argument("--budget", type=int, default=0, help=argparse_hidden())
    args = common.parse_args_with_threads(ap)
    if args.child:
        child(args)
        return
    if args.preset:
        ap.error("--preset is not used here: the checkpoint has the real dims (--num-layers)")
    path = args.model or real_dims_checkpoint(args.dir, args.num_layers)
    total, minimum = weight_bytes(path)
    budget = max(int(total * args.budget_fraction), minimum)
    contention = common.Contention()
    runs = {"resident": run_child("resident", path, budget, args, cold=False)}
    plan = [(m, False) for m in ("paged", "paged-no-prefetch")]
    plan += [] if args.no_cold else [(m, True) for m in ("paged", "paged-no-prefetch")]
    for mode, cold in plan:
        runs[mode + ("-cold" if cold else "")] = run_child(mode, path, budget, args, cold)
    reference = runs["resident"]["tokens"]
    rows = [row(name, r, budget, total, reference) for name, r in runs.items()]
    common.print_table(rows)
    result = {"checkpoint": str(path), "weights_gib": round(total / GIB, 2),
              "budget_gib": round(budget / GIB, 2), "paged_plan": runs["paged"]["plan"],
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "decoding": "sampled (temperature 1, seed 0)" if args.sample else "greedy",
              "threads": runs["resident"]["threads"],
              "distinct_decoded_tokens": len(set(reference)), **ratios(runs),
              "all_paged_tokens_equal_resident": all(r["same_tokens"] for r in rows),
              **contention.report(), "rows": rows}
    for key in [k for k in result if k != "rows"]:
        print(f"{key}  {result[key]}")
    print(json.dumps(result))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
