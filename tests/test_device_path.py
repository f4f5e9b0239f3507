"""The GPU path: the model with every op on its "cuda" implementation (the batched attention
contract, MoE without host synchronisation) against transformers, across batch compositions,
and with no host synchronisation inside a decode step but reading the sampled ids. On the CPU
the same torch code runs on CPU tensors; where CUDA is present (`-m gpu`) it runs there too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_pio.layers.custom_op import select_ops
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
PROMPTS = [[9707, 11, 1879], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [300, 301, 302, 303]]


def _llm(path: Path, device: str) -> LLM:
    llm = LLM(str(path), device=device, dtype="float32", progress=False, max_num_seqs=4,
              kv_cache_memory=2**24)
    select_ops(llm.model, "cuda")  # what build_model picks on a GPU
    return llm


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_ops_greedy_equals_transformers_in_any_batch(tiny_moe_dir: Path, device: str
                                                          ) -> None:
    transformers = pytest.importorskip("transformers")
    from inference_pio.testing.reference import hf_greedy, load_hf_model

    assert transformers is not None
    hf = load_hf_model(tiny_moe_dir)
    expected = [hf_greedy(hf, p, 12) for p in PROMPTS]
    llm = _llm(tiny_moe_dir, device)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == expected
    assert alone == expected


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_has_no_host_sync_but_the_sampled_ids(tiny_moe_dir: Path, device: str
                                                          ) -> None:
    from torch.profiler import ProfilerActivity, profile

    llm = _llm(tiny_moe_dir, device)
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    llm.generate([PROMPTS[0]], params, use_tqdm=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([PROMPTS[0], PROMPTS[2]], params, use_tqdm=False)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::nonzero", 0) == 0, counts.get("aten::nonzero")
    # `.item()` reads: at most one per generate (the sampler reads ids with one tolist a step)
    assert counts.get("aten::item", 0) <= 1, counts.get("aten::item")
