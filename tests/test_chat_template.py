"""Chat template: exact prompts for the Qwen3-Coder template, agreement with transformers'
`apply_chat_template`, and the input checks that replace cryptic template errors."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_pio import tokenizer as tokmod
from inference_pio.chat_template import (
    ChatTemplateError,
    default_chat_template,
    render_chat_template,
    select_chat_template,
)
from inference_pio.tokenizer import Tokenizer, write_tokenizer_files

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city. ",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer", "minimum": 1},
                "units": {"type": "string", "enum": ["°C", "°F"]},
            },
            "required": ["city"],
        },
    },
}
CALL_ARGS = {"city": "Zürich", "days": 3, "opts": {"lang": "日本語", "tags": ["a", "b"]}}
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "plain": ([{"role": "user", "content": "Write hello world in Rust."}], None),
    "system": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3? 🙂"},
        ],
        None,
    ),
    "tools": ([{"role": "user", "content": "Weather in Zürich?"}], [WEATHER_TOOL]),
    "tool_round_trip": (
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Zürich and Paris?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": CALL_ARGS},
                    },
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                ],
            },
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "tool", "content": "sunny\n12°C"},
            {"role": "assistant", "content": "Zürich 3°, Paris 12°."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER_TOOL],
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFERENCE_PIO_CACHE", str(tmp_path_factory.mktemp("tok_cache")))
        if tokmod.build_qwen_tokenizer.cache_info().currsize == 0:
            tokmod.build_qwen_tokenizer()  # fill the in-process cache from the tmp dir
        out = tmp_path_factory.mktemp("chat_model")
        write_tokenizer_files(out)
        yield out


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def as_json_strings(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The OpenAI wire form: tool-call arguments as JSON strings."""
    out = copy.deepcopy(messages)
    for message in out:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


def test_plain_chat_has_no_default_system_prompt(tok: Tokenizer) -> None:
    messages, _ = CONVERSATIONS["plain"]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>user\nWrite hello world in Rust.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nWrite hello world in Rust.<|im_end|>\n"
    )


def test_system_prompt(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CONVERSATIONS["system"][0])
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?")
    assert "<|im_start|>assistant\n4<|im_end|>\n" in prompt


def test_tools_bring_the_default_system_prompt(tok: Tokenizer) -> None:
    messages, tools = CONVERSATIONS["tools"]
    prompt = tok.apply_chat_template(messages, tools=tools)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, a helpful AI assistant")
    assert (
        "<function>\n<name>get_weather</name>\n<description>Weather for a city.</description>"
        in (prompt)
    )
    assert '<enum>["°C", "°F"]</enum>' in prompt  # tojson keeps non-ASCII, like transformers


def test_tool_calls_with_json_string_arguments(tok: Tokenizer) -> None:
    messages, tools = CONVERSATIONS["tool_round_trip"]
    wire = as_json_strings(messages)
    before = copy.deepcopy(wire)
    prompt = tok.apply_chat_template(wire, tools=tools)
    assert wire == before  # the caller's messages are not edited
    assert prompt == tok.apply_chat_template(messages, tools=tools)
    assert (
        "<|im_start|>assistant\nChecking both.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nZürich\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
        '<parameter=opts>\n{"lang": "日本語", "tags": ["a", "b"]}\n</parameter>\n'
        "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
    ) in prompt


def test_consecutive_tool_results_merge_into_one_user_turn(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CONVERSATIONS["tool_round_trip"][0])
    assert (
        '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 3}\n'
        "</tool_response>\n<tool_response>\nsunny\n12°C\n</tool_response>\n<|im_end|>\n"
        "<|im_start|>assistant\nZürich"
    ) in prompt


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(
    tok: Tokenizer, hf: Any, case: str, add_generation_prompt: bool
) -> None:
    messages, tools = CONVERSATIONS[case]
    expected = hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = tok.apply_chat_template(
        as_json_strings(messages), tools=tools, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert tok.encode(ours) == hf.encode(expected)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "messages is empty"),
        ("hi", "must be a list of dicts"),
        ([{"content": "hi"}], r"messages\[0\] has no role"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "content must be a str"),
        ([{"role": "user"}], "content must be a string, got NoneType"),
        ([{"role": "assistant", "content": None}], "or give tool_calls"),
        ([{"role": "user", "content": "x", "meta": {1, 2}}], "set, which is not JSON"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            r"tool_calls\[0\] arguments are not valid JSON",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            "must be a JSON object",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "has no function name"),
        ([{"role": "assistant", "tool_calls": {"name": "f"}}], "tool_calls must be a list"),
    ],
)
def test_bad_messages_are_named(tok: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages)


def test_assistant_tool_call_without_content(tok: Tokenizer) -> None:
    call = {"function": {"name": "ls", "arguments": ""}}
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "list"}, {"role": "assistant", "tool_calls": [call]}]
    )
    assert "<|im_start|>assistant\n<tool_call>\n<function=ls>\n</function>\n</tool_call>" in prompt


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        (WEATHER_TOOL, "must be a list of tool schemas"),
        (["get_weather"], r"tools\[0\] must be a dict"),
        ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\] has no function"),
    ],
)
def test_bad_tools_are_named(tok: Tokenizer, tools: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)


def test_template_errors_are_wrapped() -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="only user turns"):
        render_chat_template("{{ raise_exception('only user turns') }}", user)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat_template("{% for %}", user)
    with pytest.raises(ChatTemplateError, match="failed to render"):  # the sandbox holds
        render_chat_template("{{ messages.append(1) }}", user)


def test_extra_variables_reach_the_template(tok: Tokenizer) -> None:
    template = "{{ eos_token }}|{{ flavour }}|{{ messages | length }}|{{ {'k': 'ü'} | tojson }}"
    rendered = render_chat_template(template, [{"role": "user", "content": "x"}], flavour="dry")
    assert rendered == '|dry|1|{"k": "ü"}'
    assert (
        Tokenizer(tok.backend, chat_template=template)
        .apply_chat_template([{"role": "user", "content": "x"}], flavour="wet")
        .startswith("<|im_end|>|wet|")
    )


def test_select_chat_template() -> None:
    assert select_chat_template(None) is None
    assert select_chat_template("T") == "T"
    assert select_chat_template([{"name": "default", "template": "D"}]) == "D"
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        select_chat_template([{"name": "tool_use", "template": "X"}])
    assert default_chat_template().startswith("{% macro render_extra_keys")
