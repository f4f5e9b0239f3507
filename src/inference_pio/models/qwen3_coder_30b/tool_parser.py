"""Qwen3-Coder tool calls: parse the XML call blocks the model writes (pure Python, no torch).

The chat template teaches the model this format, one block per call (several for parallel
calls), after optional reasoning text and before `<|im_end|>`:

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE (may span lines)
    </parameter>
    </function>
    </tool_call>

Rules (model.md, and vLLM's `qwen3_coder` parser, which clients already rely on):
- content is the text before the first call, trailing whitespace removed, None when empty
  (without a call: the whole text, unchanged); text between and after calls is dropped;
- a bare `<function=NAME>` without `<tool_call>` also starts a call (the model sometimes omits
  the opening tag); the call starts once the name's '>' is there;
- one leading and one trailing newline are stripped from each value, which is then converted
  by the JSON-schema type the tool declares for that parameter;
- a value ends at `</parameter>`, or (forgotten close tag) at the next `<parameter=` or at
  `</function>`; an unterminated block at the end of the text counts as far as it goes;
- text that looks like a call but is malformed stays content and is reported in `errors`.

One scanner serves both `parse_tool_calls` (complete text) and `StreamingToolParser` (growing
text). Each scanner decision depends only on the text before the point where it is taken, and
what a growing text cannot decide yet is reported as pending instead of guessed, so whatever the
stream emits as final is exactly what the full parse gives once the text is complete.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"


def _any_of(*tags: str) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(tag) for tag in tags))


_CALL_START_TAGS = (TOOL_CALL_START, FUNCTION_START)
_CALL_START_RE = _any_of(*_CALL_START_TAGS)
# Outside a value these end a function body. All but </function> mean the model forgot
# </function>; they are left in place so the scan for the next call sees them.
_BODY_TAG_RE = _any_of(PARAMETER_START, FUNCTION_END, FUNCTION_START, TOOL_CALL_START,
                       TOOL_CALL_END)
_VALUE_END_TAGS = (PARAMETER_END, PARAMETER_START, FUNCTION_END)
_VALUE_END_RE = _any_of(*_VALUE_END_TAGS)
_MAX_VALUE_END = max(len(tag) for tag in _VALUE_END_TAGS)
_NAME_END_RE = re.compile(r"[<>\n]")  # a tag name ends at '>'; '<' or a newline first: malformed
_SPACE_RE = re.compile(r"\s*")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# ----------------------------------------------------------------------------- public types


@dataclass
class ToolCall:
    """One parsed call; `arguments` holds values already converted by the tool's schema."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI chat-completion `tool_calls` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass
class ParsedOutput:
    """A model answer split into content and calls; `errors` explains what was not parsed."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """More assistant text (never part of a call tag)."""

    text: str

    def to_openai_delta(self) -> dict[str, Any]:
        return {"content": self.text}


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new call, announced once its name is known; its arguments follow as deltas."""

    index: int
    id: str
    name: str

    def to_openai_delta(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": ""}}]}


@dataclass(frozen=True, slots=True)
class ToolCallArgumentsDelta:
    """The next piece of call `index`'s arguments JSON; the pieces concatenate to an object."""

    index: int
    text: str

    def to_openai_delta(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.text}}]}


StreamEvent = ContentDelta | ToolCallStart | ToolCallArgumentsDelta


def new_call_id() -> str:
    """An OpenAI-style call id: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


# ----------------------------------------------------------------------------- scanner


class _Status(Enum):
    VALID = "valid"
    INVALID = "invalid"
    PENDING = "pending"  # undecided: the text ends before the answer is known


@dataclass(slots=True)
class _RawParam:
    name: str
    value: str  # newline-stripped raw text; "" while not final
    final: bool  # its end tag was seen, or the text is complete
    start: int  # offset of the value in the text


@dataclass(slots=True)
class _RawCall:
    name: str
    params: list[_RawParam]
    closed: bool  # the body ended at a tag: later text cannot change this call
    end: int  # where the scan for the next call resumes


def _read_name(text: str, pos: int, at_end: bool) -> tuple[_Status, str, int]:
    """The NAME of a `<function=NAME>` or `<parameter=NAME>` tag whose '=' ends at `pos`.

    Returns the status, the stripped name and the offset just after the '>'."""
    match = _NAME_END_RE.search(text, pos)
    if match is None:
        return (_Status.INVALID if at_end else _Status.PENDING), "", len(text)
    name = text[pos:match.start()].strip()
    if match.group() != ">" or not name:
        return _Status.INVALID, "", match.start()
    return _Status.VALID, name, match.end()


def _partial_tag_at(text: str, pos: int, tags: tuple[str, ...]) -> int | None:
    """Earliest offset >= pos from which the rest of `text` is a proper prefix of a tag."""
    for i in range(max(pos, len(text) - max(map(len, tags)) + 1), len(text)):
        tail = text[i:]
        if any(tag.startswith(tail) for tag in tags):
            return i
    return None


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE_RE.match(text, pos)
    return match.end() if match else pos  # `\s*` always matches; this keeps mypy sure of it


def _start_status(text: str, pos: int, at_end: bool) -> tuple[_Status, str | None]:
    """Whether the `<tool_call>` or `<function=` tag at `pos` starts a well-formed call.

    The second item says why not; None when a nested `<function=` tag will say it itself."""
    if text.startswith(TOOL_CALL_START, pos):
        pos = _skip_space(text, pos + len(TOOL_CALL_START))
        if not text.startswith(FUNCTION_START, pos):
            rest = text[pos:pos + len(FUNCTION_START)]
            if not at_end and len(rest) < len(FUNCTION_START) and FUNCTION_START.startswith(rest):
                return _Status.PENDING, None
            return _Status.INVALID, f"{TOOL_CALL_START} is not followed by {FUNCTION_START}NAME>"
        return _read_name(text, pos + len(FUNCTION_START), at_end)[0], None
    status = _read_name(text, pos + len(FUNCTION_START), at_end)[0]
    return status, f"{FUNCTION_START} is not followed by a function name and '>'"


def _find_call_start(text: str, pos: int, at_end: bool,
                     errors: list[str]) -> tuple[_Status, int]:
    """Where the first call at or after `pos` starts (VALID), or where one may still start once
    more text arrives (PENDING); (INVALID, len(text)) when there is none."""
    while (match := _CALL_START_RE.search(text, pos)) is not None:
        status, why = _start_status(text, match.start(), at_end)
        if status is not _Status.INVALID:
            return status, match.start()
        if why is not None:
            errors.append(f"offset {match.start()}: {why}; kept as content")
        pos = match.end()
    partial = None if at_end else _partial_tag_at(text, pos, _CALL_START_TAGS)
    if partial is not None:
        return _Status.PENDING, partial
    return _Status.INVALID, len(text)


def _strip_newlines(value: str) -> str:
    """Exactly one leading and one trailing newline go: the template puts them around values."""
    return value.removeprefix("\n").removesuffix("\n")


def _scan_value(text: str, name: str, pos: int, at_end: bool) -> tuple[_RawParam, int]:
    """The value starting at `pos`, and where the body scan resumes after it."""
    match = _VALUE_END_RE.search(text, pos)
    if match is not None:
        resume = match.end() if match.group() == PARAMETER_END else match.start()
        return _RawParam(name, _strip_newlines(text[pos:match.start()]), True, pos), resume
    if not at_end:
        return _RawParam(name, "", False, pos), len(text)
    # Cut off mid-way: a half-written end tag is not part of the value.
    value = text[pos:]
    partial = _partial_tag_at(value, 0, _VALUE_END_TAGS)
    value = value if partial is None else value[:partial]
    return _RawParam(name, _strip_newlines(value), True, pos), len(text)


def _scan_body(text: str, call: _RawCall, pos: int, at_end: bool,
               errors: list[str]) -> _RawCall:
    """Fill `call` with the parameters from `pos` on, up to the end of its body."""
    while (match := _BODY_TAG_RE.search(text, pos)) is not None:
        if match.group() != PARAMETER_START:
            call.closed = True
            call.end = match.end() if match.group() == FUNCTION_END else match.start()
            return call
        status, name, value_pos = _read_name(text, match.end(), at_end)
        if status is _Status.PENDING:
            return call
        if status is _Status.INVALID:
            errors.append(f"{call.name}: offset {match.start()}: malformed {PARAMETER_START} tag")
            pos = match.end()
            continue
        param, pos = _scan_value(text, name, value_pos, at_end)
        call.params.append(param)
        if not param.final:
            return call
    return call


def _scan_call(text: str, pos: int, at_end: bool, errors: list[str]) -> _RawCall | None:
    """The next call whose `<function=NAME>` tag starts at or after `pos`; None: none (yet)."""
    while (start := text.find(FUNCTION_START, pos)) >= 0:
        status, name, body = _read_name(text, start + len(FUNCTION_START), at_end)
        if status is _Status.VALID:
            return _scan_body(text, _RawCall(name, [], False, len(text)), body, at_end, errors)
        if status is _Status.PENDING:
            return None
        errors.append(f"offset {start}: {FUNCTION_START} is not followed by a name and '>'")
        pos = start + len(FUNCTION_START)
    return None


# ----------------------------------------------------------------------------- conversion

_FAIL = object()  # a converter's "not of this type"


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("not a finite number")  # JSON has no inf/nan; clients would choke
    return number


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """Strict JSON (finite numbers only), or _FAIL."""
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _FAIL


def _literal(text: str) -> Any:
    """A Python literal the model wrote instead of JSON ({'a': True}), as a JSON value, or _FAIL.

    The JSON round trip turns tuples into lists and rejects sets, bytes and non-finite numbers,
    so the value equals what a client decodes from the arguments JSON."""
    try:
        return json.loads(json.dumps(ast.literal_eval(text), allow_nan=False))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL


def _to_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:  # beyond Python's int-from-string digit limit
        return _FAIL


def _to_float(text: str) -> Any:
    if not _FLOAT_RE.fullmatch(text):
        return _FAIL
    number = float(text)
    return number if math.isfinite(number) else _FAIL


def _to_integer(text: str) -> Any:
    if _INT_RE.fullmatch(text):
        return _to_int(text)
    number = _to_float(text)  # "3.0" or "1e3" still name an integer
    return int(number) if isinstance(number, float) and number.is_integer() else _FAIL


def _to_number(text: str) -> Any:
    return _to_int(text) if _INT_RE.fullmatch(text) else _to_float(text)


def _to_boolean(text: str) -> Any:
    return {"true": True, "false": False}.get(text.lower(), _FAIL)


def _to_null(text: str) -> Any:
    return None if text.lower() in ("", "null", "none") else _FAIL


def _to_json(text: str) -> Any:
    value = _loads(text)
    return _literal(text) if value is _FAIL else value


_CONVERTERS = {
    "integer": _to_integer, "int": _to_integer,
    "number": _to_number, "float": _to_number, "double": _to_number,
    "boolean": _to_boolean, "bool": _to_boolean,
    "null": _to_null,
    "object": _to_json, "array": _to_json, "dict": _to_json, "list": _to_json,
}
_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char"})


def _convert(raw: str, type_name: str | None) -> tuple[Any, bool]:
    """`raw` as a value of JSON-schema type `type_name`; the bool is False when it is not one
    (the raw string is then kept, as vLLM does)."""
    if type_name in _STRING_TYPES:
        return raw, True
    converter = _CONVERTERS.get(type_name or "")
    if converter is None:  # unknown parameter or type: JSON if it is JSON
        value = _loads(raw)
        return (raw if value is _FAIL else value), True
    text = raw.strip()
    if text.lower() == "null":  # an optional parameter given as null
        return None, True
    value = converter(text)
    return (raw, False) if value is _FAIL else (value, True)


def _first_type(types: list[Any]) -> str | None:
    """The first non-null type name; "null" when that is all there is."""
    names = [name.strip().lower() for name in types if isinstance(name, str)]
    return next((name for name in names if name != "null"), "null" if names else None)


def _schema_type(schema: Any) -> str | None:
    """The JSON type a parameter schema declares, or None when it does not say."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared.strip().lower()
    if isinstance(declared, list):
        return _first_type(declared)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return _first_type([_schema_type(option) for option in schema[key]])
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
        return "string"
    return None


def _index_tools(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """Tool name -> its parameters' `properties`; None when no tools were given.

    Takes the OpenAI form ({"type": "function", "function": {...}}) and the bare {"name", ...}
    form; entries that are neither are skipped rather than failing the whole answer."""
    if tools is None:
        return None
    index: dict[str, dict[str, Any]] = {}
    for tool in tools:
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        params = spec.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        index[spec["name"]] = props if isinstance(props, dict) else {}
    return index


def _param_value(call: str, param: _RawParam, schemas: dict[str, dict[str, Any]] | None,
                 errors: list[str]) -> Any:
    props = (schemas or {}).get(call) or {}
    type_name = _schema_type(props[param.name]) if param.name in props else None
    value, ok = _convert(param.value, type_name)
    if not ok:
        shown = param.value if len(param.value) <= 40 else param.value[:37] + "..."
        errors.append(f"{call}: parameter {param.name!r} = {shown!r} is not a valid "
                      f"{type_name}; kept as a string")
    return value


def _build_call(raw: _RawCall, schemas: dict[str, dict[str, Any]] | None,
                errors: list[str]) -> ToolCall:
    if schemas is not None and raw.name not in schemas:
        errors.append(f"call to unknown tool {raw.name!r}")
    arguments = {p.name: _param_value(raw.name, p, schemas, errors) for p in raw.params}
    return ToolCall(new_call_id(), raw.name, arguments)


# ----------------------------------------------------------------------------- public API


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None = None) -> ParsedOutput:
    """Split a complete model answer into content and tool calls. Never raises on bad text.

    `tools` is the request's tool list (OpenAI form or bare function specs); it gives each
    parameter's type, and calls to functions not in it are returned but reported in `errors`.
    Without tools, values that are valid JSON are decoded and the rest kept as strings."""
    errors: list[str] = []
    status, start = _find_call_start(text, 0, True, errors)
    if status is not _Status.VALID:
        return ParsedOutput(text or None, [], errors)
    schemas = _index_tools(tools)
    calls: list[ToolCall] = []
    pos = start
    while (raw := _scan_call(text, pos, True, errors)) is not None:
        calls.append(_build_call(raw, schemas, errors))
        pos = raw.end
    return ParsedOutput(text[:start].rstrip() or None, calls, errors)


class StreamingToolParser:
    """Incremental `parse_tool_calls` for streamed answers, fed text deltas split anywhere.

    `feed` and `finish` return events: content deltas, then per call a `ToolCallStart` and
    argument-JSON deltas (`{"a": 1`, `, "b": "x"`, `}`). A parameter is emitted when its end tag
    arrives, and everything left when `finish()` is called. For any split of a text, the
    streamed content concatenates to `parse_tool_calls(text).content` (or "" for None) and each
    call's argument deltas to JSON that decodes to the parsed arguments.

    Only the undecided text is kept for re-scanning (held-back content, or the call in
    progress), and while a value is open a delta that cannot end it costs one short search, so
    long file contents stream in linear time.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._tools = tools
        self._schemas = _index_tools(tools)
        self._chunks: list[str] = []  # everything fed, for `text` and `result()`
        self._length = 0  # characters fed
        self._tail = ""  # the last few characters fed, for the open-value fast path
        self._buf = ""  # the undecided text; it starts at offset `_base` of all text fed
        self._base = 0
        self._fresh: list[str] = []  # deltas the fast path has not added to `_buf` yet
        self._finished = False
        self._in_calls = False
        self._scan = 0  # content phase: call-start candidates before this were ruled out
        self._content_sent = 0  # content phase: `_buf[:_content_sent]` was emitted
        self._ids: list[str] = []  # one per call announced
        self._started = False  # call phase: the call in progress was announced
        self._params_sent = 0
        self._open_value = -1  # offset (in all text) of the call's still-open last value

    @property
    def text(self) -> str:
        """All text fed so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def feed(self, delta: str) -> list[StreamEvent]:
        """Add generated text; returns the events it makes final."""
        if self._finished:
            raise RuntimeError("StreamingToolParser.feed() called after finish()")
        if not delta:
            return []
        quiet = self._open_value >= 0 and not self._may_end_value(delta)
        self._chunks.append(delta)
        self._fresh.append(delta)
        self._length += len(delta)
        self._tail = (self._tail + delta)[-(_MAX_VALUE_END - 1):]
        return [] if quiet else self._advance(False)

    def finish(self) -> list[StreamEvent]:
        """The text is complete: returns every event not yet emitted. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        return self._advance(True)

    def result(self) -> ParsedOutput:
        """`parse_tool_calls` of the text so far, carrying the ids the stream announced."""
        parsed = parse_tool_calls(self.text, self._tools)
        # Before finish(), the full parse may find calls the stream has not announced yet.
        for call, call_id in zip(parsed.tool_calls, self._ids, strict=False):
            call.id = call_id
        return parsed

    def _may_end_value(self, delta: str) -> bool:
        """Whether `delta` can complete a value end tag, the only thing that makes a parameter
        final while a value is open; such a tag can only straddle the delta's start."""
        window = self._tail + delta
        start = max(0, self._open_value - (self._length - len(self._tail)))
        return _VALUE_END_RE.search(window, start) is not None

    def _advance(self, at_end: bool) -> list[StreamEvent]:
        self._buf += "".join(self._fresh)
        self._fresh.clear()
        events: list[StreamEvent] = []
        if not self._in_calls:
            events.extend(self._advance_content(at_end))
        if self._in_calls:
            events.extend(self._advance_calls(at_end))
        return events

    def _advance_content(self, at_end: bool) -> list[StreamEvent]:
        status, pos = _find_call_start(self._buf, self._scan, at_end, [])
        if status is not _Status.VALID and at_end:  # no call at all: content is all the text
            return self._content_upto(len(self._buf))
        # Whitespace before a call is not content, so it is held until a solid character.
        held = self._buf[self._content_sent:pos]
        events = self._content_upto(self._content_sent + len(held.rstrip()))
        if status is _Status.VALID:
            self._in_calls = True
            self._drop(pos)
        else:
            self._scan = pos
            self._drop(self._content_sent)
        return events

    def _content_upto(self, end: int) -> list[StreamEvent]:
        if end <= self._content_sent:
            return []
        delta = self._buf[self._content_sent:end]
        self._content_sent = end
        return [ContentDelta(delta)]

    def _drop(self, count: int) -> None:
        """Forget the first `count` characters of `_buf`: they are decided."""
        if count:
            self._buf = self._buf[count:]
            self._base += count
            self._scan -= count
            self._content_sent -= count

    def _advance_calls(self, at_end: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while (call := _scan_call(self._buf, 0, at_end, [])) is not None:
            events.extend(self._emit_call(call, at_end))
            if not (call.closed or at_end):
                last = call.params[-1] if call.params else None
                open_value = last is not None and not last.final
                self._open_value = self._base + last.start if last and open_value else -1
                break
            self._drop(call.end)
            self._started, self._params_sent, self._open_value = False, 0, -1
        return events

    def _emit_call(self, call: _RawCall, at_end: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not self._started:  # first sight of this call: its name is known
            self._started = True
            self._ids.append(new_call_id())
            events.append(ToolCallStart(len(self._ids) - 1, self._ids[-1], call.name))
        index = len(self._ids) - 1
        final = [param for param in call.params if param.final]
        for param in final[self._params_sent:]:
            value = _param_value(call.name, param, self._schemas, [])
            lead = ", " if self._params_sent else "{"
            key = json.dumps(param.name, ensure_ascii=False)
            events.append(ToolCallArgumentsDelta(
                index, f"{lead}{key}: {json.dumps(value, ensure_ascii=False)}"))
            self._params_sent += 1
        if call.closed or at_end:
            events.append(ToolCallArgumentsDelta(index, "}" if self._params_sent else "{}"))
        return events
