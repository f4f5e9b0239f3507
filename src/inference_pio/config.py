"""Frozen configuration dataclasses. `ModelConfig.from_hf` is the only place that knows the
quirks of Hugging Face config.json files (both rope spellings, absent fields, class defaults)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class ConfigError(ValueError):
    """A configuration value that cannot be honoured; the message names the field and the fix."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name ("float32", "bf16", ...) or a torch dtype to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(
            f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16 (or fp32/bf16/fp16)"
        )
    return DTYPES[key]


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (the only scaling Qwen3 checkpoints use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def mscale(self) -> float:
        """Multiplier of cos and sin (YaRN's attention factor)."""
        if self.attention_factor is not None:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Qwen3 / Qwen3-MoE config.json that change the forward pass."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    # MoE (num_experts == 0 means a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {self.architecture!r} is not supported; this build serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json field {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Qwen3 uses 'silu'")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                f"({self.num_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements cached per token over all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which MLP a layer uses, by the rule of transformers' Qwen3MoeDecoderLayer."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a parsed Hugging Face config.json dict. Every field is type-checked: a
        wrong value raises one ConfigError naming `source` (the file) and the field."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source} must hold a JSON object, got a {type(cfg).__name__}; "
                              "restore the checkpoint's config.json")
        try:
            return cls._from_fields(_Fields(cfg, source))
        except ConfigError as e:
            raise (e if source in str(e) else ConfigError(f"{source}: {e}")) from None
        except (TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ConfigError(f"{source} has a malformed value ({e}); restore the checkpoint's "
                              "config.json") from None

    @classmethod
    def _from_fields(cls, f: _Fields) -> ModelConfig:
        cfg = f.cfg
        archs = f.get("architectures", list) or []
        model_type = cfg.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type in ("qwen3_moe", "qwen3"):
            arch = "Qwen3MoeForCausalLM" if model_type == "qwen3_moe" else "Qwen3ForCausalLM"
        else:
            raise ConfigError(f"{f.source} names no 'architectures' and no known 'model_type'")
        hidden = f.int("hidden_size")
        heads = f.int("num_attention_heads")
        theta, scaling = _parse_rope(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(f.int_list("eos_token_id", minimum=0)) if isinstance(eos, list) else (
            () if eos is None else (f.int("eos_token_id", minimum=0),))
        is_moe = arch == "Qwen3MoeForCausalLM"
        return cls(
            architecture=str(arch),
            vocab_size=f.int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=f.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads, falsy_default=True),
            head_dim=f.int("head_dim", hidden // heads, falsy_default=True),
            intermediate_size=f.int("intermediate_size", 0, minimum=0, falsy_default=True),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=f.int("max_position_embeddings", 32768, minimum=2),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=f.bool("attention_bias", False),
            hidden_act=str(f.get("hidden_act", str) or "silu"),
            num_experts=f.int("num_experts", 0, minimum=0, falsy_default=True) if is_moe else 0,
            num_experts_per_tok=(f.int("num_experts_per_tok", 0, minimum=0, falsy_default=True)
                                 if is_moe else 0),
            moe_intermediate_size=f.int("moe_intermediate_size", 0, minimum=0,
                                        falsy_default=True),
            # transformers' class default is False: read it, never assume it.
            norm_topk_prob=f.bool("norm_topk_prob", False),
            decoder_sparse_step=f.int("decoder_sparse_step", 1, falsy_default=True),
            mlp_only_layers=tuple(f.int_list("mlp_only_layers", minimum=0)),
            sliding_window=_parse_sliding_window(cfg),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quantization_config=f.get("quantization_config", dict),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; a model directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data, str(path))

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that `from_hf` reads back to an equal config."""
        is_moe = self.architecture == "Qwen3MoeForCausalLM"
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "qwen3_moe" if is_moe else "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "hidden_act": self.hidden_act,
            "initializer_range": 0.02,
            "use_cache": True,
            "sliding_window": self.sliding_window,
            "use_sliding_window": self.sliding_window is not None,
            "max_window_layers": self.num_hidden_layers,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": None,
        }
        if self.eos_token_ids:
            out["eos_token_id"] = (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
            )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = {
                "rope_type": "yarn",
                "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast,
                "beta_slow": rs.beta_slow,
            }
            if rs.attention_factor is not None:
                out["rope_scaling"]["attention_factor"] = rs.attention_factor
        if is_moe:
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                output_router_logits=False,
                router_aux_loss_coef=0.001,
            )
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelConfig(**values)


class _Fields:
    """Typed reads of config.json fields; a wrong type raises ConfigError naming file and field.
    Absent or null fields take the default (`falsy_default`: 0 and "" too, as HF configs use)."""

    _REQUIRED: Any = object()

    def __init__(self, cfg: dict[str, Any], source: str) -> None:
        self.cfg, self.source = cfg, source

    def _error(self, name: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{self.source} field {name} must be {want}, got {value!r}; restore "
                           "the checkpoint's config.json")

    def _raw(self, name: str, default: Any, falsy_default: bool = False) -> Any:
        value = self.cfg.get(name)
        if value is None or (falsy_default and not value and not isinstance(value, bool)):
            if default is not self._REQUIRED:
                return default
            if name not in self.cfg:
                raise ConfigError(f"{self.source} lacks the required field {name!r}")
        return value

    def get(self, name: str, kind: type, default: Any = None) -> Any:
        value = self.cfg.get(name, default)
        if value is not None and not isinstance(value, kind):
            raise self._error(name, value, f"a {'JSON object' if kind is dict else kind.__name__}")
        return value

    def int(self, name: str, default: Any = _REQUIRED, minimum: int = 1,
            falsy_default: bool = False) -> int:
        value = self._raw(name, default, falsy_default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._error(name, value, f"an integer >= {minimum}")
        return value

    def float(self, name: str, default: float) -> float:
        value = self._raw(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not (
                math.isfinite(value) and value > 0):
            raise self._error(name, value, "a finite number > 0")
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name, default)
        if not isinstance(value, bool):
            raise self._error(name, value, "true or false")
        return value

    def int_list(self, name: str, minimum: int) -> list[int]:
        value = self._raw(name, [])
        if not isinstance(value, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in value):
            raise self._error(name, value, f"a list of integers >= {minimum}")
        return value


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope_theta / rope_scaling, or transformers 5's `rope_parameters` spelling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(
            f"rope scaling type {kind!r} is not supported; Qwen3 checkpoints use 'yarn' (or none)"
        )
    original = int(
        scaling.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 32768)
    )
    factor = scaling.get("factor")
    if factor is None:
        factor = int(cfg["max_position_embeddings"]) / original
    return float(theta), RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=scaling.get("attention_factor"),
        truncate=bool(scaling.get("truncate", True)),
    )


def _parse_sliding_window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window", False) or window in (None, 0):
        return None
    return int(window)


DEFAULT_KV_CACHE_BYTES = 4 * 1024**3  # as vLLM's CPU backend: 4 GiB unless told otherwise


@dataclass(frozen=True)
class EngineConfig:
    """Serving options (also `pio` flags). `kv_cache_memory`: bytes (int), a fraction of free
    memory after loading (float in (0, 1]), or None for min(4 GiB, half of free memory, what
    max_num_seqs sequences of max_model_len tokens need). `sliding_window` forces a window on a
    model without one (None: the model's own)."""

    block_size: int = 16
    kv_cache_memory: int | float | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    sliding_window: int | None = None
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
