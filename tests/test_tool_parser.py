"""Qwen3-Coder tool-call parsing: the full parse, and the stream's equivalence to it."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_pio.models.qwen3_coder_30b.tool_parser import (
    ContentDelta,
    ParsedOutput,
    StreamEvent,
    StreamingToolParser,
    ToolCall,
    ToolCallArgumentsDelta,
    ToolCallStart,
    parse_tool_calls,
)


def _function(name: str, **props: Any) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": "d",
        "parameters": {"type": "object", "properties": props}}}


TOOLS = [
    _function("write_file", path={"type": "string"}, content={"type": "string"}),
    _function("get_weather", city={"type": "string"}, days={"type": "integer"},
              metric={"type": "boolean"}),
    _function(
        "typed",
        i={"type": "integer"}, n={"type": "number"}, b={"type": "boolean"},
        z={"type": "null"}, o={"type": "object"}, a={"type": "array"}, s={"type": "string"},
        ls={"type": ["string", "null"]}, li={"type": ["null", "integer"]},
        any_n={"anyOf": [{"type": "null"}, {"type": "number"}]},
        one_o={"oneOf": [{"type": "object", "properties": {}}, {"type": "null"}]},
        odd={"type": "custom"}, en={"enum": ["1", "2"]}, untyped={"description": "x"},
    ),
]


def call_block(name: str, **params: str) -> str:
    """A block exactly as the chat template renders one."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def parse_args(text: str, tools: list[dict[str, Any]] | None = TOOLS) -> list[dict[str, Any]]:
    return [call.arguments for call in parse_tool_calls(text, tools).tool_calls]


# ----------------------------------------------------------------------------- full parse


def test_content_then_one_call() -> None:
    text = "I'll check the weather.\n\n" + call_block("get_weather", city="Paris", days="3")
    out = parse_tool_calls(text, TOOLS)
    assert out.content == "I'll check the weather."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3})]
    assert out.errors == []


def test_multi_line_value_loses_exactly_one_newline_each_side() -> None:
    code = "\ndef f():\n    return 1\n\n"
    out = parse_tool_calls(call_block("write_file", path="a.py", content=code), TOOLS)
    assert out.tool_calls[0].arguments == {"path": "a.py", "content": code}
    assert out.content is None


def test_several_calls_in_order() -> None:
    text = "\n".join(call_block("get_weather", city=city) for city in ("A", "B", "C"))
    out = parse_tool_calls(text, TOOLS)
    assert [c.arguments["city"] for c in out.tool_calls] == ["A", "B", "C"]
    assert len({c.id for c in out.tool_calls}) == 3


def test_call_ids_and_openai_form() -> None:
    call = parse_tool_calls(call_block("get_weather", city="Zürich", days="2"), TOOLS).tool_calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert call.arguments_json == '{"city": "Zürich", "days": 2}'
    assert call.to_openai() == {"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Zürich", "days": 2}'}}


@pytest.mark.parametrize("text, expected", [
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n",
     {"city": "Rome"}),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n",
     {"city": "Rome"}),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n", {"city": "Rome"}),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</param", {"city": "Rome"}),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRo", {"city": "Ro"}),
    ("<tool_call>\n<function=get_weather>\n<parameter=ci", {}),
    ("<tool_call>\n<function=get_weather>", {}),
])
def test_unterminated_final_call_counts_as_far_as_it_goes(text: str,
                                                          expected: dict[str, Any]) -> None:
    out = parse_tool_calls("Sure.\n" + text, TOOLS)
    assert out.content == "Sure."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", expected)]


def test_missing_opening_tag_is_accepted() -> None:
    text = "Writing it.\n<function=write_file>\n<parameter=path>\nx.txt\n</parameter>\n</function>"
    out = parse_tool_calls(text, TOOLS)
    assert out.content == "Writing it."
    assert out.tool_calls[0].arguments == {"path": "x.txt"}


def test_forgotten_close_tags() -> None:
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n<parameter=days>\n4\n"
            "</function>\n<tool_call>\n<function=write_file>\n<parameter=path>\np\n</parameter>\n"
            "</tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n")
    assert parse_args(text) == [{"city": "Oslo", "days": 4}, {"path": "p"}, {"city": "Lima"}]


def test_value_may_contain_other_tags() -> None:
    value = "x = '<tool_call>' + '<function=f>'\n</tool_call>"
    assert parse_args(call_block("write_file", content=value)) == [{"content": value}]


@pytest.mark.parametrize("name, raw, expected", [
    ("i", "42", 42), ("i", " -7 ", -7), ("i", "3.0", 3), ("i", "1e3", 1000), ("i", "null", None),
    ("n", "42", 42), ("n", "2.5", 2.5), ("n", "-1e-3", -0.001),
    ("b", "true", True), ("b", "False", False), ("b", "TRUE", True),
    ("z", "null", None), ("z", "", None),
    ("o", '{"a": [1, 2], "b": null}', {"a": [1, 2], "b": None}),
    ("o", "{'a': True, 'b': (1, 2)}", {"a": True, "b": [1, 2]}),
    ("a", "[1, \"x\", {\"y\": false}]", [1, "x", {"y": False}]),
    ("a", "['x', None]", ["x", None]),
    ("s", "123", "123"), ("s", "null", "null"), ("s", " padded ", " padded "),
    ("ls", "null", "null"), ("ls", "[1]", "[1]"), ("li", "5", 5), ("li", "null", None),
    ("any_n", "1.5", 1.5), ("one_o", '{"k": 1}', {"k": 1}),
    ("odd", '{"k": 1}', {"k": 1}), ("odd", "plain words", "plain words"),
    ("en", "1", "1"), ("untyped", "7", 7), ("untyped", "seven", "seven"),
    ("unknown_param", "[true]", [True]), ("unknown_param", "x", "x"),
])
def test_schema_conversion(name: str, raw: str, expected: Any) -> None:
    out = parse_tool_calls(call_block("typed", **{name: raw}), TOOLS)
    value = out.tool_calls[0].arguments[name]
    assert value == expected and type(value) is type(expected)
    assert out.errors == []


@pytest.mark.parametrize("name, raw", [
    ("i", "abc"), ("i", "2.5"), ("n", "1e400"), ("n", "NaN"), ("b", "yes"), ("z", "zero"),
    ("o", "{not json"), ("a", "[1, {2}]"), ("a", "[NaN]"),
])
def test_unconvertible_value_stays_a_string_with_an_error(name: str, raw: str) -> None:
    out = parse_tool_calls(call_block("typed", **{name: raw}), TOOLS)
    assert out.tool_calls[0].arguments == {name: raw}
    assert len(out.errors) == 1 and repr(name) in out.errors[0]


def test_bare_function_specs_are_accepted() -> None:
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}}
    tools = [{"name": "f", "parameters": schema},
             "not a tool", {"type": "function"}]
    out = parse_tool_calls(call_block("f", k="9"), tools)  # type: ignore[arg-type]
    assert out.tool_calls[0].arguments == {"k": 9} and out.errors == []


def test_without_tools_json_values_are_decoded() -> None:
    out = parse_tool_calls(call_block("f", a="1", b="x y", c='{"d": 1}', e="true"), None)
    assert out.tool_calls[0].arguments == {"a": 1, "b": "x y", "c": {"d": 1}, "e": True}
    assert out.errors == []


def test_unknown_tool_is_returned_and_reported() -> None:
    out = parse_tool_calls(call_block("rm_rf", path="/"), TOOLS)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("rm_rf", {"path": "/"})]
    assert out.errors == ["call to unknown tool 'rm_rf'"]
    assert parse_tool_calls(call_block("rm_rf"), []).errors == ["call to unknown tool 'rm_rf'"]


def test_duplicate_parameter_last_wins() -> None:
    assert parse_args(call_block("get_weather", city="A") .replace(
        "</function>", "<parameter=city>\nB\n</parameter>\n</function>")) == [{"city": "B"}]


@pytest.mark.parametrize("text", [
    'Let me call it.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
    "Use the <function= tag like this:\n<function=\nget_weather>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    "Cut off: <tool_call>\n<function=get_wea",
    "<tool_call>",
])
def test_malformed_call_stays_content(text: str) -> None:
    out = parse_tool_calls(text, TOOLS)
    assert out == ParsedOutput(text, [], out.errors)
    assert out.errors and all("content" in error for error in out.errors)


def test_malformed_attempt_then_valid_call() -> None:
    bad = "Try <tool_call> then\n"
    out = parse_tool_calls(bad + call_block("get_weather", city="X"), TOOLS)
    assert out.content == bad.rstrip()
    assert [c.arguments for c in out.tool_calls] == [{"city": "X"}]
    assert len(out.errors) == 1


@pytest.mark.parametrize("text, content", [
    ("", None), ("Plain answer.\n", "Plain answer.\n"), ("  \n", "  \n"),
    ("\n\n" + call_block("get_weather"), None), ("a <b> c\n" + call_block("x"), "a <b> c"),
])
def test_content_rules(text: str, content: str | None) -> None:
    assert parse_tool_calls(text, TOOLS).content == content


# ----------------------------------------------------------------------------- streaming


def run_stream(chunks: list[str], tools: list[dict[str, Any]] | None = TOOLS,
               ) -> list[StreamEvent]:
    parser = StreamingToolParser(tools)
    events: list[StreamEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    return events


def check_events(events: list[StreamEvent], expected: ParsedOutput) -> None:
    """The stream says what the full parse says, in a well-formed order."""
    content: list[str] = []
    names: list[str] = []
    args: list[str] = []
    for event in events:
        if isinstance(event, ContentDelta):
            assert not names, "content after a tool call"
            assert event.text
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            assert event.index == len(names) and re.fullmatch(r"call_[0-9a-f]{24}", event.id)
            names.append(event.name)
            args.append("")
        else:
            assert isinstance(event, ToolCallArgumentsDelta) and event.index == len(names) - 1
            args[event.index] += event.text
    assert "".join(content) == (expected.content or "")
    assert names == [call.name for call in expected.tool_calls]
    assert [json.loads(a) for a in args] == [call.arguments for call in expected.tool_calls]


def chunks_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


SAMPLES = [
    "Plain answer with a < and a <tool and <func, no call.\n\n",
    "I'll look.\n\n" + call_block("get_weather", city="Paris", days="3", metric="true")
    + "\n" + call_block("write_file", path="a.py", content="\nx = 1\n\n"),
    "ok <function=get_weather>\n<parameter=city>\nRome\n<parameter=days>\n2</function>junk",
    ("<tool_call>\n{\"name\": 1}\n</tool_call>\nthen <tool_call>\n<function=typed>\n"
     "<parameter=o>\n{'a': (1,)}\n</parameter>\n<parameter=i>\nnope\n</parameter>\n</function>"),
    "bad <function=\nx> tail <tool_call>\n<function=get_weather>\n<parameter=city>\nLi\n</para",
    "<function=get_weather><parameter=a b>1</parameter><parameter=\n>2</parameter>",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_equivalence_exhaustive_splits(text: str) -> None:
    expected = parse_tool_calls(text, TOOLS)
    check_events(run_stream(list(text)), expected)
    for cut in range(len(text) + 1):
        check_events(run_stream(chunks_at(text, [cut])), expected)
    step = max(1, len(text) // 40)
    for first in range(0, len(text), step):
        for second in range(first, len(text), step):
            check_events(run_stream(chunks_at(text, [first, second])), expected)


def test_stream_holds_back_tag_prefixes_and_whitespace() -> None:
    parser = StreamingToolParser(TOOLS)
    assert parser.feed("Hi.\n<tool") == [ContentDelta("Hi.")]
    assert parser.feed("_call>\n<function=get_") == []
    start = parser.feed("weather>\n")
    assert len(start) == 1 and isinstance(start[0], ToolCallStart)
    assert start[0].name == "get_weather"
    assert parser.feed("<parameter=city>\nPar") == []
    assert parser.feed("is\n</parameter>\n") == [ToolCallArgumentsDelta(0, '{"city": "Paris"')]
    assert parser.feed("</function>") == [ToolCallArgumentsDelta(0, "}")]
    assert parser.finish() == []
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_stream_result_carries_the_streamed_ids() -> None:
    parser = StreamingToolParser(TOOLS)
    events = parser.feed(call_block("get_weather", city="A") + call_block("write_file"))
    ids = [e.id for e in events if isinstance(e, ToolCallStart)]
    assert [call.id for call in parser.result().tool_calls] == ids
    assert parser.text.startswith("<tool_call>")


def test_openai_delta_shapes() -> None:
    assert ContentDelta("hi").to_openai_delta() == {"content": "hi"}
    assert ToolCallStart(0, "call_1", "f").to_openai_delta() == {"tool_calls": [{
        "index": 0, "id": "call_1", "type": "function",
        "function": {"name": "f", "arguments": ""}}]}
    assert ToolCallArgumentsDelta(1, "{").to_openai_delta() == {
        "tool_calls": [{"index": 1, "function": {"arguments": "{"}}]}


def test_long_value_streams_without_rescanning() -> None:
    # 200k one-character deltas inside one value: quadratic rescans would take minutes.
    parser = StreamingToolParser(TOOLS)
    code = "x = 1  # comment\n" * 12_000
    parser.feed("<tool_call>\n<function=write_file>\n<parameter=content>\n")
    assert all(parser.feed(ch) == [] for ch in code)
    events = parser.feed("\n</parameter>\n</function>\n</tool_call>") + parser.finish()
    assert all(isinstance(e, ToolCallArgumentsDelta) for e in events)
    arguments = "".join(e.text for e in events if isinstance(e, ToolCallArgumentsDelta))
    assert json.loads(arguments) == {"content": code}


def test_tool_call_dataclass_roundtrip() -> None:
    call = ToolCall("call_x", "f", {"a": [1, "é"]})
    assert json.loads(call.arguments_json) == call.arguments and "é" in call.arguments_json


# ----------------------------------------------------------------------------- fuzz

_PIECES = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=",
           "</parameter>", "<tool_", "</param", ">", "<", "=", "\n", " ", "\n\n",
           "get_weather", "typed", "city", "days", "i", "o", "a", "ls", "x", "1", "2.5", "true",
           "null", "[1, 2]", '{"k": 1}', "{'k': (1,)}", '"', "é", "\t"]


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(_PIECES), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       with_tools=st.booleans())
def test_stream_equivalence_fuzz(pieces: list[str], cuts: list[int], with_tools: bool) -> None:
    text = "".join(pieces)
    tools = TOOLS if with_tools else None
    expected = parse_tool_calls(text, tools)
    check_events(run_stream(chunks_at(text, [c % (len(text) + 1) for c in cuts]), tools),
                 expected)


@settings(max_examples=150, deadline=2000)
@given(text=st.text(max_size=80), cuts=st.lists(st.integers(0, 80), max_size=6))
def test_arbitrary_text_never_raises(text: str, cuts: list[int]) -> None:
    expected = parse_tool_calls(text, TOOLS)
    check_events(run_stream(chunks_at(text, [c % (len(text) + 1) for c in cuts])), expected)
