"""Streaming: the synchronous iterator and the async engine give the same tokens as generate;
leaving early aborts the request and frees its KV blocks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from inference_pio.engine.async_engine import AsyncLLMEngine
from inference_pio.llm import LLM
from inference_pio.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_moe_dir: Path) -> LLM:
    return LLM(str(tiny_moe_dir), dtype="float32", progress=False)


def test_generate_stream_deltas_add_up(llm: LLM) -> None:
    full = llm.generate(["def add(a, b):"], PARAMS, use_tqdm=False)[0].outputs[0]
    outs = list(llm.generate_stream("def add(a, b):", PARAMS))
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == full.token_ids
    assert "".join(o.delta_text for o in outs) == full.text
    assert [t for o in outs for t in o.delta_token_ids] == full.token_ids


def test_closing_the_stream_aborts(llm: LLM) -> None:
    stream = llm.generate_stream("hello", PARAMS)
    next(stream)
    assert llm.engine.scheduler.num_used_blocks > 0
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.num_used_blocks == 0 or \
        llm.engine.scheduler.num_free_blocks == llm.kv_cache_plan.num_blocks


def test_async_engine_streams_concurrent_requests(llm: LLM) -> None:
    prompts = ["def add(a, b):", "import os", "SELECT * FROM"]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]
    engine = AsyncLLMEngine(llm.engine)

    async def collect(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompts[i], PARAMS, f"r{i}"):
            tokens.extend(out.delta_token_ids)
        return tokens

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(i) for i in range(3))))

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.shutdown()


def test_async_consumer_leaving_early_aborts(llm: LLM) -> None:
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        agen = engine.generate("hello", params, "leaver")
        async for _ in agen:
            break
        await agen.aclose()

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 30  # the engine thread applies the abort between steps
        while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "leaver" not in llm.engine.scheduler.requests
        assert not llm.engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_async_bad_request_raises_before_streaming(llm: LLM) -> None:
    engine = AsyncLLMEngine(llm.engine)

    async def main() -> None:
        async for _ in engine.generate([], PARAMS, "empty"):
            pass

    try:
        with pytest.raises(ValueError, match="empty"):
            asyncio.run(main())
    finally:
        engine.shutdown()
