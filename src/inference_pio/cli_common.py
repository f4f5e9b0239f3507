"""Shared pieces of the `pio` commands: option groups, the user-error type, terminal output,
file reading and model loading. Imports nothing heavy at module level (no torch, transformers
or fastapi), so building the parser and `pio --help` stay fast."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from inference_pio.llm import LLM


class UsageError(ValueError):
    pass


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model directory or Hugging Face id (default: $INFERENCE_PIO_MODEL, else "
                        "the embedded random-weight test model)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16; auto = float32 on CPU, the checkpoint's "
                        "dtype on GPU")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length limit (default: the model's)")
    g.add_argument("--offline", action="store_true", help="never download from the hub")
    add_threads_arg(g)
    add_weight_args(p)


def _threads(text: str) -> str | None:
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of threads or auto "
                                         f"(this machine has {os.cpu_count()} CPUs)")
    return text.strip()


def add_threads_arg(g: Any) -> None:
    g.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="CPU threads for torch and the native kernels (default: "
                        "$INFERENCE_PIO_NUM_THREADS, else auto: 1 for small models, the free "
                        "cores for large ones; -v shows the choice)")


QUANTIZATION_CHOICES = ("fp32", "bf16", "fp16", "int8", "int4", "nf4", "fp8")


def add_quantization_args(g: Any, required: bool = False) -> None:
    g.add_argument("--quantization", choices=QUANTIZATION_CHOICES, required=required,
                   default=None, help="weight format of attention projections, experts and "
                   "dense MLPs (router, norms stay fp32; embedding bf16; lm_head bf16 but for "
                   "int4 and int8: see --quantize-lm-head); default: the checkpoint's own")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 group / nf4 block size in columns (default 64)")
    g.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="store the lm_head in the quantized format too (default: yes for int4 "
                        "and int8, whose kernels read it faster than bf16; no for the others)")


def add_weight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    add_quantization_args(g)
    g.add_argument("--weight-memory", type=budget, default=None, metavar="SIZE",
                   help="memory for weights (12GiB, 8GB); below the model's size the experts "
                        "are paged from disk through an LRU cache (default: no limit)")
    g.add_argument("--prefetch-experts", action=argparse.BooleanOptionalAction, default=True,
                   help="read a layer's routed experts in the background while others compute "
                        "(with --weight-memory)")


WEIGHT_OPTIONS = ("quantization", "group_size", "quantize_lm_head", "weight_memory",
                  "prefetch_experts")


def weight_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in WEIGHT_OPTIONS}


def parse_memory(text: str) -> int | float:
    """"4GiB", "512MiB", "2GB", "1073741824" -> bytes (int); "0.5" -> a fraction (float)."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    t = text.strip().lower()
    for suffix, factor in units.items():
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(t) if t.isdigit() else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size: give bytes (4294967296), a size with a unit "
            "(4GiB, 512MiB) or a fraction of free memory (0.5)") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    g.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                   help="KV cache budget: 4GiB, 512MiB, bytes, or a fraction of free memory "
                        "(0.5); default min(4 GiB, half of free memory, what is needed)")
    g.add_argument("--kv-cache-dtype", default="auto",
                   choices=["auto", "fp32", "fp16", "bf16", "int8", "fp8_e4m3"])
    g.add_argument("--max-num-seqs", type=int, default=16)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--sliding-window", type=int, default=None,
                   help="force sliding-window attention of this many tokens")
    g.add_argument("--attention-backend", default="auto",
                   choices=ATTENTION_BACKEND_NAMES)


# layers.attention.ATTENTION_BACKENDS' names (not imported: the CLI starts without torch;
# tests/test_triton_kernels.py checks the two agree)
ATTENTION_BACKEND_NAMES = ["auto", "reference", "sdpa", "torch", "triton"]

ENGINE_OPTIONS = ("block_size", "kv_cache_memory", "kv_cache_dtype", "max_num_seqs",
                  "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill",
                  "sliding_window", "attention_backend")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, help="return top-N logprobs per token")
    g.add_argument("--ignore-eos", action="store_true")


def budget(text: str) -> int:
    value = parse_memory(text)
    if isinstance(value, float):
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 24GiB or 16GB")
    return value


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed", "stop", "logprobs")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (the rest come from generation_config.json)."""
    out = {n: getattr(args, n) for n in SAMPLING_FLAGS if getattr(args, n) is not None}
    if args.ignore_eos:
        out["ignore_eos"] = True
    return out


# ---- terminal output ----------------------------------------------------------------------

def isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def color(stream: TextIO) -> bool:
    """Colours only on a terminal, never with NO_COLOR set (https://no-color.org)."""
    return isatty(stream) and not os.environ.get("NO_COLOR")


def write(stream: TextIO, text: str, style: str | None = None) -> None:
    """`text` as-is; in a rich `style` when colours are on and rich is installed."""
    if style and color(stream):
        with contextlib.suppress(ImportError):
            from rich.console import Console

            Console(file=stream, highlight=False, markup=False, emoji=False,
                    soft_wrap=True).print(text, style=style, end="")
            stream.flush()
            return
    stream.write(text)
    stream.flush()


def note(text: str) -> None:
    write(sys.stderr, f"{text}\n", "dim")


def print_error(error: BaseException | str) -> None:
    """`pio: error: MESSAGE`, an engine option at its start named as its flag
    (`max_num_seqs must be ...` -> `--max-num-seqs must be ...`)."""
    text = str(error)
    for name in (*ENGINE_OPTIONS, *WEIGHT_OPTIONS, "max_model_len"):
        if text.startswith(name + " "):
            text = "--" + name.replace("_", "-") + text[len(name):]
            break
    write(sys.stderr, "pio: error: ", "bold red")
    write(sys.stderr, f"{text}\n")


def read_text(path: str | Path) -> str:
    """A file's text ("-": stdin); unreadable files are the user's error, in one line."""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


# ---- model loading ------------------------------------------------------------------------

def create_plugin(args: argparse.Namespace) -> Any:
    from inference_pio.models.plugin_base import create_plugin

    return create_plugin("qwen3_coder_30b", args.model, dtype=args.dtype, device=args.device,
                         max_model_len=args.max_model_len, revision=args.revision,
                         allow_download=False if args.offline else None,
                         num_threads=args.threads, **engine_options(args),
                         **weight_options(args))


def load_llm(args: argparse.Namespace) -> LLM:
    """Check the device, then load the model (slow: weights, maybe kernels)."""
    check_device(args.device)
    llm: LLM = create_plugin(args).load()
    return llm


def check_device(device: str) -> None:
    """A UsageError (one line with the fix) unless `device` names a device this torch can use:
    checked before any weight is read."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name: give cpu, cuda or cuda:N"
                         ) from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
            raise UsageError(f"--device {device}: {why}; use --device cpu, or install a "
                             "CUDA build of torch (https://pytorch.org/get-started/locally/)")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif kind != "cpu":
        raise UsageError(f"--device {device}: only cpu and cuda devices are supported")


def check_sampling(args: argparse.Namespace) -> None:
    """Validate the sampling flags as SamplingParams would, before the model loads; its
    message names the flag (`--top-p must be in (0, 1], got 2`)."""
    from inference_pio.sampling_params import SamplingParams

    try:
        SamplingParams(**sampling_overrides(args))
    except (ValueError, TypeError) as e:
        text = str(e)
        for name in SAMPLING_FLAGS:
            text = text.replace(f"SamplingParams.{name}", "--" + name.replace("_", "-"))
        raise UsageError(text) from None


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported in one line, no traceback."""
    from inference_pio.chat_template import ChatTemplateError
    from inference_pio.config import ConfigError
    from inference_pio.engine.llm_engine import RequestError
    from inference_pio.models.hub import ModelNotFoundError
    from inference_pio.models.loader import CheckpointError
    from inference_pio.models.qwen3_moe import WeightLoadError

    return (UsageError, ConfigError, ChatTemplateError, RequestError, ModelNotFoundError,
            CheckpointError, WeightLoadError, ValueError, FileNotFoundError)
