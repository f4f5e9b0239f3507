"""`pio generate`, `pio chat` and `pio complete`: load the model, then stream or print."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_pio.cli_common import (
    UsageError,
    check_device,
    check_sampling,
    color,
    create_plugin,
    isatty,
    load_llm,
    note,
    print_error,
    read_text,
    sampling_overrides,
    user_errors,
    write,
)

if TYPE_CHECKING:
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

CHAT_HINT = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def stream_reply(llm: LLM, ids: list[int], params: SamplingParams) -> str:
    """Generate, writing each new piece of text to stdout as it comes, then the run summary
    line to stderr; the whole text."""
    from inference_pio.run_summary import format_summary, run_summary

    parts: list[str] = []
    stream = llm.generate_stream(ids, params)
    last = None
    try:
        for last in stream:
            parts.append(last.delta_text)
            write(sys.stdout, last.delta_text)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stopped early (Ctrl-C, broken pipe): aborts the request, frees its KV
    write(sys.stdout, "\n")
    if last is not None:
        note(format_summary(run_summary(last, llm.threads.threads)))
    return "".join(parts)


# ---- generate -----------------------------------------------------------------------------

def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if args.prompt_file is not None:
        return read_text(args.prompt_file)
    if sys.stdin.isatty():
        raise UsageError("give --prompt TEXT, --prompt-file FILE, or pipe the prompt on stdin")
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> int:
    """Chat mode goes through the Qwen3-Coder plugin (chat template); --raw sends the prompt
    as-is through the same engine. Plain output streams; --json / --code-only wait."""
    check_sampling(args)
    prompt = _read_prompt(args)
    t0 = time.perf_counter()
    llm = load_llm(args)
    load_s = time.perf_counter() - t0
    params = llm.default_sampling_params(**sampling_overrides(args))
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    ids = llm.tokenizer.encode(prompt)
    if args.json or args.code_only:
        _generate_whole(args, llm, ids, params, load_s)
    else:
        stream_reply(llm, ids, params)
    return 0


def _generate_whole(args: argparse.Namespace, llm: LLM, ids: list[int], params: SamplingParams,
                    load_s: float) -> None:
    from inference_pio.run_summary import format_summary, run_summary

    t0 = time.perf_counter()
    out = llm.generate([ids], params, use_tqdm=False)[0]
    note(format_summary(run_summary(out, llm.threads.threads)))
    if args.json:
        result = _json_result(str(llm.model_dir), out, load_s, time.perf_counter() - t0)
        result["timings"].update(run_summary(out, llm.threads.threads))
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
    check_sampling(args)
    llm = load_llm(args)
    params = llm.default_sampling_params(**sampling_overrides(args))
    interactive = isatty(sys.stdin)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        note(f"chatting with {llm.model_dir} ({CHAT_HINT})")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    while (line := _read_message(interactive)) is not None:
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(system)
            note("history cleared")
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
        reply = stream_reply(llm, ids, params)
    except KeyboardInterrupt:
        write(sys.stdout, "\n")
        note("reply stopped; the turn is not kept")
    except user_errors() as e:
        print_error(e)
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
    if color(sys.stdout):  # \001/\002 tell readline the escape codes take no width
        prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
    try:
        return input(prompt)
    except EOFError:
        write(sys.stdout, "\n")
        return None


# ---- complete -----------------------------------------------------------------------------

def cmd_complete(args: argparse.Namespace) -> int:
    """File-level FIM, or repository-level with --file / --target-path / --repo-name. Every
    flag and file is checked before the model loads."""
    check_sampling(args)
    check_device(args.device)
    prefix = args.prefix_text if args.prefix is None else read_text(args.prefix)
    suffix = args.suffix_text if args.suffix is None else read_text(args.suffix)
    files = [_context_file(spec) for spec in args.file or ()]
    repo_level = bool(files or args.target_path or args.repo_name)
    target = _target_path(args, files) if repo_level else ""
    plugin = create_plugin(args)
    sampling = sampling_overrides(args)
    if repo_level:
        middle = plugin.complete_in_repo(files, target, prefix, suffix, args.repo_name,
                                         **sampling)
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
    return path, read_text(file)


def _target_path(args: argparse.Namespace, files: list[tuple[str, str]]) -> str:
    """The completed file's path in the repo-level prompt: --target-path, else the --prefix
    file's path, else (--prefix-text or stdin) "untitled" with the first context file's
    extension, so the model sees the language."""
    if args.target_path:
        return str(args.target_path)
    if args.prefix is not None and args.prefix != "-":
        return str(args.prefix)
    suffix = Path(files[0][0]).suffix if files else ""
    return f"untitled{suffix}"
