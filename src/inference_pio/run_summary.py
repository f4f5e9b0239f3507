"""The per-run summary printed after a generation (as llama.cpp prints its timings): prompt and
generated tokens, total time, time to first token, decode speed and the thread count. Used by
`pio generate` / `pio chat` (a stderr line, and the `timings` of --json). No torch import."""

from __future__ import annotations

from typing import Any


def run_summary(out: Any, threads: int, wall_s: float | None = None) -> dict[str, Any]:
    """Figures of one finished (or stopped) RequestOutput `out`, from its engine metrics:
    prompt_tokens, cached_prompt_tokens, generated_tokens, time_s (arrival to last token, or
    `wall_s` when the metrics lack an end), time_to_first_token_s, decode_tokens_per_s (tokens
    after the first over the time after the first; None with fewer than 2 tokens),
    tokens_per_s (all generated tokens over time_s) and threads. Times in seconds, rounded."""
    m = out.metrics
    generated = len(out.outputs[0].token_ids) if out.outputs else 0
    arrival = m.arrival_time if m is not None else None
    first = m.first_token_time if m is not None else None
    end = m.finished_time if m is not None else None
    total = (end - arrival) if end is not None and arrival is not None else wall_s
    ttft = first - arrival if first is not None and arrival is not None else None
    decode = None
    if first is not None and end is not None and generated > 1 and end > first:
        decode = (generated - 1) / (end - first)
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "cached_prompt_tokens": m.num_cached_tokens if m is not None else 0,
        "generated_tokens": generated,
        "time_s": None if total is None else round(total, 3),
        "time_to_first_token_s": None if ttft is None else round(ttft, 3),
        "decode_tokens_per_s": None if decode is None else round(decode, 2),
        "tokens_per_s": round(generated / total, 2) if total else None,
        "threads": threads,
    }


def format_summary(s: dict[str, Any]) -> str:
    """One line: "prompt 14 tok, generated 8 tok in 0.21 s (TTFT 0.07 s, 52.1 tok/s decode,
    38.3 tok/s overall), 1 thread"."""
    def secs(v: float | None) -> str:
        return "?" if v is None else f"{v:.2f} s"

    speed = []
    if s["decode_tokens_per_s"] is not None:
        speed.append(f"{s['decode_tokens_per_s']:.1f} tok/s decode")
    if s["tokens_per_s"] is not None:
        speed.append(f"{s['tokens_per_s']:.1f} tok/s overall")
    cached = f" ({s['cached_prompt_tokens']} cached)" if s.get("cached_prompt_tokens") else ""
    threads = f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}"
    return (f"prompt {s['prompt_tokens']} tok{cached}, generated {s['generated_tokens']} tok in "
            f"{secs(s['time_s'])} (TTFT {secs(s['time_to_first_token_s'])}"
            f"{', ' + ', '.join(speed) if speed else ''}), {threads}")
