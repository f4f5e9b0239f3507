"""`model_info`: parameter and byte arithmetic from config.json alone, checked against the
model code's own tensor list, the storage layouts (`layout_specs`), `plan_weights`, and
docs/model.md "Sizes"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_pio import model_info
from inference_pio.config import ModelConfig
from inference_pio.layers.quantization import QuantConfig
from inference_pio.models.hub import ModelNotFoundError
from inference_pio.models.weight_plan import WeightBudgetError, layout_specs, plan_weights
from inference_pio.testing import (
    checkpoint_shapes,
    qwen3_coder_30b_config,
    tiny_dense_config,
    tiny_moe_config,
)
from inference_pio.utils.memory import format_bytes

GB = 1e9
FORMATS = {fmt.name: fmt for fmt in model_info.WEIGHT_FORMATS}


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
    assert real["weight_bytes"]["fp16"]["model"] == 61_064_245_248
    assert real["weight_bytes"]["fp32"]["model"] == 2 * 61_064_245_248


# Whole model (GB, 1 decimal), read per token without / with lm_head (GB, 2 decimals), as
# stored. model.md "Sizes" prices int8 row scales and the routers in 16 bits; the layouts keep
# them in float32 (int8 31.3 GB, model.md 31.2; every quantized format reads 0.025 GB more per
# token: 48 routers of 128 x 2048). nf4 (4 bits + fp32 per 64) costs what int4 g32 does.
SIZES = {"bf16": (61.1, 5.46, 6.08), "fp16": (61.1, 5.46, 6.08), "fp32": (122.1, 10.92, 12.17),
         "int8": (31.3, 2.78, 3.09), "int4_g32": (18.1, 1.58, 1.76),
         "int4_g64": (17.2, 1.50, 1.66), "int4_g128": (16.7, 1.45, 1.61),
         "nf4": (18.1, 1.58, 1.76), "fp8": (31.2, 2.77, 3.08)}
MODEL_MD = {"bf16": (61.1, 5.46, 6.08), "int8": (31.2, 2.74, 3.06), "int4_g32": (18.1, 1.55, 1.73),
            "int4_g64": (17.2, 1.47, 1.64), "int4_g128": (16.7, 1.43, 1.59)}


@pytest.mark.parametrize("fmt", SIZES)
def test_real_model_sizes(real: dict[str, Any], fmt: str) -> None:
    sizes = real["weight_bytes"][fmt]
    model, per_token, with_head = SIZES[fmt]
    assert round(sizes["model"] / GB, 1) == model
    assert round(sizes["per_token"] / GB, 2) == per_token
    assert round(sizes["per_token_with_lm_head"] / GB, 2) == with_head
    assert sizes["model"] == sizes["resident"] + sizes["experts"]
    assert sizes["num_experts"] == 48 * 128 and sizes["experts"] == 6144 * sizes["per_expert"]


@pytest.mark.parametrize("fmt", MODEL_MD)
def test_real_model_sizes_near_model_md(real: dict[str, Any], fmt: str) -> None:
    sizes = real["weight_bytes"][fmt]
    model, per_token, with_head = MODEL_MD[fmt]
    assert abs(sizes["model"] / GB - model) < (0.1 if fmt == "int8" else 0.05)
    # model.md rounds int8's 2.747 down to "2.74": within 0.04 GB of model.md, ~0.03 above it
    assert abs(sizes["per_token"] / GB - per_token) < 0.04
    assert abs(sizes["per_token_with_lm_head"] / GB - with_head) < 0.04


def test_int8_differs_from_model_md_by_the_fp32_scales_and_routers(real: dict[str, Any]) -> None:
    # model.md: int8 weights + fp16 row scales, everything else bf16. Here: fp32 row scales,
    # fp32 routers and norms.
    config, p = qwen3_coder_30b_config(), real["parameters"]
    h, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    rows = layers * (q + 2 * kv + h + config.num_experts * (2 * config.moe_intermediate_size + h))
    router = layers * config.num_experts * h
    norms = layers * (2 * h + 2 * config.head_dim) + h
    quantized = p["total"] - p["embedding"] - p["lm_head"] - router - norms
    model_md = quantized + 2 * rows + 2 * (p["total"] - quantized)
    assert real["weight_bytes"]["int8"]["model"] - model_md == 2 * rows + 2 * (router + norms)


# ---- the layouts equal the model code's, the plan equals plan_weights' -------------------

LAYOUTS = [
    (torch.bfloat16, None), (torch.float32, None),
    (torch.float32, QuantConfig("int8")), (torch.float32, QuantConfig("int4", 32)),
    (torch.float32, QuantConfig("int4", 128, quantize_lm_head=True)),
    (torch.float32, QuantConfig("nf4")), (torch.float32, QuantConfig("fp8")),
    (torch.bfloat16, QuantConfig("int4")),  # swapped-in linears keep float32 biases
    (torch.float32, QuantConfig("bf16")), (torch.float32, QuantConfig("fp32")),
    (torch.float32, QuantConfig("fp32", quantize_lm_head=True)),
    (torch.bfloat16, QuantConfig("bf16")),  # nothing swapped but the experts
    (torch.float32, QuantConfig("int8", embedding_dtype="fp32")),
]
CONFIGS = [tiny_moe_config(), tiny_dense_config(),
           tiny_moe_config(num_hidden_layers=4, mlp_only_layers=(0,), decoder_sparse_step=2,
                           attention_bias=True),
           tiny_moe_config(tie_word_embeddings=True)]


@pytest.mark.parametrize("config", CONFIGS, ids=["moe", "dense-tied", "mixed-bias", "moe-tied"])
@pytest.mark.parametrize("dtype, quant", LAYOUTS,
                         ids=[f"{str(d)[6:]}-{q.describe() if q else 'plain'}" for d, q in LAYOUTS])
def test_storage_specs_equal_the_model_codes(config: ModelConfig, dtype: torch.dtype,
                                             quant: QuantConfig | None) -> None:
    assert model_info.storage_specs(config, dtype, quant) == layout_specs(config, dtype, quant)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4_g128", "nf4", "fp8"])  # ~1 s each
def test_real_model_bytes_equal_plan_weights(real: dict[str, Any], fmt: str) -> None:
    sizes = real["weight_bytes"][fmt]
    plan = plan_weights(qwen3_coder_30b_config(), *FORMATS[fmt].layout(), None)
    assert (sizes["resident"], sizes["experts"], sizes["per_expert"], sizes["num_experts"]) == (
        plan.resident_bytes, plan.expert_bytes, plan.bytes_per_expert, plan.num_experts_total)
    assert sizes["layout"] == plan.layout


def test_real_model_expert_parts() -> None:
    specs = model_info.storage_specs(qwen3_coder_30b_config(), *FORMATS["int4_g64"].layout())
    down = "model.layers.47.mlp.experts.127.down_proj."
    assert specs[down + "qweight"] == ((2048, 384), torch.uint8)
    assert specs[down + "scales"] == ((2048, 12), torch.float16)
    assert specs["model.layers.0.mlp.gate.weight"] == ((128, 2048), torch.float32)
    assert specs["lm_head.weight"] == specs["model.embed_tokens.weight"] == (
        (151936, 2048), torch.bfloat16)


@pytest.mark.parametrize("config", [tiny_moe_config(), tiny_dense_config()], ids=["moe", "dense"])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4_g32", "fp8"])
def test_weight_fit_equals_plan_weights(config: ModelConfig, fmt: str) -> None:
    sizes = model_info.weight_bytes(config, FORMATS[fmt])
    k, per = config.num_experts_per_tok, sizes["per_expert"]
    minimum = sizes["resident"] + k * per if sizes["num_experts"] else sizes["model"]
    budgets = [sizes["model"], sizes["model"] - 1, minimum, minimum - 1, minimum + 3 * per + 7,
               sizes["resident"], 1]
    for budget in budgets:
        fit = model_info.weight_fit(config, sizes, budget)
        assert fit["minimum_bytes"] == minimum
        if fit["fits"] == "no":
            with pytest.raises(WeightBudgetError) as e:
                plan_weights(config, *FORMATS[fmt].layout(), budget)
            if sizes["num_experts"]:
                assert f"give at least {format_bytes(minimum)}" in str(e.value)
            continue
        plan = plan_weights(config, *FORMATS[fmt].layout(), budget)
        assert (fit["fits"] == "paged") == plan.offload
        assert fit["cache_experts"] == plan.cache_experts
        assert fit["cache_bytes"] == plan.cache_bytes


def test_real_model_plan_in_24_gib(real: dict[str, Any]) -> None:
    plans = real["memory_budget"]["weights"]
    assert {name for name, p in plans.items() if p["fits"] == "resident"} == {
        "int4_g32", "int4_g64", "int4_g128", "nf4"}
    assert plans["bf16"]["fits"] == "paged" and plans["bf16"]["cache_experts"] == (
        (24 * 2**30 - real["weight_bytes"]["bf16"]["resident"])
        // real["weight_bytes"]["bf16"]["per_expert"])
    small = model_info.summarize(qwen3_coder_30b_config(), "preset", memory=2 * 2**30)
    plans = small["memory_budget"]["weights"]
    assert plans["bf16"]["fits"] == "no" and plans["int4_g32"]["fits"] == "paged"
    assert plans["bf16"]["minimum_bytes"] > 2 * 2**30 > plans["int4_g32"]["minimum_bytes"]
    text = model_info.plain_tables(model_info.summary_tables(small))
    assert "do not fit" in text and "experts paged" in text and "Weights in 2 GiB" in text


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
    assert fits["nf4"] == fits["int4_g32"]  # 4 bits + fp32 per 64 = 4 bits + fp16 per 32


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
    bf16 = model_info.weight_bytes(config, FORMATS["bf16"])
    assert bf16["per_token_with_lm_head"] - bf16["per_token"] == 2 * embed  # the tied head
    assert bf16["model"] == 2 * p["total"] and bf16["num_experts"] == bf16["experts"] == 0
    # Quantized, the tied head is stored apart from the embedding, both in bf16; the rest of a
    # dense model is read for every token.
    int8 = model_info.weight_bytes(config, FORMATS["int8"])
    assert int8["resident"] == int8["model"] == int8["per_token"] + 2 * (2 * embed)


def test_moe_active_share_uses_k_of_e() -> None:
    config = tiny_moe_config()
    p = model_info.parameter_counts(config, model_info.tensor_shapes(config))
    routed = p["experts"] * config.num_experts_per_tok // config.num_experts
    assert p["active_without_embedding_and_head"] == (
        p["total"] - p["embedding"] - p["lm_head"] - p["experts"] + routed)


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
    assert "Weights in 1 GiB" in text and "resident" in text


@pytest.mark.parametrize("n, text", [(30_532_122_624, "30.5B"), (3_353_032_704, "3.35B"),
                                     (623_120_640, "623M"), (999, "999")])
def test_fmt_count(n: int, text: str) -> None:
    assert model_info.fmt_count(n) == text


def test_fmt_sizes() -> None:
    assert model_info.fmt_size(61_064_245_248) == "61.1 GB"
    assert model_info.fmt_binary(98304) == "96 KiB" and model_info.fmt_binary(3 * 2**30) == "3 GiB"
