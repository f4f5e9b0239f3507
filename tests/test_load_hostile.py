"""A careless or hostile checkpoint is refused at load with one line naming the file and the
field (issue 12 item 6), through `LLM(...)` on copies of the tiny session checkpoint; its chat
template renders under a time and size bound."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inference_pio.chat_template import MAX_RENDER_SECONDS, ChatTemplateError
from inference_pio.config import ConfigError
from inference_pio.llm import LLM
from inference_pio.models.loader import CheckpointError

MESSAGES = [{"role": "user", "content": "hi"}]


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _load(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", progress=False, kv_cache_memory=2**20)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda c: {**c, "hidden_size": None}, "field hidden_size must be an integer >= 1, got None"),
    (lambda c: [c], "must hold a JSON object, got a list"),
    (lambda c: {**c, "eos_token_id": "x"}, "field eos_token_id must be an integer >= 0, got 'x'"),
    (lambda c: {**c, "max_position_embeddings": 0},
     "field max_position_embeddings must be an integer >= 2, got 0"),
    (lambda c: {**c, "num_experts": "8"}, "field num_experts must be an integer >= 0, got '8'"),
    (lambda c: {**c, "tie_word_embeddings": "no"}, "field tie_word_embeddings must be true"),
])
def test_config_values_of_the_wrong_type_name_file_and_field(
        tiny_moe_dir: Path, tmp_path: Path, edit: Callable[[Any], Any], field: str) -> None:
    model_dir = _copy(tiny_moe_dir, tmp_path)
    _edit_json(model_dir / "config.json", edit)
    with pytest.raises(ConfigError) as info:
        _load(model_dir)
    message = str(info.value)
    assert str(model_dir / "config.json") in message and field in message
    assert "\n" not in message


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("tokenizer.json", "{not json", "is not a valid tokenizer file"),
    ("tokenizer_config.json", "[1, 2", "is not valid JSON"),
    ("tokenizer_config.json", '{"eos_token": "<|no such token|>"}', "fix its eos_token"),
])
def test_broken_tokenizer_files_are_named(tiny_moe_dir: Path, tmp_path: Path, name: str,
                                          text: str, expected: str) -> None:
    model_dir = _copy(tiny_moe_dir, tmp_path)
    (model_dir / name).write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        _load(model_dir)
    assert str(model_dir / name) in str(info.value)


@pytest.mark.parametrize(("gen", "field"), [
    ({"temperature": -1}, "temperature must be a number in [0, 100]"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens (max_tokens) must be an integer >= 1"),
    ({"eos_token_id": "x"}, "eos_token_id must hold ints"),
])
def test_generation_config_defaults_are_validated_at_load(
        tiny_moe_dir: Path, tmp_path: Path, gen: dict[str, Any], field: str) -> None:
    model_dir = _copy(tiny_moe_dir, tmp_path)
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError) as info:
        _load(model_dir)
    assert str(model_dir / "generation_config.json") in str(info.value)
    assert field in str(info.value)


BOMBS = {
    # The probe's template: nested loops that output nothing ran 150 s.
    "time": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    # ... and ones that build gigabytes.
    "output": "{% for a in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "repeat": "{{ 'x' * 10**10 }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "center": "{{ 'a'|center(10**10) }}",
}


def test_chat_template_bombs_are_refused(tiny_moe_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy(tiny_moe_dir, tmp_path)
    llm = _load(model_dir)
    for kind, template in BOMBS.items():
        llm.tokenizer.chat_template = template
        expected = f"longer than {MAX_RENDER_SECONDS:g} s" if kind == "time" else "more than"
        with pytest.raises(ChatTemplateError, match=expected):
            llm.chat(MESSAGES)
    assert not llm.engine.has_unfinished_requests()


def test_chat_template_file_from_the_checkpoint_is_bounded(tiny_moe_dir: Path,
                                                           tmp_path: Path) -> None:
    model_dir = _copy(tiny_moe_dir, tmp_path)
    (model_dir / "chat_template.jinja").write_text(BOMBS["output"])
    with pytest.raises(ChatTemplateError, match="chat template refused"):
        _load(model_dir).chat(MESSAGES)
