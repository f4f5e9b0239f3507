"""Issue 13's GPU measurement in one script, for the lent H200 (runs on the CPU too, small):
the model of the real dimensions in bf16 drawn straight on the device (a CUDA generator:
seconds, where drawing on the CPU and copying takes ~15 minutes), served through
`LLM.from_model(..., dtype=torch.bfloat16)`, then

- the device's copy bandwidth and the decode ceiling it implies (active bytes per token),
- batch-1 decode, 16 / 64 concurrent streams, a 2,048-token prefill,
- a profile of decode steps: wall vs device time per token, kernel launches, device-to-host
  copies and `nonzero` calls per token (each a host synchronisation).

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --num-layers 48            # on the GPU
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --ops cuda ...  # torch ops, no Triton
    PYTHONPATH=src python3 benchmarks/bench_gpu.py --device cpu --num-layers 1 --streams 1,4 \\
        --prompt-len 64 --tokens 4                                             # a smoke run

Prints a table and one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from inference_pio import LLM, SamplingParams
from inference_pio.layers.custom_op import CustomOp, select_ops
from inference_pio.models.default_model import default_model_dir
from inference_pio.models.qwen3_moe import build_model
from inference_pio.runtime.threads import active_weight_bytes
from inference_pio.testing import PRESETS
from inference_pio.tokenizer import Tokenizer


def draw_model(num_layers: int, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    config = PRESETS["qwen3-coder-30b"](num_layers)
    model = build_model(config, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model, config


def copy_bandwidth(device: str, num_bytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy, read and write counted (best of 5)."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return num_bytes / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[float, list[Any]]:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def decode_rate(llm: LLM, streams: int, tokens: int) -> float:
    """Generated tokens per second after each request's first (the steady decode rate)."""
    prompts = [[100 + i, 5, 6, 7, 8, 9, 10, 11] for i in range(streams)]
    _, outs = timed_generate(llm, prompts, tokens)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    generated = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    return generated / max(last - first, 1e-9)


def profile_decode(llm: LLM, device: str, tokens: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        wall, _ = timed_generate(llm, [[1, 2, 3, 4]], tokens + 1)
    events = prof.key_averages()
    per = 1.0 / tokens

    def count(*names: str) -> float:
        return sum(e.count for e in events if any(n in e.key for n in names)) * per

    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    return {"wall_ms_per_token": 1e3 * wall * per, "device_ms_per_token": device_us / 1e3 * per,
            "kernel_launches_per_token": count("cudaLaunchKernel", "cuLaunchKernel"),
            "device_to_host_copies_per_token": count("Memcpy DtoH"),
            "nonzero_per_token": count("aten::nonzero")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-layers", type=int, default=48)
    ap.add_argument("--streams", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ops", choices=["auto", "cuda", "native"], default="auto",
                    help="op implementations: auto = what build_model picks (Triton MoE and "
                         "attention on a GPU with triton); cuda = the torch ops with the torch "
                         "attention backend (the baseline before the Triton kernels)")
    args = ap.parse_args()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith(
        "cuda") else "cpu", "num_layers": args.num_layers, "torch": torch.__version__}
    t0 = time.perf_counter()
    model, config = draw_model(args.num_layers, args.device, torch.bfloat16)
    streams = [int(s) for s in args.streams.split(",")]
    llm = LLM.from_model(model, config, Tokenizer.from_pretrained(default_model_dir()),
                         dtype=torch.bfloat16, device=args.device, kv_cache_memory=2**33
                         if args.device.startswith("cuda") else 2**28,
                         max_num_seqs=max(streams), max_num_batched_tokens=max(
                             2048, args.prompt_len),
                         attention_backend="auto" if args.ops == "auto" else "torch")
    if args.ops != "auto":
        select_ops(llm.model, args.ops)
    out["ops"] = sorted({m.impl for m in llm.model.modules() if isinstance(m, CustomOp)})
    out["attention_backend"] = llm.engine.runner.attention_backend.name
    out["build_s"] = time.perf_counter() - t0
    active = active_weight_bytes(llm.model, config)
    out["active_bytes_per_token"] = active
    out["copy_bytes_per_s"] = copy_bandwidth(args.device)
    out["ceiling_tok_s"] = out["copy_bytes_per_s"] / active
    timed_generate(llm, [[1, 2, 3]], 3)  # warm-up
    out["decode_tok_s"] = {n: decode_rate(llm, n, args.tokens) for n in streams}
    prompt = [(7 * i) % 5000 + 10 for i in range(args.prompt_len)]
    seconds, _ = timed_generate(llm, [prompt], 1)
    out["prefill_tok_s"] = args.prompt_len / seconds
    out["profile"] = profile_decode(llm, args.device, min(args.tokens, 8))
    print(f"{out['device']}, {args.num_layers} layers bf16, ops {'/'.join(out['ops'])}, "
          f"attention {out['attention_backend']}, built in {out['build_s']:.1f} s; "
          f"{active / 1e9:.2f} GB per token, copy {out['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"ceiling {out['ceiling_tok_s']:.0f} tok/s")
    for n, rate in out["decode_tok_s"].items():
        print(f"decode, {n} stream(s): {rate:.1f} tok/s in total"
              + (f" ({rate / out['ceiling_tok_s']:.1%} of the ceiling)" if n == 1 else ""))
    print(f"prefill {args.prompt_len} tokens: {out['prefill_tok_s']:.0f} tok/s")
    print("per decoded token:", ", ".join(f"{k} {v:.1f}" for k, v in out["profile"].items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
