"""KV cache storage dtypes against an fp32 KV cache, on the same fp32 checkpoint and prompts:
KV bytes per token (from the engine's plan, int8/fp8 scales included) and their ratio to bf16;
greedy agreement of the generated tokens with the fp32-KV tokens; and the logit error under
teacher forcing.

    python benchmarks/bench_kv_cache_dtype.py                  # random 4-layer MoE, head_dim 128
    python benchmarks/bench_kv_cache_dtype.py --num-prompts 8 --max-tokens 64
    python benchmarks/bench_kv_cache_dtype.py --preset qwen3-coder-30b --num-layers 1

Method. (1) Free-running: each KV dtype generates greedily from the prompts; `agree_prefix` is
the fraction of generated positions before the first token that differs from the fp32-KV run,
`agree_all` the fraction of positions holding the same token. (2) Teacher forcing: the model
runner is driven directly, the way the engine runs a request (the prompt as one prefill chunk,
then one decode step per token), but the decode inputs are the fp32-KV run's tokens, so every
dtype sees the same contexts; the logits of each step (captured from `lm_head`) are compared
with the fp32-KV ones: `max_abs_logit_err` over all positions and vocabulary ids,
`median_pos_logit_err` the median over positions of each position's max (a MoE router that
swaps a near-tied expert turns a tiny KV error into a large logit error at that position: the
max shows those swaps, the median the smooth error), and `tf_top1_agree`, the fraction of
positions whose argmax is the same. The prefill of a
one-chunk prompt attends to its fresh K/V, so the error comes from the decode steps' reads."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import _common as common
import torch

from inference_pio.llm import LLM
from inference_pio.runtime.model_runner import ScheduledSequence
from inference_pio.sampling_params import SamplingParams
from inference_pio.testing import tiny_moe_config, write_random_checkpoint

KV_DTYPES = ("auto", "bf16", "fp16", "int8", "fp8_e4m3")


def bench_config_checkpoint(out_dir: Path, num_layers: int) -> Path:
    """A random Qwen3-MoE with the real head layout's head_dim (128) and GQA (8 per KV head)."""
    config = tiny_moe_config(
        hidden_size=256, num_hidden_layers=num_layers, num_attention_heads=8,
        num_key_value_heads=1, head_dim=128, intermediate_size=512, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128)
    return write_random_checkpoint(out_dir, config, dtype="float32")


def teacher_forced_logits(llm: LLM, prompt: list[int], continuation: list[int]
                          ) -> torch.Tensor:
    """Logits [len(continuation), V] predicting each continuation token, computed by a prefill
    of `prompt` then decode steps fed `continuation` (on an otherwise idle engine)."""
    runner, block_size = llm.engine.runner, llm.kv_cache_plan.block_size
    total = len(prompt) + len(continuation)
    blocks = list(range(math.ceil(total / block_size)))
    assert len(blocks) <= llm.kv_cache_plan.num_blocks, "KV cache too small"
    params = SamplingParams(temperature=0, max_tokens=len(continuation), ignore_eos=True)
    captured: list[torch.Tensor] = []
    lm_head = runner.model.lm_head
    assert isinstance(lm_head, torch.nn.Module)
    hook = lm_head.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().float().clone()))
    try:
        inputs, cached = prompt, 0
        for step in range(len(continuation)):
            runner.execute([ScheduledSequence(
                request_id="tf", new_token_ids=inputs, num_cached_tokens=cached,
                block_ids=blocks, needs_sample=True, params=params, prompt_token_ids=prompt,
                output_token_ids=continuation[:step])])
            cached += len(inputs)
            inputs = [continuation[step]]
    finally:
        hook.remove()
        runner.release(["tf"])
    return torch.cat(captured)[:, : llm.tokenizer.vocab_size]


def measure(path: Path, kv_dtype: str, prompts: list[list[int]], max_tokens: int,
            reference: list[list[int]] | None) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """(greedy tokens, teacher-forced logits per prompt, KV bytes per token) for one dtype."""
    llm = LLM(str(path), dtype="float32", kv_cache_dtype=kv_dtype, progress=False,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    forced = reference or tokens
    logits = [teacher_forced_logits(llm, p, c) for p, c in zip(prompts, forced, strict=True)]
    bytes_per_token = llm.kv_cache_plan.bytes_per_token
    del llm
    gc.collect()
    return tokens, logits, bytes_per_token


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions before the first divergence, fraction of equal positions)."""
    total = sum(len(r) for r in reference)
    prefix = same = 0
    for out, ref in zip(tokens, reference, strict=True):
        equal = [a == b for a, b in zip(out, ref, strict=True)]
        prefix += equal.index(False) if False in equal else len(equal)
        same += sum(equal)
    return prefix / total, same / total


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-dtypes", default=",".join(KV_DTYPES))
    args = common.parse_args_with_threads(ap)
    path, _tmp = common.prepare_checkpoint(
        args.model, args.preset, lambda ckpt: bench_config_checkpoint(ckpt, args.num_layers),
        num_layers=args.num_layers)
    contention = common.Contention()
    gen = torch.Generator().manual_seed(0)
    prompts = [common.random_prompt(args.prompt_len, gen) for _ in range(args.num_prompts)]
    ref_tokens, ref_logits, _ = measure(path, "fp32", prompts, args.max_tokens, None)
    # The runner-driven path must reproduce the engine: fp32 KV's forced argmax = its tokens.
    tf_ok = all(x.argmax(-1).tolist() == t for x, t in zip(ref_logits, ref_tokens, strict=True))
    scale = max(float(x.std()) for x in ref_logits)
    rows = []
    for kv_dtype in args.kv_dtypes.split(","):
        tokens, logits, bpt = measure(path, kv_dtype, prompts, args.max_tokens, ref_tokens)
        prefix, overall = agreement(tokens, ref_tokens)
        pos_err = torch.cat([(a - b).abs().amax(-1) for a, b in zip(logits, ref_logits,
                                                                     strict=True)])
        top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum())
                   for a, b in zip(logits, ref_logits, strict=True))
        rows.append({"kv_cache_dtype": kv_dtype + (" (fp32)" if kv_dtype == "auto" else ""),
                     "bytes_per_token": bpt, "agree_prefix": round(prefix, 4),
                     "agree_all": round(overall, 4), "tf_top1_agree":
                     round(top1 / sum(len(t) for t in ref_tokens), 4),
                     "max_abs_logit_err": float(f"{pos_err.max():.3g}"),
                     "median_pos_logit_err": float(f"{pos_err.median():.3g}")})
    bf16 = next((r["bytes_per_token"] for r in rows if r["kv_cache_dtype"] == "bf16"), None)
    for r in rows:
        r["vs_bf16"] = round(r["bytes_per_token"] / bf16, 4) if bf16 else None
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(f"{k:<{w}}" for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(f"{r[k]!s:<{w}}" for k, w in zip(keys, widths, strict=True)))
    result = {"checkpoint": common.checkpoint_label(args.model, args.preset),
              "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "teacher_forcing_reproduces_fp32": tf_ok,
              "fp32_logit_std": float(f"{scale:.3g}"),
              **contention.report(),
              "rows": rows}
    print(f"fp32-KV logit std (for scale): {result['fp32_logit_std']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
