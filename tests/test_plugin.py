"""The product plugin, the registry and the `src.` import path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from inference_pio.models.plugin_base import PluginSpec, create_plugin
from inference_pio.models.qwen3_coder_30b.code import FIM_STOP_TOKEN_IDS, extract_code, fim_prompt
from inference_pio.models.qwen3_coder_30b.plugin import (
    PLUGIN_SPEC,
    Qwen3CoderPlugin,
    create_qwen3_coder_30b_plugin,
)
from inference_pio.models.registry import RegistryError, get_plugin_spec, list_plugins
from inference_pio.sampling_params import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pio_cache")


@pytest.fixture(scope="module")
def plugin(default_cache: Path) -> Qwen3CoderPlugin:
    """The plugin on the embedded default model, written into a private cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFERENCE_PIO_CACHE", str(default_cache))
        mp.delenv("INFERENCE_PIO_MODEL", raising=False)
        p = create_qwen3_coder_30b_plugin(progress=False)
        p.load()
    return p


def test_default_model_is_written_once_and_announced(default_cache: Path,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_PIO_CACHE", str(default_cache))
    monkeypatch.delenv("INFERENCE_PIO_MODEL", raising=False)
    from inference_pio.llm import resolve_model_dir

    with caplog.at_level(logging.WARNING):
        path, is_default = resolve_model_dir(None)
    assert is_default and (path / "config.json").exists()
    assert (path / "tokenizer.json").exists() and (path / "model.safetensors.index.json").exists() \
        or (path / "model.safetensors").exists()
    assert "RANDOM" in caplog.text and "--model" in caplog.text


def test_generate_code_returns_the_answer_code(plugin: Qwen3CoderPlugin) -> None:
    code = plugin.generate_code("Write a Python function to sort an array.", max_tokens=12,
                                temperature=0)
    assert isinstance(code, str) and code
    reply = plugin.chat([{"role": "user", "content": "Write a Python function to sort an array."}],
                        max_tokens=12, temperature=0)
    assert code == extract_code(reply.content or "")


def test_generate_code_is_seed_reproducible(plugin: Qwen3CoderPlugin) -> None:
    a = plugin.generate_code("sort", max_tokens=8, seed=11)
    b = plugin.generate_code("sort", max_tokens=8, seed=11)
    assert a == b


def test_chat_uses_the_chat_template(plugin: Qwen3CoderPlugin) -> None:
    llm = plugin.llm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    reply = plugin.chat(messages, max_tokens=6, temperature=0)
    prompt = llm.tokenizer.apply_chat_template(messages)
    assert prompt.endswith("<|im_start|>assistant\n")
    ref = llm.generate([llm.tokenizer.encode(prompt)],
                       llm.default_sampling_params(max_tokens=6, temperature=0), use_tqdm=False)
    assert reply.text == ref[0].outputs[0].text
    assert reply.to_message()["role"] == "assistant"


def test_chat_with_tools_parses_no_call_from_plain_text(plugin: Qwen3CoderPlugin) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    reply = plugin.chat([{"role": "user", "content": "weather in Paris?"}], tools=tools,
                        max_tokens=5, temperature=0)
    assert reply.finish_reason in {"stop", "length"}
    assert all(call.name for call in reply.tool_calls)


def test_complete_code_uses_the_raw_fim_prompt_and_fim_stops(plugin: Qwen3CoderPlugin) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    middle = plugin.complete_code(prefix, suffix, max_tokens=10, temperature=0)
    llm = plugin.llm
    ids = llm.tokenizer.encode(fim_prompt(prefix, suffix))
    assert ids[0] == llm.tokenizer.token_to_id("<|fim_prefix|>")
    ref = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0,
                                             stop_token_ids=list(FIM_STOP_TOKEN_IDS),
                                             repetition_penalty=1.05), use_tqdm=False)[0]
    assert middle == ref.outputs[0].text.split("<|file_sep|>")[0]


def test_bad_prompt_type_is_a_clear_error(plugin: Qwen3CoderPlugin) -> None:
    with pytest.raises(TypeError, match="prompt must be a str"):
        plugin.generate_code(123)  # type: ignore[arg-type]


def test_registry_knows_the_plugin() -> None:
    assert "qwen3_coder_30b" in list_plugins()
    spec = get_plugin_spec("qwen3_coder_30b")
    assert spec is PLUGIN_SPEC and isinstance(spec, PluginSpec)
    made = create_plugin("qwen3_coder_30b", "/nonexistent/model")
    assert isinstance(made, Qwen3CoderPlugin) and made.model_path == "/nonexistent/model"
    with pytest.raises(RegistryError, match="unknown model plugin 'nope'; known: .*qwen3_coder_30b"):
        get_plugin_spec("nope")


def test_entry_point_is_declared() -> None:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert ('qwen3_coder_30b = "inference_pio.models.qwen3_coder_30b.plugin:PLUGIN_SPEC"'
            in text)


def test_src_prefixed_import_from_checkout_root() -> None:
    code = ("from src.inference_pio.models.qwen3_coder_30b.plugin import "
            "create_qwen3_coder_30b_plugin as a\n"
            "from inference_pio.models.qwen3_coder_30b.plugin import "
            "create_qwen3_coder_30b_plugin as b\n"
            "import json; print(json.dumps(a is b))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert json.loads(out.stdout) is True
