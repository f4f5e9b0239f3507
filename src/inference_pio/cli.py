"""`pio`: command-line entry. Builds the parser (cheap: no torch, transformers or fastapi at
import) and dispatches to the command, whose module is imported only when it runs:
cli_generate (generate, chat, complete), cli_tools (info, quantize, bench, make-test-model,
warmup), cli_serve (serve, whose parser it also builds). Shared options and helpers live in cli_common. Errors that are the user's to fix
(`cli_common.user_errors`) print one line `pio: error: ...` and exit 2; any other exception is
our bug and keeps its traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from inference_pio.cli_common import (
    add_engine_args,
    add_model_args,
    add_quantization_args,
    add_sampling_args,
    add_threads_arg,
    budget,
    print_error,
    user_errors,
)
from inference_pio.cli_serve import add_serve_parser

EXAMPLES_MAIN = """examples:
  pio generate --prompt "Write a Python function to sort an array."
  pio chat --model ~/models/qwen3-coder-30b
  pio complete --prefix head.py --suffix tail.py
  pio serve --model ~/models/qwen3-coder-30b --port 8000
  pio info --preset qwen3-coder-30b --memory 24GiB

Run `pio COMMAND --help` for a command's options and examples. With no --model, commands use
$INFERENCE_PIO_MODEL, else an embedded random-weight test model (gibberish output).
"""
EXAMPLES_GENERATE = """examples:
  pio generate --prompt "Write a Python function to sort an array."
  pio generate --model /models/Qwen3-Coder-30B-A3B-Instruct --prompt-file task.txt
  echo "def fib(n):" | pio generate --raw --max-tokens 64 --temperature 0 --json
  pio generate --prompt "Quicksort in Go" --code-only > quicksort.go

The answer streams to the terminal as it is generated; --json and --code-only print once it is
complete.
"""
EXAMPLES_CHAT = """examples:
  pio chat --model ~/models/qwen3-coder-30b
  pio chat --system "You are a terse senior Rust reviewer." --temperature 0.2
  printf 'Write fizzbuzz in Go.\\nNow in Rust.\\n/exit\\n' | pio chat --max-tokens 256

in the chat: /reset clears the history (the --system prompt stays), /exit, /quit or Ctrl-D
quits, Ctrl-C stops the reply being written (that turn is forgotten). End a line with \\ to
continue the message on the next line.
"""
EXAMPLES_COMPLETE = """examples:
  pio complete --prefix head.py --suffix tail.py
  pio complete --prefix-text $'def add(a, b):\\n    ' --suffix-text $'\\n\\nprint(add(1, 2))\\n'
  pio complete --prefix app/main.py --suffix tail.py --file app/util.py --file docs/api.md=API.md
  git show HEAD:app/main.py | pio complete --prefix - --target-path app/main.py --file app/db.py

Prints the generated middle. With --file (PATH=FILE, or FILE for both) the prompt is
repository-level: each file is shown to the model under PATH, then the target file
(--target-path, default the --prefix path); without a suffix the model continues the file.
"""
EXAMPLES_INFO = """examples:
  pio info --preset qwen3-coder-30b --memory 24GiB   # the real model's numbers, no files needed
  pio info --model ~/models/qwen3-coder-30b --json
  pio info --model Qwen/Qwen3-Coder-30B-A3B-Instruct --offline   # the cached config.json

Reads config.json only (a hub id fetches just that file). Formats: fp32/bf16/fp16; int8 with one
fp16 scale per row; int4 with one fp16 scale per group of 32/64/128 (no zero point); the
quantized formats keep router, norms, embedding and lm_head in bf16.
"""
EXAMPLES_QUANTIZE = """examples:
  pio quantize --model ~/models/qwen3-coder-30b --quantization int4 --out ~/models/q30b-int4
  pio quantize --model ~/models/qwen3-coder-30b --quantization int4 --group-size 32 \\
      --quantize-lm-head --out ~/models/q30b-int4-g32
  pio generate --model ~/models/q30b-int4 --prompt "Write a Python function to sort an array."

Reads the checkpoint tensor by tensor (peak memory: the quantized model plus one tensor) and
writes safetensors shards with a quantization_config in config.json, plus the tokenizer and
generation config; the result loads directly (no --quantization needed). fp8 writes Qwen's
FP8 layout (128x128 block scales).
"""
EXAMPLES_BENCH = """examples:
  pio bench --quantization int4 --group-size 32                 # 48-layer synthetic, in memory
  pio bench --num-layers 8 --quantization int8 --streams 1,4,16 --json
  pio bench --model ~/models/q30b-int4 --prompt-len 512
  pio bench --quantization int4 --compare-transformers --hf-layers 2

Without --model the model is synthetic: random weights of the real Qwen3-Coder-30B dimensions
drawn directly in the chosen format, no files. What is not given is picked to fit free memory
(said on stderr): fp32 if the whole depth fits, else int4; 48 layers, else the most that fit.
Asked for a model that does not fit, it refuses before allocating. The machine's
memory read bandwidth and fp32 FLOP/s are measured in the same run; decode is reported as a
fraction of the bandwidth ceiling (bandwidth / bytes of weights one token reads).
"""
EXAMPLES_MAKE = """examples:
  pio make-test-model --out /tmp/tiny                      # tiny Qwen3-MoE, real tokenizer
  pio make-test-model --out /tmp/q30b-2l --preset qwen3-coder-30b --num-layers 2
  pio make-test-model --out /tmp/tiny --seed 1 --force     # replace the earlier one whole
"""
PRESETS = ("tiny", "tiny-dense", "qwen3-coder-30b")  # inference_pio.testing.PRESETS, no torch


def _add_command(sub: Any, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _add_generate(sub: Any) -> None:
    gen = _add_command(sub, "generate", "generate text or code for one prompt, streamed",
                       EXAMPLES_GENERATE)
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as-is (no chat template) and print the whole output")
    gen.add_argument("--system", default=None, help="system prompt (chat mode)")
    gen.add_argument("--code-only", action="store_true",
                     help="print only the first fenced code block of the answer")
    gen.add_argument("--json", action="store_true",
                     help="print JSON: text, token ids, logprobs, finish reason, timings")
    add_model_args(gen)
    add_engine_args(gen)
    add_sampling_args(gen)


def _add_chat(sub: Any) -> None:
    chat = _add_command(sub, "chat", "interactive multi-turn chat with streamed replies",
                        EXAMPLES_CHAT)
    chat.add_argument("--system", default=None, help="system prompt, kept across /reset")
    add_model_args(chat)
    add_engine_args(chat)
    add_sampling_args(chat)


def _add_complete(sub: Any) -> None:
    comp = _add_command(sub, "complete", "fill in the middle of code (FIM) between a prefix "
                        "and a suffix", EXAMPLES_COMPLETE)
    g = comp.add_argument_group("code")
    pre = g.add_mutually_exclusive_group(required=True)
    pre.add_argument("--prefix", metavar="FILE", help="file with the code before the gap "
                     "(- for stdin)")
    pre.add_argument("--prefix-text", metavar="TEXT", help="the code before the gap")
    suf = g.add_mutually_exclusive_group()
    suf.add_argument("--suffix", metavar="FILE", help="file with the code after the gap")
    suf.add_argument("--suffix-text", metavar="TEXT", help="the code after the gap")
    g.add_argument("--file", action="append", metavar="PATH=FILE",
                   help="repository context file (repeatable); PATH is its name in the prompt")
    g.add_argument("--target-path", help="repo path of the completed file (default: the "
                   "--prefix path; with --prefix-text or stdin, untitled.EXT, EXT the first "
                   "--file's extension)")
    g.add_argument("--repo-name", help="repository name for the repo-level prompt")
    comp.add_argument("--json", action="store_true", help='print {"middle": ...}')
    add_model_args(comp)
    add_engine_args(comp)
    add_sampling_args(comp)


def _add_quantize(sub: Any) -> None:
    q = _add_command(sub, "quantize", "write a quantized copy of a checkpoint that loads "
                     "directly", EXAMPLES_QUANTIZE)
    q.add_argument("--model", default=None, help="source model directory or Hugging Face id "
                   "(default: $INFERENCE_PIO_MODEL, else the embedded test model)")
    q.add_argument("--out", required=True, type=Path, help="new directory to write")
    q.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    q.add_argument("--offline", action="store_true", help="never download from the hub")
    add_quantization_args(q.add_argument_group("format"), required=True)


def _streams(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give stream counts like 1,4,16")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return value


def _add_bench(sub: Any) -> None:
    b = _add_command(sub, "bench", "measure decode, prefill and batched speed against this "
                     "machine's bandwidth ceiling", EXAMPLES_BENCH)
    src = b.add_argument_group("model")
    src.add_argument("--model", default=None, help="model directory (default: a synthetic "
                     "model built in memory)")
    src.add_argument("--preset", default="qwen3-coder-30b", choices=PRESETS,
                     help="synthetic model's dimensions")
    src.add_argument("--num-layers", type=int, default=None,
                     help="synthetic model depth (default: the preset's, 48, or the most "
                     "that fit free memory)")
    src.add_argument("--device", default="cpu")
    add_threads_arg(src)
    add_quantization_args(src)
    run = b.add_argument_group("runs")
    run.add_argument("--decode-tokens", type=int, default=16)
    run.add_argument("--repeat", type=_positive, default=1,
                     help="batch-1 decode runs; the median is reported (default 1)")
    run.add_argument("--prompt-len", type=int, default=512, help="prefill prompt (0: skip)")
    run.add_argument("--streams", type=_streams, default=(1, 4, 16),
                     help="concurrent greedy streams for throughput (comma list)")
    run.add_argument("--compare-transformers", action="store_true",
                     help="also time transformers (bf16) and us on a reduced-layer checkpoint")
    run.add_argument("--hf-layers", type=int, default=2,
                     help="layers of that checkpoint (real dimensions otherwise)")
    run.add_argument("--profile", action="store_true",
                     help="also profile decode steps: time per op (native kernels included)")
    b.add_argument("--json", action="store_true", help="print one JSON object")


def _add_info(sub: Any) -> None:
    info = _add_command(sub, "info", "model summary: parameters, weight and KV cache bytes, "
                        "context that fits in memory", EXAMPLES_INFO)
    src = info.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory, config.json or Hugging "
                     "Face id (default: $INFERENCE_PIO_MODEL, else the embedded test model)")
    src.add_argument("--preset", choices=PRESETS, help="a built-in config (qwen3-coder-30b: "
                     "the real model's dimensions)")
    info.add_argument("--revision", default=None, help="hub revision")
    info.add_argument("--offline", action="store_true", help="never download config.json")
    info.add_argument("--memory", type=budget, default=None, metavar="SIZE",
                      help="memory budget (24GiB, 16GB): show how much context fits")
    info.add_argument("--json", action="store_true", help="print the summary as JSON (bytes)")


def _add_make_test_model(sub: Any) -> None:
    make = _add_command(sub, "make-test-model", "write a random-weight checkpoint (real format "
                        "and tokenizer) for tests and benchmarks", EXAMPLES_MAKE)
    make.add_argument("--out", type=Path, required=True, help="output directory")
    make.add_argument("--preset", default="tiny", choices=PRESETS)
    make.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    make.add_argument("--force", action="store_true",
                      help="replace a non-empty --out directory whole (default: refuse)")


def _add_warmup(sub: Any) -> None:
    w = _add_command(sub, "warmup", "build (or load) the native CPU kernels now, so the first "
                     "generate does not wait for the compiler", "examples:\n  pio warmup\n"
                     "  INFERENCE_PIO_CACHE=/opt/pio-cache pio warmup   # a shared cache\n")
    w.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pio", description="Inference-PIO: run Qwen3-Coder (and other Qwen3 MoE/dense "
        "models) locally.", epilog=EXAMPLES_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_chat, _add_complete, add_serve_parser, _add_info,
                _add_quantize, _add_bench, _add_make_test_model, _add_warmup):
        add(sub)
    return parser


# ---- dispatch -----------------------------------------------------------------------------

COMMANDS: dict[str, str] = {
    "generate": "cli_generate:cmd_generate", "chat": "cli_generate:cmd_chat",
    "complete": "cli_generate:cmd_complete", "serve": "cli_serve:cmd_serve",
    "info": "cli_tools:cmd_info", "make-test-model": "cli_tools:cmd_make_test_model",
    "quantize": "cli_tools:cmd_quantize", "bench": "cli_tools:cmd_bench",
    "warmup": "cli_tools:cmd_warmup"}


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs command `name`, its module imported now (not at start-up)."""
    module, _, func = COMMANDS[name].partition(":")
    fn: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f"inference_pio.{module}"), func)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return command(args.command)(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (pio generate ... | head): quit quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.verbose or not isinstance(e, user_errors()):
            raise
        print_error(e)
        return 2
