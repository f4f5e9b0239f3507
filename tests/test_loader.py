"""models.loader: round trips through random checkpoints, and one test per refusal, each
checking that the message names the file or tensor at fault."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_pio.config import ModelConfig, resolve_dtype
from inference_pio.models.loader import (
    CheckpointError,
    iter_checkpoint_tensors,
    load_model,
    open_model_dir,
)
from inference_pio.models.qwen3_moe import Qwen3MoeForCausalLM
from inference_pio.testing import (
    default_generation_config,
    tiny_moe_config,
    write_random_checkpoint,
)

SMALL = tiny_moe_config(vocab_size=512)  # real vocab is not needed without a tokenizer
SHARD2 = "model-00002-of-00003.safetensors"


def _small(tmp_path: Path, **kwargs: Any) -> Path:
    return write_random_checkpoint(tmp_path / "ckpt", SMALL, tokenizer=False, **kwargs)


def _written(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor on disk, read with safetensors directly (independent of the loader)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _assert_loaded(model: Qwen3MoeForCausalLM, written: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> None:
    views = model.checkpoint_views()
    assert set(views) <= set(written)
    for name, got in views.items():
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, written[name].to(dtype), rtol=0, atol=0, msg=name)


def _edit_single(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, progress=False)
    return str(info.value)


# ---- round trips ------------------------------------------------------------------------

def test_sharded_round_trip(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader must never call torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    files = open_model_dir(tiny_moe_dir)
    assert [p.name for p in files.shard_files] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files.index_path == tiny_moe_dir / "model.safetensors.index.json"
    assert files.generation_config == default_generation_config()
    model, config = load_model(files, progress=False)
    assert config == tiny_moe_cfg
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    _assert_loaded(model, _written(tiny_moe_dir), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", torch.float16])
def test_casts_on_load(tmp_path: Path, dtype: str | torch.dtype) -> None:
    model_dir = _small(tmp_path, dtype="float32", num_shards=3)
    model, _ = load_model(model_dir, dtype=dtype, progress=False)
    _assert_loaded(model, _written(model_dir), resolve_dtype(dtype))


def test_single_file_round_trip(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    files = open_model_dir(model_dir)
    assert files.index_path is None
    assert files.shard_files == (model_dir / "model.safetensors",)
    assert set(files.weight_map) == set(_written(model_dir))
    model, _ = load_model(model_dir, progress=False)
    _assert_loaded(model, _written(model_dir), torch.bfloat16)


def test_tied_model_without_lm_head(tiny_dense_dir: Path) -> None:
    assert "lm_head.weight" not in _written(tiny_dense_dir)
    model, config = load_model(tiny_dense_dir, dtype="float32", progress=False)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _assert_loaded(model, _written(tiny_dense_dir), torch.float32)


def test_tied_model_with_lm_head_present(tmp_path: Path, tiny_dense_dir: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_dense_dir, tmp_path / "copy"))
    _edit_single(model_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]
                                                 .clone()}))
    model, _ = load_model(model_dir, progress=False)
    embed = _written(model_dir)["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight, embed, rtol=0, atol=0)


def test_iter_checkpoint_tensors_is_lazy_and_casts(tiny_moe_dir: Path) -> None:
    files = open_model_dir(tiny_moe_dir)
    names = ["model.norm.weight", "model.layers.1.mlp.gate.weight"]
    stream = iter_checkpoint_tensors(files, torch.float32, names)
    assert not isinstance(stream, (list, tuple))
    got = dict(stream)
    assert set(got) == set(names)
    written = _written(tiny_moe_dir)
    for name in names:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], written[name].float(), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"model\.nope\.weight"):
        list(iter_checkpoint_tensors(files, "bf16", ["model.nope.weight"]))


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_model(_small(tmp_path), progress=False)
    assert capsys.readouterr().err == ""


# ---- directory errors -------------------------------------------------------------------

def test_no_config_json(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        open_model_dir(model_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_model_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tmp_path / "file")


def test_no_weights_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
    with pytest.raises(CheckpointError, match=r"no weights.*model\.safetensors"):
        open_model_dir(tmp_path)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError) as info:
        open_model_dir(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "never unpickles" in message and "safetensors" in message


def test_shards_without_index(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    (model_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003.*no model\.safetensors\."):
        open_model_dir(model_dir)


def test_index_refers_to_missing_shard(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    (model_dir / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=rf"refers to {SHARD2}.*re-download"):
        open_model_dir(model_dir)
    with pytest.raises(CheckpointError, match=SHARD2):
        load_model(model_dir, progress=False)


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"model.norm.weight": 3}}', "weight_map"),
    ('[1, 2]', "weight_map"),
    ('{"weight_map": {"model.norm.weight": "../model.safetensors"}}', "not a plain file name"),
])
def test_malformed_index(tmp_path: Path, text: str, why: str) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    (model_dir / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as info:
        open_model_dir(model_dir)
    message = str(info.value)
    assert "model.safetensors.index.json" in message and why in message


def test_malformed_generation_config(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    (model_dir / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"generation_config\.json is not valid JSON"):
        open_model_dir(model_dir)


# ---- corrupt files ----------------------------------------------------------------------

def test_truncated_shard(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    data = (model_dir / SHARD2).read_bytes()
    (model_dir / SHARD2).write_bytes(data[: len(data) - 100])
    message = _load_error(model_dir)
    assert f"{SHARD2} is truncated or corrupt" in message and "re-download" in message


def test_corrupt_header(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    data = bytearray((model_dir / SHARD2).read_bytes())
    data[8:16] = b"#garbage"
    (model_dir / SHARD2).write_bytes(bytes(data))
    assert f"{SHARD2} is truncated or corrupt" in _load_error(model_dir)
    files = open_model_dir(_small(tmp_path / "b", num_shards=3))
    (files.root / SHARD2).write_bytes(bytes(data))  # corrupted after opening: the stream checks
    with pytest.raises(CheckpointError, match=f"{SHARD2} is truncated or corrupt"):
        list(iter_checkpoint_tensors(files, "float32"))


def test_index_names_wrong_shard(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    message = _load_error(model_dir)
    assert "model.norm.weight" in message and "model-00001-of-00003.safetensors" in message


# ---- tensors that do not fit the config -------------------------------------------------

def test_missing_tensor(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    _edit_single(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    message = _load_error(model_dir)
    assert "lacks 1 tensor" in message and "model.layers.1.self_attn.k_norm.weight" in message


def test_many_missing_tensors_are_counted(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)

    def drop_experts(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.mlp.experts.")]:
            del tensors[name]

    _edit_single(model_dir, drop_experts)
    message = _load_error(model_dir)
    assert f"lacks {3 * SMALL.num_experts} tensor" in message
    assert "model.layers.1.mlp.experts." in message and "more" in message


@pytest.mark.parametrize("num_layers", [3, 20_000])
def test_layer_count_mismatch_is_refused_before_building(tmp_path: Path,
                                                         num_layers: int) -> None:
    model_dir = _small(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_layers}))
    message = _load_error(model_dir)  # before any model is built (20,000 once took minutes)
    assert f"num_hidden_layers is {num_layers}, but the weights hold layers 0..1" in message


def test_unexpected_tensor(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    _edit_single(model_dir, lambda t: t.update({"model.layers.0.mlp.experts.8.up_proj.weight":
                                                torch.zeros(32, 64, dtype=torch.bfloat16)}))
    message = _load_error(model_dir)
    assert "unexpected tensor model.layers.0.mlp.experts.8.up_proj.weight" in message
    assert "model.safetensors" in message


def test_shape_mismatch(tmp_path: Path) -> None:
    model_dir = _small(tmp_path, num_shards=3)
    files = open_model_dir(model_dir)
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = files.weight_map[name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(32, 64, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = _load_error(model_dir)
    assert name in message and shard.name in message
    assert "[32, 64]" in message and "[64, 64]" in message


@pytest.mark.parametrize("dtype, kind", [(torch.float8_e4m3fn, "FP8"), (torch.int8, "I8")])
def test_quantized_tensor_dtype_is_refused(tmp_path: Path, dtype: torch.dtype, kind: str) -> None:
    model_dir = _small(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_single(model_dir, lambda t: t.update({name: t[name].float().to(dtype)}))
    message = _load_error(model_dir)
    assert name in message and kind in message and "declares no quantization_config" in message


def test_fp8_config_over_bf16_tensors_is_refused(tmp_path: Path) -> None:
    model_dir = _small(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(config))
    message = _load_error(model_dir)
    assert "lacks" in message and "weight_scale_inv" in message


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_unknown_quant_method_is_refused(tmp_path: Path, method: str) -> None:
    model_dir = _small(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    message = _load_error(model_dir)
    assert repr(method) in message and "pio quantize" in message
