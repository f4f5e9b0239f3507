"""Tool calls through the HTTP server, with a scripted fake engine that replays given model
output as token deltas: streaming and non-streaming must give the same `tool_calls`, and the
expected ones. Also shared with test_server_fuzz.py: `FakeClient` and `serve`."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from inference_pio.engine.llm_engine import RequestError
from inference_pio.engine.outputs import CompletionOutput, RequestOutput
from inference_pio.sampling_params import SamplingParams
from inference_pio.server import EngineStats, build_app
from inference_pio.tokenizer import Tokenizer

MODEL = "fake-coder"


class FakeClient:
    """An `EngineClient` whose model "writes" `script`, cut into pieces of `chunk_sizes`
    characters (cycled), one output per piece. Records the last prompt and params."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int = 2048) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.script = "Hello!"
        self.chunk_sizes: tuple[int, ...] = (3,)
        self.last_prompt: list[int] = []
        self.last_params: SamplingParams | None = None
        self.aborted: list[str] = []
        self.max_num_seqs = 16  # requests "running" at once (the server queues more)
        self.ready = True  # loaded: /health is 200

    def generate(self, prompt: list[int], params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]:
        return self._generate(list(prompt), params, request_id)

    def _pieces(self) -> list[str]:
        pieces, pos = [], 0
        while pos < len(self.script):
            size = self.chunk_sizes[len(pieces) % len(self.chunk_sizes)]
            pieces.append(self.script[pos:pos + size])
            pos += size
        return pieces or [""]

    async def _generate(self, prompt: list[int], params: SamplingParams, request_id: str
                        ) -> AsyncIterator[RequestOutput]:
        if not prompt or len(prompt) + (params.max_tokens or 0) > self.max_model_len:
            raise RequestError("the prompt is too long for max_model_len")
        self.last_prompt, self.last_params = prompt, params
        pieces = self._pieces()
        ids: list[int] = []
        for number, piece in enumerate(pieces):
            await asyncio.sleep(0)
            new_ids = self.tokenizer.encode(piece) if piece else []
            ids += new_ids
            last = number == len(pieces) - 1
            logprobs = [{t: -1.0} for t in ids] if params.logprobs is not None else None
            comp = CompletionOutput(0, "".join(pieces[:number + 1]), list(ids),
                                    "stop" if last else None, logprobs=logprobs)
            yield RequestOutput(request_id, None, prompt, [comp], last, None, piece, new_ids)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams(**overrides)

    def stats(self) -> EngineStats:
        return EngineStats(num_total_blocks=8)

    def shutdown(self) -> None:
        pass


@contextmanager
def serve(app: FastAPI, **config: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free loopback port in a thread (`config`: more
    uvicorn.Config options); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def openai_client(base_url: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60,
                         http_client=httpx.Client(trust_env=False))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def fake(tokenizer: Tokenizer) -> FakeClient:
    return FakeClient(tokenizer)


@pytest.fixture(scope="module")
def base_url(fake: FakeClient) -> Iterator[str]:
    with serve(build_app(fake, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url)


def _tool(name: str, **props: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": f"the {name} tool",
        "parameters": {"type": "object",
                       "properties": {p: {"type": t} for p, t in props.items()}}}}


TOOLS = [
    _tool("get_weather", city="string", days="integer"),
    _tool("write_file", path="string", content="string"),
    _tool("configure", count="integer", ratio="number", flag="boolean", opts="object",
          items="array", note="string", nothing="null"),
]
MESSAGES = [{"role": "user", "content": "help"}]


def _call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CASES: dict[str, tuple[str, str | None, list[tuple[str, dict[str, Any]]]]] = {
    "single": ("Let me check.\n" + _call("get_weather", city="Paris", days="3"),
               "Let me check.", [("get_weather", {"city": "Paris", "days": 3})]),
    "multi_line_value": (
        _call("write_file", path="a.py", content="def f():\n    return 1\n\n# end"),
        None, [("write_file", {"path": "a.py", "content": "def f():\n    return 1\n\n# end"})]),
    "several_calls": (
        _call("get_weather", city="Oslo", days="1") + "\n" + _call("get_weather", city="Rome"),
        None, [("get_weather", {"city": "Oslo", "days": 1}), ("get_weather", {"city": "Rome"})]),
    "unterminated_final_call": (
        _call("get_weather", city="Oslo") + "\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nLima", None,
        [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Lima"})]),
    "missing_opening_tag": (
        "Sure.\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
        "Sure.", [("get_weather", {"city": "Paris"})]),
    "schema_conversions": (
        _call("configure", count="7", ratio="0.25", flag="true", opts='{"a": [1, 2]}',
              items="[1, \"x\"]", note="007", nothing="null"), None,
        [("configure", {"count": 7, "ratio": 0.25, "flag": True, "opts": {"a": [1, 2]},
                        "items": [1, "x"], "note": "007", "nothing": None})]),
    "no_call": ("Just text, <b>no</b> calls.", "Just text, <b>no</b> calls.", []),
}


def _chat(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str | None, list[Any],
                                                                      str | None]:
    """(content, [(name, arguments)], finish_reason), streamed or not."""
    args: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments))
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, names, arguments, finish = "", {}, {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                arguments[call.index] = (arguments.get(call.index, "")
                                         + ((call.function and call.function.arguments) or ""))
            finish = choice.finish_reason or finish
    calls = [(names[i], json.loads(arguments[i])) for i in sorted(names)]
    return content or None, calls, finish


@pytest.mark.parametrize("case", sorted(CASES))
def test_tool_calls_same_streamed_or_not(client: openai.OpenAI, fake: FakeClient,
                                         case: str) -> None:
    script, content, calls = CASES[case]
    fake.script = script
    for sizes in [(1,), (2, 7, 3), (len(script),)]:
        fake.chunk_sizes = sizes
        for stream in (False, True):
            got = _chat(client, stream)
            assert got == (content, calls, "tool_calls" if calls else "stop"), (sizes, stream)


def test_call_ids_are_openai_shaped(client: openai.OpenAI, fake: FakeClient) -> None:
    fake.script, fake.chunk_sizes = CASES["several_calls"][0], (5,)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    ids = [call.id for call in response.choices[0].message.tool_calls or []]
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_keeps_only_that_function(client: openai.OpenAI, fake: FakeClient,
                                                    stream: bool) -> None:
    fake.script = _call("get_weather", city="Oslo") + _call("write_file", path="x", content="y")
    fake.chunk_sizes = (4,)
    choice = {"type": "function", "function": {"name": "write_file"}}
    got = _chat(client, stream, tool_choice=choice)
    assert got == (None, [("write_file", {"path": "x", "content": "y"})], "tool_calls")
    prompt = fake.tokenizer.decode(fake.last_prompt)
    assert "write_file" in prompt and "get_weather" not in prompt  # only the named tool shown


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_first(client: openai.OpenAI, fake: FakeClient,
                                               stream: bool) -> None:
    fake.script, fake.chunk_sizes = CASES["several_calls"][0], (6,)
    got = _chat(client, stream, parallel_tool_calls=False)
    assert got == (None, [("get_weather", {"city": "Oslo", "days": 1})], "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_parses_nothing(client: openai.OpenAI, fake: FakeClient,
                                         stream: bool) -> None:
    fake.script, fake.chunk_sizes = CASES["single"][0], (5,)
    got = _chat(client, stream, tool_choice="none")
    assert got == (CASES["single"][0], [], "stop")
    assert "get_weather" not in fake.tokenizer.decode(fake.last_prompt)


def _parse_failures(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", trust_env=False).text
    match = re.search(r"^pio_tool_call_parse_failures_total ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_malformed_call_stays_content_and_counts(client: openai.OpenAI, fake: FakeClient,
                                                 base_url: str) -> None:
    script = "I will call <tool_call>\n<function=>\n</tool_call> now."
    fake.script, fake.chunk_sizes = script, (2, 5)
    before = _parse_failures(base_url)
    for stream in (False, True):
        assert _chat(client, stream) == (script, [], "stop")
    assert _parse_failures(base_url) == before + 2


def test_assistant_tool_calls_and_tool_results_render(client: openai.OpenAI,
                                                      fake: FakeClient) -> None:
    fake.script, fake.chunk_sizes = "It is sunny.", (4,)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert response.choices[0].message.content == "It is sunny."
    prompt = fake.tokenizer.decode(fake.last_prompt)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt


def test_bad_tool_requests_are_400(client: openai.OpenAI) -> None:
    bad = [
        {"tools": [{"type": "function", "function": {"parameters": {}}}]},  # no name
        {"tools": [_tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": [1]}}}]},
        {"tool_choice": "required"},  # without tools
        {"tools": [_tool("f")], "messages": [{"role": "assistant", "content": None,
                                              "tool_calls": [{"type": "function", "function": {
                                                  "name": "f", "arguments": "{not json"}}]}]},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, **extra})
        assert info.value.body and info.value.body.get("message"), extra  # type: ignore
