"""Qwen3-MoE and dense Qwen3 causal LMs. Attribute paths are the checkpoint's tensor names;
the only packing is the loader's stacking of `mlp.experts.E.*` into [E, ...] tensors."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from inference_pio.config import ModelConfig
from inference_pio.layers.attention import Attention
from inference_pio.layers.custom_op import choose_impl, select_ops
from inference_pio.layers.moe import DenseMLP, SparseMoeBlock
from inference_pio.layers.norm import RMSNorm
from inference_pio.layers.quantization import QuantConfig, quantize_modules
from inference_pio.layers.rotary import QKNormRope, RotaryEmbedding
from inference_pio.utils.memory import advise_huge_pages


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
        self.qk_norm_rope = QKNormRope()
        self.attn = Attention(layer_idx, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                              c.sliding_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.qk_norm_rope(q, k, self.q_norm, self.k_norm, cos, sin)
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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block with the adds fused into the norms: takes and returns
        (this sublayer's output, the residual stream before it); the hidden state after the
        layer is their sum, which the next norm forms."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


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
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.norm(x, residual)[0] if residual is not None else self.norm(x)


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
    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter or buffer view it fills, in this model's
        storage layout (float weights, or a quantization's parts). Modules with their own
        layout (stacked experts, quantized experts) say so through `checkpoint_views`."""
        views: dict[str, torch.Tensor] = {}
        seen: set[int] = set()  # ids of tensors already named: a tied lm_head is the embedding
        # One walk, linear in the number of modules: a module with its own layout is not
        # descended into (the old prefix test against every such module was quadratic).
        stack: list[tuple[str, nn.Module]] = [("", self)]
        while stack:
            prefix, module = stack.pop()
            own = getattr(module, "checkpoint_views", None)
            if own is not None and module is not self:
                views.update(own(prefix))
                continue
            tensors = [*module.named_parameters(recurse=False),
                       *((n, b) for n, b in module.named_buffers(recurse=False)
                         if n not in module._non_persistent_buffers_set)]
            for attr, tensor in tensors:
                if id(tensor) not in seen:
                    views[f"{prefix}.{attr}" if prefix else attr] = tensor
                    seen.add(id(tensor))
            children = [(f"{prefix}.{name}" if prefix else name, child)
                        for name, child in module.named_children()]
            stack.extend(reversed(children))  # pop in registration order, as named_modules
        return views

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name a complete checkpoint holds, with its shape."""
        return {name: tuple(spec[0]) for name, spec in self.checkpoint_specs().items()}

    def checkpoint_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor name of this model's checkpoint layout with (shape, dtype), including
        offloaded experts (which have no views)."""
        specs = {name: (tuple(t.shape), t.dtype) for name, t in self.checkpoint_views().items()}
        for prefix, module in self.named_modules():
            extra = getattr(module, "checkpoint_specs", None)
            if extra is not None and module is not self:
                specs.update(extra(prefix))
        return specs

    def optional_checkpoint_names(self) -> set[str]:
        """Names a checkpoint may carry that are not needed (a tied model's lm_head)."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def _float_loaders(self) -> dict[str, nn.Module]:
        """Module prefix -> module that quantizes a checkpoint's float weights itself."""
        return {prefix: m for prefix, m in self.named_modules()
                if m is not self and hasattr(m, "load_float_weight")}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in: a tensor stored as is is cast to its view's dtype; a
        float weight of a quantized module is quantized on the way. Returns the names loaded.
        Completeness is the caller's check (see models.loader)."""
        loaded: set[str] = set()
        optional = self.optional_checkpoint_names()
        views, float_loaders = self.checkpoint_views(), self._float_loaders()
        tied_head = (self.config.tie_word_embeddings and "lm_head" in float_loaders)
        head_stored, embedding = False, None
        for name, tensor in weights:
            if tied_head and name.startswith("lm_head.") and name in views:
                head_stored = True  # a pre-quantized checkpoint's own copy of the tied head
            elif name in optional:
                continue
            self._load_one(name, tensor, views, float_loaders)
            if tied_head and name == "model.embed_tokens.weight":
                embedding = tensor
            loaded.add(name)
        if tied_head and not head_stored and embedding is not None:
            float_loaders["lm_head"].load_float_weight("weight", embedding)
        return loaded - optional

    @staticmethod
    def _load_one(name: str, tensor: torch.Tensor, views: dict[str, torch.Tensor],
                  float_loaders: dict[str, nn.Module]) -> None:
        target = views.get(name)
        if target is not None and _storable(tensor, target):
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                    f"{list(target.shape)}: config.json and the weights disagree")
            target.copy_(tensor)
            return
        if tensor.is_floating_point() and tensor.dtype not in _FP8:
            owner, suffix = _owner(name, float_loaders)
            if owner is not None:
                try:
                    owner.load_float_weight(suffix, tensor)
                    return
                except KeyError:
                    pass
                except ValueError as e:
                    raise WeightLoadError(f"tensor {name!r}: {e}") from None
        if target is not None:
            raise WeightLoadError(
                f"tensor {name!r} is stored as {tensor.dtype}, the model expects {target.dtype}: "
                "the checkpoint's quantization_config and its tensors disagree")
        raise WeightLoadError(f"unexpected tensor {name!r}: the model has no such parameter")


def _owner(name: str, float_loaders: dict[str, nn.Module]) -> tuple[nn.Module | None, str]:
    """The longest module prefix of `name` that quantizes float weights, and the rest."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = float_loaders.get(".".join(parts[:cut]))
        if owner is not None:
            return owner, ".".join(parts[cut:])
    return None, name


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _storable(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    """Float tensors cast into float views; integer and FP8 storage must match exactly."""
    if target.dtype in _FP8 or not target.is_floating_point():
        return tensor.dtype == target.dtype
    return tensor.is_floating_point() and tensor.dtype not in _FP8


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                quant_config: QuantConfig | None = None, offload_experts: bool = False
                ) -> Qwen3MoeForCausalLM:
    """Allocate an uninitialised model of the class registered for `config.architecture` (no
    random init work); weights come from the loader. `dtype` is the activation dtype (and the
    weights' when `quant_config` is None); `quant_config` swaps in quantized modules;
    `offload_experts` leaves expert weights unallocated (the loader pages them)."""
    model = build_model_meta(config, dtype, quant_config, offload_experts).to_empty(device=device)
    advise_huge_pages([*model.parameters(), *model.buffers()])  # before the first write
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear) and isinstance(
            model.model.embed_tokens, nn.Embedding):  # to_empty keeps the tie; make it explicit
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_buffers()
    select_ops(model, choose_impl(device, dtype))  # each op's implementation, chosen once
    return model.eval().requires_grad_(False)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "orthogonal_", "sparse_")
_init_lock = threading.Lock()


def _return_tensor(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within the block, torch.nn.init's initialisers do nothing (what transformers'
    `no_init_weights` does): modules built on the meta device have no values to initialise,
    and running the initialisers there imports torch._dynamo (seconds of start-up, through
    torch._refs). Process-wide while it lasts (serialised by a lock); meant for meta builds."""
    with _init_lock:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS
                 if hasattr(nn.init, name)}
        try:
            for name in saved:
                setattr(nn.init, name, _return_tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)


def build_model_meta(config: ModelConfig, dtype: torch.dtype,
                     quant_config: QuantConfig | None = None, offload_experts: bool = False
                     ) -> Qwen3MoeForCausalLM:
    """The model on the meta device: shapes, dtypes and checkpoint layout at no cost."""
    from inference_pio.models.registry import MODELS

    with torch.device("meta"), skip_init():
        model = MODELS.get(config.architecture)(config).to(dtype)
        if quant_config is not None:
            quantize_modules(model, quant_config, dtype, offload_experts)
    return model


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each quantization method repack its modules' weights once loading is done."""
    for module in model.modules():
        method = getattr(module, "method", None)
        if method is not None:
            method.process_weights_after_loading(module)
