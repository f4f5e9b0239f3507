"""Weight formats against float32 on one random checkpoint and the same code prompts: weight
bytes, top-1 agreement of the next-token predictions, mean KL divergence and the logit error,
all measured in one run.

    python benchmarks/bench_quant_fidelity.py                      # 6-layer MoE, 64 experts
    python benchmarks/bench_quant_fidelity.py --formats int4-g32,int4-g32-head --json out.json
    python benchmarks/bench_quant_fidelity.py --model DIR          # an existing float checkpoint

The checkpoint: a random float32 Qwen3-MoE (real vocabulary and tokenizer, real head_dim 128, 64
experts with 8 active), written once into `--dir` and reused while its marker file matches the
arguments. Its weights are drawn with std `--std` (default 0.05, not the writer's 0.02): at 0.02
the lm_head logits have a std of ~0.02 * sqrt(hidden) and the router logits are just as flat
(~0.55 at hidden 768), so next-token distributions are nearly uniform (KL figures then say
little) and the routers' top-8 weights nearly equal; 0.05 gives logit std ~1.4 and more peaked
routing weights. Random weights stay far flatter than a trained model's (entropy ~11 of the 11.9
nats of a uniform distribution), so every figure here is a pessimistic comparison of the formats
with each other, not a prediction for the real model. The fp32 logit std, mean entropy and
top-1/top-2 gap are printed for scale.

The prompts: `--num-prompts` (4) sequences of `--prompt-len` (256) real tokens, the start of
the source of fixed stdlib modules (`inspect.getsource`), teacher-forced: every format sees the
same tokens (`testing.reference.prompt_logits`, chunks of 256 through a float32 KV cache), and
each of the 1,024 positions' next-token logits is compared with float32's. The checkpoint files
are read once before the first load, so every `load_s` reads them from the page cache.

Formats (`--formats`): METHOD[-gGROUP][-head][-embDTYPE], e.g. int4-g32 (int4, groups of 32
columns), int4-g32-head (the lm_head quantized too), fp16-embfp16 (embedding and lm_head in fp16
instead of the package default, bf16, which every format uses unless told otherwise).

Columns: `weight_bytes` (`model.weight_plan.total_bytes`) and `vs_fp32`; `expert_vs_fp32`, the
routed experts' ratio alone (the embedding and lm_head dominate the bytes of this small model,
not of the real one); `top1_agree`, the fraction of positions whose argmax equals float32's;
`mean_kl`, the mean over positions of KL(fp32 || format) in nats; `max_abs_logit_err` over all
positions and vocabulary ids, and `median_pos_logit_err`, the median over positions of each
position's max (a weight error that swaps a near-tied 8th router expert moves that position's
logits far more than the format's smooth error does: the max shows such swaps, the median the
smooth error); `route_swap_pct`, the share of (layer, token) top-8 expert sets that differ from
float32's; `load_s`, loading (and quantizing) the checkpoint; `forward_s`, the teacher-forced
passes over all prompts (the quantized formats dequantize each weight per use: plain torch, no
kernels)."""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
import torch

from inference_pio.config import ModelConfig
from inference_pio.layers.quantization import QuantConfig
from inference_pio.models.loader import LoadConfig, load_model
from inference_pio.testing import tiny_moe_config, write_random_checkpoint
from inference_pio.testing.reference import prompt_logits
from inference_pio.tokenizer import Tokenizer

FORMATS = ("bf16", "fp16", "int8", "int4-g32", "int4-g64", "int4-g128", "nf4", "fp8",
           "int4-g32-head")
# Fixed stdlib modules whose source makes the prompts (one module per prompt, in this order).
SOURCE_MODULES = ("textwrap", "heapq", "fnmatch", "json.decoder", "shlex", "bisect",
                  "colorsys", "queue")
MARKER = "bench_quant_fidelity.json"


def bench_config(args: Any) -> ModelConfig:
    hidden = args.hidden_size
    return tiny_moe_config(
        hidden_size=hidden, num_hidden_layers=args.num_layers, num_attention_heads=hidden // 64,
        num_key_value_heads=2, head_dim=128, intermediate_size=2 * hidden,
        num_experts=args.num_experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate_size)


def cached_checkpoint(args: Any) -> tuple[Path, float | None]:
    """(the checkpoint in --dir, seconds spent writing it or None when reused)."""
    config = bench_config(args)
    spec = {"config": config.to_hf(), "std": args.std, "seed": args.seed, "dtype": "float32"}
    out = args.dir or Path("/tmp") / (
        f"pio-quant-fidelity-L{args.num_layers}-h{args.hidden_size}-e{args.num_experts}"
        f"-k{args.top_k}-m{args.moe_intermediate_size}-std{args.std}-s{args.seed}")
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        return out, None
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_random_checkpoint(out, config, dtype="float32", std=args.std, seed=args.seed)
    marker.write_text(json.dumps(spec))  # written last: a checkpoint without it is incomplete
    return out, time.perf_counter() - t0


def code_prompts(tokenizer: Tokenizer, num: int, length: int) -> tuple[list[list[int]], list[str]]:
    """The first `length` tokens of the source of each of the first `num` SOURCE_MODULES."""
    if num > len(SOURCE_MODULES):
        raise SystemExit(f"--num-prompts is at most {len(SOURCE_MODULES)}")
    prompts, names = [], []
    for name in SOURCE_MODULES[:num]:
        ids = tokenizer.encode(inspect.getsource(importlib.import_module(name)))
        if len(ids) < length:
            raise SystemExit(f"the source of {name} has only {len(ids)} tokens (< {length})")
        prompts.append(ids[:length])
        names.append(name)
    return prompts, names


def parse_format(spec: str) -> QuantConfig:
    """METHOD[-gGROUP][-head][-embDTYPE] -> QuantConfig (DTYPE: the embedding_dtype)."""
    method, *rest = spec.split("-")
    group, head, emb = None, False, "bf16"
    for part in rest:
        if part == "head":
            head = True
        elif part.startswith("g") and part[1:].isdigit():
            group = int(part[1:])
        elif part.startswith("emb"):
            emb = part[3:]
        else:
            raise SystemExit(f"bad format {spec!r}: expected METHOD[-gGROUP][-head][-embDTYPE]")
    return QuantConfig(method, group_size=group, quantize_lm_head=head, embedding_dtype=emb)


def forced_logits(model: Any, config: ModelConfig, ids: list[int],
                  routes: list[torch.Tensor]) -> torch.Tensor:
    """`testing.reference.prompt_logits` (next-token logits [T, V], teacher-forced through a
    KV cache of the activation dtype, float32 here, for every format), appending each MoE
    gate's top-k expert ids [T, k] to `routes` (layer by layer)."""
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    per_layer: list[list[torch.Tensor]] = [[] for _ in gates]
    k = config.num_experts_per_tok
    hooks = [g.register_forward_hook(
        lambda _m, _i, out, i=i: per_layer[i].append(out.float().topk(k, -1).indices.sort(-1)
                                                    .values))
        for i, g in enumerate(gates)]
    try:
        logits = prompt_logits(model, config, ids)
    finally:
        for h in hooks:
            h.remove()
    routes.extend(torch.cat(p) for p in per_layer)
    return logits


def warm_page_cache(path: Path) -> None:
    """Read the weight files once, so that no format's load_s includes the disk."""
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            while fh.read(1 << 26):
                pass


def run_format(path: Path, quant: QuantConfig | None, prompts: list[list[int]]
               ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], Any, float, float]:
    """(logits per prompt, routes per prompt, weight plan, load seconds, teacher-forced
    forward seconds) for one format."""
    t0 = time.perf_counter()
    model, config = load_model(path, "float32", progress=False,
                               load_config=LoadConfig(quantization=quant))
    load_s = time.perf_counter() - t0
    routes: list[list[torch.Tensor]] = [[] for _ in prompts]
    t1 = time.perf_counter()
    logits = [forced_logits(model, config, p, r)[:, :config.vocab_size]
              for p, r in zip(prompts, routes, strict=True)]
    forward_s = time.perf_counter() - t1
    plan = model.weight_plan
    del model
    gc.collect()
    return logits, routes, plan, load_s, forward_s


def compare(logits: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    """top-1 agreement, mean KL(ref || logits), max and median-of-position-max |error|."""
    same = n = 0
    kl_sum = 0.0
    pos_err = []
    for a, b in zip(logits, ref, strict=True):
        for rows in range(0, a.shape[0], 64):  # chunks keep the log-softmax copies small
            x, y = a[rows:rows + 64], b[rows:rows + 64]
            same += int((x.argmax(-1) == y.argmax(-1)).sum())
            lp, lq = torch.log_softmax(y.double(), -1), torch.log_softmax(x.double(), -1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            pos_err.append((x - y).abs().amax(-1))
            n += x.shape[0]
    err = torch.cat(pos_err)
    return {"top1_agree": round(same / n, 4), "mean_kl": float(f"{kl_sum / n:.3g}"),
            "max_abs_logit_err": float(f"{err.max():.3g}"),
            "median_pos_logit_err": float(f"{err.median():.3g}")}


def route_swaps(routes: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> float:
    """Percent of (layer, token) top-k expert sets that differ from the reference's."""
    diff = total = 0
    for per_prompt, ref_prompt in zip(routes, ref, strict=True):
        for a, b in zip(per_prompt, ref_prompt, strict=True):
            diff += int((a != b).any(-1).sum())
            total += a.shape[0]
    return round(100 * diff / total, 2) if total else 0.0


def reference_stats(ref: list[torch.Tensor]) -> dict[str, float]:
    """Scale of the fp32 predictions: logit std, mean entropy (nats), mean top-1/top-2 gap."""
    logits = torch.cat(ref)
    std = float(logits.std())
    ent = []
    for rows in range(0, logits.shape[0], 64):
        lp = torch.log_softmax(logits[rows:rows + 64].double(), -1)
        ent.append(-(lp.exp() * lp).sum(-1))
    top2 = logits.topk(2, -1).values
    return {"fp32_logit_std": float(f"{std:.3g}"),
            "fp32_mean_entropy_nats": float(f"{torch.cat(ent).mean():.3g}"),
            "fp32_mean_top1_top2_gap": float(f"{(top2[:, 0] - top2[:, 1]).mean():.3g}")}


def main() -> None:
    ap = common.make_parser(__doc__, num_layers_default=6)
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the checkpoint is written once and reused (default: "
                         "/tmp/pio-quant-fidelity-<config>)")
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--num-experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-intermediate-size", type=int, default=384)
    ap.add_argument("--std", type=float, default=0.05, help="init std of the random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = common.parse_args_with_threads(ap)
    if args.preset:
        raise SystemExit("--preset is not supported: use --model DIR or the bench config")
    t_start = time.perf_counter()
    if args.model is not None:
        path, write_s, label = args.model, None, str(args.model)
    else:
        path, write_s = cached_checkpoint(args)
        cfg = bench_config(args)
        label = (f"random fp32 Qwen3-MoE std {args.std}: {cfg.num_hidden_layers} layers, hidden "
                 f"{cfg.hidden_size}, {cfg.num_attention_heads}q/{cfg.num_key_value_heads}kv "
                 f"heads x {cfg.head_dim}, {cfg.num_experts} experts (top-"
                 f"{cfg.num_experts_per_tok}) x {cfg.moe_intermediate_size}, vocab "
                 f"{cfg.vocab_size}")
    quants = {spec: parse_format(spec) for spec in args.formats.split(",")}
    prompts, modules = code_prompts(Tokenizer.from_pretrained(path), args.num_prompts,
                                    args.prompt_len)
    warm_page_cache(path)
    contention = common.Contention()
    ref, ref_routes, ref_plan, ref_load, ref_fwd = run_format(path, None, prompts)
    rows = [{"format": "fp32 (reference)", "weight_bytes": ref_plan.total_bytes, "vs_fp32": 1.0,
             "expert_vs_fp32": 1.0, "top1_agree": 1.0, "mean_kl": 0.0, "max_abs_logit_err": 0.0,
             "median_pos_logit_err": 0.0, "route_swap_pct": 0.0, "load_s": round(ref_load, 2),
             "forward_s": round(ref_fwd, 2)}]
    for spec, quant in quants.items():
        print(f"[{time.perf_counter() - t_start:.0f} s] {spec}: {quant.describe()}",
              file=sys.stderr, flush=True)
        logits, routes, plan, load_s, forward_s = run_format(path, quant, prompts)
        rows.append({"format": spec, "weight_bytes": plan.total_bytes,
                     "vs_fp32": round(plan.total_bytes / ref_plan.total_bytes, 4),
                     "expert_vs_fp32": round(plan.expert_bytes / ref_plan.expert_bytes, 4),
                     **compare(logits, ref), "route_swap_pct": route_swaps(routes, ref_routes),
                     "load_s": round(load_s, 2), "forward_s": round(forward_s, 2)})
        del logits, routes
        gc.collect()
    common.print_table(rows)
    result = {"checkpoint": label, "checkpoint_write_s": None if write_s is None
              else round(write_s, 1), "prompts": f"{len(prompts)} x {args.prompt_len} tokens "
              f"of stdlib source: {', '.join(modules)}",
              "positions": sum(len(p) for p in prompts), "python": sys.version.split()[0],
              "torch_threads": torch.get_num_threads(), **reference_stats(ref),
              "wall_s": round(time.perf_counter() - t_start, 1), **contention.report(),
              "rows": rows}
    for key in ("checkpoint", "prompts", "fp32_logit_std", "fp32_mean_entropy_nats",
                "fp32_mean_top1_top2_gap", "wall_s", "cpu_stall_pct"):
        print(f"{key}: {result[key]}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
