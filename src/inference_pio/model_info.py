"""`pio info`: what a model costs, from its config.json alone (no weights, no model object).

Counts are arithmetic over the checkpoint's tensor list (`tensor_shapes`, tested name for name
against the model code's own list). Storage formats, as in docs/model.md "Sizes":

- fp32 / bf16 / fp16: every tensor in that dtype.
- int8: each weight matrix as int8 plus one fp16 scale per output row.
- int4 gG: each weight matrix as packed int4 (two per byte) plus one fp16 scale per group of G
  input columns (symmetric: no zero point).
- The quantized formats keep the router, norms, biases, embedding and lm_head in bf16 (the
  convention of the official FP8 checkpoint). "Read per token" is what one decode step reads:
  attention, router, norms and the routed experts of every layer (the embedding lookup reads
  one row, ignored); "+lm_head" adds the output head stored in the format itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from inference_pio import envs
from inference_pio.config import ConfigError, ModelConfig

SCALE_BYTES = 2  # fp16 scales: int8 rows and int4 groups
KEPT_BYTES = 2  # bf16: tensors the quantized formats leave unquantized
KV_CACHE_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8_e4m3")
PRESETS = ("tiny", "tiny-dense", "qwen3-coder-30b")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
QUANTIZED_ROLES = ("expert", "linear")

ASSUMPTIONS = {
    "scale_dtype": "float16",
    "int8": "int8 weights, one fp16 scale per output row",
    "int4": "packed int4 weights, one fp16 scale per group of input columns, no zero point",
    "kept_in_bf16": "router, norms, biases, embedding and lm_head (quantized formats)",
    "per_token": "attention, router, norms and the routed experts of every layer; the "
                 "embedding lookup is ignored; per_token_with_lm_head adds the head in the "
                 "format itself",
    "memory_budget": "weights plus KV cache only: activations and runtime overhead are ignored",
}


@dataclass(frozen=True)
class WeightFormat:
    """A weight storage format. `group_size` None: plain float; 0: one scale per row."""

    name: str
    label: str
    bits: int
    group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.group_size is not None

    def matrix_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one tensor stored in this format (scales included)."""
        rows, cols = math.prod(shape[:-1]), shape[-1]
        data = rows * -(-cols * self.bits // 8)
        if not self.quantized:
            return data
        groups = 1 if not self.group_size else -(-cols // self.group_size)
        return data + rows * groups * SCALE_BYTES


WEIGHT_FORMATS = (
    WeightFormat("fp32", "fp32", 32), WeightFormat("bf16", "bf16", 16),
    WeightFormat("fp16", "fp16", 16), WeightFormat("int8", "int8", 8, 0),
    WeightFormat("int4_g32", "int4 g32", 4, 32), WeightFormat("int4_g64", "int4 g64", 4, 64),
    WeightFormat("int4_g128", "int4 g128", 4, 128),
)


# ---- the tensor list ----------------------------------------------------------------------

def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a complete checkpoint for `config`, by checkpoint name, with its shape."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes.update(_attention_shapes(config, prefix + "self_attn."))
        shapes.update(_mlp_shapes(config, prefix + "mlp.", config.is_moe_layer(layer)))
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


def _mlp_shapes(config: ModelConfig, p: str, moe: bool) -> dict[str, tuple[int, ...]]:
    h = config.hidden_size
    if not moe:
        i = config.intermediate_size
        return {f"{p}gate_proj.weight": (i, h), f"{p}up_proj.weight": (i, h),
                f"{p}down_proj.weight": (h, i)}
    i = config.moe_intermediate_size
    out: dict[str, tuple[int, ...]] = {f"{p}gate.weight": (config.num_experts, h)}
    for e in range(config.num_experts):
        out.update({f"{p}experts.{e}.gate_proj.weight": (i, h),
                    f"{p}experts.{e}.up_proj.weight": (i, h),
                    f"{p}experts.{e}.down_proj.weight": (h, i)})
    return out


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


def _stored_bytes(fmt: WeightFormat, role: str, shape: tuple[int, ...]) -> int:
    if fmt.quantized and role not in QUANTIZED_ROLES:
        return math.prod(shape) * KEPT_BYTES
    return fmt.matrix_bytes(shape)


def weight_bytes(config: ModelConfig, shapes: dict[str, tuple[int, ...]],
                 fmt: WeightFormat) -> dict[str, int]:
    """Bytes of the whole model in `fmt`, and bytes one decoded token reads (without and with
    the lm_head, which is then priced in `fmt` itself)."""
    model = read = experts = 0
    for name, shape in shapes.items():
        role = tensor_role(name, shape)
        size = _stored_bytes(fmt, role, shape)
        model += size
        if role == "expert":
            experts += size
        elif role not in ("embedding", "lm_head"):
            read += size
    per_token = read + _routed_share(config, experts)
    head = fmt.matrix_bytes(shapes.get(HEAD, shapes[EMBED]))
    return {"model": model, "per_token": per_token, "per_token_with_lm_head": per_token + head}


def kv_bytes(config: ModelConfig) -> dict[str, int]:
    """KV cache bytes per token (all layers, K and V, scales included) for each KV dtype."""
    from inference_pio.runtime.kv_cache import kv_bytes_per_token

    return {name: kv_bytes_per_token(config, _kv_format(name)) for name in KV_CACHE_DTYPES}


def _kv_format(name: str) -> Any:
    import torch

    from inference_pio.runtime.kv_quant import KVCacheFormat, resolve_kv_cache_format

    try:
        return resolve_kv_cache_format(name, torch.bfloat16)
    except ConfigError:  # fp8 unsupported by this torch here: its size is the same anyway
        return KVCacheFormat(name, torch.float8_e4m3fn, is_quantized=True)


def context_fit(weights: dict[str, dict[str, int]], kv: dict[str, int], budget: int
                ) -> dict[str, dict[str, int | None]]:
    """Tokens of KV cache that fit in `budget` after the weights, per (weight format, KV dtype);
    None where not even one token fits."""
    return {fmt: {name: _tokens(budget - sizes["model"], per_token)
                  for name, per_token in kv.items()} for fmt, sizes in weights.items()}


def _tokens(free: int, per_token: int) -> int | None:
    return free // per_token if free >= per_token else None


def summarize(config: ModelConfig, source: str, memory: int | None = None) -> dict[str, Any]:
    """Everything `pio info` shows, JSON-ready (all sizes in bytes)."""
    shapes = tensor_shapes(config)
    weights = {fmt.name: weight_bytes(config, shapes, fmt) for fmt in WEIGHT_FORMATS}
    kv = kv_bytes(config)
    budget = None if memory is None else {"bytes": memory,
                                          "context_tokens": context_fit(weights, kv, memory)}
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
    only config.json is downloaded, unless offline)."""
    from inference_pio.models.hub import ModelNotFoundError

    local = Path(name).expanduser()
    if local.is_dir():
        return local / "config.json"
    if local.is_file():
        return local
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
              _weight_table(summary["weight_bytes"]), _kv_table(summary)]
    if summary["memory_budget"] is not None:
        tables.append(_context_table(summary))
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


def _weight_table(weights: dict[str, dict[str, int]]) -> TextTable:
    rows = [(fmt.label, fmt_size(weights[fmt.name]["model"]),
             fmt_size(weights[fmt.name]["per_token"]),
             fmt_size(weights[fmt.name]["per_token_with_lm_head"])) for fmt in WEIGHT_FORMATS]
    note = ("int8: fp16 scale per row; int4: fp16 scale per group, no zero point; router, norms, "
            "embedding and lm_head stay bf16 (+lm_head: the head in the format itself)")
    return TextTable("Weights", ("format", "whole model", "read per token", "+lm_head"), rows,
                     note)


def _kv_table(summary: dict[str, Any]) -> TextTable:
    max_len = summary["model"]["max_position_embeddings"]
    lengths = [n for n in (32768, max_len) if n <= max_len]
    rows = [(name, f"{per:,} B", fmt_binary(per), *(fmt_binary(per * n) for n in lengths))
            for name, per in summary["kv_bytes_per_token"].items()]
    columns = ("KV dtype", "bytes per token", "", *(f"{n:,} tokens" for n in lengths))
    note = (f"{summary['kv_elements_per_token']:,} elements per token; int8/fp8 add one fp16 "
            "scale per token and KV head")
    return TextTable("KV cache", columns, rows, note)


def _context_table(summary: dict[str, Any]) -> TextTable:
    budget = summary["memory_budget"]
    fits = budget["context_tokens"]
    rows = [(fmt.label, *(_fit_cell(fits[fmt.name][kv]) for kv in KV_CACHE_DTYPES))
            for fmt in WEIGHT_FORMATS]
    note = (f"the model's max context is {summary['model']['max_position_embeddings']:,} tokens;"
            " activations and runtime overhead are not counted")
    return TextTable(f"Tokens of context that fit in {fmt_binary(budget['bytes'])} after the "
                     "weights", ("weights \\ KV", *KV_CACHE_DTYPES), rows, note)


def _fit_cell(tokens: int | None) -> str:
    return "does not fit" if tokens is None else f"{tokens:,}"


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
