"""Thread policy: how many CPU threads torch and the native kernels use, chosen once per load.

The native kernels take their thread count from torch (`at::get_num_threads()`), so
`torch.set_num_threads(n)` governs both. The count is, in order of precedence:

1. an explicit request (`LLM(num_threads=N)`, `pio ... --threads N`);
2. the environment variable INFERENCE_PIO_NUM_THREADS;
3. "auto": one thread when a decode step reads little weight memory (the per-token weight
   bytes are under SMALL_MODEL_BYTES: such a model is bound by per-op overhead, and extra
   threads only add OpenMP hand-offs, which stall badly when another process holds a core);
   otherwise the CPUs this process may run on (sched_getaffinity) minus the ones other
   processes keep busy (a 0.25 s sample of /proc/stat less this process's own CPU time), at
   least one. Not the load average: it lags a minute, and right after loading it counts the
   load's own work, which made an idle 2-core box look half busy.

Measured on a 2-core Zen 4 (benchmarks/bench_first_contact.py, 2026-12-05): the tiny default
model (76 MiB read per token) 74 tok/s on 1 thread and 76 on 2 when idle, 79 against 33 beside
a CPU burner; the 48-layer int4 model (2.0 GiB per token) 5.3 tok/s on 1 thread and 8.5 on 2
when idle, 5.2 against 2.6 beside the burner. The threshold was 256 MiB until a 2-layer int4
model of the real dimensions (228 MB per token, mostly its int4 lm_head) was measured: 61-62
tok/s on 1 thread, 96.5-98 on 2 (`pio bench --num-layers 2 --quantization int4 --prompt-len 0
--threads N`, alternated, 2026-12-05); 128 MiB keeps the tiny model on one thread."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from inference_pio.config import ConfigError, ModelConfig
from inference_pio.layers.moe import Experts
from inference_pio.layers.quantization import QuantExperts

logger = logging.getLogger(__name__)

ENV_VAR = "INFERENCE_PIO_NUM_THREADS"
SMALL_MODEL_BYTES = 128 * 2**20  # per-token weight bytes below which one thread is best


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count applied, and why (for `pio generate -v` and the run summary)."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cpus(window_s: float = 0.25) -> float:
    """How many CPUs other processes keep busy now: the busy CPUs of /proc/stat over
    `window_s` seconds less this process's own CPU time; 0 where /proc/stat is unreadable."""
    return _sampled_busy(window_s)


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle+iowait


def _sampled_busy(window_s: float) -> float:
    try:
        total0, idle0 = _cpu_ticks()
        own0, wall0 = time.process_time(), time.monotonic()
        time.sleep(window_s)
        total1, idle1 = _cpu_ticks()
        own, wall = time.process_time() - own0, time.monotonic() - wall0
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0 or wall <= 0:
        return 0.0
    busy_fraction = 1 - (idle1 - idle0) / (total1 - total0)
    return max(0.0, busy_fraction * usable_cpus() - own / wall)


def check_num_threads(value: object, source: str = "num_threads") -> int | None:
    """`value` as a thread count: None or "auto" -> None (choose automatically); a positive
    integer (or its text) -> that int. Anything else raises ConfigError naming `source`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        n = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1:
        raise ConfigError(f"{source}={value!r} is not a thread count: give a positive integer "
                          f"(this machine has {usable_cpus()} usable CPUs) or 'auto'")
    return n


def requested_threads(explicit: object = None, source: str = "num_threads") -> int | None:
    """The explicit request, else INFERENCE_PIO_NUM_THREADS, else None (auto); both checked."""
    n = check_num_threads(explicit, source)
    if n is not None:
        return n
    return check_num_threads(os.environ.get(ENV_VAR), ENV_VAR)


def active_weight_bytes(model: torch.nn.Module, config: ModelConfig) -> int:
    """Bytes one batch-1 decode step reads: everything but the embedding table and the
    experts, plus top-k experts per MoE layer (one embedding row is ignored)."""
    total, embed = 0, model.model.embed_tokens  # type: ignore[union-attr]
    seen: set[int] = set()
    for module in model.modules():
        if module is embed:
            continue
        if isinstance(module, QuantExperts):
            per_expert = sum(module.method.nbytes(r, c) for r, c in module.shapes.values())
            total += config.num_experts_per_tok * per_expert
            continue
        if isinstance(module, Experts):
            per_expert = module.gate_up_proj[0].nbytes + module.down_proj[0].nbytes
            total += config.num_experts_per_tok * per_expert
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    return total


def choose_threads(requested: int | None, per_token_bytes: int | None,
                   cpus: int | None = None, busy: float | None = None) -> ThreadChoice:
    """The policy in the module docstring. `requested` wins; `per_token_bytes` None means
    unknown (treated as a large model); `cpus` / `busy` default to this machine's now."""
    if requested is not None:
        return ThreadChoice(requested, "requested")
    cpus = usable_cpus() if cpus is None else cpus
    if per_token_bytes is not None and per_token_bytes < SMALL_MODEL_BYTES:
        return ThreadChoice(1, f"auto: {per_token_bytes / 2**20:.0f} MiB of weights per token "
                               f"is too little to split across threads")
    busy = busy_cpus() if busy is None else busy
    free = int(cpus - busy + 0.5)
    n = max(1, min(cpus, free))
    return ThreadChoice(n, f"auto: {cpus} usable CPUs, {busy:.1f} busy with other work")


def apply_threads(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's (and so the native kernels') intra-op thread count; returns `choice`."""
    torch.set_num_threads(choice.threads)
    if choice.threads > usable_cpus():
        logger.warning("%d threads on %d usable CPUs: oversubscribed, expect stalls",
                       choice.threads, usable_cpus())
    logger.debug("threads: %s", choice.describe())
    return choice
