"""Hypothesis fuzz over real HTTP (the tiny model): a batch of valid greedy requests sent
concurrently with hostile ones (out-of-vocabulary stop ids with min_tokens, top_k 2**63,
temperature 1e308, lone surrogates, wrong types, huge max_tokens). No response may be a 5xx,
and every valid request's text must equal what it gives alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_tools import serve

from inference_pio.llm import LLM
from inference_pio.server import LLMEngineClient, ServerConfig, build_app

VALID_PROMPTS = ("def add(a, b):", "import os\n", "SELECT * FROM", "Once upon")
HOSTILE: list[str] = [
    '{"prompt": "x", "max_tokens": 4, "stop_token_ids": [1000000000], "min_tokens": 2}',
    '{"prompt": "x", "max_tokens": 4, "top_k": 9223372036854775808}',
    '{"prompt": "x", "max_tokens": 4, "temperature": 1e308}',
    '{"prompt": "abc\\ud800def", "max_tokens": 2}',
    '{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
    '{"prompt": 5, "max_tokens": "many"}',
    '{"prompt": "x", "max_tokens": 1000000000000}',
    '{"prompt": "x", "max_tokens": null, "n": "2"}',
    '{"prompt": [1000000000], "max_tokens": 2}',
    '{"messages": "not a list"}',
]


@pytest.fixture(scope="module")
def base_url(tiny_moe_dir: Path) -> Iterator[str]:
    llm = LLM(str(tiny_moe_dir), dtype="float32", progress=False, max_num_seqs=8)
    client = LLMEngineClient(llm, warmup=True)
    # a small default: `max_tokens: null` must not generate 2,048 tokens per example
    config = ServerConfig(default_max_tokens=8)
    with serve(build_app(client, model_name="tiny", config=config)) as url:
        client.engine.ready.wait(900)
        yield url


def _valid(prompt: str) -> str:
    return json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                       "ignore_eos": True})


def _send(base_url: str, path: str, raw: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=300) as http:
        return http.post(f"{base_url}{path}", content=raw,
                         headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def alone(base_url: str) -> dict[str, str]:
    out = {}
    for prompt in VALID_PROMPTS:
        response = _send(base_url, "/v1/completions", _valid(prompt))
        assert response.status_code == 200, response.text
        out[prompt] = response.json()["choices"][0]["text"]
    return out


@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(valid=st.lists(st.sampled_from(VALID_PROMPTS), min_size=1, max_size=4),
       hostile=st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=4),
       order=st.randoms(use_true_random=False))
def test_hostile_requests_never_hurt_valid_ones(base_url: str, alone: dict[str, str],
                                                valid: list[str], hostile: list[str],
                                                order: Any) -> None:
    batch: list[tuple[str | None, str, str]] = [(p, "/v1/completions", _valid(p))
                                                for p in valid]
    for raw in hostile:
        path = "/v1/chat/completions" if '"messages"' in raw else "/v1/completions"
        batch.append((None, path, raw))
    order.shuffle(batch)
    with ThreadPoolExecutor(len(batch)) as pool:
        responses = list(pool.map(lambda item: _send(base_url, item[1], item[2]), batch))
    for (prompt, _, raw), response in zip(batch, responses, strict=True):
        assert response.status_code < 500, (raw, response.text)
        if prompt is not None:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == alone[prompt], prompt
