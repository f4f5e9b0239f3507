"""Prefix caching: requests that share a long prefix (a repository context of `--prefix-len`
tokens, cut from this package's own source) plus a distinct short task each, served with
`enable_prefix_caching=True` and `False` on the same checkpoint in one run. Prints the prefix
cache hit rate, the mean time to first token of the requests after the first (which finds the
prefix cached), the off/on ratio, and whether greedy outputs are identical with and without.

    python benchmarks/bench_prefix_cache.py                    # random 4-layer, 16-expert MoE
    python benchmarks/bench_prefix_cache.py --num-requests 16 --concurrent
    python benchmarks/bench_prefix_cache.py --model /path/to/checkpoint

The first request runs alone on each engine. The others then run one `generate` call each,
alternating between the two engines (so a burst of other load on this shared box hits both),
or with --concurrent as one `generate` call per engine (their TTFT then includes queueing)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import _common as common
import torch

import inference_pio
from inference_pio.engine.outputs import RequestOutput
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams
from inference_pio.tokenizer import Tokenizer


def make_prompts(tokenizer: Tokenizer, prefix_len: int, n: int) -> list[list[int]]:
    """n prompts: the same `prefix_len`-token repository context, then a distinct task."""
    root = Path(inference_pio.__file__).parent
    text = "".join(f"# file: {p.relative_to(root)}\n{p.read_text()}\n"
                   for p in sorted(root.rglob("*.py")))
    prefix = tokenizer.encode(text)[:prefix_len]
    if len(prefix) < prefix_len:
        raise SystemExit(f"only {len(prefix)} tokens of source text for --prefix-len {prefix_len}")
    tasks = ["write a unit test for", "explain", "find a bug in", "add type hints to",
             "document", "simplify", "profile", "rename the arguments of"]
    names = ["the scheduler", "the block manager", "the sampler", "the tokenizer",
             "the loader", "the KV cache", "the attention backend", "the MoE router"]
    return [prefix + tokenizer.encode(f"\n\n# Task {i}: {tasks[i % 8]} "
                                      f"{names[(i // 8 + i) % 8]}.\n")
            for i in range(n)]


def main() -> None:
    ap = common.make_moe_parser(__doc__)
    ap.add_argument("--prefix-len", type=int, default=2000)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrent", action="store_true",
                    help="submit the requests after the first together")
    args = common.parse_args_with_threads(ap)
    if args.num_requests < 2:
        ap.error("--num-requests must be >= 2 (the first request fills the cache)")
    path, _tmp = common.moe_checkpoint(args)
    contention = common.Contention()
    llms = {on: LLM(str(path), dtype=args.dtype, progress=False, enable_prefix_caching=on,
                    max_num_seqs=max(args.num_requests, 1)) for on in (False, True)}
    prompts = make_prompts(llms[True].tokenizer, args.prefix_len, args.num_requests)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    warm = common.random_prompt(len(prompts[0]), torch.Generator().manual_seed(1))
    firsts: dict[bool, RequestOutput] = {}
    rest: dict[bool, list[RequestOutput]] = {False: [], True: []}
    snaps: list[tuple[int, int]] = []  # (queried, hit) of the caching engine

    def snapshot() -> None:
        stats = llms[True].engine.scheduler.prefix_cache_stats
        snaps.append((stats.num_queried_tokens, stats.num_hit_tokens))

    t0 = time.perf_counter()
    for on, llm in llms.items():
        llm.generate([warm], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        snapshot()
        firsts[on] = llm.generate([prompts[0]], params, use_tqdm=False)[0]
    snapshot()
    if args.concurrent:
        for on, llm in llms.items():
            rest[on] = llm.generate(prompts[1:], params, use_tqdm=False)
    else:
        for prompt in prompts[1:]:
            for on, llm in llms.items():
                rest[on].append(llm.generate([prompt], params, use_tqdm=False)[0])
    wall = time.perf_counter() - t0
    snapshot()
    mean = {on: statistics.fmean(map(common.ttft, rest[on])) for on in llms}
    median = {on: statistics.median(map(common.ttft, rest[on])) for on in llms}
    (q0, h0), (q1, h1), (q2, h2) = snaps[1:]  # before the first, after it, at the end
    outs = {on: [firsts[on], *rest[on]] for on in llms}
    mismatched = [i for i, (a, b) in enumerate(zip(outs[False], outs[True], strict=True))
                  if a.outputs[0].token_ids != b.outputs[0].token_ids]
    cached = [o.metrics.num_cached_tokens for o in rest[True] if o.metrics is not None]
    cfg = llms[True].config
    result = {
        "checkpoint": common.checkpoint_label(args.model, args.preset),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "num_requests": args.num_requests,
        "prefix_len": args.prefix_len, "prompt_lens": f"{min(map(len, prompts))}.."
        f"{max(map(len, prompts))}", "max_tokens": args.max_tokens,
        "mode": "concurrent" if args.concurrent else "one by one",
        "hit_rate_all": round((h2 - h0) / (q2 - q0), 4) if q2 > q0 else 0.0,
        "hit_rate_after_first": round((h2 - h1) / (q2 - q1), 4) if q2 > q1 else 0.0,
        "mean_cached_tokens_after_first": round(sum(cached) / max(len(cached), 1), 1),
        "first_ttft_off_s": round(common.ttft(firsts[False]), 4),
        "first_ttft_on_s": round(common.ttft(firsts[True]), 4),
        "mean_ttft_after_first_off_s": round(mean[False], 4),
        "mean_ttft_after_first_on_s": round(mean[True], 4),
        "ttft_off_over_on": round(mean[False] / mean[True], 2),
        "median_ttft_after_first_off_s": round(median[False], 4),
        "median_ttft_after_first_on_s": round(median[True], 4),
        "median_ttft_off_over_on": round(median[False] / median[True], 2),
        "identical_outputs": not mismatched, "mismatched_requests": mismatched,
        "wall_s": round(wall, 1),
        **contention.report(),
    }
    common.print_result(result)


if __name__ == "__main__":
    main()
