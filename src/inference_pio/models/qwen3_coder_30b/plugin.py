"""The product plugin for Qwen3-Coder-30B-A3B-Instruct: checkpoint id, defaults, chat, tool
calls and fill-in-the-middle, on top of the architecture's model code (models/qwen3_moe.py).

    from inference_pio.models.qwen3_coder_30b.plugin import create_qwen3_coder_30b_plugin
    plugin = create_qwen3_coder_30b_plugin()          # embedded random default, or a path/id
    print(plugin.generate_code("Write a Python function to sort an array."))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inference_pio.models.plugin_base import PluginSpec
from inference_pio.models.qwen3_coder_30b.code import (
    FIM_STOP_TOKEN_IDS,
    cut_fim_output,
    extract_code,
    fim_prompt,
    repo_fim_prompt,
)
from inference_pio.models.qwen3_coder_30b.tool_parser import ToolCall, parse_tool_calls

if TYPE_CHECKING:
    from inference_pio.engine.outputs import RequestOutput
    from inference_pio.llm import LLM
    from inference_pio.sampling_params import SamplingParams

MODEL_ID = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
DEFAULT_MAX_TOKENS = 512

PLUGIN_SPEC = PluginSpec(
    name="qwen3_coder_30b",
    description="Qwen3-Coder-30B-A3B-Instruct: code generation, chat with tool calls, FIM",
    architectures=("Qwen3MoeForCausalLM",),
    default_model_id=MODEL_ID,
    factory="inference_pio.models.qwen3_coder_30b.plugin:create_qwen3_coder_30b_plugin",
)


@dataclass(frozen=True)
class ChatResult:
    """The assistant's turn: `content` is the text before any tool call; `text` is raw."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    text: str
    tool_call_errors: list[str]

    def to_message(self) -> dict[str, Any]:
        """An OpenAI-shaped assistant message, ready to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


class Qwen3CoderPlugin:
    """Loads the model on first use (or at `load()`); every method takes sampling overrides
    (max_tokens, temperature, top_p, top_k, seed, stop, ...) as keyword arguments."""

    spec = PLUGIN_SPEC

    def __init__(self, model_path: str | None = None, **llm_options: Any) -> None:
        self.model_path = model_path
        self.llm_options = llm_options
        self._llm: LLM | None = None

    def load(self) -> LLM:
        if self._llm is None:
            from inference_pio.llm import LLM

            self._llm = LLM(self.model_path, **self.llm_options)
        return self._llm

    @property
    def llm(self) -> LLM:
        return self.load()

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The checkpoint's generation defaults, max_tokens 512, then `overrides`."""
        overrides.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        return self.llm.default_sampling_params(**overrides)

    def generate_code(self, prompt: str, language: str | None = None, **sampling: Any) -> str:
        """Ask for code in a chat turn; return the first fenced block, else the whole answer."""
        _require_text(prompt, "prompt")
        reply = self.chat([{"role": "user", "content": prompt}], **sampling)
        return extract_code(reply.content or reply.text, language)

    def chat(self, messages: Sequence[Mapping[str, Any]],
             tools: Sequence[Mapping[str, Any]] | None = None, **sampling: Any) -> ChatResult:
        """One assistant turn; with tools, the model's XML tool calls come back parsed."""
        out = self.llm.chat(messages, self.sampling_params(**sampling), tools=tools)
        completion = out.outputs[0]
        if tools:
            parsed = parse_tool_calls(completion.text, [dict(t) for t in tools])
            return ChatResult(parsed.content, parsed.tool_calls, completion.finish_reason,
                              completion.text, parsed.errors)
        return ChatResult(completion.text, [], completion.finish_reason, completion.text, [])

    def complete_code(self, prefix: str, suffix: str = "", **sampling: Any) -> str:
        """Fill in the middle between `prefix` and `suffix` (raw FIM prompt, FIM stop ids)."""
        _require_text(prefix, "prefix")
        _require_text(suffix, "suffix")
        return self._infill(fim_prompt(prefix, suffix), sampling)

    def complete_in_repo(self, files: Sequence[tuple[str, str]], target_path: str, prefix: str,
                         suffix: str | None = None, repo_name: str | None = None,
                         **sampling: Any) -> str:
        """Repository-level FIM: other files as context, then the target file's gap."""
        return self._infill(repo_fim_prompt(repo_name, files, target_path, prefix, suffix),
                            sampling)

    def _infill(self, prompt: str, sampling: dict[str, Any]) -> str:
        stop_ids = set(FIM_STOP_TOKEN_IDS) | set(sampling.pop("stop_token_ids", None) or ())
        params = self.sampling_params(stop_token_ids=sorted(stop_ids), **sampling)
        ids = self.llm.tokenizer.encode(prompt)
        out: RequestOutput = self.llm.generate([ids], params, use_tqdm=False)[0]
        return cut_fim_output(out.outputs[0].text)


def _require_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def create_qwen3_coder_30b_plugin(model_path: str | None = None, **options: Any
                                  ) -> Qwen3CoderPlugin:
    """The plugin for a model directory or hub id; None uses INFERENCE_PIO_MODEL, else the
    embedded random-weight default (with a loud warning). `options` go to `LLM` (dtype,
    device, max_model_len, max_num_seqs, revision, allow_download, progress)."""
    return Qwen3CoderPlugin(model_path, **options)
