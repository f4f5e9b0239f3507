"""One bad request never hurts another (issue 12 items 1, 2, 8), through the real engine and
`LLM` on a tiny random checkpoint: values checked at add_request, a request that still fails
inside a step finishes alone with finish_reason "error", aborts from another thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from inference_pio.engine.llm_engine import RequestError
from inference_pio.engine.outputs import RequestFailedError, RequestOutput
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams
from inference_pio.testing import tiny_moe_config, write_random_checkpoint

VOCAB = 3000
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    out = tmp_path_factory.mktemp("isolation_ckpt")
    write_random_checkpoint(out, tiny_moe_config(vocab_size=VOCAB), seed=7, dtype="float32",
                            tokenizer=False)
    return LLM(str(out), dtype="float32", progress=False, block_size=4)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 9, 21)]


def _alone(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]


def _drive(llm: LLM) -> dict[str, RequestOutput]:
    final = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():  # never raises because of one request
            if out.finished:
                final[out.request_id] = out
    return final


def test_a_request_failing_inside_a_step_fails_alone(llm: LLM) -> None:
    prompts = _prompts()
    alone = _alone(llm, prompts)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"ok-{i}", p, GREEDY)
    poisoned = SamplingParams(temperature=0, max_tokens=4, min_tokens=2, stop_token_ids=[5])
    engine.add_request("poisoned", prompts[1], poisoned)
    # The crash, past validation: a stop id beyond the vocabulary under min_tokens made
    # the sampler raise IndexError for the whole batch.
    engine.scheduler.requests["poisoned"].stop_checker.stop_token_ids = frozenset({10**9})
    final = _drive(llm)
    bad = final.pop("poisoned")
    assert bad.outputs[0].finish_reason == "error" and bad.finished
    assert bad.error is not None and "IndexError" in bad.error and "poisoned" in bad.error
    assert [final[f"ok-{i}"].outputs[0].token_ids for i in range(4)] == alone
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in final.values())
    engine.scheduler.check_invariants()
    assert not engine.scheduler.requests and engine.scheduler.block_manager.num_used_blocks == 0


def test_llm_generate_raises_request_failed_with_the_others_intact(llm: LLM) -> None:
    prompts = _prompts()
    alone = _alone(llm, prompts)
    corrupt = SamplingParams(temperature=0.5, max_tokens=6)
    object.__setattr__(corrupt, "temperature", "hot")  # past validation: fails in the sampler
    params = [GREEDY, corrupt, GREEDY, GREEDY]
    with pytest.raises(RequestFailedError, match="TypeError") as info:
        llm.generate(prompts, params, use_tqdm=False)
    outputs = info.value.outputs
    assert outputs is not None and info.value.request_id == outputs[1].request_id
    assert outputs[1].outputs[0].finish_reason == "error"
    assert [outputs[i].outputs[0].token_ids for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(RequestFailedError):
        list(llm.generate_stream(prompts[0], corrupt))


@pytest.mark.parametrize(("params", "match"), [
    ({"stop_token_ids": [10**9], "min_tokens": 2}, "stop_token_ids holds 1000000000"),
    ({"stop_token_ids": [VOCAB]}, f"outside the vocabulary \\[0, {VOCAB}\\)"),
])
def test_token_ids_outside_the_vocabulary_are_refused_at_add(llm: LLM, params: dict,
                                                             match: str) -> None:
    with pytest.raises(RequestError, match=match):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, **params), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(("prompt", "match"), [
    ([1, VOCAB], f"prompt token id {VOCAB} is outside"),
    ([1, True], "token ids must be ints"),
    ([1, 2.0], "token ids must be ints"),
    (b"abc", "bytes"),
    ({"a": 1}, "dict"),
])
def test_bad_prompts_are_refused_at_add(llm: LLM, prompt: object, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        llm.engine.add_request("bad", prompt, GREEDY)  # type: ignore[arg-type]
    assert not llm.engine.has_unfinished_requests()


def test_llm_rejects_bytes_and_extreme_values(llm: LLM) -> None:
    with pytest.raises(TypeError, match="bytes: decode it"):
        llm.generate(b"hello", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0, 100\]"):
        SamplingParams(temperature=1e308)
    # top_k beyond int64 once overflowed in the step; it now means "every token".
    out = llm.generate([[1, 2, 3]], SamplingParams(top_k=2**63, max_tokens=3, seed=1),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.error is None


def test_abort_from_another_thread_ends_generate_cleanly(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    engine = llm.engine
    aborted: list[str] = []

    def abort_first_once_decoding() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [r for r in list(engine.scheduler.running) if r.output_token_ids]
            if running:
                engine.abort_request(running[0].request_id)
                aborted.append(running[0].request_id)
                return
            time.sleep(0.001)

    thread = threading.Thread(target=abort_first_once_decoding)
    thread.start()
    outputs = llm.generate([[1, 2, 3], [4, 5, 6, 7]], params, use_tqdm=False)
    thread.join()
    assert len(aborted) == 1
    by_id = {o.request_id: o.outputs[0] for o in outputs}
    assert by_id[aborted[0]].finish_reason == "abort"
    other = next(o for rid, o in by_id.items() if rid != aborted[0])
    assert other.finish_reason == "length" and len(other.token_ids) == 400
    assert not engine.has_unfinished_requests()
