"""Pieces the benchmark scripts share: argument parsing, the benchmark checkpoint, random prompts,
time to first token, CPU contention, and the printed result (a key/value table, then one JSON
line). Not a script: each `benchmarks/bench_*.py` imports it (`import _common as common`); run
as `python benchmarks/NAME.py`, a script has the benchmarks folder first on `sys.path`."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from inference_pio.engine.outputs import RequestOutput
from inference_pio.testing import make_test_model, tiny_moe_config, write_random_checkpoint

RANDOM_TOKEN_LIMIT = 150000  # random prompt ids are drawn from [0, this)


def make_parser(doc: str | None, preset_default: str | None = None, num_layers: bool = True,
                num_layers_default: int | None = 4) -> argparse.ArgumentParser:
    """A parser with the script's docstring as description, `--model`, `--preset` (a
    make-test-model preset; with no default, the script's own bench config is used instead) and,
    if `num_layers`, `--num-layers`."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="existing checkpoint directory")
    if preset_default is None:
        ap.add_argument("--preset", default=None,
                        help="make-test-model preset instead of the default bench config")
    else:
        ap.add_argument("--preset", default=preset_default,
                        help="make-test-model preset when no --model")
    if num_layers:
        ap.add_argument("--num-layers", type=int, default=num_layers_default)
    return ap


def parse_args_with_threads(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Add `--threads` (the last argument), parse, and set torch's thread count if given."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def make_moe_parser(doc: str | None) -> argparse.ArgumentParser:
    """`make_parser` plus `--hidden-size`, `--num-experts`, `--dtype`: with `--num-layers`, the
    arguments of `moe_checkpoint`."""
    ap = make_parser(doc)
    ap.add_argument("--hidden-size", type=int, default=384, help="default bench config only")
    ap.add_argument("--num-experts", type=int, default=16, help="default bench config only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return ap


def moe_bench_checkpoint(out_dir: Path, num_layers: int, hidden: int, experts: int,
                         dtype: str) -> Path:
    """A moderately sized random Qwen3-MoE (real vocab and tokenizer), where batching shows: the
    default checkpoint of bench_throughput.py and bench_prefix_cache.py."""
    config = tiny_moe_config(
        hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=hidden // 64,
        num_key_value_heads=2, head_dim=64, intermediate_size=2 * hidden, num_experts=experts,
        num_experts_per_tok=4, moe_intermediate_size=hidden // 2)
    return write_random_checkpoint(out_dir, config, dtype=dtype)


def prepare_checkpoint(model: Path | None, preset: str | None,
                       bench_config: Callable[[Path], Path] | None = None,
                       **preset_kwargs: Any,
                       ) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """(checkpoint path, the temporary directory holding it or None). `model` when given; else
    a checkpoint written into a new temporary directory: `bench_config(dir)` when there is one
    and no `preset`, otherwise `make_test_model(dir, preset, **preset_kwargs)`. Keep the
    directory object alive while the checkpoint is in use."""
    if model is not None:
        return model, None
    tmp = tempfile.TemporaryDirectory(prefix="pio-bench-")
    ckpt = Path(tmp.name) / "ckpt"
    if bench_config is not None and not preset:
        return bench_config(ckpt), tmp
    assert preset is not None
    return make_test_model(ckpt, preset, **preset_kwargs), tmp


def moe_checkpoint(args: argparse.Namespace
                   ) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """`prepare_checkpoint` for the arguments of `make_moe_parser`: the
    `--preset` at `--num-layers` and `--dtype`, or by default `moe_bench_checkpoint`."""
    return prepare_checkpoint(
        args.model, args.preset,
        lambda ckpt: moe_bench_checkpoint(ckpt, args.num_layers, args.hidden_size,
                                          args.num_experts, args.dtype),
        num_layers=args.num_layers, dtype=args.dtype)


def checkpoint_label(model: Path | None, preset: str | None) -> str:
    """What the result's "checkpoint" names: the directory, the preset or the bench config."""
    return "random bench config" if model is None and not preset else str(model or preset)


def random_prompt(length: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, RANDOM_TOKEN_LIMIT, (length,), generator=generator).tolist()


def ttft(out: RequestOutput) -> float:
    """Seconds from a request's arrival to its first token."""
    assert out.metrics is not None and out.metrics.first_token_time is not None
    return out.metrics.first_token_time - out.metrics.arrival_time


class Contention:
    """Share of wall time some task on this machine waited for a CPU (Linux PSI), and the load
    average: how much other work disturbed the figures. None where PSI is unavailable."""

    def __init__(self) -> None:
        self.load_before, self.t0, self.stall0 = os.getloadavg()[0], time.time(), _stall_us()

    def report(self) -> dict[str, object]:
        stall, wall_us = _stall_us(), (time.time() - self.t0) * 1e6
        pct = None if stall is None or self.stall0 is None else round(
            100 * (stall - self.stall0) / wall_us, 1)
        return {"cpu_stall_pct": pct, "loadavg_1m_before_after": [
            round(self.load_before, 2), round(os.getloadavg()[0], 2)]}


def _stall_us() -> int | None:
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=", 1)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def print_result(result: dict[str, Any], notes: Iterable[str] = ()) -> None:
    """`result` as a key/value table, then the `notes` lines, then `result` as one JSON line."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    for note in notes:
        print(note)
    print(json.dumps(result))


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as left-aligned columns under a header line."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(f"{k:<{w}}" for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(f"{r[k]!s:<{w}}" for k, w in zip(keys, widths, strict=True)))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank; 0.0 when empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0
