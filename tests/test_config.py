"""ModelConfig.from_hf: every config.json quirk of the Qwen3 family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference_pio.config import ConfigError, ModelConfig, RopeScaling, resolve_dtype
from inference_pio.models.qwen3_moe import Qwen3MoeForCausalLM, build_model
from inference_pio.models.registry import MODELS
from inference_pio.testing import qwen3_coder_30b_config, tiny_dense_config, tiny_moe_config

REAL_CONFIG = {  # config.json of Qwen3-Coder-30B-A3B-Instruct (../shared/docs/model.md)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "attention_dropout": 0.0, "decoder_sparse_step": 1, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5472, "max_position_embeddings": 262144, "max_window_layers": 28,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
    "router_aux_loss_coef": 0.0, "shared_expert_intermediate_size": 0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_qk_norm": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_real_config_parses_to_the_documented_values() -> None:
    c = ModelConfig.from_hf(REAL_CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim) == (2048, 48, 32, 4, 128)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, 768)
    assert c.norm_topk_prob and c.rope_theta == 1e7 and c.rope_scaling is None
    assert c.sliding_window is None and not c.tie_word_embeddings and c.eos_token_ids == (151645,)
    assert all(c.is_moe_layer(i) for i in range(48))
    assert c.kv_elements_per_token == 49152  # model.md: 96 KiB per token in bf16
    assert c == qwen3_coder_30b_config()


def test_real_dims_have_the_documented_parameter_count() -> None:
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(ModelConfig.from_hf(REAL_CONFIG))
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 1) == 30.5


def test_both_rope_spellings_and_yarn() -> None:
    legacy = dict(REAL_CONFIG, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 262144})
    v5 = dict(REAL_CONFIG, rope_scaling=None)
    del v5["rope_theta"]
    v5["rope_parameters"] = {"rope_theta": 1e7, "rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 262144}
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(v5)
    assert a.rope_scaling == b.rope_scaling == RopeScaling(4.0, 262144)
    assert a.rope_theta == b.rope_theta == 1e7
    assert abs(a.rope_scaling.mscale - 1.1386) < 1e-4  # model.md
    plain = dict(v5, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    assert ModelConfig.from_hf(plain).rope_theta == 5e5
    assert ModelConfig.from_hf(plain).rope_scaling is None


def test_class_defaults_are_not_assumed() -> None:
    cfg = dict(REAL_CONFIG)
    del cfg["norm_topk_prob"]
    assert ModelConfig.from_hf(cfg).norm_topk_prob is False  # transformers' class default
    window = dict(REAL_CONFIG, sliding_window=4096)
    assert ModelConfig.from_hf(window).sliding_window is None  # use_sliding_window is false
    assert ModelConfig.from_hf(dict(window, use_sliding_window=True)).sliding_window == 4096


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "not supported"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
])
def test_bad_configs_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(dict(REAL_CONFIG, **change))


def test_missing_field_and_bad_file(tmp_path: Path) -> None:
    cfg = dict(REAL_CONFIG)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(cfg)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("config", [tiny_moe_config(), tiny_dense_config(),
                                    tiny_moe_config(rope_scaling=RopeScaling(4.0, 64),
                                                    mlp_only_layers=(0,), sliding_window=8)])
def test_to_hf_round_trips(config: ModelConfig) -> None:
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


def test_dense_layers_follow_the_transformers_rule() -> None:
    c = tiny_moe_config(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [c.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert not any(tiny_dense_config().is_moe_layer(i) for i in range(2))


def test_registry_maps_both_architectures_to_the_one_model_file() -> None:
    assert MODELS.get("Qwen3MoeForCausalLM") is MODELS.get("Qwen3ForCausalLM") \
        is Qwen3MoeForCausalLM
    model = build_model(tiny_dense_config(), torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                         ("torch.float16", torch.float16)])
def test_resolve_dtype(name: str, dtype: torch.dtype) -> None:
    assert resolve_dtype(name) is dtype
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int3")
