"""`pio bench`: decode and prefill speed of a model on this machine, next to what the machine
can do (memory read bandwidth, fp32 FLOP/s, both measured in the same run) and, optionally,
next to transformers on the same reduced-layer checkpoint.

Decode at batch 1 reads every active weight once per token (attention, routers, norms, the
top-k experts of each MoE layer and the lm_head; the embedding lookup reads one row), so
bandwidth / active bytes is the ceiling a perfect CPU kernel could reach."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference_pio.runtime.threads import active_weight_bytes  # noqa: F401 - re-exported
from inference_pio.sampling_params import SamplingParams

RANDOM_TOKEN_LIMIT = 150000


# ---- the machine ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5,
                           device: str | torch.device = "cpu") -> float:
    """Bytes/s of reading a `num_bytes` fp32 buffer on `device` (a sum: one read, no write),
    best of `repeats` (with torch's threads on the CPU; synchronised on a GPU)."""
    dev = torch.device(device)
    buf = torch.ones(num_bytes // 4, dtype=torch.float32, device=dev)
    buf.sum()  # touch the pages
    best = math.inf
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        buf.sum()
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def measure_fp32_flops(n: int = 1024, repeats: int = 5,
                       device: str | torch.device = "cpu") -> float:
    """FLOP/s of an n x n x n fp32 matmul on `device`, best of `repeats`."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    best = math.inf
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_stall_pct(wall: float, cpu: float, threads: int) -> float:
    """How much of the threads' wall time this process did not get the CPU (others ran)."""
    return max(0.0, 100.0 * (1 - cpu / (wall * threads))) if wall > 0 else 0.0


# ---- runs ---------------------------------------------------------------------------------

@dataclass
class BenchResult:
    decode_tok_s: float
    ttft_s: float
    prefill_tok_s: float
    prompt_tokens: int
    throughput: dict[int, float] = field(default_factory=dict)  # streams -> tok/s, end to end
    decode_throughput: dict[int, float] = field(default_factory=dict)  # streams -> tok/s
    cpu_stall_pct: float = 0.0
    decode_runs: list[float] = field(default_factory=list)  # each batch-1 run; decode: median


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, RANDOM_TOKEN_LIMIT, (n,), generator=g).tolist()


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def time_decode(llm: Any, tokens: int, prompt_len: int = 16) -> tuple[float, float]:
    """(decode tok/s after the first token, time to first token) for one greedy request."""
    out = llm.generate([_prompt(prompt_len, 1)], _params(tokens + 1), use_tqdm=False)[0]
    m = out.metrics
    decode = (m.finished_time - m.first_token_time)
    return tokens / decode, m.first_token_time - m.arrival_time


def time_prefill(llm: Any, prompt_len: int) -> float:
    """Seconds to the first token of a `prompt_len`-token prompt (prefill + one sample)."""
    out = llm.generate([_prompt(prompt_len, 2)], _params(1), use_tqdm=False)[0]
    return out.metrics.first_token_time - out.metrics.arrival_time


def time_streams(llm: Any, streams: int, tokens: int) -> tuple[float, float]:
    """`streams` greedy requests (16-token prompts) decoding together: (generated tok/s end to
    end, prefill included; decode tok/s, the tokens after each request's first over the time
    from the first first-token to the last finish: the batch's steady decode rate)."""
    prompts = [_prompt(16, 100 + i) for i in range(streams)]
    start = time.perf_counter()
    outs = llm.generate(prompts, _params(tokens), use_tqdm=False)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    return generated / wall, (generated - len(outs)) / max(last - first, 1e-9)


def run_bench(llm: Any, decode_tokens: int, prompt_len: int, streams: Sequence[int],
              repeat: int = 1) -> BenchResult:
    """Batch-1 decode `repeat` times (the median counts: single runs of a model that fills the
    machine spread by +-15%), the prefill, then each stream count once."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    time_decode(llm, 2)  # warm-up: first-call allocations, lazy kernel builds
    runs = [time_decode(llm, decode_tokens) for _ in range(repeat)]
    decode, ttft = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    prefill_s = time_prefill(llm, prompt_len) if prompt_len else math.nan
    result = BenchResult(decode, ttft, prompt_len / prefill_s if prompt_len else math.nan,
                         prompt_len, decode_runs=[r[0] for r in runs])
    for n in streams:
        result.throughput[n], result.decode_throughput[n] = time_streams(llm, n, decode_tokens)
    result.cpu_stall_pct = cpu_stall_pct(time.perf_counter() - wall0,
                                         time.process_time() - cpu0, torch.get_num_threads())
    return result


def profile_decode(llm: Any, tokens: int, top: int = 12) -> list[dict[str, Any]]:
    """Where a greedy decode step's time goes: torch.profiler over `tokens` steps, ops by self
    time (the native kernels appear as inference_pio::*), in ms per token and as a share of
    the steps' wall time; the last row is everything else (Python, the engine, small ops)."""
    from torch.profiler import ProfilerActivity, profile

    llm.generate([_prompt(16, 3)], _params(2), use_tqdm=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = llm.generate([_prompt(16, 3)], _params(tokens + 1), use_tqdm=False)[0]
        wall = time.perf_counter() - start
    steps = len(out.outputs[0].token_ids)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    rows = []
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1e3 / steps
        rows.append({"op": e.key, "calls_per_token": e.count / steps, "ms_per_token": ms,
                     "share": ms / (1e3 * wall / steps)})
    rest = 1e3 * wall / steps - sum(r["ms_per_token"] for r in rows)
    rows.append({"op": "(the rest)", "calls_per_token": None, "ms_per_token": rest,
                 "share": rest / (1e3 * wall / steps)})
    return rows


def transformers_decode(model_dir: Path, tokens: int, dtype: torch.dtype = torch.bfloat16
                        ) -> float:
    """transformers' greedy decode tok/s on a checkpoint (bf16: its default for these files)."""
    from inference_pio.testing.reference import load_hf_model

    model = load_hf_model(model_dir, dtype)
    ids = torch.tensor([_prompt(16, 1)])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1,
                       do_sample=False)
        whole = time.perf_counter() - start
    return tokens / max(whole - first, 1e-9)


def result_dict(result: BenchResult) -> dict[str, Any]:
    out = asdict(result)
    out["throughput"] = {str(k): v for k, v in result.throughput.items()}
    out["decode_throughput"] = {str(k): v for k, v in result.decode_throughput.items()}
    return out
