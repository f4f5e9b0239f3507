"""Where a batched decode step goes: a synthetic int4 model of the real dimensions (LAYERS of
the 48), STREAMS greedy requests decoding together, torch.profiler over 17 steps; ops by self
time per step (the native kernels appear as inference_pio::*). `pio bench --profile` does the
same for batch 1.

    PYTHONPATH=src python3 benchmarks/profile_streams.py [LAYERS=8] [STREAMS=16] [FORMAT=int4]

FORMAT: a weight format of `pio bench --quantization` (int4, int8, bf16, ...)."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from inference_pio import LLM, SamplingParams
from inference_pio.layers.quantization import QuantConfig
from inference_pio.models.default_model import default_model_dir
from inference_pio.testing import PRESETS, random_model
from inference_pio.tokenizer import Tokenizer

STEPS = 17


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    streams = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    fmt = sys.argv[3] if len(sys.argv) > 3 else "int4"
    config = PRESETS["qwen3-coder-30b"](layers)
    model = random_model(config, torch.float32, QuantConfig(fmt))
    llm = LLM.from_model(model, config, Tokenizer.from_pretrained(default_model_dir()),
                         dtype=torch.float32, kv_cache_memory=256 * 2**20, max_num_seqs=streams)
    prompts = [[100 + i, 5, 6, 7] for i in range(streams)]
    warm = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    llm.generate(prompts, warm, use_tqdm=False)
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    step_ms = wall / STEPS * 1e3
    print(f"{layers} layers {fmt}, {streams} streams: {step_ms:.1f} ms per step, "
          f"{torch.get_num_threads()} threads")
    shown = 0.0
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        ms = e.self_cpu_time_total / 1e3 / STEPS
        shown += ms
        print(f"{e.key[:56]:56} {e.count / STEPS:7.1f} calls {ms:8.2f} ms")
    print(f"{'(the rest)':56} {'':13} {step_ms - shown:8.2f} ms")


if __name__ == "__main__":
    main()
