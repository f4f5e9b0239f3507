"""Chat-template rendering with the same Jinja environment transformers uses, plus input checks.

Templates come from checkpoints (untrusted), so they run in an immutable sandbox. Inputs are
validated and copied before rendering: a template's own errors are cryptic (`'dict object' has
no attribute 'content'`), so we catch the usual mistakes first and say how to fix them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE_RESOURCE = "qwen3_coder_chat_template.jinja"


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


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template does not parse (line {exc.lineno}: {exc.message}); "
            "fix the template or remove it to use the built-in default"
        ) from exc


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
    try:
        rendered: str = compiled.render(
            messages=checked, tools=tool_list, add_generation_prompt=add_generation_prompt, **extra
        )
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
