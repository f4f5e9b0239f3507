"""`pio`: command-line entry. Flags become LLM / SamplingParams arguments; nothing else here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES_GENERATE = """examples:
  pio generate --prompt "Write a Python function to sort an array."
  pio generate --model /models/Qwen3-Coder-30B-A3B-Instruct --prompt-file task.txt
  echo "def fib(n):" | pio generate --raw --max-tokens 64 --temperature 0 --json
"""
EXAMPLES_MAKE = """examples:
  pio make-test-model --out /tmp/tiny                      # tiny Qwen3-MoE, real tokenizer
  pio make-test-model --out /tmp/q30b-2l --preset qwen3-coder-30b --num-layers 2
"""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pio", description="Inference-PIO: run Qwen3-Coder (and other Qwen3 MoE/dense "
        "models) locally.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate text or code for one prompt",
                         epilog=EXAMPLES_GENERATE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
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
    make = sub.add_parser("make-test-model", help="write a random-weight checkpoint (real "
                          "format and tokenizer) for tests and benchmarks", epilog=EXAMPLES_MAKE,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    make.add_argument("--out", type=Path, required=True, help="output directory")
    make.add_argument("--preset", default="tiny",
                      choices=["tiny", "tiny-dense", "qwen3-coder-30b"])
    make.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "seed", "stop", "logprobs")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.ignore_eos:
        out["ignore_eos"] = True
    return out


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if args.prompt_file is not None:
        return Path(args.prompt_file).read_text()
    if sys.stdin.isatty():
        raise UsageError("give --prompt TEXT, --prompt-file FILE, or pipe the prompt on stdin")
    return sys.stdin.read()


class UsageError(ValueError):
    pass


def cmd_generate(args: argparse.Namespace) -> int:
    """Chat mode goes through the Qwen3-Coder plugin (chat template); --raw sends the prompt
    as-is through the same engine."""
    from inference_pio.models.plugin_base import create_plugin

    prompt = _read_prompt(args)
    t0 = time.perf_counter()
    plugin = create_plugin("qwen3_coder_30b", args.model, dtype=args.dtype, device=args.device,
                           max_model_len=args.max_model_len, revision=args.revision,
                           allow_download=False if args.offline else None,
                           **engine_options(args))
    llm = plugin.load()
    load_s = time.perf_counter() - t0
    params = llm.default_sampling_params(**_sampling_overrides(args))
    if args.raw:
        text = prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        text = llm.tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    t1 = time.perf_counter()
    out = llm.generate([llm.tokenizer.encode(text)], params, use_tqdm=False)[0]
    gen_s = time.perf_counter() - t1
    completion = out.outputs[0]
    if args.json:
        print(json.dumps(_json_result(str(llm.model_dir), out, load_s, gen_s),
                         ensure_ascii=False, indent=2))
    elif args.code_only:
        from inference_pio.models.qwen3_coder_30b.code import extract_code

        print(extract_code(completion.text))
    else:
        print(completion.text)
    return 0


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


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from inference_pio.testing import make_test_model

    path = make_test_model(args.out, preset=args.preset, num_layers=args.num_layers,
                           seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight {args.preset} checkpoint to {path}")
    return 0


COMMANDS = {"generate": cmd_generate, "make-test-model": cmd_make_test_model}


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose or not isinstance(e, _user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
