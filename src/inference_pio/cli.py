"""`pio`: command-line entry. Flags become plugin / LLM / SamplingParams calls; the model
summary is computed and drawn by `model_info`. Commands: generate, chat, complete, serve, info,
make-test-model."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from inference_pio.cli_serve import add_serve_parser, cmd_serve

if TYPE_CHECKING:
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

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
(--num-layers of them, default 48) drawn directly in the chosen format, no files. The machine's
memory read bandwidth and fp32 FLOP/s are measured in the same run; decode is reported as a
fraction of the bandwidth ceiling (bandwidth / bytes of weights one token reads).
"""
EXAMPLES_MAKE = """examples:
  pio make-test-model --out /tmp/tiny                      # tiny Qwen3-MoE, real tokenizer
  pio make-test-model --out /tmp/q30b-2l --preset qwen3-coder-30b --num-layers 2
"""
PRESETS = ("tiny", "tiny-dense", "qwen3-coder-30b")  # inference_pio.testing.PRESETS, no torch
CHAT_HINT = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


class UsageError(ValueError):
    pass


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
    _add_weight_args(p)


QUANTIZATION_CHOICES = ("fp32", "bf16", "fp16", "int8", "int4", "nf4", "fp8")


def _add_quantization_args(g: Any, required: bool = False) -> None:
    g.add_argument("--quantization", choices=QUANTIZATION_CHOICES, required=required,
                   default=None, help="weight format of attention projections, experts and "
                   "dense MLPs (router, norms stay fp32; embedding and lm_head bf16); default: "
                   "the checkpoint's own")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 group / nf4 block size in columns (default 64)")
    g.add_argument("--quantize-lm-head", action="store_true",
                   help="store the lm_head in the quantized format too")


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    _add_quantization_args(g)
    g.add_argument("--weight-memory", type=_budget, default=None, metavar="SIZE",
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


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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
                   choices=["auto", "reference", "sdpa", "torch"])


ENGINE_OPTIONS = ("block_size", "kv_cache_memory", "kv_cache_dtype", "max_num_seqs",
                  "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill",
                  "sliding_window", "attention_backend")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
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
    _add_model_args(gen)
    _add_engine_args(gen)
    _add_sampling_args(gen)


def _add_chat(sub: Any) -> None:
    chat = _add_command(sub, "chat", "interactive multi-turn chat with streamed replies",
                        EXAMPLES_CHAT)
    chat.add_argument("--system", default=None, help="system prompt, kept across /reset")
    _add_model_args(chat)
    _add_engine_args(chat)
    _add_sampling_args(chat)


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
    g.add_argument("--target-path", help="repo path of the completed file (default: --prefix)")
    g.add_argument("--repo-name", help="repository name for the repo-level prompt")
    comp.add_argument("--json", action="store_true", help='print {"middle": ...}')
    _add_model_args(comp)
    _add_engine_args(comp)
    _add_sampling_args(comp)


def _budget(text: str) -> int:
    value = parse_memory(text)
    if isinstance(value, float):
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 24GiB or 16GB")
    return value


def _add_quantize(sub: Any) -> None:
    q = _add_command(sub, "quantize", "write a quantized copy of a checkpoint that loads "
                     "directly", EXAMPLES_QUANTIZE)
    q.add_argument("--model", default=None, help="source model directory or Hugging Face id "
                   "(default: $INFERENCE_PIO_MODEL, else the embedded test model)")
    q.add_argument("--out", required=True, type=Path, help="new directory to write")
    q.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    q.add_argument("--offline", action="store_true", help="never download from the hub")
    _add_quantization_args(q.add_argument_group("format"), required=True)


def _streams(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give stream counts like 1,4,16")
    return values


def _add_bench(sub: Any) -> None:
    b = _add_command(sub, "bench", "measure decode, prefill and batched speed against this "
                     "machine's bandwidth ceiling", EXAMPLES_BENCH)
    src = b.add_argument_group("model")
    src.add_argument("--model", default=None, help="model directory (default: a synthetic "
                     "model built in memory)")
    src.add_argument("--preset", default="qwen3-coder-30b", choices=PRESETS,
                     help="synthetic model's dimensions")
    src.add_argument("--num-layers", type=int, default=None,
                     help="synthetic model depth (default: the preset's, 48)")
    src.add_argument("--device", default="cpu")
    _add_quantization_args(src)
    run = b.add_argument_group("runs")
    run.add_argument("--decode-tokens", type=int, default=16)
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
    info.add_argument("--memory", type=_budget, default=None, metavar="SIZE",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pio", description="Inference-PIO: run Qwen3-Coder (and other Qwen3 MoE/dense "
        "models) locally.", epilog=EXAMPLES_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_chat, _add_complete, add_serve_parser, _add_info,
                _add_quantize, _add_bench, _add_make_test_model):
        add(sub)
    return parser


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "stop", "logprobs")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.ignore_eos:
        out["ignore_eos"] = True
    return out


# ---- terminal output ----------------------------------------------------------------------

def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _color(stream: TextIO) -> bool:
    """Colours only on a terminal, never with NO_COLOR set (https://no-color.org)."""
    return _isatty(stream) and not os.environ.get("NO_COLOR")


def _write(stream: TextIO, text: str, style: str | None = None) -> None:
    """`text` as-is; in a rich `style` when colours are on and rich is installed."""
    if style and _color(stream):
        with contextlib.suppress(ImportError):
            from rich.console import Console

            Console(file=stream, highlight=False, markup=False, emoji=False,
                    soft_wrap=True).print(text, style=style, end="")
            stream.flush()
            return
    stream.write(text)
    stream.flush()


def _note(text: str) -> None:
    _write(sys.stderr, f"{text}\n", "dim")


def _error(error: BaseException | str) -> None:
    _write(sys.stderr, "error: ", "bold red")
    _write(sys.stderr, f"{error}\n")


def _read_text(path: str | Path) -> str:
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

def _create_plugin(args: argparse.Namespace) -> Any:
    from inference_pio.models.plugin_base import create_plugin

    return create_plugin("qwen3_coder_30b", args.model, dtype=args.dtype, device=args.device,
                         max_model_len=args.max_model_len, revision=args.revision,
                         allow_download=False if args.offline else None,
                         **engine_options(args), **weight_options(args))


def _load_llm(args: argparse.Namespace) -> LLM:
    llm: LLM = _create_plugin(args).load()
    return llm


def _stream_reply(llm: LLM, ids: list[int], params: SamplingParams) -> str:
    """Generate, writing each new piece of text to stdout as it comes; the whole text."""
    parts: list[str] = []
    stream = llm.generate_stream(ids, params)
    try:
        for out in stream:
            parts.append(out.delta_text)
            _write(sys.stdout, out.delta_text)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stopped early (Ctrl-C, broken pipe): aborts the request, frees its KV
    _write(sys.stdout, "\n")
    return "".join(parts)


# ---- generate -----------------------------------------------------------------------------

def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if args.prompt_file is not None:
        return _read_text(args.prompt_file)
    if sys.stdin.isatty():
        raise UsageError("give --prompt TEXT, --prompt-file FILE, or pipe the prompt on stdin")
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> int:
    """Chat mode goes through the Qwen3-Coder plugin (chat template); --raw sends the prompt
    as-is through the same engine. Plain output streams; --json / --code-only wait."""
    prompt = _read_prompt(args)
    t0 = time.perf_counter()
    llm = _load_llm(args)
    load_s = time.perf_counter() - t0
    params = llm.default_sampling_params(**_sampling_overrides(args))
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    ids = llm.tokenizer.encode(prompt)
    if args.json or args.code_only:
        _generate_whole(args, llm, ids, params, load_s)
    else:
        _stream_reply(llm, ids, params)
    return 0


def _generate_whole(args: argparse.Namespace, llm: LLM, ids: list[int], params: SamplingParams,
                    load_s: float) -> None:
    t0 = time.perf_counter()
    out = llm.generate([ids], params, use_tqdm=False)[0]
    if args.json:
        result = _json_result(str(llm.model_dir), out, load_s, time.perf_counter() - t0)
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        from inference_pio.models.qwen3_coder_30b.code import extract_code

        print(extract_code(out.outputs[0].text))


def _json_result(model: str, out: Any, load_s: float, gen_s: float) -> dict[str, Any]:
    completion = out.outputs[0]
    metrics = out.metrics
    ttft = (metrics.first_token_time - metrics.arrival_time
            if metrics is not None and metrics.first_token_time is not None else None)
    return {
        "model": model, "text": completion.text,
        "prompt_token_ids": out.prompt_token_ids, "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
        "logprobs": None if completion.logprobs is None else
        [{str(k): v for k, v in lp.items()} for lp in completion.logprobs],
        "timings": {"load_s": round(load_s, 3), "generate_s": round(gen_s, 3),
                    "time_to_first_token_s": None if ttft is None else round(ttft, 3),
                    "generated_tokens": len(completion.token_ids),
                    "tokens_per_s": round(len(completion.token_ids) / gen_s, 2)},
    }


# ---- chat ---------------------------------------------------------------------------------

def cmd_chat(args: argparse.Namespace) -> int:
    """A read-eval loop over stdin lines (a terminal or a pipe); the history is the messages
    list sent through the chat template each turn."""
    llm = _load_llm(args)
    params = llm.default_sampling_params(**_sampling_overrides(args))
    interactive = _isatty(sys.stdin)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        _note(f"chatting with {llm.model_dir} ({CHAT_HINT})")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while (line := _read_message(interactive)) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(system)
            _note("history cleared")
        elif command:
            _chat_turn(llm, params, messages, line)
    return 0


def _chat_turn(llm: LLM, params: SamplingParams, messages: list[dict[str, str]],
               text: str) -> None:
    """Stream one reply and add the turn to `messages`; a failed or interrupted turn is
    dropped (reported on stderr)."""
    messages.append({"role": "user", "content": text})
    try:
        ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
        reply = _stream_reply(llm, ids, params)
    except KeyboardInterrupt:
        _write(sys.stdout, "\n")
        _note("reply stopped; the turn is not kept")
    except _user_errors() as e:
        _error(e)
    else:
        messages.append({"role": "assistant", "content": reply})
        return
    messages.pop()


def _read_message(interactive: bool) -> str | None:
    """One message: a line, joined with the next while it ends with a backslash."""
    line = _read_line(interactive, ">>> ")
    while line is not None and line.endswith("\\"):
        more = _read_line(interactive, "... ")
        line = line[:-1] + "\n" + (more or "")
        if more is None:
            break
    return line


def _read_line(interactive: bool, prompt: str) -> str | None:
    """A line without its newline; None at the end of input (Ctrl-D)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    if _color(sys.stdout):  # \001/\002 tell readline the escape codes take no width
        prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
    try:
        return input(prompt)
    except EOFError:
        _write(sys.stdout, "\n")
        return None


# ---- complete -----------------------------------------------------------------------------

def cmd_complete(args: argparse.Namespace) -> int:
    """File-level FIM, or repository-level with --file / --target-path / --repo-name."""
    prefix = args.prefix_text if args.prefix is None else _read_text(args.prefix)
    suffix = args.suffix_text if args.suffix is None else _read_text(args.suffix)
    files = [_context_file(spec) for spec in args.file or ()]
    plugin = _create_plugin(args)
    sampling = _sampling_overrides(args)
    if files or args.target_path or args.repo_name:
        middle = plugin.complete_in_repo(files, _target_path(args), prefix, suffix,
                                         args.repo_name, **sampling)
    else:
        middle = plugin.complete_code(prefix, suffix or "", **sampling)
    print(json.dumps({"middle": middle}, ensure_ascii=False) if args.json else middle)
    return 0


def _context_file(spec: str) -> tuple[str, str]:
    """"PATH=FILE" (or "FILE", shown under its own name) -> (PATH, FILE's text)."""
    path, sep, file = spec.partition("=")
    if not sep or Path(spec).is_file():
        path, file = spec, spec
    if not path or not file:
        raise UsageError(f"--file {spec!r}: give PATH=FILE or FILE")
    return path, _read_text(file)


def _target_path(args: argparse.Namespace) -> str:
    if args.target_path:
        return str(args.target_path)
    if args.prefix is not None and args.prefix != "-":
        return str(args.prefix)
    raise UsageError("give --target-path: the repository path of the file being completed")


# ---- serve, info, make-test-model ---------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from inference_pio import model_info

    config, source = model_info.load_config(args.model, args.preset, revision=args.revision,
                                            offline=args.offline)
    summary = model_info.summarize(config, source, args.memory)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        model_info.print_tables(model_info.summary_tables(summary), sys.stdout)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from inference_pio.layers.quantization import QuantConfig, QuantizationError
    from inference_pio.llm import resolve_model_dir
    from inference_pio.models.quantize import quantize_checkpoint

    src, _ = resolve_model_dir(args.model, revision=args.revision,
                               allow_download=False if args.offline else None)
    try:
        quant = QuantConfig(args.quantization, group_size=args.group_size,
                            quantize_lm_head=args.quantize_lm_head)
    except QuantizationError as e:
        raise UsageError(str(e)) from None
    start = time.perf_counter()
    out = quantize_checkpoint(src, args.out, quant)
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    print(f"wrote {src} as {quant.describe()} to {out}: {size / 2**30:.2f} GiB of weights in "
          f"{time.perf_counter() - start:.1f} s; load it with --model {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from inference_pio import bench_cli

    report = bench_cli.run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        bench_cli.print_report(report, sys.stdout)
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from inference_pio.testing import make_test_model

    path = make_test_model(args.out, preset=args.preset, num_layers=args.num_layers,
                           seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight {args.preset} checkpoint to {path}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": cmd_generate, "chat": cmd_chat, "complete": cmd_complete, "serve": cmd_serve,
    "info": cmd_info, "make-test-model": cmd_make_test_model, "quantize": cmd_quantize,
    "bench": cmd_bench}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported in one line, no traceback."""
    from inference_pio.chat_template import ChatTemplateError
    from inference_pio.config import ConfigError
    from inference_pio.engine.llm_engine import RequestError
    from inference_pio.models.hub import ModelNotFoundError
    from inference_pio.models.loader import CheckpointError
    from inference_pio.models.qwen3_moe import WeightLoadError

    return (UsageError, ConfigError, ChatTemplateError, RequestError, ModelNotFoundError,
            CheckpointError, WeightLoadError, ValueError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (pio generate ... | head): quit quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.verbose or not isinstance(e, _user_errors()):
            raise
        _error(e)
        return 2
