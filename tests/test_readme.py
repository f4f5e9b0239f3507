"""README.md's code blocks, run as a user would run them, so a broken example fails CI.

The convention (README.md authors: follow it):
- Every ```bash / ```python block is preceded by an HTML comment saying what to do with it;
  a block without one fails `test_every_block_is_marked`:
    <!-- readme-test: run -->                  run the block
    <!-- readme-test: run, skip pio bench -->  run it, but not its lines starting `pio bench`
                                               (comma-separated prefixes after `skip`)
    <!-- readme-test: skip REASON -->          never run it; REASON says why
- Blocks run in a fresh temporary directory holding head.py, tail.py and src/utils.py (small
  Python files the examples name), with PYTHONPATH at this tree, `pio` the installed entry point,
  and INFERENCE_PIO_MODEL the tiny test checkpoint. Model placeholders are replaced before
  running: PLACEHOLDERS below (the real model's path -> the tiny checkpoint, a `pio quantize`
  output -> the tiny checkpoint quantized to int4, /tmp/ -> the temporary directory).
- Shell blocks run line by line through bash (a trailing backslash joins lines; `#` comments are
  kept, bash drops them); `pio generate|chat|complete` commands (also after a `|`) without --max-tokens get
  `--max-tokens 4` appended to stay fast. Each line must exit 0. Python blocks run whole in a
  subprocess and must exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->\s*\n```(bash|python)\n(.*?)```", re.DOTALL)
FENCE = re.compile(r"^```(bash|python)\n", re.MULTILINE)
GENERATING = re.compile(r"(^|\| )pio (generate|chat|complete)\b")


def blocks() -> list[tuple[int, str, str, str]]:
    """(line number, marker text, language, code) of each marked block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2), m.group(3))
            for m in MARK.finditer(text)]


def test_every_block_is_marked() -> None:
    text = README.read_text()
    fences = [text.count("\n", 0, m.start()) + 1 for m in FENCE.finditer(text)]
    marked = {line for line, *_ in blocks()}
    assert fences and [f for f in fences if f not in marked] == [], "blocks without a marker"
    assert all(mark.startswith(("run", "skip ")) for _, mark, *_ in blocks())


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory, tiny_moe_dir: Path
                 ) -> dict[str, str]:
    work = tmp_path_factory.mktemp("readme")
    int4 = work / "q30b-int4"
    subprocess.run([sys.executable, "-m", "inference_pio", "quantize", "--model",
                    str(tiny_moe_dir), "--quantization", "int4", "--out", str(int4)],
                   env=_env(), check=True, capture_output=True)
    return {"~/models/qwen3-coder-30b": str(tiny_moe_dir),
            "/path/to/Qwen3-Coder-30B-A3B-Instruct": str(tiny_moe_dir),
            "/path/to/checkpoint": str(tiny_moe_dir),
            "~/models/q30b-int4": str(work / "out-int4"), "/path/to/q30b-int4": str(int4)}


def _env(model: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_COLOR": "1"}
    if model is not None:
        env["INFERENCE_PIO_MODEL"] = str(model)
    return env


def _commands(code: str) -> list[str]:
    return [c.strip() for c in code.replace("\\\n", " ").splitlines() if c.strip()]


RUN = [b for b in blocks() if b[1].startswith("run")]


@pytest.mark.parametrize("line, mark, lang, code", RUN, ids=[f"README.md:{b[0]}" for b in RUN])
def test_readme_block_runs(line: int, mark: str, lang: str, code: str, tmp_path: Path,
                           placeholders: dict[str, str], tiny_moe_dir: Path) -> None:
    (tmp_path / "head.py").write_text("def add(a, b):\n    ")
    (tmp_path / "tail.py").write_text("\n\nprint(add(1, 2))\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "utils.py").write_text("def helper():\n    return 1\n")
    for old, new in {"/tmp/": f"{tmp_path}/", **placeholders}.items():  # /tmp/ first
        code = code.replace(old, new)
    env = _env(tiny_moe_dir)
    if lang == "python":
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                                capture_output=True, timeout=600, check=False)
        assert result.returncode == 0, f"README.md:{line}\n{result.stderr[-3000:]}"
        return
    skipped = [p.strip() for p in mark.partition("skip")[2].split(",") if p.strip()]
    assert shutil.which("pio"), "the `pio` entry point is not installed (pip install -e .)"
    for command in _commands(code):
        if any(command.startswith(p) for p in skipped):
            continue
        if GENERATING.search(command) and "--max-tokens" not in command:
            command = re.sub(r"(\s+#.*)?$", r" --max-tokens 4\1", command, count=1)
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, text=True,
                                input="", capture_output=True, timeout=600, check=False)
        assert result.returncode == 0, f"README.md:{line}: {command}\n{result.stderr[-3000:]}"
