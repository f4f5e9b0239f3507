"""FIM prompt builders and code extraction for Qwen3-Coder."""

from __future__ import annotations

import pytest

from inference_pio.models.qwen3_coder_30b.code import (
    FILE_SEP,
    FIM_MIDDLE,
    FIM_PAD,
    FIM_PREFIX,
    FIM_STOP_TOKEN_IDS,
    FIM_SUFFIX,
    REPO_NAME,
    cut_fim_output,
    extract_code,
    fim_prompt,
    repo_fim_prompt,
)


def test_token_strings_and_stop_ids() -> None:
    assert (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD) == (
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
    assert (REPO_NAME, FILE_SEP) == ("<|repo_name|>", "<|file_sep|>")
    assert FIM_STOP_TOKEN_IDS == (151659, 151661, 151662, 151663, 151664, 151643, 151645)


def test_fim_prompt() -> None:
    assert fim_prompt("def f(x):\n    ", "\n    return y\n") == (
        "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>")
    assert fim_prompt("", "") == "<|fim_prefix|><|fim_suffix|><|fim_middle|>"
    with pytest.raises(TypeError):
        fim_prompt("a", None)  # type: ignore[arg-type]


def test_repo_fim_prompt_with_suffix() -> None:
    prompt = repo_fim_prompt("lib", [("a.py", "A = 1"), ("b/c.py", "C = 2")], "main.py",
                             "from a import A\n", "\nprint(A)\n")
    assert prompt == ("<|repo_name|>lib\n<|file_sep|>a.py\nA = 1\n<|file_sep|>b/c.py\nC = 2\n"
                      "<|file_sep|>main.py\n<|fim_prefix|>from a import A\n<|fim_suffix|>\n"
                      "print(A)\n<|fim_middle|>")


def test_repo_fim_prompt_continues_a_file_without_suffix() -> None:
    prompt = repo_fim_prompt(None, [("a.py", "A = 1")], "main.py", "import a\n", None)
    assert prompt == "<|file_sep|>a.py\nA = 1\n<|file_sep|>main.py\nimport a\n"
    assert repo_fim_prompt("r", [], "x.py", "", None) == "<|repo_name|>r\n<|file_sep|>x.py\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"target_path": "a\nb.py"}, "line break"),
    ({"target_path": "x<|file_sep|>.py"}, "control-token"),
    ({"target_path": " "}, "empty"),
    ({"repo_name": "my\r\nrepo"}, "line break"),
    ({"repo_name": "<|im_end|>"}, "control-token"),
    ({"files": [("ok.py", "x"), ("bad\n.py", "y")]}, "files\\[1\\] path"),
    ({"files": [("<|fim_pad|>", "y")]}, "rename"),
])
def test_repo_fim_prompt_rejects_bad_names(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"repo_name": "r", "files": [], "target_path": "t.py",
                               "prefix": "p", "suffix": "s", **kwargs}
    with pytest.raises(ValueError, match=message):
        repo_fim_prompt(**args)  # type: ignore[arg-type]


def test_repo_fim_prompt_rejects_bad_types() -> None:
    with pytest.raises(TypeError, match="pair"):
        repo_fim_prompt("r", [("only_path",)], "t.py", "", "")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="content"):
        repo_fim_prompt("r", [("a.py", 3)], "t.py", "", "")  # type: ignore[list-item]


@pytest.mark.parametrize("text, expected", [
    ("    return x\n", "    return x\n"),
    ("x = 1\n<|file_sep|>other.py\nimport os\n", "x = 1\n"),
    ("a<|fim_pad|><|fim_pad|>", "a"),
    ("a<|endoftext|>b<|file_sep|>", "a"),
    ("b<|im_end|>", "b"),
    ("c<|fim_middle|>d", "c"),
    ("", ""),
])
def test_cut_fim_output(text: str, expected: str) -> None:
    assert cut_fim_output(text) == expected


@pytest.mark.parametrize("text, language, expected", [
    ("Here:\n```python\nprint(1)\n```\nDone.", None, "print(1)"),
    ("```\nplain\n```", None, "plain"),
    ("~~~rust\nfn main() {}\n~~~", None, "fn main() {}"),
    ("```js\nlet a;\n```\n```python\nb = 2\n```", "python", "b = 2"),
    ("```js\nlet a;\n```\n```py\nb = 2\n```", "python", "b = 2"),
    ("```js\nlet a;\n```\n```python\nb = 2\n```", "go", "let a;"),
    ("```js\nlet a;\n```\n```python\nb = 2\n```", None, "let a;"),
    ("Sure:\n```python\ndef f():\n    return", None, "def f():\n    return"),
    ("```python\na\n", None, "a\n"),
    ("````md\n```python\nx\n```\n````", None, "```python\nx\n```"),
    ("1. Step:\n   ```python\n   x = 1\n     y\n   ```", None, "x = 1\n  y"),
    ("```python\r\nx = 1\r\n```", None, "x = 1"),
    ("  just code, no fence  \n", None, "just code, no fence"),
    ("Use ```inline``` code", None, "Use ```inline``` code"),
    ("<think>\nhmm ```x```\n</think>\n\n```python\nok\n```", None, "ok"),
    ("<think>let me see</think>\nanswer", None, "answer"),
    ("<think>cut off while thinking", None, "cut off while thinking"),
    ("```python\n```", None, ""),
])
def test_extract_code(text: str, language: str | None, expected: str) -> None:
    assert extract_code(text, language) == expected
