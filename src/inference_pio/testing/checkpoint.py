"""Random-weight checkpoints laid out exactly like the real Hugging Face ones, for tests and for
trying the engine without the 61 GB download.

Every tensor comes from its own generator seeded by (seed, name), so files are reproducible byte
for byte and can be written shard by shard: memory stays about one shard even for real dims."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inference_pio.config import ModelConfig, resolve_dtype
from inference_pio.layers.quantization import QuantConfig
from inference_pio.models.quantize import quantization_config_json
from inference_pio.models.qwen3_moe import Qwen3MoeForCausalLM
from inference_pio.models.weight_plan import layout_specs

# The real tokenizer emits ids up to 151668 (see docs/model.md), so smaller vocabs break it.
MIN_VOCAB_FOR_TOKENIZER = 151669
QWEN3_VOCAB_SIZE = 151936
_NORM_NOISE = 0.1  # norms are ones plus this much noise, so tests notice a norm that is ignored
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def default_generation_config() -> dict[str, Any]:
    """The generation_config.json of Qwen3-Coder-30B-A3B-Instruct (a fresh dict each call)."""
    return {
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }


# ---- config presets ---------------------------------------------------------------------

def qwen3_coder_30b_config(num_layers: int | None = None) -> ModelConfig:
    """The real Qwen3-Coder-30B-A3B-Instruct dims; `num_layers` cuts the depth for tests."""
    return ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=QWEN3_VOCAB_SIZE, hidden_size=2048,
        num_hidden_layers=48 if num_layers is None else num_layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=5472,
        rms_norm_eps=1e-6, rope_theta=10_000_000.0, max_position_embeddings=262144,
        tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, eos_token_ids=(151645,),
        torch_dtype="bfloat16",
    )


def tiny_moe_config(**overrides: Any) -> ModelConfig:
    """A 2-layer, 8-expert Qwen3-MoE with the real vocab, so the real tokenizer works with it
    (vocab_size must stay >= 151669 for that)."""
    base = ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        eos_token_ids=(151645,), torch_dtype="bfloat16",
    )
    return base.replace(**overrides) if overrides else base


def tiny_dense_config(**overrides: Any) -> ModelConfig:
    """A 2-layer dense Qwen3 (Qwen3ForCausalLM) with tied embeddings, like Qwen3-0.6B."""
    base = ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_ids=(151645,), torch_dtype="bfloat16",
    )
    return base.replace(**overrides) if overrides else base


# ---- tensors and shards -----------------------------------------------------------------

def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a complete checkpoint for `config`, in model order, with its shape."""
    with torch.device("meta"):  # shapes only: no memory even for real dims
        return Qwen3MoeForCausalLM(config).checkpoint_shapes()


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so any tensor can be generated alone and in any order."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int = 0,
                  dtype: str | torch.dtype = "bfloat16", std: float = 0.02) -> torch.Tensor:
    """The tensor `write_random_checkpoint` writes for `name` (norm weights are ~1)."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    mean, spread = (1.0, _NORM_NOISE) if name.endswith("norm.weight") else (0.0, std)
    # One in-place fp32 pass, then the cast: about 2.5x faster than randn * std for real dims.
    values = torch.empty(shape, dtype=torch.float32).normal_(mean, spread, generator=generator)
    return values.to(resolve_dtype(dtype))


def plan_shards(sizes: dict[str, int], *, max_shard_bytes: int | None = None,
                num_shards: int | None = None) -> list[list[str]]:
    """Split names (in the given order) into contiguous shards, as transformers does: a new shard
    starts when the next tensor would pass the byte budget, so layers may straddle shards."""
    if max_shard_bytes is not None and num_shards is not None:
        raise ValueError("give max_shard_bytes or num_shards, not both")
    if num_shards is not None:
        if not 1 <= num_shards <= len(sizes):
            raise ValueError(f"num_shards must be in 1..{len(sizes)} (the tensor count)")
        return _split_even(sizes, num_shards)
    budget = max_shard_bytes if max_shard_bytes is not None else math.inf
    if budget <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > budget:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _split_even(sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Contiguous shards of about equal bytes, none empty."""
    total = max(sum(sizes.values()), 1)
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    current, done = 0, 0
    for left, (name, size) in zip(range(len(sizes), 0, -1), sizes.items(), strict=True):
        wanted = int((done + size / 2) * num_shards / total)  # the shard of its byte midpoint
        # Move on one shard at a time, and early enough that every later shard gets a tensor.
        must_move = num_shards - 1 - current >= left
        if shards[current] and (wanted > current or must_move):
            current += 1
        shards[current].append(name)
        done += size
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """Hugging Face's names: model.safetensors alone, else model-000NN-of-000MM.safetensors."""
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


# ---- writer -----------------------------------------------------------------------------

def _remove_stale_weights(out_dir: Path) -> None:
    # A leftover index or shard from an earlier write would be read together with the new ones.
    for path in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / "model.safetensors",
                 out_dir / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# Standard deviation of the stored integer codes, to give dequantized weights about `std`:
# uniform int4 codes -8..7, uniform int8 codes -127..127, NF4 code book values (uniform codes).
_CODE_STD = {"int4": math.sqrt((16**2 - 1) / 12), "int8": math.sqrt((255**2 - 1) / 12),
             "nf4": 0.5334}


def random_bytes(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniform random bytes (drawn 8 at a time: ~8x faster than randint on uint8)."""
    words = torch.empty(-(-n // 8), dtype=torch.int64).random_(-2**63, 2**63 - 1,
                                                              generator=generator)
    return words.view(torch.uint8)[:n]


def random_part(name: str, shape: tuple[int, ...], dtype: torch.dtype, method: str, *,
                seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """A random stored part of a quantized weight, drawn directly in its storage format (codes
    uniform, scales such that the dequantized weight has about `std`): what
    `write_random_checkpoint(quantization=...)` writes for `name`."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    part = name.rsplit(".", 1)[-1]
    if part == "qweight":
        return random_bytes(math.prod(shape) * dtype.itemsize, g).view(dtype).view(shape)
    if dtype == torch.float8_e4m3fn:  # fp8 weight: N(0, 1) codes, scaled by weight_scale_inv
        return torch.empty(shape).normal_(0.0, 1.0, generator=g).to(dtype)
    if part == "weight_scale_inv":
        return torch.full(shape, std, dtype=dtype)
    base = std / _CODE_STD[method]  # scales (int4, int8) or absmax (nf4), uniform in 0.5-1.5x
    return uniform_from_bytes(math.prod(shape), g, 0.5 * base, 1.5 * base).view(shape).to(dtype)


def uniform_from_bytes(n: int, generator: torch.Generator, low: float, high: float
                       ) -> torch.Tensor:
    """n float32 values uniform on 256 levels in [low, high], from random bytes: no OpenMP
    kernel, so fast even when other processes hold the cores (randn/uniform_ stall then)."""
    levels = random_bytes(n, generator).float()
    return levels.mul_((high - low) / 255.0).add_(low)


def _write_shards(out_dir: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  shards: list[list[str]], make: Callable[[str], torch.Tensor]) -> dict[str, str]:
    """Write each shard (generated just before, freed just after); returns the weight_map."""
    weight_map: dict[str, str] = {}
    for file_name, names in zip(shard_file_names(len(shards)), shards, strict=True):
        tensors = {n: make(n) for n in names}
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
        del tensors
    return weight_map


def write_random_checkpoint(
    out_dir: str | Path, config: ModelConfig, *, seed: int = 0,
    dtype: str | torch.dtype = "bfloat16", max_shard_bytes: int | None = None,
    num_shards: int | None = None, std: float = 0.02,
    generation_config: dict[str, Any] | None = None, tokenizer: bool = True,
    chat_template: str | None = None, quantization: QuantConfig | None = None,
) -> Path:
    """Write a seeded random checkpoint with real tensor names: config.json,
    generation_config.json (default: the real one), safetensors weights (one file, or shards
    with an index) and, with `tokenizer`, the tokenizer files. Returns `out_dir`.
    With `quantization`, weights are drawn directly in that storage layout (the layout of
    `pio quantize`, quantization_config in config.json), never materialised in float: this is
    how a 48-layer checkpoint of the real dimensions is written in a few minutes."""
    target = resolve_dtype(dtype)
    if tokenizer and config.vocab_size < MIN_VOCAB_FOR_TOKENIZER:
        raise ValueError(f"vocab_size {config.vocab_size} is too small for the real tokenizer "
                         f"(ids up to {MIN_VOCAB_FOR_TOKENIZER - 1}); pass tokenizer=False")
    if chat_template is not None and not tokenizer:
        raise ValueError("chat_template is written with the tokenizer files: pass tokenizer=True")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_weights(out)
    specs = {name: (shape, target if _is_float(dtype) else dtype)
             for name, (shape, dtype) in _layout(config, quantization).items()}
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in specs.items()}
    shards = plan_shards(sizes, max_shard_bytes=max_shard_bytes, num_shards=num_shards)

    def make(name: str) -> torch.Tensor:
        shape, dtype = specs[name]
        if _is_float(dtype) and not name.endswith("weight_scale_inv"):
            return random_tensor(name, shape, seed=seed, dtype=dtype, std=std)
        return random_part(name, shape, dtype, quantization.method if quantization else "",
                           seed=seed, std=std)

    weight_map = _write_shards(out, specs, shards, make)
    if len(shards) > 1:
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    hf = {**config.to_hf(), "torch_dtype": _DTYPE_NAMES[target]}
    if quantization is not None:
        hf["quantization_config"] = quantization_config_json(quantization)
    _write_json(out / "config.json", hf)
    _write_json(out / "generation_config.json",
                default_generation_config() if generation_config is None else generation_config)
    if tokenizer:
        from inference_pio.tokenizer import write_tokenizer_files  # heavy; only when asked

        write_tokenizer_files(out, chat_template)
    return out


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize > 1  # fp8 is a quantized format


def _layout(config: ModelConfig, quantization: QuantConfig | None
            ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if quantization is None:
        return {n: (s, torch.float32) for n, s in checkpoint_shapes(config).items()}
    return layout_specs(config, torch.float32, quantization)


# ---- presets for the CLI ----------------------------------------------------------------

PRESETS: dict[str, Callable[[int | None], ModelConfig]] = {
    "tiny": lambda n: tiny_moe_config() if n is None else tiny_moe_config(num_hidden_layers=n),
    "tiny-dense": lambda n: (tiny_dense_config() if n is None
                             else tiny_dense_config(num_hidden_layers=n)),
    "qwen3-coder-30b": qwen3_coder_30b_config,
}
# Real-dims default shard budget: 4 GB gives 16 shards for 48 layers, like the real checkpoint.
_PRESET_SHARD_BYTES = {"qwen3-coder-30b": 4_000_000_000}


def make_test_model(out_dir: str | Path, preset: str = "tiny", num_layers: int | None = None,
                    seed: int = 0, dtype: str | torch.dtype = "bfloat16",
                    max_shard_bytes: int | None = None) -> Path:
    """Write a random checkpoint of a named preset ("tiny", "tiny-dense", "qwen3-coder-30b")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if max_shard_bytes is None:
        max_shard_bytes = _PRESET_SHARD_BYTES.get(preset)
    return write_random_checkpoint(out_dir, PRESETS[preset](num_layers), seed=seed, dtype=dtype,
                                   max_shard_bytes=max_shard_bytes)


# ---- in memory --------------------------------------------------------------------------

@torch.inference_mode()
def random_model(config: ModelConfig, dtype: str | torch.dtype = "float32",
                 quantization: QuantConfig | None = None, *, seed: int = 0,
                 std: float = 0.02, device: str | torch.device = "cpu") -> Qwen3MoeForCausalLM:
    """A model with random weights drawn straight into its storage (quantized parts drawn
    directly, as `write_random_checkpoint(quantization=...)` writes them), no files: how
    `pio bench` builds the 48-layer model of the real dimensions in seconds."""
    from inference_pio.models.qwen3_moe import build_model, process_weights_after_loading

    target = resolve_dtype(dtype)
    model = build_model(config, target, device, quantization)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound fills: one thread avoids OpenMP stalls under load
    try:
        _fill_random(model, quantization.method if quantization else "", seed, std)
    finally:
        torch.set_num_threads(threads)
    if config.tie_word_embeddings and quantization is not None and hasattr(
            model.lm_head, "load_float_weight"):
        model.lm_head.load_float_weight("weight", model.model.embed_tokens.weight.float())
    process_weights_after_loading(model)
    return model


def _fill_random(model: Qwen3MoeForCausalLM, method: str, seed: int, std: float) -> None:
    """Float tensors on the CPU get the same values as the written checkpoints; on a GPU they
    are drawn there (a device generator, seconds instead of minutes of CPU draws and copies;
    other values, same distribution)."""
    for name, view in model.checkpoint_views().items():
        shape = tuple(view.shape)
        if _is_float(view.dtype) and not name.endswith("weight_scale_inv"):
            mean, spread = (1.0, _NORM_NOISE) if name.endswith("norm.weight") else (0.0, std)
            half = spread * math.sqrt(3)  # uniform with this standard deviation
            if view.device.type != "cpu":
                g = torch.Generator(device=view.device).manual_seed(tensor_seed(seed, name))
                view.uniform_(mean - half, mean + half, generator=g)
                continue
            g = torch.Generator().manual_seed(tensor_seed(seed, name))
            view.copy_(uniform_from_bytes(view.numel(), g, mean - half, mean + half).view(shape))
        else:
            view.copy_(random_part(name, shape, view.dtype, method, seed=seed, std=std))
