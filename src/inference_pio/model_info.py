"""`pio info`: what a model costs, from its config.json alone (no weights, no model object).

Counts are arithmetic over the checkpoint's tensor list (`tensor_shapes`, tested name for name
against the model code's own list). Weight bytes are those of the real storage layouts: the
tensors `weight_plan.layout_specs` (a meta-device model with `quantize_modules` applied) would
allocate, derived here from the tensor list and each format's `QuantMethod.part_specs` without
building a model (`storage_specs`, tested name for name, shape and dtype against
`layout_specs`; the resident / expert split and the paging decision equal `plan_weights`'):

- fp32 / bf16 / fp16: every tensor in that dtype (the checkpoint loaded with that --dtype; bf16
  is the checkpoint itself, 61,064,245,248 bytes).
- Quantized formats, as loaded on the CPU (activations in float32): attention projections,
  experts and dense MLPs in the format; the MoE routers and norms in float32 (the activation
  dtype); the embedding and the lm_head in bf16 (the lm_head in the format itself with
  quantize_lm_head: the "+lm_head" column; int4 and int8 load that way by default).
  - int8: int8 weights plus one float32 scale per output row.
  - int4 gG: packed int4 (two per byte; columns padded to a multiple of max(64, G)) plus one
    fp16 scale per group of G columns (symmetric: no zero point).
  - nf4: packed NormalFloat-4 codes plus one float32 absmax per block of 64 columns.
  - fp8: float8 e4m3 weights plus one float32 scale per 128 x 128 tile (Qwen's FP8 layout).
- docs/model.md "Sizes" prices int8 row scales as fp16 and the router in bf16; the real layouts
  store float32 there, so int8 is 31.3 GB here (model.md: 31.2) and a decoded token reads about
  0.03 GB more in every quantized format (the routers: 48 x 128 x 2048 floats, 25 MB more in
  float32). int4 g32 / g64 / g128 agree with model.md to 0.1 GB (18.1 / 17.2 / 16.7 GB): the
  embedding and lm_head are bf16 in both, and no int4 row of this model needs padding. nf4
  (4 bits + fp32 per 64) costs exactly what int4 g32 (4 bits + fp16 per 32) does.
- "Read per token" is what one decode step reads: attention, routers, norms and the routed
  experts of every layer (k of E; the embedding lookup reads one row, ignored); "+lm_head" adds
  the output head stored in the format itself.
- Resident: everything but the routed experts (attention, routers, norms, embedding, lm_head,
  dense MLPs). With --memory, each format is planned as `plan_weights` plans weight_memory: the
  whole model resident if it fits, else the experts paged from disk through a cache of what the
  budget leaves after the resident part (at least top-k experts), else it does not fit; the
  minimum is the resident part plus top-k experts. Context that fits is counted after the
  whole model, resident.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from inference_pio import envs
from inference_pio.config import ConfigError, ModelConfig
from inference_pio.layers.quantization import QuantConfig
from inference_pio.layers.quantization.methods import FloatMethod, QuantMethod

ACTIVATION_DTYPE = torch.float32  # quantized formats as loaded on the CPU ("auto" dtype)
KV_CACHE_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8_e4m3")
PRESETS = ("tiny", "tiny-dense", "qwen3-coder-30b")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ASSUMPTIONS = {
    "layouts": "the tensors the model allocates in each format (weight_plan.layout_specs)",
    "float": "fp32 / bf16 / fp16: every tensor in that dtype",
    "activation_dtype": "float32 (quantized formats as loaded on the CPU): routers and norms",
    "kept_in_bf16": "embedding and lm_head (quantized formats; per_token_with_lm_head prices "
                    "the head in the format itself)",
    "int8": "int8 weights, one float32 scale per output row",
    "int4": "packed int4 (columns padded to a multiple of max(64, group)), one fp16 scale per "
            "group of input columns, no zero point",
    "nf4": "packed NormalFloat-4 codes, one float32 absmax per block of 64 columns",
    "fp8": "float8 e4m3 weights, one float32 scale per 128 x 128 tile",
    "per_token": "attention, routers, norms and the routed experts of every layer; the "
                 "embedding lookup is ignored; per_token_with_lm_head adds the head in the "
                 "format itself",
    "resident": "everything but the routed experts, which can be paged from disk",
    "weight_plan": "with a budget: resident if the whole model fits, else experts paged "
                   "through a cache of what is left after the resident part (at least top-k "
                   "experts), else it does not fit; minimum: resident + top-k experts",
    "memory_budget": "weights plus KV cache only: activations and runtime overhead are ignored",
}

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class WeightFormat:
    """A weight storage format: a float dtype for every tensor, or a quantization method
    (`group_size`: the int4 group / nf4 block)."""

    name: str
    label: str
    method: str
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.method not in FLOAT_DTYPES

    def layout(self, quantize_lm_head: bool = False) -> tuple[torch.dtype, QuantConfig | None]:
        """(activation dtype, QuantConfig or None) as `plan_weights` / `layout_specs` take."""
        if not self.quantized:
            return FLOAT_DTYPES[self.method], None
        return ACTIVATION_DTYPE, QuantConfig(self.method, self.group_size, quantize_lm_head)


WEIGHT_FORMATS = (
    WeightFormat("fp32", "fp32", "fp32"), WeightFormat("bf16", "bf16", "bf16"),
    WeightFormat("fp16", "fp16", "fp16"), WeightFormat("int8", "int8", "int8"),
    WeightFormat("int4_g32", "int4 g32", "int4", 32),
    WeightFormat("int4_g64", "int4 g64", "int4", 64),
    WeightFormat("int4_g128", "int4 g128", "int4", 128),
    WeightFormat("nf4", "nf4", "nf4", 64), WeightFormat("fp8", "fp8", "fp8"),
)


# ---- the tensor list ----------------------------------------------------------------------

def tensor_shapes(config: ModelConfig, experts: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of a complete checkpoint for `config`, by checkpoint name, with its shape
    (without the routed experts' with experts=False: see `expert_shapes`)."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes.update(_attention_shapes(config, prefix + "self_attn."))
        shapes.update(_mlp_shapes(config, prefix + "mlp.", config.is_moe_layer(layer), experts))
        shapes[prefix + "input_layernorm.weight"] = (h,)
        shapes[prefix + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes[HEAD] = (config.vocab_size, h)
    return shapes


def _attention_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {f"{p}q_proj.weight": (q, h), f"{p}k_proj.weight": (kv, h),
                                       f"{p}v_proj.weight": (kv, h), f"{p}o_proj.weight": (h, q)}
    if config.attention_bias:
        out.update({f"{p}q_proj.bias": (q,), f"{p}k_proj.bias": (kv,), f"{p}v_proj.bias": (kv,),
                    f"{p}o_proj.bias": (h,)})
    out.update({f"{p}q_norm.weight": (hd,), f"{p}k_norm.weight": (hd,)})
    return out


def _mlp_shapes(config: ModelConfig, p: str, moe: bool, experts: bool = True
                ) -> dict[str, tuple[int, ...]]:
    h = config.hidden_size
    if not moe:
        i = config.intermediate_size
        return {f"{p}gate_proj.weight": (i, h), f"{p}up_proj.weight": (i, h),
                f"{p}down_proj.weight": (h, i)}
    i = config.moe_intermediate_size
    out: dict[str, tuple[int, ...]] = {f"{p}gate.weight": (config.num_experts, h)}
    for e in range(config.num_experts if experts else 0):
        out.update({f"{p}experts.{e}.{proj}.weight": shape
                    for proj, shape in expert_shapes(config).items()})
    return out


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Projection -> weight shape of one routed expert."""
    h, i = config.hidden_size, config.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def tensor_role(name: str, shape: tuple[int, ...]) -> str:
    """embedding | lm_head | vector (norms, biases) | expert | router | linear."""
    if name == EMBED:
        return "embedding"
    if name == HEAD:
        return "lm_head"
    if len(shape) < 2:
        return "vector"
    if ".mlp.experts." in name:
        return "expert"
    return "router" if name.endswith(".mlp.gate.weight") else "linear"


def _routed_share(config: ModelConfig, expert_total: int) -> int:
    """The part of all experts' total (params or bytes) one token uses: k of E per layer."""
    if not config.num_experts:
        return expert_total
    return expert_total * config.num_experts_per_tok // config.num_experts


# ---- counts -------------------------------------------------------------------------------

def parameter_counts(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Total and per-token active parameters (a tied head counts once, as the embedding)."""
    by_role: dict[str, int] = {}
    for name, shape in shapes.items():
        role = tensor_role(name, shape)
        by_role[role] = by_role.get(role, 0) + math.prod(shape)
    embedding, head = by_role.get("embedding", 0), by_role.get("lm_head", 0)
    experts = by_role.get("expert", 0)
    total = sum(by_role.values())
    core = total - embedding - head - experts + _routed_share(config, experts)
    layers = sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers."))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return {"total": total, "embedding": embedding, "lm_head": head, "experts": experts,
            "per_layer": layers // config.num_hidden_layers,
            "experts_per_layer": experts // moe_layers if moe_layers else 0,
            "active": core + embedding + head, "active_without_embedding_and_head": core}


# ---- storage layouts ---------------------------------------------------------------------

def storage_specs(config: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None) -> Specs:
    """Checkpoint name -> (shape, dtype) of every tensor of the storage layout, as
    `weight_plan.layout_specs(config, dtype, quant)` returns it, but derived from the tensor
    list and the methods' part specs, without a model object (see `layout_groups`)."""
    specs: Specs = {}
    for name, spec, count in layout_groups(config, dtype, quant):
        if count:
            specs.update((name.format(e), spec) for e in range(count))
        else:
            specs[name] = spec
    return specs


def layout_groups(config: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None
                  ) -> Iterable[tuple[str, tuple[tuple[int, ...], torch.dtype], int]]:
    """The storage layout compactly: (name, (shape, dtype), 0) for each tensor but the routed
    experts' parts, which come once per (MoE layer, projection, part) as (name with "{}" for
    the expert index, spec, number of experts). Mirrors `quantize_modules`: with a QuantConfig,
    experts and every nn.Linear but the routers and the lm_head take the method's parts (a
    swapped-in linear's bias is float32); the embedding and the lm_head are stored as the
    QuantConfig says; the rest stays in `dtype`. Without one, every tensor is in `dtype`."""
    method = FloatMethod(dtype) if quant is None else quant.weight_method()
    swapped = quant is not None and not _same_as_activations(method, dtype)
    for name, shape in tensor_shapes(config, experts=False).items():
        role = tensor_role(name, shape)
        module, _, attr = name.rpartition(".")
        if quant is None:
            yield name, (shape, dtype), 0
        elif role == "embedding":
            yield name, (shape, quant.embedding_torch_dtype), 0
        elif role == "linear" and swapped:
            for part, spec in method.part_specs(*shape).items():
                yield f"{module}.{part}", spec, 0
        elif role == "vector" and attr == "bias" and swapped:
            yield name, (shape, torch.get_default_dtype()), 0  # QuantLinear's own bias
        elif role != "lm_head":
            yield name, (shape, dtype), 0
    if quant is not None:
        # A tied head is the embedding itself only while neither module is swapped.
        head = quant.lm_head_method()
        if (not config.tie_word_embeddings or not _same_as_activations(head, dtype)
                or quant.embedding_torch_dtype != dtype):
            for part, spec in head.part_specs(config.vocab_size, config.hidden_size).items():
                yield f"lm_head.{part}", spec, 0
    parts = {proj: method.part_specs(*shape) for proj, shape in expert_shapes(config).items()}
    for layer in range(config.num_hidden_layers):
        if config.num_experts and config.is_moe_layer(layer):
            for proj, specs in parts.items():
                for part, spec in specs.items():
                    name = f"model.layers.{layer}.mlp.experts.{{}}.{proj}.{part}"
                    yield name, spec, config.num_experts


def _same_as_activations(method: QuantMethod, dtype: torch.dtype) -> bool:
    """As quantize_modules decides: such a linear is left as it is (not swapped)."""
    return isinstance(method, FloatMethod) and method.dtype == dtype


def _nbytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    return math.prod(spec[0]) * spec[1].itemsize


def weight_bytes(config: ModelConfig, fmt: WeightFormat) -> dict[str, Any]:
    """Bytes of the whole model stored in `fmt`, split as `plan_weights` splits it (resident vs
    routed experts), and bytes one decoded token reads (without and with the lm_head, then
    priced in `fmt` itself)."""
    dtype, quant = fmt.layout()
    resident = experts = read = 0
    for name, spec, count in layout_groups(config, dtype, quant):
        if count:
            experts += count * _nbytes(spec)
            continue
        resident += _nbytes(spec)
        if not name.startswith(("model.embed_tokens.", "lm_head.")):
            read += _nbytes(spec)
    n = num_routed_experts(config)
    per_token = read + _routed_share(config, experts)
    head_dtype, head_quant = fmt.layout(quantize_lm_head=True)
    rows, cols = config.vocab_size, config.hidden_size
    head = (head_quant.lm_head_method().nbytes(rows, cols) if head_quant is not None
            else rows * cols * head_dtype.itemsize)
    layout = quant.describe() if quant is not None else str(dtype).removeprefix("torch.")
    return {"layout": layout,
            "model": resident + experts, "resident": resident, "experts": experts,
            "num_experts": n, "per_expert": experts // n if n else 0,
            "per_token": per_token, "per_token_with_lm_head": per_token + head}


def num_routed_experts(config: ModelConfig) -> int:
    """Routed experts in the whole model: MoE layers x experts per layer."""
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return moe_layers * config.num_experts if config.num_experts else 0


def weight_fit(config: ModelConfig, sizes: dict[str, Any], budget: int) -> dict[str, Any]:
    """`plan_weights`' decision for a weight budget, on sizes from `weight_bytes`: "resident"
    (the whole model fits), "paged" (experts paged through a cache of `cache_experts`) or "no";
    `minimum_bytes`: the smallest budget that works (resident part plus top-k experts)."""
    resident, n, per_expert = sizes["resident"], sizes["num_experts"], sizes["per_expert"]
    need = config.num_experts_per_tok
    minimum = resident + need * per_expert if n else sizes["model"]
    if sizes["model"] <= budget:
        fits, cache = "resident", n
    else:
        cache = (budget - resident) // per_expert if n and budget > resident else 0
        fits = "paged" if n and cache >= need else "no"
        cache = min(cache, n) if fits == "paged" else 0
    return {"fits": fits, "cache_experts": cache, "cache_bytes": cache * per_expert,
            "minimum_bytes": minimum}


def kv_bytes(config: ModelConfig) -> dict[str, int]:
    """KV cache bytes per token (all layers, K and V, scales included) for each KV dtype."""
    from inference_pio.runtime.kv_cache import kv_bytes_per_token

    return {name: kv_bytes_per_token(config, _kv_format(name)) for name in KV_CACHE_DTYPES}


def _kv_format(name: str) -> Any:
    from inference_pio.runtime.kv_quant import KVCacheFormat, resolve_kv_cache_format

    try:
        return resolve_kv_cache_format(name, torch.bfloat16)
    except ConfigError:  # fp8 unsupported by this torch here: its size is the same anyway
        return KVCacheFormat(name, torch.float8_e4m3fn, is_quantized=True)


def context_fit(weights: dict[str, dict[str, Any]], kv: dict[str, int], budget: int
                ) -> dict[str, dict[str, int | None]]:
    """Tokens of KV cache that fit in `budget` after the whole model, resident, per (weight
    format, KV dtype); None where not even one token fits."""
    return {fmt: {name: _tokens(budget - sizes["model"], per_token)
                  for name, per_token in kv.items()} for fmt, sizes in weights.items()}


def _tokens(free: int, per_token: int) -> int | None:
    return free // per_token if free >= per_token else None


def summarize(config: ModelConfig, source: str, memory: int | None = None) -> dict[str, Any]:
    """Everything `pio info` shows, JSON-ready (all sizes in bytes)."""
    shapes = tensor_shapes(config)
    weights = {fmt.name: weight_bytes(config, fmt) for fmt in WEIGHT_FORMATS}
    kv = kv_bytes(config)
    budget = None if memory is None else {
        "bytes": memory, "context_tokens": context_fit(weights, kv, memory),
        "weights": {name: weight_fit(config, sizes, memory) for name, sizes in weights.items()}}
    return {"source": source, "model": _model_facts(config),
            "parameters": parameter_counts(config, shapes), "weight_bytes": weights,
            "kv_elements_per_token": config.kv_elements_per_token, "kv_bytes_per_token": kv,
            "memory_budget": budget, "assumptions": ASSUMPTIONS}


def _model_facts(config: ModelConfig) -> dict[str, Any]:
    names = ("architecture", "num_hidden_layers", "hidden_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
             "moe_intermediate_size", "intermediate_size", "vocab_size",
             "max_position_embeddings", "tie_word_embeddings", "torch_dtype")
    facts = {name: getattr(config, name) for name in names}
    facts["num_moe_layers"] = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return facts


# ---- where the config comes from ----------------------------------------------------------

def load_config(model: str | None = None, preset: str | None = None, *,
                revision: str | None = None, offline: bool = False) -> tuple[ModelConfig, str]:
    """(config, where it came from): a preset, a model directory / config.json / hub id, else
    INFERENCE_PIO_MODEL, else the embedded default's config (nothing is written)."""
    if preset is not None:
        from inference_pio.testing import PRESETS as PRESET_CONFIGS

        if preset not in PRESET_CONFIGS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESET_CONFIGS[preset](None), f"preset {preset}"
    name = model if model is not None else envs.default_model()
    if name is None:
        from inference_pio.models.default_model import DEFAULT_MODEL_NAME, default_model_config

        return default_model_config(), f"{DEFAULT_MODEL_NAME} (embedded default, random weights)"
    return ModelConfig.from_file(config_path(name, revision=revision, offline=offline)), name


def config_path(name: str, *, revision: str | None = None, offline: bool = False) -> Path:
    """config.json of a model directory, a config.json path, or a hub id (the cached copy, else
    only config.json is downloaded, unless offline). A local path imports no hub code."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local / "config.json"
    if local.is_file():
        return local
    from inference_pio.models.hub import ModelNotFoundError

    if name.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model directory {local} does not exist")
    if name.count("/") != 1:
        raise ModelNotFoundError(f"{name!r} is neither a model directory, a config.json file "
                                 "nor a Hugging Face repo id (ORG/NAME)")
    return _hub_config(name, revision, offline)


def _hub_config(repo_id: str, revision: str | None, offline: bool) -> Path:
    from huggingface_hub import hf_hub_download

    from inference_pio.models.hub import ModelNotFoundError, read_hub_env

    env = read_hub_env()
    local_only = offline or env.offline_reason is not None
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision,
                                    cache_dir=str(env.cache_dir), local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - not cached / no network / no such repo
        where = f"in the Hugging Face cache {env.cache_dir}" if local_only else "on the Hub"
        raise ModelNotFoundError(
            f"found no config.json of {repo_id} {where} ({type(e).__name__}); pass a model "
            f"directory, or fetch it: huggingface-cli download {repo_id} config.json") from None


# ---- presentation -------------------------------------------------------------------------

@dataclass(frozen=True)
class TextTable:
    """A titled table of strings (rendered with rich when installed, else as plain text)."""

    title: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[str, ...]] = ()
    note: str = ""
    numeric: bool = True  # right-align every column but the first


def fmt_count(n: int) -> str:
    """30532122624 -> "30.5B"; 623000000 -> "623M"."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{_three_digits(n / div)}{unit}"
    return str(n)


def fmt_size(n: float) -> str:
    """Decimal units as in model.md: 61064245248 -> "61.1 GB"."""
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{_three_digits(n / div)} {unit}"
    return f"{n:.0f} B"


def fmt_binary(n: float) -> str:
    """Binary units for KV sizes: 98304 -> "96 KiB"; 3 GiB -> "3 GiB"."""
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{_three_digits(n / div)} {unit}"
    return f"{n:.0f} B"


def _three_digits(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def summary_tables(summary: dict[str, Any]) -> list[TextTable]:
    tables = [_model_table(summary), _parameter_table(summary["parameters"]),
              _weight_table(summary), _kv_table(summary)]
    if summary["memory_budget"] is not None:
        tables.extend([_plan_table(summary), _context_table(summary)])
    return tables


def _model_table(summary: dict[str, Any]) -> TextTable:
    m = summary["model"]
    experts = (f"{m['num_experts']} per MoE layer, {m['num_experts_per_tok']} active per token "
               f"(expert MLP {m['moe_intermediate_size']})" if m["num_experts"] else "none (dense)")
    dense = m["num_hidden_layers"] - m["num_moe_layers"]
    heads = (f"{m['num_attention_heads']} query / {m['num_key_value_heads']} KV heads of "
             f"{m['head_dim']}")
    rows = [("source", summary["source"]), ("architecture", m["architecture"]),
            ("layers", f"{m['num_hidden_layers']} ({m['num_moe_layers']} MoE, {dense} dense)"),
            ("hidden size", str(m["hidden_size"])),
            ("attention", heads),
            ("experts", experts), ("vocabulary", f"{m['vocab_size']:,}"),
            ("max context", f"{m['max_position_embeddings']:,} tokens"),
            ("tied embeddings", "yes" if m["tie_word_embeddings"] else "no"),
            ("checkpoint dtype", m["torch_dtype"])]
    return TextTable("Model", ("", ""), rows, numeric=False)


def _parameter_table(p: dict[str, int]) -> TextTable:
    rows = [("total", p["total"]), ("embedding", p["embedding"]), ("lm_head", p["lm_head"]),
            ("per layer (mean)", p["per_layer"]), ("experts per MoE layer", p["experts_per_layer"]),
            ("active per token", p["active"]),
            ("active per token, without embedding and lm_head",
             p["active_without_embedding_and_head"])]
    return TextTable("Parameters", ("", "count", "exact"),
                     [(name, fmt_count(n), f"{n:,}") for name, n in rows])


def _weight_table(summary: dict[str, Any]) -> TextTable:
    weights = summary["weight_bytes"]
    moe = summary["model"]["num_experts"] > 0
    rows = [(fmt.label, *(fmt_size(weights[fmt.name][key]) for key in (
        "model", "resident", "experts", "per_token", "per_token_with_lm_head")))
        for fmt in WEIGHT_FORMATS]
    if not moe:  # dense: everything is resident
        rows = [(r[0], r[1], r[4], r[5]) for r in rows]
    note = ("as stored: int8 + fp32 scale per row; int4 + fp16 scale per group; nf4 + fp32 "
            "absmax per 64; fp8 e4m3 + fp32 scale per 128x128; quantized formats keep routers "
            "and norms in fp32, embedding and lm_head in bf16 (+lm_head: the head in the format "
            "itself)")
    columns = ("format", "whole model", *(("resident", "experts") if moe else ()),
               "read per token", "+lm_head")
    return TextTable("Weights", columns, rows, note)


def _kv_table(summary: dict[str, Any]) -> TextTable:
    max_len = summary["model"]["max_position_embeddings"]
    lengths = [n for n in (32768, max_len) if n <= max_len]
    rows = [(name, f"{per:,} B", fmt_binary(per), *(fmt_binary(per * n) for n in lengths))
            for name, per in summary["kv_bytes_per_token"].items()]
    columns = ("KV dtype", "bytes per token", "", *(f"{n:,} tokens" for n in lengths))
    note = (f"{summary['kv_elements_per_token']:,} elements per token; int8/fp8 add one fp16 "
            "scale per token and KV head")
    return TextTable("KV cache", columns, rows, note)


def _plan_table(summary: dict[str, Any]) -> TextTable:
    budget = summary["memory_budget"]
    plans = budget["weights"]
    rows = [(fmt.label, fmt_binary(summary["weight_bytes"][fmt.name]["model"]),
             *_plan_cells(plans[fmt.name], summary["weight_bytes"][fmt.name]["num_experts"]))
            for fmt in WEIGHT_FORMATS]
    k = summary["model"]["num_experts_per_tok"]
    note = ("paged: experts read from disk through a cache of what the budget leaves after the "
            f"resident weights (at least {k} experts); minimum: resident weights plus {k} "
            "experts" if summary["model"]["num_experts"] else
            "a dense model cannot page: the whole model must fit")
    return TextTable(f"Weights in {fmt_binary(budget['bytes'])}",
                     ("format", "whole model", "weights", "expert cache", "minimum"), rows, note)


def _plan_cells(plan: dict[str, Any], num_experts: int) -> tuple[str, str, str]:
    minimum = fmt_binary(plan["minimum_bytes"])
    if plan["fits"] == "resident":
        return "resident", f"all {num_experts:,}" if num_experts else "-", minimum
    if plan["fits"] == "paged":
        cache = (f"{plan['cache_experts']:,} of {num_experts:,} "
                 f"({fmt_binary(plan['cache_bytes'])})")
        return "experts paged", cache, minimum
    return "do not fit", "-", minimum


def _context_table(summary: dict[str, Any]) -> TextTable:
    budget = summary["memory_budget"]
    fits, plans = budget["context_tokens"], budget["weights"]
    rows = [(fmt.label, *(_fit_cell(fits[fmt.name][kv], plans[fmt.name]["fits"])
                          for kv in KV_CACHE_DTYPES)) for fmt in WEIGHT_FORMATS]
    note = (f"the model's max context is {summary['model']['max_position_embeddings']:,} tokens;"
            " activations and runtime overhead are not counted; paged: the weights fit only "
            "with experts paged, and the expert cache takes the budget")
    return TextTable(f"Tokens of context that fit in {fmt_binary(budget['bytes'])} after the "
                     "weights", ("weights \\ KV", *KV_CACHE_DTYPES), rows, note)


def _fit_cell(tokens: int | None, plan: str = "no") -> str:
    if tokens is not None:
        return f"{tokens:,}"
    return "paged" if plan == "paged" else "does not fit"


def print_tables(tables: Iterable[TextTable], stream: TextIO) -> None:
    """Rich tables (colours only on a terminal, NO_COLOR honoured), else plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream.write(plain_tables(tables))
        return
    width = None if stream.isatty() else 120
    console = Console(file=stream, width=width, highlight=False, markup=False, emoji=False)
    for t in tables:
        table = Table(title=t.title, title_justify="left", title_style="bold",
                      caption=t.note or None, caption_justify="left", show_header=any(t.columns))
        for i, column in enumerate(t.columns):
            table.add_column(column, justify="right" if i and t.numeric else "left",
                             style="cyan" if i == 0 else None)
        for row in t.rows:
            table.add_row(*row)
        console.print(table)


def plain_tables(tables: Iterable[TextTable]) -> str:
    lines: list[str] = []
    for t in tables:
        widths = [max(len(r[i]) for r in [t.columns, *t.rows]) for i in range(len(t.columns))]
        lines.append(t.title)
        for row in [*([t.columns] if any(t.columns) else []), *t.rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        lines.extend([t.note, ""] if t.note else [""])
    return "\n".join(lines)
