"""`pio quantize`: rewrite a checkpoint in a quantized storage layout, tensor by tensor.

The output is a normal model directory (config.json with a quantization_config, safetensors
shards with an index, generation config and tokenizer files copied) that `load_model` reads
directly, without quantizing again. Tensor names follow the checkpoint's: a quantized weight
`X.weight` becomes its parts `X.qweight`, `X.scales` (int4), ...; experts keep their per-expert
names. With fp8 the output is Qwen's FP8 layout (`X.weight` float8_e4m3fn plus
`X.weight_scale_inv`, quant_method "fp8"), which other engines read too."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inference_pio.config import ConfigError, ModelConfig, resolve_dtype
from inference_pio.layers.quantization import QuantConfig
from inference_pio.layers.quantization.formats import FP8_BLOCK

SHARD_BYTES = 4_000_000_000
_COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
           "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def quantization_config_json(quant: QuantConfig) -> dict[str, Any]:
    """The config.json quantization_config of a checkpoint stored in `quant`'s layout."""
    if quant.method == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    return quant.to_hf()


def quantize_checkpoint(src: str | Path, out: str | Path, quant: QuantConfig,
                        progress: bool = True, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Load `src` quantizing while loading (peak memory: the quantized model plus one float
    tensor), then write it to `out` in shards. Returns `out`."""
    from inference_pio.models.loader import LoadConfig, load_model, open_model_dir

    if quant.method == "fp8" and (quant.quantize_lm_head or quant.embedding_dtype != "bf16"):
        raise ValueError("fp8 checkpoints are written in Qwen's FP8 layout, whose "
                         "quantization_config cannot record a quantized lm_head or a non-bf16 "
                         "embedding; drop quantize_lm_head (or choose int8/int4/nf4)")
    files = open_model_dir(src)
    out_dir = Path(out).expanduser()
    if out_dir.resolve() == files.root.resolve():
        raise ValueError(f"--out {out_dir} is the source directory; write to a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose a new directory or empty it")
    model, config = load_model(files, torch.float32, progress=progress,
                               load_config=LoadConfig(quantization=quant))
    out_dir.mkdir(parents=True, exist_ok=True)
    float_dtype = _source_float_dtype(config)
    _write_sharded(out_dir, iter(model.checkpoint_views().items()), max_shard_bytes,
                   float_dtype)
    hf = config.to_hf()
    hf["quantization_config"] = quantization_config_json(quant)
    hf["torch_dtype"] = str(float_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    for name in _COPIED:
        if (files.root / name).is_file():
            shutil.copy2(files.root / name, out_dir / name)
    return out_dir


def _source_float_dtype(config: ModelConfig) -> torch.dtype:
    try:
        return resolve_dtype(config.torch_dtype or "bfloat16")
    except ConfigError:
        return torch.bfloat16


def _stored(name: str, tensor: torch.Tensor, float_dtype: torch.dtype) -> torch.Tensor:
    """Float weights go back to the source checkpoint's dtype (routers and norms run in fp32
    but come from it, so nothing is lost); quantization scales keep theirs."""
    if tensor.dtype == torch.float32 and not name.endswith(("scales", "absmax", "_scale_inv")):
        return tensor.to(float_dtype)
    return tensor.contiguous()


def _write_sharded(out_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]],
                   max_shard_bytes: int, float_dtype: torch.dtype) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors:
        t = _stored(name, tensor, float_dtype)
        size = t.numel() * t.element_size()
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += size
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    if n > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
