"""`pio` commands, run in-process through `cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_pio.cli import main


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
    assert err.startswith("error: ") and "config.json" in err and "Traceback" not in err


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
def test_parse_memory(text: str, value: int | float) -> None:
    from inference_pio.cli import parse_memory

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
