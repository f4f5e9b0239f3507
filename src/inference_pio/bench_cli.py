"""The `pio bench` command: builds the model (a directory, or a synthetic one in memory), runs
inference_pio.bench's measurements and renders the report (a table, or JSON)."""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from inference_pio import bench, envs
from inference_pio.layers.quantization import QuantConfig

logger = logging.getLogger(__name__)
KV_BYTES = 512 * 2**20  # the bench's KV cache: enough for its prompts, small next to weights


def _quant(args: argparse.Namespace) -> QuantConfig | None:
    if args.quantization is None:
        return None
    return QuantConfig(args.quantization, group_size=args.group_size,
                       quantize_lm_head=args.quantize_lm_head)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"kv_cache_memory": KV_BYTES, "max_num_seqs": max(args.streams),
            "max_num_batched_tokens": max(2048, args.prompt_len),
            "num_threads": getattr(args, "threads", None)}


def build_llm(args: argparse.Namespace) -> tuple[Any, str, float]:
    """(LLM, description, build seconds)."""
    from inference_pio.llm import LLM

    start = time.perf_counter()
    quant = _quant(args)
    if args.model is not None:
        llm = LLM(args.model, device=args.device, progress=False, quantization=quant,
                  **_engine_options(args))
        return llm, str(args.model), time.perf_counter() - start
    from inference_pio.models.default_model import default_model_dir
    from inference_pio.testing import PRESETS, random_model
    from inference_pio.tokenizer import Tokenizer

    config = PRESETS[args.preset](args.num_layers)
    model = random_model(config, torch.float32, quant, device=args.device)
    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    llm = LLM.from_model(model, config, tokenizer, dtype=torch.float32, device=args.device,
                         **_engine_options(args))
    what = f"synthetic {args.preset}, {config.num_hidden_layers} layers"
    return llm, what, time.perf_counter() - start


def _hf_checkpoint(layers: int) -> Path:
    """A bf16 random checkpoint of the real dimensions with `layers` layers, cached."""
    from inference_pio.testing import qwen3_coder_30b_config, write_random_checkpoint

    path = envs.cache_dir() / "bench" / f"qwen3-coder-30b-{layers}L-bf16"
    if not (path / "config.json").exists():
        logger.info("writing a %d-layer bf16 checkpoint of the real dimensions to %s", layers,
                    path)
        write_random_checkpoint(path, qwen3_coder_30b_config(layers), dtype="bfloat16",
                                max_shard_bytes=4_000_000_000)
    return path


def compare_transformers(args: argparse.Namespace) -> dict[str, Any]:
    """Decode tok/s of transformers (bf16) and of us (args' quantization) on one checkpoint."""
    from inference_pio.llm import LLM

    path = _hf_checkpoint(args.hf_layers)
    theirs = bench.transformers_decode(path, args.decode_tokens)
    llm = LLM(path, progress=False, quantization=_quant(args), kv_cache_memory=KV_BYTES,
              max_num_seqs=1)
    bench.time_decode(llm, 2)
    ours, _ = bench.time_decode(llm, args.decode_tokens)
    return {"checkpoint": str(path), "layers": args.hf_layers, "transformers_tok_s": theirs,
            "ours_tok_s": ours, "ratio": ours / theirs}


def _weights_layout(args: argparse.Namespace, llm: Any) -> str:
    """What the weights are stored as: the flag's format, else a loaded checkpoint's own (a
    `pio quantize` output), else the activation dtype."""
    if args.quantization:
        return _quant(args).describe()  # type: ignore[union-attr]
    plan = getattr(llm, "weight_plan", None)
    return plan.layout if plan is not None else str(llm.dtype).removeprefix("torch.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    bandwidth_before = bench.measure_read_bandwidth()
    flops = bench.measure_fp32_flops()
    llm, what, build_s = build_llm(args)
    active = bench.active_weight_bytes(llm.model, llm.config)
    result = bench.run_bench(llm, args.decode_tokens, args.prompt_len, args.streams)
    # probed again after the runs: other work on the machine only ever lowers the figure
    bandwidth_after = bench.measure_read_bandwidth()
    bandwidth = max(bandwidth_before, bandwidth_after)
    ceiling = bandwidth / active
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "read_gb_s": bandwidth / 1e9,
                    "read_gb_s_before_after": [bandwidth_before / 1e9, bandwidth_after / 1e9],
                    "fp32_gflop_s": flops / 1e9},
        "model": what, "quantization": _weights_layout(args, llm),
        "build_s": build_s, "active_bytes_per_token": active,
        "ceiling_tok_s": ceiling, "decode_fraction_of_ceiling": result.decode_tok_s / ceiling,
        **bench.result_dict(result)}
    if args.profile:
        report["profile"] = bench.profile_decode(llm, args.decode_tokens)
    if args.compare_transformers:
        report["transformers"] = compare_transformers(args)
    return report


def print_report(r: dict[str, Any], stream: TextIO) -> None:
    from inference_pio.model_info import TextTable, print_tables

    m = r["machine"]
    rows = [("machine", f"{m['cpu']}, {m['threads']} threads, read {m['read_gb_s']:.1f} GB/s "
             "(best of before and after the runs), "
             f"fp32 {m['fp32_gflop_s']:.0f} GFLOP/s"),
            ("model", f"{r['model']} ({r['quantization']}), built in {r['build_s']:.1f} s"),
            ("weights read per token", f"{r['active_bytes_per_token'] / 1e9:.3f} GB"),
            ("bandwidth ceiling", f"{r['ceiling_tok_s']:.2f} tok/s"),
            ("decode, batch 1", f"{r['decode_tok_s']:.2f} tok/s "
             f"({100 * r['decode_fraction_of_ceiling']:.0f}% of the ceiling)"),
            ("time to first token", f"{r['ttft_s']:.2f} s (16-token prompt)")]
    if r["prompt_tokens"]:
        rows.append((f"prefill, {r['prompt_tokens']} tokens", f"{r['prefill_tok_s']:.1f} tok/s"))
    for n, tps in r["throughput"].items():
        dec = r["decode_throughput"][n]
        rows.append((f"{n} streams", f"{dec:.2f} tok/s decoding ({dec / r['decode_tok_s']:.2f}x "
                     f"batch-1 decode), {tps:.2f} tok/s with the prefill"))
    if "transformers" in r:
        t = r["transformers"]
        rows.append((f"vs transformers bf16, {t['layers']} layers",
                     f"{t['ours_tok_s']:.2f} vs {t['transformers_tok_s']:.2f} tok/s, "
                     f"{t['ratio']:.2f}x"))
    rows.append(("cpu_stall_pct", f"{r['cpu_stall_pct']:.0f}"))
    tables = [TextTable("pio bench", ("measure", "value"), rows, numeric=False)]
    if "profile" in r:
        prof = [(p["op"], "" if p["calls_per_token"] is None else f"{p['calls_per_token']:.0f}",
                 f"{p['ms_per_token']:.2f}", f"{100 * p['share']:.1f}%") for p in r["profile"]]
        tables.append(TextTable("decode step profile (batch 1)",
                                ("op", "calls/token", "ms/token", "share"), prof))
    print_tables(tables, stream)
