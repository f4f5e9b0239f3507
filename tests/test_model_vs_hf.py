"""Our Qwen3 / Qwen3-MoE against transformers, loaded from the same random checkpoint files.

For each config: logits at every prompt position, then 32 greedy decode steps through our KV
cache (each step's logits against transformers' full-sequence forward), and greedy tokens of
`LLM.generate` against transformers' `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_pio.config import ModelConfig, RopeScaling
from inference_pio.forward_context import ForwardContext, forward_context
from inference_pio.llm import LLM
from inference_pio.models.loader import load_model
from inference_pio.runtime.kv_cache import ContiguousKVCache
from inference_pio.sampling_params import SamplingParams
from inference_pio.testing import tiny_dense_config, tiny_moe_config, write_random_checkpoint
from inference_pio.testing.reference import hf_greedy, load_hf_model

pytest.importorskip("transformers")

NUM_DECODE = 32
ATOL = 1e-4

CONFIGS: dict[str, ModelConfig] = {
    "tiny_moe": tiny_moe_config(),
    # odd sizes: hidden 48, 6 heads over 2 KV heads (3 per group), head_dim 12, 6 experts top-3,
    # a dense layer in the middle (mlp_only_layers) and a small vocab
    "odd_moe": tiny_moe_config(
        vocab_size=1003, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=20, intermediate_size=72, mlp_only_layers=(1,)),
    "moe_no_topk_norm": tiny_moe_config(norm_topk_prob=False, vocab_size=2000),
    "dense_tied": tiny_dense_config(),
    "moe_yarn": tiny_moe_config(
        vocab_size=2000, rope_theta=1_000_000.0, max_position_embeddings=4096,
        rope_scaling=RopeScaling(
            factor=4.0, original_max_position_embeddings=64)),
    "moe_sparse_step_bias": tiny_moe_config(vocab_size=1500, num_hidden_layers=4,
                                            decoder_sparse_step=2, attention_bias=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    write_random_checkpoint(out, CONFIGS[name], seed=1, dtype="float32", num_shards=2,
                            tokenizer=False)
    return name, out


def _prompt(vocab: int, length: int = 23, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 151643), (length,), generator=g)


@torch.inference_mode()
def _our_logits_with_cache(model: torch.nn.Module, config: ModelConfig, prompt: torch.Tensor,
                           steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill, then `steps` greedy single-token steps through the KV cache; returns the logits
    of every position [len(prompt) + steps, V] and the greedy tokens."""
    cache = ContiguousKVCache(config, torch.float32)
    cache.allocate(0, 8)  # small on purpose: exercises growth
    cache.bind((0,))
    n = prompt.shape[0]
    with forward_context(ForwardContext((n,), (0,), cache)):
        logits = [model.compute_logits(model(prompt, torch.arange(n)))]
    tokens: list[int] = []
    for step in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        pos = n + step
        with forward_context(ForwardContext((1,), (pos,), cache)):
            hidden = model(torch.tensor([tokens[-1]]), torch.tensor([pos]))
        logits.append(model.compute_logits(hidden))
    return torch.cat(logits), tokens


def test_prompt_and_decode_logits_match_transformers(checkpoint: tuple[str, Path]) -> None:
    name, path = checkpoint
    ours, config = load_model(path, torch.float32, progress=False)
    hf = load_hf_model(path, torch.float32)
    prompt = _prompt(config.vocab_size)
    logits, tokens = _our_logits_with_cache(ours, config, prompt, NUM_DECODE)
    full = torch.cat([prompt, torch.tensor(tokens)])
    with torch.inference_mode():
        ref = hf(full[None]).logits[0]
    # every prompt position and every decode step (the last step's logits have no reference)
    diff = (logits[: full.shape[0]] - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max |logit diff| {diff:.2e}"
    ref_tokens = ref[prompt.shape[0] - 1: -1].argmax(-1).tolist()
    assert tokens == ref_tokens, f"{name}: greedy tokens differ"


def test_engine_greedy_tokens_match_transformers_generate(checkpoint: tuple[str, Path]) -> None:
    name, path = checkpoint
    llm = LLM(str(path), dtype="float32", progress=False)
    hf = load_hf_model(path, torch.float32)
    prompts = [_prompt(llm.config.vocab_size, n, seed=n) for n in (5, 17)]
    params = SamplingParams(temperature=0, max_tokens=NUM_DECODE, ignore_eos=True)
    outs = llm.generate([p.tolist() for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt.tolist(), NUM_DECODE), name
        assert out.outputs[0].finish_reason == "length"


def test_bfloat16_greedy_tokens_match_transformers(tmp_path: Path) -> None:
    """bf16 greedy decode, judged by transformers' full-sequence forward over our tokens: at
    every step our token must be transformers' argmax up to bf16 rounding (a near tie). Matching
    `generate` token for token is not a sound oracle in bf16: transformers' own cached decode
    and its full forward disagree on 1-ulp ties (seen at step 16 of this prompt on an AVX-512
    machine), after which the sequences part for good."""
    write_random_checkpoint(tmp_path, tiny_moe_config(), seed=3, dtype="bfloat16",
                            tokenizer=False)
    llm = LLM(str(tmp_path), dtype="bfloat16", progress=False)
    hf = load_hf_model(tmp_path, torch.bfloat16)
    prompt = _prompt(llm.config.vocab_size, 12, seed=7).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NUM_DECODE,
                                                ignore_eos=True), use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == NUM_DECODE
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
    best = ref.max(-1).values
    chosen = ref[torch.arange(NUM_DECODE), torch.tensor(tokens)]
    # 2 bf16 ulps of the winning logit: a tie in bf16 arithmetic, not a different choice
    tol = 2 * torch.finfo(torch.bfloat16).eps * best.abs().clamp(min=1.0)
    gaps = best - chosen
    assert bool((gaps <= tol).all()), f"steps off transformers' argmax: {gaps.tolist()}"
    # and the first steps, before any near tie, equal transformers' generate exactly
    ref_tokens = hf_greedy(hf, prompt, 8)
    assert tokens[:8] == ref_tokens
