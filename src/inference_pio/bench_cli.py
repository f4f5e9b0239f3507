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


# Beside weights and KV: the 1 GiB bandwidth probe buffer, prefill activations, the tokenizer
# and allocator slack (the 48-layer int4 model, 16.0 GiB of weights, peaked at 16.96 GiB RSS
# in generation); and only FREE_SHARE of free memory is planned on (others share the machine:
# a 34-layer int8 model, 20.1 GiB of weights, planned at 22.5 of 23.0 GiB free was OOM-killed;
# this rule refuses it and keeps the 48-layer int4 model, 18.5 of 21.7 GiB).
HEADROOM = 2 * 2**30
FREE_SHARE = 0.95
DEFAULT_GROUP = 64  # int4 / nf4 group when --group-size is not given (QuantConfig's default)


def _needed_bytes(preset: str, layers: int, method: str, group: int | None) -> int:
    """Memory the synthetic model needs: its weights as `pio info` / the planner price them
    (model_info.weight_bytes), plus the bench's KV cache and HEADROOM."""
    from inference_pio.model_info import WeightFormat, weight_bytes
    from inference_pio.testing import PRESETS

    fmt = WeightFormat(method, method, method,
                       group or DEFAULT_GROUP if method in ("int4", "nf4") else None)
    return int(weight_bytes(PRESETS[preset](layers), fmt)["model"]) + KV_BYTES + HEADROOM


def _most_layers(preset: str, method: str, group: int | None, depth: int, free: int) -> int:
    """The most layers (<= depth) whose synthetic model fits `free` bytes; 0 if none."""
    return max((n for n in range(1, depth + 1)
                if _needed_bytes(preset, n, method, group) <= free), default=0)


def plan_synthetic(args: argparse.Namespace, free: int) -> str | None:
    """Fill in the synthetic model's --quantization / --num-layers the user left out so that it
    fits FREE_SHARE of `free` bytes: fp32 if the whole depth fits, else int4; the preset's
    depth, else the most layers that fit. Returns the line saying what was picked (None when both were given).
    Raises UsageError, before anything is allocated, when what was asked does not fit."""
    from inference_pio.cli_common import UsageError
    from inference_pio.testing import PRESETS

    avail, free = free, int(free * FREE_SHARE)
    depth = PRESETS[args.preset](None).num_hidden_layers
    layers = args.num_layers or depth
    if args.num_layers is not None and args.num_layers < 1:
        raise UsageError(f"--num-layers {args.num_layers}: give 1 or more")
    picked = args.quantization is None or args.num_layers is None
    method = args.quantization or ("fp32" if _needed_bytes(
        args.preset, layers, "fp32", None) <= free else "int4")
    if args.num_layers is None:
        layers = _most_layers(args.preset, method, args.group_size, depth, free)
    need = _needed_bytes(args.preset, max(layers, 1), method, args.group_size)
    if layers == 0 or need > free:
        most = _most_layers(args.preset, method, args.group_size, depth, free)
        fix = (f"give --num-layers {most} or fewer" if most else "free some memory")
        if method != "int4" and _needed_bytes(args.preset, max(layers, 1), "int4",
                                               args.group_size) <= free:
            fix += " or --quantization int4"
        raise UsageError(f"a synthetic {args.preset} of {max(layers, 1)} layers in {method} "
                         f"needs {need / 2**30:.1f} GiB (weights, {KV_BYTES >> 20} MiB of KV "
                         f"cache, {HEADROOM >> 30} GiB headroom); {free / 2**30:.1f} GiB can be used "
                         f"({FREE_SHARE:.0%} of {avail / 2**30:.1f} GiB available): {fix}")
    args.quantization = None if method == "fp32" and args.quantization is None else method
    args.num_layers = layers
    if not picked:
        return None
    return (f"pio bench: benchmarking a synthetic {args.preset}, {layers} of {depth} layers in "
            f"{method}: {need / 2**30:.1f} GiB of the {avail / 2**30:.1f} GiB available "
            "(choose with --quantization and --num-layers)")


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
    """Plan (synthetic model: what fits free memory, said on stderr), measure, report."""
    import sys

    from inference_pio.cli_common import check_device
    from inference_pio.utils.memory import free_memory_bytes

    check_device(args.device)
    plan = None
    if args.model is None:
        plan = plan_synthetic(args, free_memory_bytes(args.device))
        if plan:
            print(plan, file=sys.stderr, flush=True)
    # the ceiling is the bandwidth of the memory the weights live in: the GPU's with --device
    bandwidth_before = bench.measure_read_bandwidth(device=args.device)
    flops = bench.measure_fp32_flops(device=args.device)
    llm, what, build_s = build_llm(args)
    active = bench.active_weight_bytes(llm.model, llm.config)
    result = bench.run_bench(llm, args.decode_tokens, args.prompt_len, args.streams,
                             args.repeat)
    # probed again after the runs: other work on the machine only ever lowers the figure
    bandwidth_after = bench.measure_read_bandwidth(device=args.device)
    bandwidth = max(bandwidth_before, bandwidth_after)
    ceiling = bandwidth / active
    report: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "device": (torch.cuda.get_device_name(args.device)
                               if str(args.device).startswith("cuda") else "cpu"),
                    "threads": torch.get_num_threads(), "read_gb_s": bandwidth / 1e9,
                    "read_gb_s_before_after": [bandwidth_before / 1e9, bandwidth_after / 1e9],
                    "fp32_gflop_s": flops / 1e9},
        "model": what, "quantization": _weights_layout(args, llm), "picked": plan,
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
    where = f"{m['device']} (host {m['cpu']}, {m['threads']} threads)" \
        if m.get("device", "cpu") != "cpu" else f"{m['cpu']}, {m['threads']} threads"
    rows = [("machine", (f"{where}, read {m['read_gb_s']:.1f} GB/s "
             "(best of before and after the runs), "
             f"fp32 {m['fp32_gflop_s']:.0f} GFLOP/s")),
            ("model", f"{r['model']} ({r['quantization']}), built in {r['build_s']:.1f} s"),
            ("weights read per token", f"{r['active_bytes_per_token'] / 1e9:.3f} GB"),
            ("bandwidth ceiling", f"{r['ceiling_tok_s']:.2f} tok/s"),
            ("decode, batch 1", (f"{r['decode_tok_s']:.2f} tok/s "
             f"({100 * r['decode_fraction_of_ceiling']:.0f}% of the ceiling)"
             + _spread(r["decode_runs"]))),
            ("time to first token", f"{r['ttft_s']:.2f} s (16-token prompt)")]
    if r["prompt_tokens"]:
        rows.append((f"prefill, {r['prompt_tokens']} tokens", f"{r['prefill_tok_s']:.1f} tok/s"))
    for n, tps in r["throughput"].items():
        dec = r["decode_throughput"][n]
        rows.append((f"{n} streams", (f"{dec:.2f} tok/s decoding ({dec / r['decode_tok_s']:.2f}x "
                     f"batch-1 decode), {tps:.2f} tok/s with the prefill")))
    if "transformers" in r:
        t = r["transformers"]
        rows.append((f"vs transformers bf16, {t['layers']} layers",
                     (f"{t['ours_tok_s']:.2f} vs {t['transformers_tok_s']:.2f} tok/s, "
                     f"{t['ratio']:.2f}x")))
    rows.append(("cpu_stall_pct", f"{r['cpu_stall_pct']:.0f}"))
    tables = [TextTable("pio bench", ("measure", "value"), rows, numeric=False)]
    if "profile" in r:
        prof = [(p["op"], "" if p["calls_per_token"] is None else f"{p['calls_per_token']:.0f}",
                 f"{p['ms_per_token']:.2f}", f"{100 * p['share']:.1f}%") for p in r["profile"]]
        tables.append(TextTable("decode step profile (batch 1)",
                                ("op", "calls/token", "ms/token", "share"), prof))
    print_tables(tables, stream)


def _spread(runs: list[float]) -> str:
    """", median of N runs: lo-hi" for a repeated measurement; "" for one run."""
    return f", median of {len(runs)}: {min(runs):.2f}-{max(runs):.2f}" if len(runs) > 1 else ""
