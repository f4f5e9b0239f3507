"""The GPU path: the model with every op on its "cuda" implementation (torch ops: the batched
attention contract, MoE without host synchronisation) or its "triton" one (the fused MoE and
paged attention kernels) against transformers, across batch compositions, and with no host
synchronisation inside a decode step but reading the sampled ids. On the CPU the same code
runs on CPU tensors (Triton's through its interpreter); where CUDA is present (`-m gpu`) it
runs there too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_pio.layers.custom_op import select_ops, triton_available
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
PROMPTS = [[9707, 11, 1879], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [300, 301, 302, 303]]


IMPLS = ["cuda", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="triton is not installed"))]


def _llm(path: Path, device: str, impl: str) -> LLM:
    """impl "cuda": torch ops and the "auto" attention of a CPU cache; "triton": what
    build_model picks on a GPU with triton (Triton MoE and attention)."""
    backend = "triton" if impl == "triton" else "auto"
    llm = LLM(str(path), device=device, dtype="float32", progress=False, max_num_seqs=4,
              kv_cache_memory=2**24, attention_backend=backend)
    select_ops(llm.model, impl)
    assert llm.engine.runner.attention_backend.name == ("triton" if impl == "triton" else "auto")
    return llm


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_cuda_ops_greedy_equals_transformers_in_any_batch(tiny_moe_dir: Path, device: str,
                                                          impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    from inference_pio.testing.reference import hf_greedy, load_hf_model

    assert transformers is not None
    hf = load_hf_model(tiny_moe_dir)
    expected = [hf_greedy(hf, p, 12) for p in PROMPTS]
    llm = _llm(tiny_moe_dir, device, impl)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == expected
    assert alone == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_has_no_host_sync_but_the_sampled_ids(tiny_moe_dir: Path, device: str,
                                                          impl: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    llm = _llm(tiny_moe_dir, device, impl)
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    llm.generate([PROMPTS[0]], params, use_tqdm=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([PROMPTS[0], PROMPTS[2]], params, use_tqdm=False)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::nonzero", 0) == 0, counts.get("aten::nonzero")
    # `.item()` reads: at most one per generate (the sampler reads ids with one tolist a step)
    assert counts.get("aten::item", 0) <= 1, counts.get("aten::item")
