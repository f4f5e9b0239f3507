"""Batch-1 greedy generation: Inference-PIO vs Hugging Face transformers on the same checkpoint,
measured in one run, printed as a table and a ratio.

    python benchmarks/bench_generate.py                       # tiny random checkpoint
    python benchmarks/bench_generate.py --preset qwen3-coder-30b --num-layers 2 --dtype bfloat16
    python benchmarks/bench_generate.py --model /path/to/checkpoint

transformers is a test dependency (pip install -e ".[test]")."""

from __future__ import annotations

import time
from pathlib import Path

import _common as common
import torch

from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams


def _time_ours(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    total = time.perf_counter() - t0
    return total, common.ttft(out), out.outputs[0].token_ids


def _time_hf(path: Path, dtype: torch.dtype, prompt: list[int], new_tokens: int
             ) -> tuple[float, list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    kwargs = {"do_sample": False, "repetition_penalty": 1.0,
              "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - t0
    return total, out[0, len(prompt):].tolist()


def main() -> None:
    ap = common.make_parser(__doc__, preset_default="tiny", num_layers_default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    path, _tmp = common.prepare_checkpoint(args.model, args.preset,
                                           num_layers=args.num_layers, dtype=args.dtype)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    llm = LLM(str(path), dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    prompt = common.random_prompt(args.prompt_len, torch.Generator().manual_seed(0))
    ours_s, ttft_s, ours_tokens = _time_ours(llm, prompt, args.new_tokens)
    result = {"checkpoint": str(path), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "ours_load_s": round(load_s, 2), "ours_ttft_s": round(ttft_s, 4),
              "ours_tok_per_s": round(args.new_tokens / ours_s, 2)}
    if not args.no_hf:
        del llm
        hf_s, hf_tokens = _time_hf(path, dtype, prompt, args.new_tokens)
        result.update(hf_tok_per_s=round(args.new_tokens / hf_s, 2),
                      speedup_vs_hf=round(hf_s / ours_s, 2),
                      same_greedy_tokens=hf_tokens == ours_tokens)
    common.print_result(result)


if __name__ == "__main__":
    main()
