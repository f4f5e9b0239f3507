"""Code-specific helpers: fill-in-the-middle prompts and getting code out of answers (no torch).

FIM prompts are raw text, no chat template (model.md, "Fill-in-the-middle"):
- file level: `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`;
- repo level: `<|repo_name|>{name}\\n<|file_sep|>{path}\\n{content}\\n...<|file_sep|>{target}\\n`
  then the FIM triple, or the partial content of the target file to continue it.
Generation should stop on `FIM_STOP_TOKEN_IDS`; `cut_fim_output` trims what slipped through.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"
ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"

# fim_prefix, fim_suffix, fim_pad, repo_name, file_sep, endoftext, im_end.
FIM_STOP_TOKEN_IDS = (151659, 151661, 151662, 151663, 151664, 151643, 151645)
# Text forms to cut at, for output that was not stopped on a token boundary (e.g. decoded
# from a stream, or stopped by length right after one). fim_middle is no stop token, but a
# second one inside a middle is never code either.
FIM_STOP_STRINGS = (FILE_SEP, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD, REPO_NAME, ENDOFTEXT,
                    IM_END)

# Any `<|name|>` string: the tokenizer matches Qwen's added tokens inside text, so one in a path
# or repo name would become a control token and break the prompt's structure.
_CONTROL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def _require_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _check_line(value: object, what: str) -> str:
    """A repo name or path: one line, no control-token strings, not empty."""
    text = _require_str(value, what)
    if not text.strip():
        raise ValueError(f"{what} is empty; pass the file's path relative to the repo root")
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} {text!r} contains a line break; the repo-level FIM format puts "
                         "it on one line, so remove the line break")
    token = _CONTROL_TOKEN_RE.search(text)
    if token is not None:
        raise ValueError(f"{what} {text!r} contains the control-token string {token.group()!r}, "
                         "which the tokenizer reads as a control token; rename it or drop it")
    return text


def fim_prompt(prefix: str, suffix: str) -> str:
    """The file-level fill-in-the-middle prompt; the model writes the middle.

    Code is not checked for control-token strings: a file that contains one (say, this module)
    still gets a prompt, as the tokenizer would give it anyway."""
    prefix = _require_str(prefix, "prefix")
    suffix = _require_str(suffix, "suffix")
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def repo_fim_prompt(repo_name: str | None, files: Sequence[tuple[str, str]], target_path: str,
                    prefix: str, suffix: str | None) -> str:
    """A repo-level prompt: context files, then the target file.

    With a `suffix`, the model fills the middle between `prefix` and `suffix`; with None, it
    continues the target file from `prefix` (its partial content). A None `repo_name` leaves
    the repo-name line out. Raises ValueError (naming the fix) for a name or path that would
    break the format, TypeError for arguments of the wrong type."""
    parts: list[str] = []
    if repo_name is not None:
        parts.append(f"{REPO_NAME}{_check_line(repo_name, 'repo_name')}\n")
    for number, item in enumerate(files):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"files[{number}] must be a (path, content) pair")
        path = _check_line(item[0], f"files[{number}] path")
        parts.append(f"{FILE_SEP}{path}\n{_require_str(item[1], f'files[{number}] content')}\n")
    parts.append(f"{FILE_SEP}{_check_line(target_path, 'target_path')}\n")
    if suffix is None:
        parts.append(_require_str(prefix, "prefix"))
    else:
        parts.append(fim_prompt(prefix, suffix))
    return "".join(parts)


def cut_fim_output(text: str) -> str:
    """The generated middle (or continuation), cut at the first FIM/stop token string."""
    end = len(text)
    for stop in FIM_STOP_STRINGS:
        found = text.find(stop, 0, end)
        if found >= 0:
            end = found
    return text[:end]


# ----------------------------------------------------------------------------- extract_code

# CommonMark fences: 3+ backticks or tildes. Indentation is allowed beyond CommonMark's 3
# spaces because answers often put code blocks inside list items.
_OPEN_FENCE_RE = re.compile(r"(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)")
_CLOSE_FENCE_RE = re.compile(r"[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*")
_LANGUAGE_ALIASES = {
    "py": "python", "python3": "python", "js": "javascript", "ts": "typescript",
    "sh": "bash", "shell": "bash", "zsh": "bash", "c++": "cpp", "cxx": "cpp", "rs": "rust",
    "golang": "go", "rb": "ruby", "kt": "kotlin", "yml": "yaml", "cs": "csharp", "c#": "csharp",
}


@dataclass(frozen=True, slots=True)
class _Block:
    language: str  # normalised first word of the info string; "" without one
    code: str


def _language(info: str) -> str:
    words = info.strip().split()
    name = words[0].strip("{}.").lower() if words else ""
    return _LANGUAGE_ALIASES.get(name, name)


def _closing_line(lines: list[str], start: int, fence: str) -> int | None:
    """Index of the line closing `fence`: same character, at least as long, nothing else."""
    for number in range(start, len(lines)):
        match = _CLOSE_FENCE_RE.fullmatch(lines[number])
        if match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence):
            return number
    return None


def _dedent(lines: list[str], width: int) -> list[str]:
    """Remove up to the opening fence's indentation from each code line, as CommonMark does."""
    return [line[min(width, len(line) - len(line.lstrip(" \t"))):] for line in lines]


def _fenced_blocks(text: str) -> list[_Block]:
    """The fenced blocks in order; an unclosed last one runs to the end of the text."""
    lines = text.split("\n")
    blocks: list[_Block] = []
    number = 0
    while number < len(lines):
        match = _OPEN_FENCE_RE.fullmatch(lines[number])
        if match is None or (match["fence"][0] == "`" and "`" in match["info"]):
            number += 1  # backticks in the info string: inline code, not a fence
            continue
        close = _closing_line(lines, number + 1, match["fence"])
        body = lines[number + 1:len(lines) if close is None else close]
        blocks.append(_Block(_language(match["info"]),
                             "\n".join(_dedent(body, len(match["indent"])))))
        if close is None:
            break
        number = close + 1
    return blocks


def _strip_think(text: str) -> str:
    """Drop a leading `<think>...</think>` (reasoning is not the answer)."""
    body = text.lstrip()
    if not body.startswith("<think>"):
        return text
    end = body.find("</think>")
    # Unclosed: the generation was cut off while thinking; keep the text, minus the tag.
    return body[len("<think>"):] if end < 0 else body[end + len("</think>"):]


def extract_code(text: str, language: str | None = None) -> str:
    """The code in a model answer.

    The first fenced Markdown block (``` or ~~~), preferring the first whose language is
    `language` when given (aliases such as py/python match); an unclosed fence (cut-off
    generation) yields everything after it. Without a fence, the whole answer, stripped."""
    text = _strip_think(text.replace("\r\n", "\n"))
    blocks = _fenced_blocks(text)
    if not blocks:
        return text.strip()
    if language is not None:
        wanted = _language(language)
        for block in blocks:
            if block.language == wanted:
                return block.code
    return blocks[0].code
