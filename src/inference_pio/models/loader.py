"""Open a Hugging Face model directory and stream its safetensors weights into a model.

Never unpickles anything: only safetensors files are read, memory-mapped by `safe_open`, one
tensor at a time, so peak host memory is about the model plus one tensor. Every name, shape and
dtype is checked against the safetensors headers before any tensor data is read."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from inference_pio.config import ConfigError, ModelConfig, resolve_dtype
from inference_pio.layers.quantization import QuantConfig, QuantizationError
from inference_pio.layers.quantization.formats import dequantize_fp8
from inference_pio.models.qwen3_moe import (
    Qwen3MoeForCausalLM,
    build_model,
    build_model_meta,
    process_weights_after_loading,
)
from inference_pio.models.weight_plan import (
    EXPERT_NAME,
    WeightBudgetError,
    WeightPlan,
    layout_specs,
    plan_weights,
)
from inference_pio.sampling_params import SamplingParams, eos_token_ids_from_generation_config
from inference_pio.utils.memory import format_bytes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bytes per element of safetensors dtypes; only the first four load without a quantization scheme.
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {**_FLOAT_DTYPES, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_LISTED = 5  # names quoted in an error before "and N more"


class CheckpointError(ValueError):
    """A model directory or weight file that cannot be loaded; the message names file and fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (no data read)."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 1)


@dataclass(frozen=True)
class ModelFiles:
    """A resolved model directory. `weight_map` holds every tensor name of the checkpoint."""

    root: Path
    config_path: Path
    generation_config: dict[str, Any] | None
    shard_files: tuple[Path, ...]
    weight_map: Mapping[str, Path]
    index_path: Path | None  # None for a single model.safetensors


# ---- model directory --------------------------------------------------------------------

def open_model_dir(path: str | Path) -> ModelFiles:
    """Resolve config, generation config and weight files of a model directory, or explain
    exactly what is wrong with it (CheckpointError)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise CheckpointError(
            f"{root} {what}; pass the model directory that holds config.json and the "
            "*.safetensors weights")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"{root} has no {CONFIG_NAME}; a model directory needs the config.json of its "
            "checkpoint next to the weights (download the whole repository, not only the weights)")
    index_path: Path | None = root / INDEX_NAME
    single = root / SINGLE_FILE_NAME
    if (root / INDEX_NAME).is_file():
        weight_map = _read_index(root / INDEX_NAME)
    elif single.is_file():
        weight_map = dict.fromkeys(read_header(single), single)
        index_path = None
    else:
        raise _no_weights_error(root)
    return ModelFiles(
        root=root,
        config_path=config_path,
        generation_config=_read_generation_config(root / GENERATION_CONFIG_NAME),
        shard_files=tuple(sorted(set(weight_map.values()))),
        weight_map=weight_map,
        index_path=index_path,
    )


def _read_generation_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; fix or delete it")
    # Its values become every request's defaults: a bad one is the checkpoint's fault, so it
    # is refused here, naming the file, not later as if each client had sent it.
    try:
        SamplingParams.from_generation_config(data)
        eos_token_ids_from_generation_config(data)
    except (ValueError, TypeError) as e:
        field = str(e).removeprefix("SamplingParams.").replace(
            "max_tokens", "max_new_tokens (max_tokens)", 1)
        raise CheckpointError(f"{path} holds an invalid default: {field}; fix that field or "
                              "delete the file") from None
    return data


def _read_index(index_path: Path) -> dict[str, Path]:
    """The index's weight_map as name -> shard path, after checking every shard is on disk."""
    fix = "re-download it from the model repository"
    try:
        data = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path} is malformed: not valid JSON ({e}); {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(
            f"{index_path} is malformed: it needs a non-empty \"weight_map\" object mapping "
            f"tensor names to shard file names; {fix}")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # NOTE: a shard name with a directory part could point outside the model directory.
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index_path} names shard {shard!r}, which is not a plain file "
                                  f"name inside {index_path.parent}; {fix}")
    root = index_path.parent
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{INDEX_NAME} refers to {_listing(missing)}, missing from {root}: the download is "
            f"incomplete; re-download the missing shard(s)")
    return {name: root / shard for name, shard in weight_map.items()}


def _no_weights_error(root: Path) -> CheckpointError:
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if shards:
        return CheckpointError(
            f"{root} has {_listing(shards)} but no {INDEX_NAME} saying which tensor is in which "
            "shard; download the index file too")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return CheckpointError(
            f"{root} holds only PyTorch pickle weights ({_listing(pickles)}). inference_pio never "
            "unpickles files, because loading a pickle can run arbitrary code: download the "
            "safetensors version of the checkpoint (model.safetensors or model-*.safetensors "
            "with model.safetensors.index.json), or convert it on a machine you trust")
    return CheckpointError(
        f"{root} has no weights: expected {SINGLE_FILE_NAME}, or {INDEX_NAME} with its "
        "model-*.safetensors shards")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


# ---- safetensors headers ----------------------------------------------------------------

def _safe_open(path: Path) -> Any:
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(
            f"{path.name} is truncated or corrupt ({e}); re-download it (in {path.parent})"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _header(f: Any, path: Path) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
        tensor_slice = f.get_slice(name)
        infos[name] = TensorInfo(name, path, tensor_slice.get_dtype(),
                                 tuple(tensor_slice.get_shape()))
    return infos


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of one safetensors file, from its header only."""
    path = Path(path)
    with _safe_open(path) as f:
        return _header(f, path)


def _check_in_file(name: str, path: Path, header: Mapping[str, TensorInfo]) -> TensorInfo:
    if name not in header:
        raise CheckpointError(
            f"{INDEX_NAME} says tensor {name} is in {path.name}, but that file does not hold it: "
            f"the index and the shards come from different downloads; re-download {path.parent}")
    return header[name]


def check_dtype(info: TensorInfo) -> None:
    """Refuse non-float tensors in a checkpoint whose config.json declares no quantization."""
    if info.dtype in _FLOAT_DTYPES:
        return
    kind = "FP8" if info.dtype.startswith("F8") else f"{info.dtype} (quantized)"
    raise CheckpointError(
        f"tensor {info.name} in {info.file.name} is stored as {info.dtype}, but config.json "
        f"declares no quantization_config to read {kind} weights with; restore the "
        "checkpoint's config.json (its quantization_config) or use a float checkpoint")


def scan_checkpoint(files: ModelFiles) -> dict[str, TensorInfo]:
    """Every tensor of the weight_map with its header info; checks each header and that each
    tensor is in the file the index says. Reads no tensor data."""
    headers = {path: read_header(path) for path in files.shard_files}
    return {name: _check_in_file(name, path, headers[path])
            for name, path in files.weight_map.items()}


# ---- streaming tensors ------------------------------------------------------------------

def _group_by_file(files: ModelFiles, names: Iterable[str]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {path: [] for path in files.shard_files}
    for name in names:
        if name not in files.weight_map:
            raise CheckpointError(f"tensor {name} is not in the checkpoint at {files.root}")
        by_file[files.weight_map[name]].append(name)
    return {path: sorted(group) for path, group in by_file.items() if group}


def iter_checkpoint_tensors(files: ModelFiles, dtype: str | torch.dtype | None,
                            names: Iterable[str] | None = None
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor cast to dtype) lazily, file by file (so not in `names` order).
    Each file's header and each tensor's place and dtype are checked before its data is read.
    dtype None: tensors as stored, quantized ones included (validated by the caller)."""
    target = None if dtype is None else resolve_dtype(dtype)
    by_file = _group_by_file(files, files.weight_map if names is None else names)
    for path, group in by_file.items():
        with _safe_open(path) as f:
            header = _header(f, path)
            for name in group:
                info = _check_in_file(name, path, header)
                if target is not None:
                    check_dtype(info)
            for name in group:
                tensor = f.get_tensor(name)
                yield name, tensor if target is None else tensor.to(target)


# ---- whole-model load -------------------------------------------------------------------

@dataclass(frozen=True)
class LoadConfig:
    """How weights are stored and where: `quantization` (None: the checkpoint's own format, or
    plain `dtype` weights for a float checkpoint); `weight_memory` bytes for weights (None: no
    limit), below the model's size experts are paged from disk; `prefetch` reads the experts a
    layer routed to in the background while the first ones compute."""

    quantization: QuantConfig | None = None
    weight_memory: int | None = None
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.weight_memory is not None and (
                not isinstance(self.weight_memory, int) or self.weight_memory < 1):
            raise ConfigError(f"weight_memory must be a number of bytes >= 1, got "
                              f"{self.weight_memory!r}")


def checkpoint_quantization(config: ModelConfig, files: ModelFiles) -> QuantConfig | None:
    """The storage layout a checkpoint declares in config.json (None: plain float)."""
    if not config.quantization_config:
        return None
    try:
        return QuantConfig.from_hf(config.quantization_config, str(files.config_path))
    except QuantizationError as e:
        raise CheckpointError(str(e)) from None


def _float_layout(infos: Mapping[str, TensorInfo]) -> QuantConfig:
    """A float checkpoint's own dtype as a storage layout (what paging reads from disk)."""
    dtype = next((i.dtype for n, i in infos.items() if EXPERT_NAME.match(n)), "BF16")
    name = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(dtype, "fp32")
    return QuantConfig(method=name, embedding_dtype=name)


def _target_layout(stored: QuantConfig | None, wanted: QuantConfig | None,
                   files: ModelFiles) -> QuantConfig | None:
    if stored is None:
        return wanted
    if stored.method == "fp8":
        return wanted or stored  # FP8 is loaded as is, or dequantized into what was asked
    if (wanted is not None and not wanted.head_explicit
            and replace(wanted, quantize_lm_head=stored.quantize_lm_head) == stored):
        return stored  # the format asked for, with the checkpoint's own lm_head
    if wanted is not None and wanted != stored:
        raise CheckpointError(
            f"{files.root} is already quantized ({stored.describe()}); load it without a "
            f"quantization option, or quantize the original checkpoint to "
            f"{wanted.describe()} instead")
    return stored


# torch dtype -> safetensors' spelling, for the dtypes a storage layout uses.
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}


def _is_float_storage(dtype: torch.dtype) -> bool:
    """Float weights load from any float dtype (cast); fp8 and integers must match exactly."""
    return dtype.is_floating_point and dtype != torch.float8_e4m3fn


def validate_checkpoint(config: ModelConfig, infos: Mapping[str, TensorInfo],
                        root: Path | str = "the checkpoint", layout: QuantConfig | None = None
                        ) -> list[str]:
    """Compare header infos with the tensors a model of `config` stored in `layout` (None:
    plain float) needs; returns the names to load. Raises CheckpointError on a bad dtype, an
    unexpected, missing or misshapen tensor. The layer count is compared first, in time linear
    in the number of tensors, so an absurd num_hidden_layers is refused before any model is
    built."""
    _check_layer_count(config, infos)
    meta = build_model_meta(config, torch.float32, layout)
    specs = meta.checkpoint_specs()
    optional = meta.optional_checkpoint_names()
    if layout is None:
        for info in infos.values():
            check_dtype(info)
    unexpected = [n for n in infos if n not in specs and n not in optional]
    if unexpected:
        first = infos[unexpected[0]]
        raise CheckpointError(
            f"unexpected tensor {first.name} in {first.file.name} ({len(unexpected)} unexpected "
            f"in all): the model built from {CONFIG_NAME} has no such parameter; config.json and "
            "the weights disagree")
    missing = [n for n in specs if n not in infos]
    if missing:
        raise CheckpointError(
            f"{root} lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}; "
            f"the download is incomplete or {CONFIG_NAME} does not match the weights")
    for name, (shape, dtype) in specs.items():
        info = infos[name]
        if info.shape != shape:
            raise CheckpointError(
                f"tensor {name} in {info.file.name} has shape {list(info.shape)}, "
                f"the model expects {list(shape)} from {CONFIG_NAME}: config and weights disagree")
        want = None if _is_float_storage(dtype) else SAFETENSORS_DTYPE.get(dtype)
        if (info.dtype != want) if want else (info.dtype not in _FLOAT_DTYPES):
            raise CheckpointError(
                f"tensor {name} in {info.file.name} is stored as {info.dtype}, its "
                f"quantization_config needs {want or 'a float dtype'}: config.json and the "
                "weights disagree")
    return list(specs)


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _check_layer_count(config: ModelConfig, infos: Mapping[str, TensorInfo]) -> None:
    layers = {int(m.group(1)) for name in infos if (m := _LAYER_NAME.match(name))}
    if infos and len(layers) != config.num_hidden_layers:
        held = f"layers 0..{max(layers)} ({len(layers)} distinct)" if layers else "no layers"
        raise CheckpointError(
            f"{CONFIG_NAME} field num_hidden_layers is {config.num_hidden_layers}, but the "
            f"weights hold {held}: config.json and the weights disagree; restore the "
            "checkpoint's config.json")


def _with_progress(tensors: Iterator[tuple[str, torch.Tensor]], infos: Mapping[str, TensorInfo],
                   names: list[str], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    total = sum(infos[n].num_bytes for n in names)
    # disable=None lets tqdm hide the bar when stderr is not a terminal (logs, CI).
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Loading weights",
              file=sys.stderr, disable=None if progress else True) as bar:
        for name, tensor in tensors:
            yield name, tensor
            bar.update(infos[name].num_bytes)


def dequantize_fp8_stream(tensors: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair each FP8 `X.weight` with its `X.weight_scale_inv` and yield the float32 weight;
    other tensors pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        if name.endswith(".weight_scale_inv"):
            key, part = name.removesuffix("_scale_inv"), "weight_scale_inv"
        elif tensor.dtype == torch.float8_e4m3fn:
            key, part = name, "weight"
        else:
            yield name, tensor
            continue
        parts = pending.setdefault(key, {})
        parts[part] = tensor
        if len(parts) == 2:
            del pending[key]
            yield key, dequantize_fp8(parts, parts["weight"].shape[-1])
    if pending:
        raise CheckpointError(f"FP8 tensors without their pair (weight and weight_scale_inv): "
                              f"{_listing(sorted(pending))}; the checkpoint is incomplete")


def _expert_layouts_match(config: ModelConfig, a: QuantConfig | None, b: QuantConfig | None
                          ) -> bool:
    def experts(q: QuantConfig | None) -> dict[str, Any]:
        return {n: s for n, s in layout_specs(config, torch.float32, q).items()
                if EXPERT_NAME.match(n)}
    return experts(a) == experts(b)


def _plan(config: ModelConfig, dtype: torch.dtype, target: QuantConfig | None,
          budget: int | None) -> WeightPlan | None:
    """The weight plan; None when plain float weights (target None) do not fit resident."""
    try:
        plan = plan_weights(config, dtype, target, budget)
    except WeightBudgetError:
        if target is None:
            return None
        raise
    return None if plan.offload and target is None else plan


def load_model(path_or_files: str | Path | ModelFiles, dtype: str | torch.dtype = "bfloat16",
               device: str | torch.device = "cpu", progress: bool = True,
               load_config: LoadConfig | None = None
               ) -> tuple[Qwen3MoeForCausalLM, ModelConfig]:
    """Build the model of a checkpoint directory and load its weights, validated first,
    quantizing tensor by tensor when asked (peak memory: the quantized model plus one float
    tensor), and paging experts from disk when `load_config.weight_memory` is too small."""
    load_config = load_config or LoadConfig()
    files = (path_or_files if isinstance(path_or_files, ModelFiles)
             else open_model_dir(path_or_files))
    config = ModelConfig.from_file(files.config_path)
    target_dtype = resolve_dtype(dtype)
    stored = checkpoint_quantization(config, files)
    infos = scan_checkpoint(files)
    names = validate_checkpoint(config, infos, files.root, stored)
    target = _target_layout(stored, load_config.quantization, files)
    plan = _plan(config, target_dtype, target, load_config.weight_memory)
    if plan is None:  # too big as plain `dtype` weights: page the checkpoint's own float format
        target = _float_layout(infos)
        plan = plan_weights(config, target_dtype, target, load_config.weight_memory)
    if plan.offload and not _expert_layouts_match(config, stored or _float_layout(infos), target):
        raise CheckpointError(
            f"weight_memory {format_bytes(plan.budget or 0)} is below the "
            f"{format_bytes(plan.total_bytes)} the model needs as {plan.layout}, so experts must "
            f"be paged from disk in that format, but {files.root} stores them otherwise; write "
            f"a {target.method if target else 'float'} checkpoint first with `pio quantize`, "
            "or raise weight_memory")
    logger.info("%s", plan.describe())
    model = build_model(config, target_dtype, device, target, plan.offload)
    to_load = [n for n in names if not (plan.offload and EXPERT_NAME.match(n))]
    stream: Iterator[tuple[str, torch.Tensor]] = _with_progress(
        iter_checkpoint_tensors(files, None, to_load), infos, to_load, progress)
    if stored is not None and stored.method == "fp8" and (target is None or target.method != "fp8"):
        stream = dequantize_fp8_stream(stream)
        to_load = [n for n in to_load if not n.endswith(".weight_scale_inv")]
    loaded = model.load_weights(stream)
    if loaded != set(to_load) - model.optional_checkpoint_names():
        # NOTE: guards the contract with load_weights, not user data
        raise CheckpointError(f"loaded {len(loaded)} of {len(to_load)} tensors from {files.root}")
    if plan.offload:
        from inference_pio.models.expert_offload import attach_expert_pager

        attach_expert_pager(model, files, plan, prefetch=load_config.prefetch)
    process_weights_after_loading(model)
    model.weight_plan = plan
    return model, config
