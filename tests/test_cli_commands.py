"""Every user-facing `pio` command run as users run it: the installed `pio` entry point in a
subprocess (PYTHONPATH points it at this tree), on one tiny random checkpoint shared by the
module. Checks exit codes, outputs, and that user errors are one line `pio: error: ...` with
no traceback, given before the model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PIO = shutil.which("pio") or str(Path(sys.executable).with_name("pio"))
FAST = ["--max-tokens", "3", "--temperature", "0", "--ignore-eos"]


def pio(*args: str, stdin: str | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = os.environ if env is None else env
    env = {**base, "PYTHONPATH": f"{SRC}{os.pathsep}{base.get('PYTHONPATH', '')}",
           "NO_COLOR": "1"}
    return subprocess.run([PIO, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Assert a user error: exit 2, one `pio: error:` line with `words`, no traceback."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("pio: error: ") and all(w in err for w in words), err
    return err


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint written by `pio make-test-model` itself."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = pio("make-test-model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"checkpoint to {out}" in result.stdout
    return out


def test_entry_point_is_installed() -> None:
    assert Path(PIO).exists(), "the `pio` entry point is not installed (pip install -e .)"


def test_help_and_info_do_not_import_torch(model: Path) -> None:
    """`pio --help` builds every parser without the heavy packages."""
    code = ("import sys; from inference_pio.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, check=True).stdout
    assert out.strip() == "[]"
    result = pio("--help")
    assert result.returncode == 0 and "make-test-model" in result.stdout


def test_generate_json(model: Path) -> None:
    result = pio("generate", "--model", str(model), "--prompt", "def f():", "--raw", *FAST,
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["token_ids"]) == 3 and data["finish_reason"] == "length"


def test_chat_reads_stdin(model: Path) -> None:
    result = pio("chat", "--model", str(model), *FAST, stdin="hello\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # one streamed reply per message
    assert "history cleared" in result.stderr


def test_complete_text_with_context_file(model: Path, tmp_path: Path) -> None:
    """The README's form: --prefix-text with --file and no --target-path."""
    (tmp_path / "utils.py").write_text("def helper():\n    return 1\n")
    result = pio("complete", "--model", str(model), "--prefix-text", "def add(a, b):\n    ",
                 "--file", f"src/utils.py={tmp_path / 'utils.py'}", *FAST, "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout)["middle"], str)


def test_info(model: Path) -> None:
    result = pio("info", "--model", str(model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["num_hidden_layers"] == 2


def test_quantize_then_generate(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    result = pio("quantize", "--model", str(model), "--quantization", "int8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"--model {out}" in result.stdout
    result = pio("generate", "--model", str(out), "--prompt", "x", "--raw", *FAST, "--json")
    assert result.returncode == 0 and len(json.loads(result.stdout)["token_ids"]) == 3


def test_bench_tiny_says_what_it_picked() -> None:
    result = pio("bench", "--preset", "tiny", "--decode-tokens", "2", "--prompt-len", "0",
                 "--streams", "1", "--repeat", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert "pio bench: benchmarking a synthetic tiny, 2 of 2 layers in fp32" in result.stderr
    report = json.loads(result.stdout)
    assert report["decode_tok_s"] > 0 and report["picked"].startswith("pio bench:")
    assert len(report["decode_runs"]) == 3 and report["decode_tok_s"] == sorted(
        report["decode_runs"])[1]  # the median of the repeated batch-1 runs


def test_bench_refuses_what_does_not_fit() -> None:
    one_line_error(pio("bench", "--quantization", "fp32", "--num-layers", "48"),
                   "48 layers in fp32 needs", "GiB available", "--num-layers")


def test_make_test_model_refuses_then_force_replaces(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    shutil.copytree(model, out)
    (out / "stale-00009.safetensors").write_bytes(b"old")
    one_line_error(pio("make-test-model", "--out", str(out), "--preset", "tiny-dense"),
                   "not empty", "--force")
    assert (out / "stale-00009.safetensors").exists()  # refused: nothing touched
    result = pio("make-test-model", "--out", str(out), "--preset", "tiny-dense", "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "stale-00009.safetensors").exists()  # replaced whole
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Qwen3ForCausalLM"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # no staging left


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], ["--temperature", "[0, 100]"]),
    (["--top-p", "2"], ["--top-p", "(0, 1]"]),
    (["--max-tokens", "0"], ["--max-tokens", ">= 1"]),
    (["--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["--device", "tpu9"], ["--device", "cpu, cuda or cuda:N"]),
    (["--attention-backend", "triton"], ["'triton' runs on a GPU", "use 'auto'"]),
])
def test_generate_user_errors_before_loading(flags: list[str], words: list[str]) -> None:
    """The model path does not exist: these errors must come first, so nothing was loaded."""
    if flags in (["--device", "cuda"], ["--attention-backend", "triton"]):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    one_line_error(pio("generate", "--model", "/nonexistent/model", "--prompt", "x", *flags,
                       env=env), *words)


def test_missing_model_and_unreadable_files(tmp_path: Path, model: Path) -> None:
    one_line_error(pio("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"),
                   "does not exist")
    one_line_error(pio("info", "--model", str(tmp_path)), "config.json")
    one_line_error(pio("complete", "--model", str(model), "--prefix", str(tmp_path / "a.py")),
                   "cannot read")
