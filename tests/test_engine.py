"""Engine-level equivalence: the same greedy tokens one at a time, all together, with tiny
prefill chunks, with and without prefix caching, under a KV budget small enough to preempt,
and against transformers in float32. Plus sliding windows, abort and streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_pio.engine.llm_engine import RequestError
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams
from inference_pio.testing import tiny_moe_config, write_random_checkpoint
from inference_pio.testing.reference import hf_greedy, load_hf_model

pytest.importorskip("transformers")

NUM_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
CONFIG = tiny_moe_config(vocab_size=3000)


def _prompts() -> list[list[int]]:
    """16 prompts of mixed lengths; half share a 37-token prefix (prefix-cache hits)."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 3000, (37,), generator=g).tolist()
    prompts = []
    for i in range(16):
        own = torch.randint(0, 3000, (1 + (i * 7) % 45,), generator=g).tolist()
        prompts.append(shared + own if i % 2 else own)
    return prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine_ckpt")
    return write_random_checkpoint(out, CONFIG, seed=5, dtype="float32", tokenizer=False)


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> list[list[int]]:
    """transformers' greedy continuation of every prompt, float32."""
    hf = load_hf_model(ckpt)
    return [hf_greedy(hf, p, NUM_NEW) for p in _prompts()]


def _llm(ckpt: Path, **options: object) -> LLM:
    return LLM(str(ckpt), dtype="float32", progress=False, **options)  # type: ignore[arg-type]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_all_together_equals_transformers(ckpt: Path, reference: list[list[int]]) -> None:
    llm = _llm(ckpt)
    assert _tokens(llm, _prompts()) == reference
    # All 16 were admitted in one step, before any block was computed: no hits yet. A second
    # round finds every full prompt block cached.
    assert llm.engine.scheduler.prefix_cache_stats.num_hit_tokens == 0
    outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert sum(o.metrics.num_cached_tokens for o in outs if o.metrics) > 0
    assert llm.engine.scheduler.prefix_cache_stats.num_hit_tokens > 0
    assert llm.engine.scheduler.num_used_blocks == 0


def test_one_at_a_time_equals_transformers(ckpt: Path, reference: list[list[int]]) -> None:
    llm = _llm(ckpt, enable_prefix_caching=False)
    assert [_tokens(llm, [p])[0] for p in _prompts()] == reference


def test_small_prefill_chunks(ckpt: Path, reference: list[list[int]]) -> None:
    llm = _llm(ckpt, max_num_seqs=4, max_num_batched_tokens=5, block_size=4)
    assert _tokens(llm, _prompts()) == reference
    assert llm.engine.num_steps > 60  # prompts of up to 81 tokens really went in 5-token chunks


def test_prefix_caching_off(ckpt: Path, reference: list[list[int]]) -> None:
    llm = _llm(ckpt, enable_prefix_caching=False)
    assert _tokens(llm, _prompts()) == reference
    assert llm.engine.scheduler.prefix_cache_stats.num_hit_tokens == 0


def test_preemption_under_a_tiny_kv_budget(ckpt: Path, reference: list[list[int]]) -> None:
    per_token = _llm(ckpt).kv_cache_plan.bytes_per_token
    # 30 blocks of 4 tokens: the longest request (91 tokens) fits alone, 16 together do not.
    llm = _llm(ckpt, block_size=4, kv_cache_memory=30 * 4 * per_token)
    assert llm.kv_cache_plan.num_blocks == 30
    outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert sum(o.metrics.num_preemptions for o in outs if o.metrics) > 0
    assert llm.engine.scheduler.num_used_blocks == 0 or not llm.engine.has_unfinished_requests()


def test_a_request_that_can_never_fit_is_refused_at_once(ckpt: Path) -> None:
    per_token = _llm(ckpt).kv_cache_plan.bytes_per_token
    llm = _llm(ckpt, block_size=4, kv_cache_memory=4 * 4 * per_token)
    with pytest.raises(RequestError, match="kv_cache_memory"):
        llm.generate([list(range(1, 40))], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "bf16"])
def test_compressed_kv_runs_and_mostly_agrees(ckpt: Path, reference: list[list[int]],
                                              kv_dtype: str) -> None:
    llm = _llm(ckpt, kv_cache_dtype=kv_dtype)
    tokens = _tokens(llm, _prompts())
    same = sum(a == b for t, r in zip(tokens, reference) for a, b in zip(t, r))
    # Agreement is reported by benchmarks/bench_kv_cache_dtype.py; here: the path is sound.
    assert same / (16 * NUM_NEW) > 0.5


def test_sliding_window_matches_transformers(tmp_path: Path) -> None:
    cfg = CONFIG.replace(sliding_window=6)
    write_random_checkpoint(tmp_path / "w", cfg, seed=5, dtype="float32", tokenizer=False)
    write_random_checkpoint(tmp_path / "nw", CONFIG, seed=5, dtype="float32", tokenizer=False)
    hf = load_hf_model(tmp_path / "w")
    prompts = _prompts()[:6]
    ref = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    from_config = _llm(tmp_path / "w", block_size=4)
    assert _tokens(from_config, prompts) == ref
    forced = _llm(tmp_path / "nw", block_size=4, sliding_window=6, max_num_batched_tokens=8,
                  max_num_seqs=2)
    assert _tokens(forced, prompts) == ref


def test_abort_frees_blocks_and_streaming_deltas_add_up(ckpt: Path) -> None:
    llm = _llm(ckpt)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("keep", _prompts()[3], params)
    engine.add_request("drop", _prompts()[5], params)
    engine.step()
    used = engine.scheduler.num_used_blocks
    aborted = engine.abort_request("drop")
    assert aborted is not None and aborted.finished
    assert aborted.outputs[0].finish_reason == "abort"
    assert engine.scheduler.num_used_blocks < used
    deltas, final, dropped = [], None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "drop":  # the next step returns the abort too, once
                dropped.append(out.outputs[0].finish_reason)
                continue
            assert out.request_id == "keep"
            deltas.extend(out.delta_token_ids)
            final = out
    assert dropped == ["abort"]
    assert final is not None and final.finished
    assert deltas == final.outputs[0].token_ids[1:]  # the first token came with step one
    assert engine.abort_request("keep") is None  # already finished
