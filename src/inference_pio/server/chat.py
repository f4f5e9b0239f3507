"""/v1/chat/completions: render the conversation through the chat template, turn the model's
tool-call XML into OpenAI `tool_calls` (the same result streamed or not), write the answer.

tool_choice: "auto" (the default with tools) and "required" put every tool in the prompt and
parse calls ("required" cannot force a call: there is no constrained decoding); "none" leaves
the tools out of the prompt and parses nothing; a named function puts only that tool in the
prompt and keeps only calls to it. `parallel_tool_calls: false` keeps the first call only.
Calls the policy drops are not parse failures; markup that does not parse is (the metric)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from inference_pio.chat_template import ChatTemplateError
from inference_pio.engine.outputs import CompletionOutput, RequestOutput
from inference_pio.models.qwen3_coder_30b.tool_parser import (
    ContentDelta,
    StreamEvent,
    StreamingToolParser,
    ToolCall,
    ToolCallStart,
    parse_tool_calls,
)
from inference_pio.server.completions import (
    DEFAULT_LIMITS,
    MAX_CHARS_PER_TOKEN,
    Choice,
    Job,
    Payload,
    TokenLimits,
    delta_logprobs,
    encode,
    expand_choices,
    finite,
    request_values,
    resolve_max_tokens,
    sampling_params,
    token_text,
    with_max_tokens,
)
from inference_pio.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    EngineClient,
    Tool,
)
from inference_pio.tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolPolicy:
    """Which tool calls an answer may carry; `tools` None: no parsing at all."""

    tools: list[dict[str, Any]] | None = None
    only: str | None = None
    parallel: bool = True

    def keep(self, name: str, num_kept: int) -> bool:
        return (self.only is None or name == self.only) and (self.parallel or num_kept == 0)

    def filter(self, calls: list[ToolCall]) -> list[ToolCall]:
        kept: list[ToolCall] = []
        for call in calls:
            if self.keep(call.name, len(kept)):
                kept.append(call)
        return kept


def tool_policy(req: ChatCompletionRequest) -> ToolPolicy:
    """The tools to show the model (and parse with) under `tool_choice`; 400 when it names a
    tool that was not given."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools: give `tools` or drop tool_choice",
                           param="tool_choice")
        return ToolPolicy()
    tools = [_check_tool(i, tool) for i, tool in enumerate(req.tools)]
    if choice == "none":
        return ToolPolicy()
    if isinstance(choice, str) or choice is None:
        return ToolPolicy(tools, None, req.parallel_tool_calls)
    named = [t for t in tools if t["function"]["name"] == choice.function.name]
    if not named:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                       param="tool_choice")
    return ToolPolicy(named, choice.function.name, req.parallel_tool_calls)


def _check_tool(index: int, tool: Tool) -> dict[str, Any]:
    """The tool as a dict; 400 when its parameters are not an object schema."""
    params = tool.function.parameters
    where = f"tools.{index}.function.parameters"
    if params is not None:
        if params.get("type", "object") != "object":
            raise APIError(400, f"{where} must be a JSON schema of type 'object'", param=where)
        props = params.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
            raise APIError(400, f"{where}.properties must map parameter names to schemas",
                           param=where)
    return tool.model_dump(exclude_none=True)


def render_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer,
                  tools: list[dict[str, Any]] | None) -> str:
    messages = [_message_dict(m) for m in req.messages]
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except (ChatTemplateError, ValueError, TypeError, RecursionError) as e:
        raise APIError(400, f"messages cannot be rendered: {e}", param="messages") from None


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for call in message.tool_calls]
    elif content is None and message.role == "assistant":
        out["content"] = ""
    for key in ("name", "tool_call_id"):
        if getattr(message, key) is not None:
            out[key] = getattr(message, key)
    return out


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list[dict[int, float]],
                  k: int) -> list[Payload]:
    """OpenAI chat `logprobs.content` entries for `ids`."""
    def item(token_id: int, logprob: float) -> Payload:
        return {"token": token_text(tokenizer, token_id), "logprob": finite(logprob),
                "bytes": list(tokenizer.token_bytes(token_id))}

    content = []
    for token_id, entry in zip(ids, entries, strict=False):
        top = sorted(entry.items(), key=lambda pair: -pair[1])[:k]
        content.append({**item(token_id, entry.get(token_id, float("-inf"))),
                        "top_logprobs": [item(t, v) for t, v in top]})
    return content


class _ToolStream:
    """One choice's streaming state: tool-parser events as OpenAI deltas, with the policy's
    dropped calls left out and the kept ones renumbered 0, 1, ..."""

    def __init__(self, policy: ToolPolicy) -> None:
        self.policy = policy
        self.parser = StreamingToolParser(policy.tools) if policy.tools is not None else None
        self.new_index: dict[int, int | None] = {}
        self.num_kept = 0
        self.started = False

    def feed(self, text: str, finished: bool) -> list[Payload]:
        if self.parser is None:
            return [{"content": text}] if text else []
        events = self.parser.feed(text) + (self.parser.finish() if finished else [])
        return [delta for event in events if (delta := self._delta(event)) is not None]

    def _delta(self, event: StreamEvent) -> Payload | None:
        if isinstance(event, ContentDelta):
            return event.to_openai_delta() if event.text else None
        if isinstance(event, ToolCallStart):
            keep = self.policy.keep(event.name, self.num_kept)
            self.new_index[event.index] = self.num_kept if keep else None
            self.num_kept += keep
        index = self.new_index.get(event.index)
        return None if index is None else replace(event, index=index).to_openai_delta()

    def has_errors(self) -> bool:
        return self.parser is not None and bool(self.parser.result().errors)


class ChatJob(Job):
    chunk_object = "chat.completion.chunk"

    def __init__(self, choices: list[Choice], req: ChatCompletionRequest, model: str,
                 tokenizer: Tokenizer, policy: ToolPolicy,
                 on_parse_failure: Callable[[], None]) -> None:
        super().__init__(choices, model=model, stream=req.stream,
                         include_usage=req.include_usage, id_prefix="chatcmpl")
        self.tokenizer, self.policy, self.on_parse_failure = tokenizer, policy, on_parse_failure
        self.num_top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.streams = {c.index: _ToolStream(policy) for c in choices}

    def chunks(self, index: int, out: RequestOutput) -> list[Payload]:
        stream = self.streams[index]
        deltas = [] if stream.started else [{"role": "assistant", "content": ""}]
        stream.started = True
        deltas += stream.feed(out.delta_text, out.finished)
        logprobs = self._logprobs(*delta_logprobs(out))
        if logprobs and not deltas:
            deltas.append({})
        payloads = [self._chunk(index, delta, logprobs if i == 0 else None)
                    for i, delta in enumerate(deltas)]
        if out.finished:
            if stream.has_errors():
                self.on_parse_failure()
            reason = "tool_calls" if stream.num_kept else out.outputs[0].finish_reason
            payloads.append(self._chunk(index, {}, None, reason))
        return payloads

    def _chunk(self, index: int, delta: Payload, logprobs: Payload | None,
               finish_reason: str | None = None) -> Payload:
        return self.envelope([{"index": index, "delta": delta, "logprobs": logprobs,
                               "finish_reason": finish_reason}])

    def _logprobs(self, ids: list[int], entries: list[dict[int, float]]) -> Payload | None:
        if self.num_top_logprobs is None or not ids:
            return None
        return {"content": chat_logprobs(self.tokenizer, ids, entries, self.num_top_logprobs)}

    def response(self, finals: dict[int, RequestOutput]) -> Payload:
        choices = [self._choice(i, finals[i].outputs[0]) for i in sorted(finals)]
        return {**self.envelope(choices, usage=self.usage(finals)), "object": "chat.completion"}

    def _choice(self, index: int, comp: CompletionOutput) -> Payload:
        message: Payload = {"role": "assistant", "content": comp.text}
        reason = comp.finish_reason
        if self.policy.tools is not None:
            parsed = parse_tool_calls(comp.text, self.policy.tools)
            if parsed.errors:
                self.on_parse_failure()
            calls = self.policy.filter(parsed.tool_calls)
            message["content"] = parsed.content if calls else parsed.content or ""
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
                reason = "tool_calls"
        logprobs = self._logprobs(comp.token_ids, comp.logprobs or [])
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": reason}


def chat_job(req: ChatCompletionRequest, client: EngineClient, model: str,
             on_parse_failure: Callable[[], None], limits: TokenLimits = DEFAULT_LIMITS
             ) -> ChatJob:
    """Check, render and expand a chat request (messages too long to fit the context are
    refused before the template renders them)."""
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported "
                       "(no constrained decoding); use 'text'", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    policy = tool_policy(req)
    _check_length(req, client.max_model_len)
    ids = encode(client.tokenizer, render_prompt(req, client.tokenizer, policy.tools),
                 client.max_model_len, "messages")
    requested = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    base = sampling_params(client, {**request_values(req), "logprobs": logprobs,
                                    "max_tokens": requested})
    max_tokens = resolve_max_tokens(requested, len(ids), client.max_model_len, "messages",
                                    limits)
    choices = expand_choices([(ids, with_max_tokens(base, max_tokens))], req.n)
    return ChatJob(choices, req, model, client.tokenizer, policy, on_parse_failure)


def _check_length(req: ChatCompletionRequest, max_model_len: int) -> None:
    chars = 0
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            chars += sum(len(part.text) for part in content)
        elif content is not None:
            chars += len(content)
    if chars > max_model_len * MAX_CHARS_PER_TOKEN:
        raise APIError(400, f"messages hold {chars} characters, more than max_model_len="
                       f"{max_model_len} tokens can hold: shorten them", param="messages",
                       code="context_length_exceeded")
