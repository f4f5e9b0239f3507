"""Continuous batching: N concurrent greedy requests in one `generate` call vs the same requests
one `generate` call each, on the same engine, measured in one run; generated tokens/s of both,
their ratio, and a token-for-token check that both produce the same outputs.

    python benchmarks/bench_throughput.py                      # random 4-layer, 16-expert MoE
    python benchmarks/bench_throughput.py --num-requests 32 --max-tokens 64
    python benchmarks/bench_throughput.py --preset qwen3-coder-30b --num-layers 1
    python benchmarks/bench_throughput.py --model /path/to/checkpoint

Prefix caching is off, so a later pass over the same prompts gets no free prefill. The two modes
alternate for --rounds rounds and the fastest round of each counts (this box is shared)."""

from __future__ import annotations

import time

import _common as common
import torch

from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams


def make_prompts(n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """n random-token prompts with lengths spread evenly over [min_len, max_len], shuffled."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(min_len, max_len, n).round().long()
    lengths: list[int] = spread[torch.randperm(n, generator=gen)].tolist()
    return [common.random_prompt(length, gen) for length in lengths]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, batched: bool
        ) -> tuple[float, list[list[int]], list[float]]:
    """(seconds, generated ids per prompt, time to first token per prompt)."""
    t0 = time.perf_counter()
    if batched:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    seconds = time.perf_counter() - t0
    return seconds, [o.outputs[0].token_ids for o in outs], [common.ttft(o) for o in outs]


def main() -> None:
    ap = common.make_moe_parser(__doc__)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --num-requests")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate sequential/batched this many times; report the best of each")
    ap.add_argument("--seed", type=int, default=0)
    args = common.parse_args_with_threads(ap)
    if args.rounds < 1 or args.num_requests < 1:
        ap.error("--rounds and --num-requests must be >= 1")
    path, _tmp = common.moe_checkpoint(args)
    llm = LLM(str(path), dtype=args.dtype, progress=False, enable_prefix_caching=False,
              max_num_seqs=args.max_num_seqs or args.num_requests)
    prompts = make_prompts(args.num_requests, args.min_prompt_len, args.max_prompt_len,
                           args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    contention = common.Contention()
    run(llm, prompts, SamplingParams(temperature=0, max_tokens=2), batched=True)  # warm-up
    seq: list[tuple[float, list[list[int]], list[float]]] = []
    bat: list[tuple[float, list[list[int]], list[float]]] = []
    steps = {False: 0, True: 0}
    for _ in range(args.rounds):  # alternate, so a burst of other load hits both modes alike
        for batched, results in ((False, seq), (True, bat)):
            steps0 = llm.engine.num_steps
            results.append(run(llm, prompts, params, batched))
            steps[batched] = llm.engine.num_steps - steps0
    fastest = [min(results, key=lambda r: r[0]) for results in (seq, bat)]
    (seq_s, seq_ids, seq_ttft), (bat_s, bat_ids, bat_ttft) = fastest
    generated = sum(len(ids) for ids in bat_ids)
    mismatched = sorted({i for _, ids, _ in seq + bat for i, (a, b)
                         in enumerate(zip(seq_ids, ids, strict=True)) if a != b})
    cfg = llm.config
    result = {
        "checkpoint": common.checkpoint_label(args.model, args.preset),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts,
        "dtype": args.dtype, "threads": torch.get_num_threads(),
        "num_requests": args.num_requests,
        "prompt_lens": f"{args.min_prompt_len}..{args.max_prompt_len}",
        "max_tokens": args.max_tokens, "generated_tokens": generated,
        "sequential_s": round(seq_s, 2), "batched_s": round(bat_s, 2),
        "sequential_s_all": [round(r[0], 2) for r in seq],
        "batched_s_all": [round(r[0], 2) for r in bat],
        "sequential_steps": steps[False], "batched_steps": steps[True],
        "sequential_tok_per_s": round(generated / seq_s, 1),
        "batched_tok_per_s": round(generated / bat_s, 1),
        "batched_over_sequential": round(seq_s / bat_s, 2),
        "sequential_mean_ttft_s": round(sum(seq_ttft) / len(seq_ttft), 4),
        "batched_mean_ttft_s": round(sum(bat_ttft) / len(bat_ttft), 4),
        "identical_outputs": not mismatched, "mismatched_requests": mismatched,
        **contention.report(),
    }
    common.print_result(result)


if __name__ == "__main__":
    main()
