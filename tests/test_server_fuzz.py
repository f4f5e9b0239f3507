"""Fuzzing the server with random JSON bodies (hypothesis) over the scripted fake engine: no
body may get a 5xx or hang; streamed and non-streamed tool-call parsing agree on random
tag soup."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_server_tools import MODEL, TOOLS, FakeClient

from inference_pio.server import build_app
from inference_pio.tokenizer import Tokenizer

EXAMPLE_TIME_LIMIT_S = 20
FUZZ = settings(max_examples=80, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fake() -> FakeClient:
    return FakeClient(Tokenizer.from_pretrained(None), max_model_len=1024)


@pytest.fixture(scope="module")
def http(fake: FakeClient) -> Iterator[TestClient]:
    app = build_app(fake, model_name=MODEL, max_body_bytes=64 * 1024)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when an example takes longer than `seconds`."""
    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"request did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- strategies

leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any],
           one_in: int = 10) -> st.SearchStrategy[Any]:
    """`common`, but `rare` about once in `one_in` draws (one_of would pick each half the
    time, and a body with a dozen fields would then almost never be valid)."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: rare if i == 0 else common)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-typed value, sometimes any JSON at all."""
    return mostly(strategy, json_value)


small_int = mostly(st.integers(1, 40), st.integers(-3, 0) | st.integers(-(2**70), 2**70))
number = mostly(st.floats(0.01, 1), st.floats(-3, 3) | small_int)
text = st.text(max_size=40)


SAMPLING = {
    "model": maybe(st.just(MODEL)), "max_tokens": maybe(small_int),
    "temperature": maybe(number), "top_p": maybe(number), "top_k": maybe(small_int),
    "min_p": maybe(number), "presence_penalty": maybe(number), "repetition_penalty": maybe(number),
    "seed": maybe(small_int), "n": maybe(st.integers(-1, 20)), "stream": maybe(st.booleans()),
    "stop": maybe(text | st.lists(text, max_size=3)), "min_tokens": maybe(small_int),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop_token_ids": maybe(st.lists(small_int, max_size=3)), "ignore_eos": maybe(st.booleans()),
}
token_ids = st.lists(st.integers(-3, 200_000), max_size=6)
COMPLETION = st.fixed_dictionaries({"prompt": maybe(
    text | st.lists(text, max_size=3) | token_ids | st.lists(token_ids, max_size=3))},
    optional={**SAMPLING, "suffix": maybe(text), "logprobs": maybe(small_int),
              "echo": maybe(st.booleans()), "best_of": maybe(small_int)})
tool_call = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text}, optional={"arguments": maybe(st.just('{"city": "x"}') | text)})})
message = st.fixed_dictionaries({
    "role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
    "content": maybe(text | st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": text}), max_size=2))},
    optional={"tool_calls": maybe(st.lists(tool_call, max_size=2)), "tool_call_id": maybe(text)})
schema = st.fixed_dictionaries({"type": maybe(st.just("object"))}, optional={
    "properties": maybe(st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "object", "bogus"])}),
        max_size=3))})
tool = st.fixed_dictionaries({"type": maybe(st.just("function")), "function": maybe(
    st.fixed_dictionaries({"name": text}, optional={"parameters": maybe(schema)}))})
named_choice = st.fixed_dictionaries({"type": st.just("function"),
                                      "function": st.fixed_dictionaries({"name": text})})
CHAT = st.fixed_dictionaries({"messages": maybe(st.lists(message, min_size=1, max_size=3))}, optional={
    **SAMPLING, "tools": maybe(st.just(TOOLS) | st.lists(tool, max_size=2)),
    "tool_choice": maybe(st.sampled_from(["none", "auto", "required"]) | named_choice),
    "logprobs": maybe(st.booleans()), "top_logprobs": maybe(small_int),
    "parallel_tool_calls": maybe(st.booleans()), "max_completion_tokens": maybe(small_int),
    "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object"])}))})
INFILL = st.fixed_dictionaries({}, optional={
    "input_prefix": maybe(text), "input_suffix": maybe(text), "prompt": maybe(text),
    "input_extra": maybe(st.lists(st.fixed_dictionaries(
        {"filename": maybe(text), "text": maybe(text)}), max_size=2)),
    "n_predict": maybe(small_int), "temperature": maybe(number), "stream": maybe(st.booleans()),
    "repo_name": maybe(text), "filename": maybe(text), "stop": maybe(st.lists(text, max_size=2))})
TOKENS = st.fixed_dictionaries({}, optional={"content": maybe(text), "prompt": maybe(text),
                                             "tokens": maybe(token_ids)})
BODIES = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/infill": INFILL,
          "/tokenize": TOKENS, "/detokenize": TOKENS}
requests = st.sampled_from(sorted(BODIES)).flatmap(lambda p: st.tuples(st.just(p), BODIES[p]))
TAGS = ["<tool_call>", "</tool_call>", "<function=get_weather>", "<function=write_file>",
        "<function=", "</function>", "<parameter=city>", "<parameter=days>", "</parameter>",
        "\n", "Paris", "3", " ", "x", "<", ">", "=", "{", "\""]
scripts = st.lists(st.sampled_from(TAGS), max_size=24).map("".join)
chunkings = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


# ----------------------------------------------------------------------------- tests


def _post(http: TestClient, path: str, body: bytes) -> tuple[int, str]:
    with time_limit(EXAMPLE_TIME_LIMIT_S):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    return response.status_code, response.text


@FUZZ
@given(request=requests, script=scripts, sizes=chunkings)
def test_random_requests_never_fail_the_server(http: TestClient, fake: FakeClient,
                                               request: tuple[str, Any], script: str,
                                               sizes: tuple[int, ...]) -> None:
    fake.script, fake.chunk_sizes = script, sizes
    path, body = request
    status, answer = _post(http, path, json.dumps(body).encode())
    event(f"{path} -> {status}")
    assert status < 500, answer
    if status >= 400:
        assert json.loads(answer)["error"]["message"]
    elif answer.startswith("data: ") and path.startswith("/v1/"):
        assert answer.rstrip().endswith("data: [DONE]"), answer


@FUZZ
@given(path=st.sampled_from(sorted(BODIES)),
       raw=st.binary(max_size=64) | json_value.map(lambda v: json.dumps(v).encode()))
def test_random_bytes_get_a_clean_error(http: TestClient, path: str, raw: bytes) -> None:
    status, answer = _post(http, path, raw)
    assert status < 500, answer


def _sse_payloads(text: str) -> list[dict[str, Any]]:
    lines = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def _streamed(http: TestClient, body: dict[str, Any]) -> tuple[str | None, list[Any], str]:
    status, text = _post(http, "/v1/chat/completions", json.dumps({**body, "stream": True})
                         .encode())
    assert status == 200, text
    content, names, arguments, finish = "", {}, {}, ""
    for payload in _sse_payloads(text):
        for choice in payload["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                names.setdefault(call["index"], call["function"].get("name"))
                arguments[call["index"]] = (arguments.get(call["index"], "")
                                            + call["function"].get("arguments", ""))
            finish = choice["finish_reason"] or finish
    calls = [(names[i], json.loads(arguments[i])) for i in sorted(names)]
    return content or None, calls, finish


@FUZZ
@given(script=scripts, sizes=chunkings)
def test_tag_soup_parses_the_same_streamed_or_not(http: TestClient, fake: FakeClient,
                                                  script: str, sizes: tuple[int, ...]) -> None:
    fake.script, fake.chunk_sizes = script, sizes
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "tools": TOOLS}
    status, text = _post(http, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in choice["message"].get("tool_calls") or []]
    content = choice["message"]["content"] or None
    assert _streamed(http, body) == (content, calls, choice["finish_reason"])
