"""Qwen3-MoE and dense Qwen3 causal LMs. Attribute paths are the checkpoint's tensor names;
the only packing is the loader's stacking of `mlp.experts.E.*` into [E, ...] tensors."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from inference_pio.config import ModelConfig
from inference_pio.layers.attention import Attention
from inference_pio.layers.moe import DenseMLP, SparseMoeBlock
from inference_pio.layers.norm import RMSNorm
from inference_pio.layers.rotary import RotaryEmbedding, apply_rotary


class WeightLoadError(ValueError):
    """A checkpoint tensor that is missing, unexpected or of the wrong shape."""


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # one [Hd] weight shared by all heads
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.attn = Attention(layer_idx, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                              c.sliding_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v).reshape(num_tokens, -1))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Qwen3Attention(c, layer_idx)
        self.mlp: nn.Module
        if c.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(c.hidden_size, c.num_experts, c.num_experts_per_tok,
                                      c.moe_intermediate_size, c.norm_topk_prob)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class Qwen3MoeForCausalLM(nn.Module):
    """Serves both `Qwen3MoeForCausalLM` and `Qwen3ForCausalLM` (the MLP is chosen per layer)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] (a flat batch laid out by the ForwardContext) -> hidden [T, H]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- checkpoint <-> parameters -------------------------------------------------------
    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name a complete checkpoint holds, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, param in self.named_parameters():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix, (num_experts, two_i, hidden) = name[: -len(".gate_up_proj")], param.shape
                for e in range(num_experts):
                    shapes[f"{prefix}.{e}.gate_proj.weight"] = (two_i // 2, hidden)
                    shapes[f"{prefix}.{e}.up_proj.weight"] = (two_i // 2, hidden)
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name[: -len(".down_proj")]
                for e in range(param.shape[0]):
                    shapes[f"{prefix}.{e}.down_proj.weight"] = tuple(param.shape[1:])
            else:
                shapes[name] = tuple(param.shape)
        return shapes

    def optional_checkpoint_names(self) -> set[str]:
        """Names a checkpoint may carry that are not needed (a tied model's lm_head)."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def param_slice(self, name: str, params: dict[str, nn.Parameter] | None = None
                    ) -> torch.Tensor:
        """The parameter view that checkpoint tensor `name` fills."""
        if params is None:
            params = dict(self.named_parameters(remove_duplicate=False))
        m = _EXPERT.match(name)
        if m is None:
            if name not in params:
                raise WeightLoadError(f"unexpected tensor {name!r}: the model has no such parameter")
            return params[name].data
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            stacked = params.get(f"{prefix}.down_proj")
            rows = slice(None)
        else:
            stacked = params.get(f"{prefix}.gate_up_proj")
            inter = 0 if stacked is None else stacked.shape[1] // 2
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        if stacked is None or expert >= stacked.shape[0]:
            raise WeightLoadError(f"unexpected tensor {name!r}: the model has no such expert")
        return stacked.data[expert, rows]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in (cast to each parameter's dtype); returns the names loaded.
        Completeness is the caller's check (see models.loader)."""
        loaded: set[str] = set()
        optional = self.optional_checkpoint_names()
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, tensor in weights:
            if name in optional:
                continue
            target = self.param_slice(name, params)
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                    f"{list(target.shape)}: config.json and the weights disagree"
                )
            target.copy_(tensor)
            loaded.add(name)
        return loaded


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
                ) -> Qwen3MoeForCausalLM:
    """Allocate an uninitialised model of the class registered for `config.architecture` (no
    random init work); weights come from the loader."""
    from inference_pio.models.registry import MODELS

    model_cls = MODELS.get(config.architecture)
    with torch.device("meta"):
        model = model_cls(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty keeps the tie, but make it explicit
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_buffers()
    return model.eval().requires_grad_(False)
