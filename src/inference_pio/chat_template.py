"""Chat-template rendering with the same Jinja environment transformers uses, plus input checks.

Templates come from checkpoints (untrusted), so they run in an immutable sandbox, bounded in
time and size: a render that runs longer than MAX_RENDER_SECONDS, or that builds a string or list
(output, `*`, `+`, `~`, `**`) longer than MAX_RENDER_CHARS, is stopped with ChatTemplateError.
The time bound is a per-line check in the template's own code (sys.settrace on frames of the
compiled template), so a loop that outputs nothing is stopped too. Inputs are
validated and copied before rendering: a template's own errors are cryptic (`'dict object' has
no attribute 'content'`), so we catch the usual mistakes first and say how to fix them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_RESOURCE = "qwen3_coder_chat_template.jinja"

# A real prompt renders in milliseconds and is at most the context window (262,144 tokens of a
# few characters each); these bounds are far above both and far below harm.
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 16 * 2**20
_TEMPLATE_FILENAME = "<template>"  # jinja's co_filename for code compiled from a string


class ChatTemplateError(ValueError):
    """Bad chat input or a template that failed; the message names the problem and the fix."""


@lru_cache(maxsize=1)
def default_chat_template() -> str:
    """The built-in Qwen3-Coder template, for checkpoints that ship none."""
    data = resources.files(__package__) / "data" / DEFAULT_TEMPLATE_RESOURCE
    return data.read_text(encoding="utf-8")


def select_chat_template(value: str | Sequence[Mapping[str, Any]] | None) -> str | None:
    """The template to use from a tokenizer_config `chat_template` field (a string, or a list of
    `{name, template}` entries of which "default" is the one for plain chat)."""
    if value is None or isinstance(value, str):
        return value
    named = {entry.get("name"): entry.get("template") for entry in value}
    template = named.get("default")
    if not isinstance(template, str):
        raise ChatTemplateError(
            f"tokenizer_config.json chat_template lists {sorted(map(str, named))} but no "
            "'default'; add a template named 'default' or a chat_template.jinja file"
        )
    return template


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes and forces ASCII; transformers' keeps text as is, and
    # the model was trained on prompts rendered by transformers.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _LimitExceeded(jinja2.exceptions.TemplateError):
    pass


def _too_big(size: float) -> None:
    if size > MAX_RENDER_CHARS:
        raise _LimitExceeded(f"it builds a value of more than {MAX_RENDER_CHARS} items")


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with sizes checked before `*`, `+`, `**` and `%` compute a result."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(count, int):
                    _too_big(len(seq) * count)
        elif operator == "+" and _size(left) is not None and _size(right) is not None:
            _too_big(len(left) + len(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            _too_big(right * math.log2(abs(left) + 1) / 8)  # bytes of the result
        result = super().call_binop(context, operator, left, right)
        if _size(result) is not None:
            _too_big(len(result))
        return result


def _bounded_str_join(seq: Any) -> str:
    parts = [str(v) for v in seq]
    _too_big(sum(map(len, parts)))
    return "".join(parts)


def _bounded_center(value: str, width: int = 80) -> str:
    _too_big(width)
    return str(value).center(width)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters["center"] = _bounded_center
    env.globals["raise_exception"] = _raise_exception
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template does not parse (line {exc.lineno}: {exc.message}); "
            "fix the template or remove it to use the built-in default"
        ) from exc
    # `a ~ b` compiles to the module-level str_join of the template's namespace.
    compiled.root_render_func.__globals__["str_join"] = _bounded_str_join
    return compiled


def _render_bounded(compiled: jinja2.Template, context: dict[str, Any]) -> str:
    """Render, stopping past MAX_RENDER_SECONDS or MAX_RENDER_CHARS of output."""
    deadline = time.monotonic() + MAX_RENDER_SECONDS

    def on_line(frame: Any, event: str, arg: Any) -> Callable[..., Any]:
        if time.monotonic() > deadline:
            raise _LimitExceeded(f"it ran longer than {MAX_RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        return on_line(frame, event, arg) if frame.f_code.co_filename == _TEMPLATE_FILENAME \
            else None

    parts: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in compiled.generate(**context):
            size += len(chunk)
            _too_big(size)
            parts.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` (OpenAI-style dicts) and optional `tools` (JSON schemas) to a prompt."""
    compiled = _compile(template)
    checked = normalize_messages(messages)
    tool_list = normalize_tools(tools)
    context = dict(extra, messages=checked, tools=tool_list,
                   add_generation_prompt=add_generation_prompt)
    try:
        rendered = _render_bounded(compiled, context)
    except _LimitExceeded as exc:
        raise ChatTemplateError(
            f"chat template refused: {exc}; the checkpoint's template is broken or hostile: "
            "fix it, or delete it (chat_template.jinja / tokenizer_config.json chat_template) "
            "to use the built-in default"
        ) from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    return rendered


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked deep copies of `messages`, with JSON-string tool-call arguments parsed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of dicts, got {type(messages).__name__}; "
            'wrap a single prompt as [{"role": "user", "content": text}]'
        )
    if not messages:
        raise ChatTemplateError("messages is empty; pass at least one message")
    return [_check_message(index, message) for index, message in enumerate(messages)]


def _check_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"{where} must be a dict, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ChatTemplateError(
            f"{where} has no role; add 'role' ('system', 'user', 'assistant' or 'tool')"
        )
    copy: dict[str, Any] = json.loads(json.dumps(message, default=_not_json(where)))
    calls = copy.get("tool_calls")
    has_calls = role == "assistant" and bool(calls)
    if has_calls:
        copy["tool_calls"] = _check_tool_calls(where, calls)
    content = copy.get("content")
    if not isinstance(content, str) and not (has_calls and content is None):
        raise ChatTemplateError(
            f"{where} (role {role!r}): content must be a string, got "
            f"{type(content).__name__}; join text parts into one string"
            + (" or give tool_calls" if role == "assistant" else "")
        )
    return copy


def _not_json(where: str) -> Any:
    def fail(value: Any) -> NoReturn:
        raise ChatTemplateError(
            f"{where} holds a {type(value).__name__}, which is not JSON data; "
            "pass only str, numbers, bools, None, lists and dicts"
        )

    return fail


def _check_tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ChatTemplateError(f"{where}.tool_calls must be a list, got {type(calls).__name__}")
    return [_check_tool_call(f"{where}.tool_calls[{i}]", call) for i, call in enumerate(calls)]


def _check_tool_call(where: str, call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise ChatTemplateError(f"{where} must be a dict, got {type(call).__name__}")
    # OpenAI nests name/arguments under "function"; the template accepts both shapes.
    body = call.get("function", call)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise ChatTemplateError(
            f"{where} has no function name; use {{'function': {{'name': ..., 'arguments': ...}}}}"
        )
    if "arguments" in body:
        body["arguments"] = _parse_arguments(where, body["arguments"])
    return call


def _parse_arguments(where: str, arguments: Any) -> dict[str, Any]:
    # The template iterates `arguments|items`: a JSON string (OpenAI's wire format) must become
    # a mapping first, or the render fails.
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(
                f"{where} arguments are not valid JSON ({exc.msg} at char {exc.pos}); "
                "pass a JSON object string or a dict"
            ) from exc
    if not isinstance(arguments, dict):
        raise ChatTemplateError(
            f"{where} arguments must be a JSON object (parameter name -> value), got "
            f"{type(arguments).__name__}"
        )
    return arguments


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Checked copies of tool schemas (`{"type": "function", "function": {...}}` or bare)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(
            f"tools must be a list of tool schemas, got {type(tools).__name__}; "
            "wrap a single tool in a list"
        )
    return [_check_tool(index, tool) for index, tool in enumerate(tools)]


def _check_tool(index: int, tool: Mapping[str, Any]) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping):
        raise ChatTemplateError(
            f"{where} must be a dict (a JSON schema), got {type(tool).__name__}"
        )
    body = tool.get("function", tool)
    if not isinstance(body, Mapping) or not isinstance(body.get("name"), str):
        raise ChatTemplateError(
            f"{where} has no function name; use "
            "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
        )
    checked: dict[str, Any] = json.loads(json.dumps(tool, default=_not_json(where)))
    return checked
