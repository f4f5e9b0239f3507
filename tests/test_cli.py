"""`pio` commands, run in-process through `cli.main`."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_pio.cli import main
from inference_pio.models.qwen3_coder_30b.code import extract_code
from inference_pio.tokenizer import Tokenizer


def test_generate_json_on_a_model_dir(tiny_moe_dir: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    rc = main(["generate", "--model", str(tiny_moe_dir), "--prompt", "def f():", "--raw",
               "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--logprobs", "2",
               "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["token_ids"]) == 5 and data["finish_reason"] == "length"
    assert len(data["logprobs"]) == 5
    assert all(str(t) in lp for t, lp in zip(data["token_ids"], data["logprobs"]))
    assert data["timings"]["generated_tokens"] == 5


def test_generate_text_is_deterministic_with_seed(tiny_moe_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--model", str(tiny_moe_dir), "--prompt", "hi", "--max-tokens", "6",
            "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_reads_the_prompt_from_a_file(tiny_moe_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("Write a Python function to sort an array.")
    assert main(["generate", "--model", str(tiny_moe_dir), "--prompt-file", str(prompt),
                 "--max-tokens", "3", "--temperature", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prompt_token_ids"][0] == 151644  # <|im_start|>: the chat template was applied


def test_user_errors_are_one_line_without_traceback(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--offline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pio: error: ") and "config.json" in err and "Traceback" not in err


def test_bad_sampling_value_is_reported(tiny_moe_dir: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert main(["generate", "--model", str(tiny_moe_dir), "--prompt", "x",
                 "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_make_test_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert main(["make-test-model", "--out", str(out), "--preset", "tiny-dense"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "make-test-model" in out


@pytest.mark.parametrize("text, value", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20),
                                         ("2GB", 2 * 10**9), ("1024", 1024), ("0.5", 0.5)])
def test_parse_memory(text: str, value: float) -> None:
    from inference_pio.cli_common import parse_memory

    assert parse_memory(text) == value


def test_engine_flags_reach_the_engine(tiny_moe_dir: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    assert main(["generate", "--model", str(tiny_moe_dir), "--prompt", "x", "--raw",
                 "--max-tokens", "3", "--temperature", "0", "--kv-cache-dtype", "int8",
                 "--block-size", "8", "--kv-cache-memory", "1MiB", "--no-enable-prefix-caching",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert main(["generate", "--model", str(tiny_moe_dir), "--prompt", "x",
                 "--kv-cache-memory", "10B"]) == 2
    assert "kv_cache_memory" in capsys.readouterr().err


# ---- streaming generate ---------------------------------------------------------------------

def test_generate_streams_the_same_text_as_json(tiny_moe_dir: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_pio.llm import LLM

    streamed: list[int] = []
    original = LLM.generate_stream

    def counting(self: LLM, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for out in original(self, *args, **kwargs):
            streamed.append(len(out.delta_token_ids))
            yield out

    monkeypatch.setattr(LLM, "generate_stream", counting)
    args = ["generate", "--model", str(tiny_moe_dir), "--prompt", "def quicksort(arr):",
            "--raw", "--max-tokens", "12", "--temperature", "0", "--ignore-eos"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert sum(streamed) == 12 and len(streamed) > 1  # token by token, not at the end
    assert main([*args, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["text"]
    assert text == whole + "\n"
    assert main([*args, "--code-only"]) == 0
    assert capsys.readouterr().out == extract_code(whole) + "\n"


# ---- chat -----------------------------------------------------------------------------------

@pytest.fixture()
def recorded_prompts(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The prompt ids of every generate_stream call."""
    from inference_pio.llm import LLM

    prompts: list[list[int]] = []
    original = LLM.generate_stream

    def recording(self: LLM, prompt: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        prompts.append(list(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate_stream", recording)
    return prompts


def _run_chat(monkeypatch: pytest.MonkeyPatch, model: Path, lines: str, *extra: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return main(["chat", "--model", str(model), "--max-tokens", "4", "--temperature", "0",
                 "--ignore-eos", *extra])


def test_chat_keeps_the_history(tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str],
                                recorded_prompts: list[list[int]]) -> None:
    assert _run_chat(monkeypatch, tiny_moe_dir, "alpha question\nbeta question\n/exit\nnever\n",
                     "--system", "be brief") == 0
    out = capsys.readouterr().out
    assert len(recorded_prompts) == 2  # /exit stopped before "never"
    tok = Tokenizer.from_pretrained(tiny_moe_dir)
    first, second = (tok.decode(p) for p in recorded_prompts)
    replies = out.splitlines()
    assert len(replies) == 2 and replies[0]  # one streamed line per reply
    assert first.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert second.startswith(first)  # the whole first turn is in the second prompt ...
    assert f"alpha question<|im_end|>\n<|im_start|>assistant\n{replies[0]}" in second
    assert second.endswith("beta question<|im_end|>\n<|im_start|>assistant\n")


def test_chat_reset_and_end_of_input(tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str],
                                     recorded_prompts: list[list[int]]) -> None:
    lines = "alpha\n\n/reset\nbeta \\\ncontinued\n"  # no /exit: end of input quits
    assert _run_chat(monkeypatch, tiny_moe_dir, lines) == 0
    assert "history cleared" in capsys.readouterr().err
    tok = Tokenizer.from_pretrained(tiny_moe_dir)
    prompts = [tok.decode(p) for p in recorded_prompts]
    assert len(prompts) == 2 and "alpha" not in prompts[1]  # the empty line sent nothing
    assert prompts[1] == "<|im_start|>user\nbeta \ncontinued<|im_end|>\n<|im_start|>assistant\n"


def test_chat_error_drops_the_turn_and_goes_on(tiny_moe_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               recorded_prompts: list[list[int]]) -> None:
    long_line = "word " * 200  # longer than --max-model-len
    assert _run_chat(monkeypatch, tiny_moe_dir, f"{long_line}\nshort\n/exit\n",
                     "--max-model-len", "64") == 0
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    tok = Tokenizer.from_pretrained(tiny_moe_dir)
    assert "word" not in tok.decode(recorded_prompts[-1])  # the failed turn was dropped


# ---- complete -------------------------------------------------------------------------------

@pytest.fixture()
def recorded_generate(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    from inference_pio.llm import LLM

    prompts: list[list[int]] = []
    original = LLM.generate

    def recording(self: LLM, prompts_arg: Any, *args: Any, **kwargs: Any) -> Any:
        prompts.extend(prompts_arg)
        return original(self, prompts_arg, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", recording)
    return prompts


def test_complete_from_files(tiny_moe_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str],
                             recorded_generate: list[list[int]]) -> None:
    from inference_pio.models.qwen3_coder_30b.code import fim_prompt

    (tmp_path / "pre.py").write_text("def add(a, b):\n    ")
    (tmp_path / "suf.py").write_text("\n\nprint(add(1, 2))\n")
    assert main(["complete", "--model", str(tiny_moe_dir), "--prefix", str(tmp_path / "pre.py"),
                 "--suffix", str(tmp_path / "suf.py"), "--max-tokens", "4",
                 "--temperature", "0", "--json"]) == 0
    middle = json.loads(capsys.readouterr().out)["middle"]
    tok = Tokenizer.from_pretrained(tiny_moe_dir)
    assert tok.decode(recorded_generate[0]) == fim_prompt("def add(a, b):\n    ",
                                                          "\n\nprint(add(1, 2))\n")
    assert isinstance(middle, str) and "<|fim" not in middle


def test_complete_in_repo_with_context_files(tiny_moe_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             recorded_generate: list[list[int]]) -> None:
    from inference_pio.models.qwen3_coder_30b.code import repo_fim_prompt

    (tmp_path / "util.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "notes.md").write_text("# notes\n")
    assert main(["complete", "--model", str(tiny_moe_dir), "--prefix-text", "import util\n",
                 "--suffix-text", "\n", "--file", f"pkg/util.py={tmp_path / 'util.py'}",
                 "--file", str(tmp_path / "notes.md"), "--target-path", "pkg/main.py",
                 "--repo-name", "demo", "--max-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    expected = repo_fim_prompt("demo", [("pkg/util.py", "def helper():\n    return 1\n"),
                                        (str(tmp_path / "notes.md"), "# notes\n")],
                               "pkg/main.py", "import util\n", "\n")
    assert Tokenizer.from_pretrained(tiny_moe_dir).decode(recorded_generate[0]) == expected


def test_complete_prefix_text_with_files_names_the_target_untitled(
        tiny_moe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        recorded_generate: list[list[int]]) -> None:
    from inference_pio.models.qwen3_coder_30b.code import repo_fim_prompt

    (tmp_path / "utils.py").write_text("def helper():\n    return 1\n")
    assert main(["complete", "--model", str(tiny_moe_dir), "--prefix-text", "import utils\n",
                 "--file", f"src/utils.py={tmp_path / 'utils.py'}", "--max-tokens", "2",
                 "--temperature", "0"]) == 0
    expected = repo_fim_prompt(None, [("src/utils.py", "def helper():\n    return 1\n")],
                               "untitled.py", "import utils\n", None)
    assert Tokenizer.from_pretrained(tiny_moe_dir).decode(recorded_generate[0]) == expected


def test_complete_user_errors(tiny_moe_dir: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["complete", "--model", str(tiny_moe_dir), "--prefix-text", "x",
                 "--file", str(tmp_path / "missing.py")]) == 2
    assert capsys.readouterr().err.startswith("pio: error: cannot read")
    with pytest.raises(SystemExit) as exc:  # --prefix or --prefix-text is required
        main(["complete", "--model", str(tiny_moe_dir)])
    assert exc.value.code == 2


# ---- serve ----------------------------------------------------------------------------------

def test_serve_bad_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "70000"])
    assert exc.value.code == 2 and "port" in capsys.readouterr().err


# ---- info -----------------------------------------------------------------------------------

def test_info_preset_json_matches_model_md(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "qwen3-coder-30b", "--memory", "24GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    p, w = data["parameters"], data["weight_bytes"]
    assert round(p["total"] / 1e9, 1) == 30.5
    assert round(p["active"] / 1e9, 2) == 3.35
    assert round(p["active_without_embedding_and_head"] / 1e9, 2) == 2.73
    assert [round(w[f]["model"] / 1e9, 1) for f in ("bf16", "int8", "int4_g32")] == [
        61.1, 31.3, 18.1]
    assert data["kv_bytes_per_token"]["bf16"] == 96 * 1024
    assert data["memory_budget"]["bytes"] == 24 * 2**30
    assert data["memory_budget"]["context_tokens"]["bf16"]["bf16"] is None
    assert data["memory_budget"]["context_tokens"]["int4_g32"]["int8"] > 100_000


def test_info_table_on_the_tiny_model_dir(tiny_moe_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tiny_moe_dir), "--memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    for text in ("Qwen3MoeForCausalLM", "Parameters", "int4 g32", "fp8_e4m3",
                 "Tokens of context that fit in 1 GiB", str(tiny_moe_dir)):
        assert text in out
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


def test_info_json_on_the_tiny_model_dir(tiny_moe_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tiny_moe_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["num_hidden_layers"] == 2 and data["memory_budget"] is None
    assert data["kv_bytes_per_token"]["bf16"] == 2 * 2 * 2 * 16 * 2  # K,V x layers x heads x 16


def test_info_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tmp_path)]) == 2  # a directory without config.json
    err = capsys.readouterr().err
    assert err.startswith("pio: error: ") and "config.json" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["info", "--memory", "0.5"])
    assert "24GiB" in capsys.readouterr().err


# ---- help -----------------------------------------------------------------------------------

COMMANDS = ("generate", "chat", "complete", "serve", "info", "make-test-model")


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in COMMANDS) and "examples:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"pio {command} " in out.split("examples:")[1]


def test_engine_option_errors_name_the_flag(tiny_moe_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_moe_dir), "--prompt", "x",
                 "--max-num-seqs", "0"]) == 2
    assert capsys.readouterr().err.startswith("pio: error: --max-num-seqs must be")
