"""`model_info`: parameter and byte arithmetic from config.json alone, checked against the
model code's own tensor list and against docs/model.md "Sizes"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from inference_pio import model_info
from inference_pio.config import ModelConfig
from inference_pio.models.hub import ModelNotFoundError
from inference_pio.testing import (
    checkpoint_shapes,
    qwen3_coder_30b_config,
    tiny_dense_config,
    tiny_moe_config,
)

GB = 1e9


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    return model_info.summarize(qwen3_coder_30b_config(), "preset", memory=24 * 2**30)


@pytest.mark.parametrize("config", [
    tiny_moe_config(), tiny_dense_config(),
    tiny_moe_config(num_hidden_layers=4, mlp_only_layers=(0,), decoder_sparse_step=2,
                    attention_bias=True),
], ids=["moe", "dense-tied", "mixed-bias"])
def test_tensor_list_equals_the_model_codes(config: ModelConfig) -> None:
    assert model_info.tensor_shapes(config) == checkpoint_shapes(config)


def test_real_model_parameters_match_model_md(real: dict[str, Any]) -> None:
    p = real["parameters"]
    assert round(p["total"] / 1e9, 1) == 30.5
    assert round(p["active"] / 1e9, 2) == 3.35
    assert round(p["active_without_embedding_and_head"] / 1e9, 2) == 2.73
    assert round(p["per_layer"] / 1e6) == 623 and round(p["experts_per_layer"] / 1e6) == 604


def test_real_model_bytes_match_the_checkpoint(real: dict[str, Any]) -> None:
    # model.md "Checkpoint": 61,064,245,248 bytes of bf16 tensors
    assert real["weight_bytes"]["bf16"]["model"] == 61_064_245_248
    assert real["weight_bytes"]["fp32"]["model"] == 2 * 61_064_245_248


# model.md "Sizes": whole model (GB, 1 decimal), read per token without / with lm_head (GB).
SIZES = {"bf16": (61.1, 5.46, 6.08), "int8": (31.2, 2.74, 3.06), "int4_g32": (18.1, 1.55, 1.73),
         "int4_g64": (17.2, 1.47, 1.64), "int4_g128": (16.7, 1.43, 1.59)}


@pytest.mark.parametrize("fmt", SIZES)
def test_real_model_sizes_match_model_md(real: dict[str, Any], fmt: str) -> None:
    sizes = real["weight_bytes"][fmt]
    model, per_token, with_head = SIZES[fmt]
    assert round(sizes["model"] / GB, 1) == model
    # Two of the ten per-token figures of model.md round the other way (int8 2.747 -> "2.74",
    # int4 g64 +lm_head 1.635 -> "1.64"); all are within 0.01 GB.
    assert abs(sizes["per_token"] / GB - per_token) < 0.0101
    assert abs(sizes["per_token_with_lm_head"] / GB - with_head) < 0.0101


def test_real_model_kv_bytes(real: dict[str, Any]) -> None:
    kv = real["kv_bytes_per_token"]
    assert real["kv_elements_per_token"] == 49152
    assert kv["bf16"] == kv["fp16"] == 96 * 1024 and kv["fp32"] == 192 * 1024
    # int8 / fp8: one byte per element plus an fp16 scale per (token, layer, K|V, KV head)
    assert kv["int8"] == kv["fp8_e4m3"] == 49152 + 2 * 48 * 4 * 2


def test_context_fit_is_budget_minus_weights_over_kv(real: dict[str, Any]) -> None:
    budget = real["memory_budget"]
    fits = budget["context_tokens"]
    weights = real["weight_bytes"]["int4_g32"]["model"]
    assert fits["int4_g32"]["bf16"] == (budget["bytes"] - weights) // (96 * 1024)
    assert fits["bf16"]["bf16"] is None and fits["int8"]["int8"] is None  # 61 / 31 GB > 24 GiB
    assert fits["int4_g128"]["int8"] > fits["int4_g32"]["int8"] > fits["int4_g32"]["fp32"]


def test_no_budget_no_fit_table() -> None:
    summary = model_info.summarize(tiny_moe_config(), "tiny")
    assert summary["memory_budget"] is None
    assert [t.title for t in model_info.summary_tables(summary)] == [
        "Model", "Parameters", "Weights", "KV cache"]


def test_dense_tied_model_counts_the_head_once() -> None:
    config = tiny_dense_config()
    shapes = model_info.tensor_shapes(config)
    p = model_info.parameter_counts(config, shapes)
    assert p["lm_head"] == 0 and p["total"] == sum(math.prod(s) for s in shapes.values())
    assert p["active"] == p["total"]  # dense: every weight is used for every token
    embed = config.vocab_size * config.hidden_size
    bf16 = model_info.weight_bytes(config, shapes, model_info.WEIGHT_FORMATS[1])
    assert bf16["per_token_with_lm_head"] - bf16["per_token"] == 2 * embed  # the tied head


def test_moe_active_share_uses_k_of_e() -> None:
    config = tiny_moe_config()
    p = model_info.parameter_counts(config, model_info.tensor_shapes(config))
    routed = p["experts"] * config.num_experts_per_tok // config.num_experts
    assert p["active_without_embedding_and_head"] == (
        p["total"] - p["embedding"] - p["lm_head"] - p["experts"] + routed)


@pytest.mark.parametrize("shape, fmt, expected", [
    ((768, 2048), "int8", 768 * 2048 + 768 * 2),
    ((768, 2048), "int4_g32", 768 * 1024 + 768 * 64 * 2),
    ((2048, 768), "int4_g128", 2048 * 384 + 2048 * 6 * 2),
    ((3, 5), "int4_g32", 3 * 3 + 3 * 1 * 2),  # odd widths round up: packing and groups
    ((7,), "fp32", 28),
])
def test_matrix_bytes(shape: tuple[int, ...], fmt: str, expected: int) -> None:
    by_name = {f.name: f for f in model_info.WEIGHT_FORMATS}
    assert by_name[fmt].matrix_bytes(shape) == expected


def test_load_config_sources(tiny_moe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, source = model_info.load_config(str(tiny_moe_dir))
    assert config == ModelConfig.from_file(tiny_moe_dir / "config.json")
    assert source == str(tiny_moe_dir)
    assert model_info.load_config(str(tiny_moe_dir / "config.json"))[0] == config
    assert model_info.load_config(preset="qwen3-coder-30b")[0] == qwen3_coder_30b_config()
    monkeypatch.delenv("INFERENCE_PIO_MODEL", raising=False)
    config, source = model_info.load_config()
    assert config.num_hidden_layers == 4 and "embedded default" in source
    monkeypatch.setenv("INFERENCE_PIO_MODEL", str(tiny_moe_dir))
    assert model_info.load_config()[1] == str(tiny_moe_dir)


def _fake_hub_cache(cache: Path, repo_id: str, config: dict[str, Any]) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)


def test_hub_id_reads_the_cached_config_offline(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub_cache(tmp_path, "Qwen/Qwen3-Coder-30B-A3B-Instruct",
                    qwen3_coder_30b_config().to_hf())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, _ = model_info.load_config("Qwen/Qwen3-Coder-30B-A3B-Instruct")
    assert config == qwen3_coder_30b_config()
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download Org/missing"):
        model_info.load_config("Org/missing", offline=True)


@pytest.mark.parametrize("name, message", [
    ("/no/such/dir", "does not exist"), ("not-a-repo-id", "neither a model directory")])
def test_bad_model_names(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        model_info.config_path(name)


def test_plain_tables_without_rich() -> None:
    tables = model_info.summary_tables(model_info.summarize(tiny_moe_config(), "tiny", 2**30))
    text = model_info.plain_tables(tables)
    assert "int4 g32" in text and "Tokens of context that fit in 1 GiB" in text


@pytest.mark.parametrize("n, text", [(30_532_122_624, "30.5B"), (3_353_032_704, "3.35B"),
                                     (623_120_640, "623M"), (999, "999")])
def test_fmt_count(n: int, text: str) -> None:
    assert model_info.fmt_count(n) == text


def test_fmt_sizes() -> None:
    assert model_info.fmt_size(61_064_245_248) == "61.1 GB"
    assert model_info.fmt_binary(98304) == "96 KiB" and model_info.fmt_binary(3 * 2**30) == "3 GiB"
