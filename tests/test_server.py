"""The HTTP server on the tiny random model, through the official `openai` client and raw
httpx: endpoints, streaming, logprobs, stop, seeds, usage counts, auth, metrics, client
disconnects (KV freed) and bad requests."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from test_server_tools import openai_client, serve

from inference_pio.llm import LLM
from inference_pio.models.qwen3_coder_30b.code import fim_prompt
from inference_pio.server import LLMEngineClient, build_app, default_model_name, run_server

MODEL = "tiny-coder"
KEY = "sk-test"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 4}
MESSAGES = [{"role": "user", "content": "Write hello world in Python."}]


@pytest.fixture(scope="module")
def llm(tiny_moe_dir: Path) -> LLM:
    return LLM(str(tiny_moe_dir), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def base_url(llm: LLM) -> Iterator[str]:
    engine_client = LLMEngineClient(llm, warmup=True)  # kernels built before the first test
    with serve(build_app(engine_client, model_name=MODEL, api_key=KEY)) as url:
        assert _wait_until(lambda: engine_client.ready, timeout_s=900), "warm-up never ended"
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, KEY)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _engine_idle(llm: LLM) -> bool:
    scheduler = llm.engine.scheduler
    return not scheduler.has_unfinished_requests() and scheduler.num_used_blocks == 0


# ----------------------------------------------------------------------------- endpoints


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_usage_equals_tokenizer_counts(client: openai.OpenAI, llm: LLM,
                                                  http: httpx.Client) -> None:
    prompt = "def add(a, b):"
    response = client.completions.create(model=MODEL, prompt=prompt, logprobs=0,
                                         extra_body={"ignore_eos": True}, **GREEDY)
    choice = response.choices[0]
    assert response.usage is not None and choice.logprobs is not None
    assert response.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert response.usage.prompt_tokens == http.post("/tokenize", json={"content": prompt}
                                                     ).json()["count"]
    assert response.usage.completion_tokens == len(choice.logprobs.tokens) == 4
    assert choice.finish_reason == "length"


def test_streamed_completion_matches_plain(client: openai.OpenAI) -> None:
    prompt = "import os\n"
    plain = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_completion_with_suffix_is_fim(client: openai.OpenAI, llm: LLM) -> None:
    prefix, suffix = "def f(x):\n    return ", "\n\nprint(f(1))\n"
    response = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, **GREEDY)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(llm.tokenizer.encode(fim_prompt(prefix, suffix)))
    assert "<|fim" not in response.choices[0].text and "<|file_sep|>" not in \
        response.choices[0].text


def test_infill_and_detokenize(http: httpx.Client) -> None:
    body = {"input_prefix": "def f(", "input_suffix": "):\n", "n_predict": 3, "temperature": 0,
            "input_extra": [{"filename": "util.py", "text": "X = 1\n"}]}
    answer = http.post("/infill", json=body).json()
    assert isinstance(answer["content"], str) and answer["tokens_predicted"] <= 3
    ids = http.post("/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["content"] == "hello world"


def test_chat_plain_and_streamed(client: openai.OpenAI, llm: LLM) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    prompt = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert plain.usage is not None and chunks[-1].usage is not None
    assert plain.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="x = ", logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs or [])
    offsets = logprobs.text_offset or []
    assert offsets == sorted(offsets) and offsets[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True,
                                          top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "The", "temperature": 0, "max_tokens": 8}
    full = client.completions.create(**args).choices[0].text
    pairs = [full[k:k + 2] for k in range(1, len(full) - 1)]
    usable = [pair for pair in pairs if pair.strip() == pair and "\ufffd" not in pair]
    if not usable:
        pytest.skip(f"the random model wrote no usable stop string: {full!r}")
    stop = usable[len(usable) // 2]
    cut = client.completions.create(stop=[stop], **args).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_same_seed_same_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "Once", "temperature": 1.0,
                            "max_tokens": 4, "seed": 1234}
    first = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args).choices[0].text == first


def test_n_samples_and_prompt_batches(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, temperature=0,
                                         max_tokens=2)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in response.choices}
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n samples agree


# ----------------------------------------------------------------------------- auth, metrics


def test_api_key(base_url: str) -> None:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=30) as anon:
        assert anon.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = anon.get("/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert anon.post("/tokenize", json={"content": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai_client(base_url, "wrong").models.list()


def test_metrics_text(base_url: str, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="a", max_tokens=1)
    text = httpx.get(f"{base_url}/metrics", trust_env=False).text
    for name in ("pio_requests_total", "pio_prompt_tokens_total", "pio_generation_tokens_total",
                 "pio_time_to_first_token_seconds_bucket", "pio_inter_token_latency_seconds",
                 "pio_num_requests_running", "pio_num_requests_waiting",
                 "pio_kv_cache_used_blocks", "pio_prefix_cache_hit_rate",
                 "pio_tool_call_parse_failures_total"):
        assert name in text, name
    assert 'pio_requests_total{endpoint="/v1/completions",status="200"}' in text


# ----------------------------------------------------------------------------- disconnects


def test_disconnect_mid_stream_frees_kv(http: httpx.Client, llm: LLM) -> None:
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 400, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert llm.engine.scheduler.has_unfinished_requests()
    assert _wait_until(lambda: _engine_idle(llm)), "the request kept running after disconnect"


def test_disconnect_while_waiting_frees_kv(base_url: str, llm: LLM) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True}
    with (httpx.Client(base_url=base_url, trust_env=False, timeout=1.0,
                       headers={"Authorization": f"Bearer {KEY}"}) as impatient,
          pytest.raises(httpx.ReadTimeout)):
        impatient.post("/v1/chat/completions", json=body)
    assert _wait_until(lambda: _engine_idle(llm)), "the request kept running after disconnect"


# ----------------------------------------------------------------------------- bad requests


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": [11] * 5000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
     400, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": "nope"}}]}, 400,
     "tools.0.function.parameters"),
    ("/infill", {"input_prefix": "x", "n_predict": 0}, 400, "n_predict"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests(http: httpx.Client, path: str, body: Any, status: int,
                      param: str | None) -> None:
    error = _error(http.post(path, json=body), status)
    assert param is None or error["param"] == param, error


def test_prompt_longer_than_context_names_max_model_len(http: httpx.Client) -> None:
    error = _error(http.post("/v1/completions", json={"prompt": [11] * 5000}), 400)
    assert "max_model_len" in error["message"] and error["code"] == "context_length_exceeded"


def test_malformed_and_oversized_bodies(http: httpx.Client) -> None:
    for raw in (b"{", b"\xff\xfe", b'{"prompt": NaN}', b"[1, 2]", b"null"):
        _error(http.post("/v1/completions", content=raw,
                         headers={"Content-Type": "application/json"}), 400)
    big = json.dumps({"model": MODEL, "prompt": "a" * (5 * 1024 * 1024)})
    _error(http.post("/v1/completions", content=big,
                     headers={"Content-Type": "application/json"}), 413)
    _error(http.get("/v1/nothing-here"), 404)
    _error(http.get("/v1/completions"), 405)


def test_server_still_serves_after_bad_requests(client: openai.OpenAI, llm: LLM) -> None:
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices
    assert _wait_until(lambda: _engine_idle(llm))


# ----------------------------------------------------------------------------- run_server


def test_run_server_logs_plan_and_binds_loopback(llm: LLM, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    configs: list[uvicorn.Config] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: configs.append(
        self.config))
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("uvicorn.error")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # setLevel, not assignment: it clears the logger's level cache
    try:
        run_server(llm, port=8123, served_model_name="served")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert configs[0].host == "127.0.0.1" and configs[0].port == 8123
    text = "\n".join(r.getMessage() for r in records)
    assert "http://127.0.0.1:8123/v1" in text and "'served'" in text
    assert llm.kv_cache_plan.describe() in text and "weights:" in text


def test_default_model_name(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--Qwen--Qwen3-Coder-30B-A3B-Instruct" / "snapshots" / "abc123"
    assert default_model_name(snapshot) == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert default_model_name(tmp_path / "my-model") == "my-model"
