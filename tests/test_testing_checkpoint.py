"""inference_pio.testing: the random checkpoint writer (layout, reproducibility, sharding) and
the config presets (real dims checked on a meta model, never written)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from inference_pio.config import ModelConfig
from inference_pio.models.loader import load_model
from inference_pio.testing import (
    PRESETS,
    checkpoint_shapes,
    default_generation_config,
    make_test_model,
    plan_shards,
    qwen3_coder_30b_config,
    random_tensor,
    tiny_dense_config,
    tiny_moe_config,
    write_random_checkpoint,
)

SMALL = tiny_moe_config(vocab_size=512)


def _write(out: Path, config: ModelConfig = SMALL, **kwargs: Any) -> Path:
    return write_random_checkpoint(out, config, tokenizer=False, **kwargs)


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture
def fake_tokenizer(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str | None]]:
    """Stand in for inference_pio.tokenizer, recording write_tokenizer_files calls."""
    calls: list[tuple[Path, str | None]] = []
    module = types.ModuleType("inference_pio.tokenizer")
    module.write_tokenizer_files = (  # type: ignore[attr-defined]
        lambda out, template: calls.append((Path(out), template)))
    monkeypatch.setitem(sys.modules, "inference_pio.tokenizer", module)
    return calls


# ---- writer -----------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    first = _files(_write(tmp_path / "a", seed=3, num_shards=3))
    assert first == _files(_write(tmp_path / "b", seed=3, num_shards=3))
    other = _files(_write(tmp_path / "c", seed=4, num_shards=3))
    assert first["config.json"] == other["config.json"]
    for name in first:
        if name.endswith(".safetensors"):
            assert first[name] != other[name], name


def test_tensors_are_generated_per_name(tmp_path: Path) -> None:
    written = _tensors(_write(tmp_path, seed=7, dtype="float32", num_shards=2))
    shapes = checkpoint_shapes(SMALL)
    assert set(written) == set(shapes)
    for name in ("model.layers.1.mlp.experts.5.down_proj.weight", "model.norm.weight"):
        expected = random_tensor(name, shapes[name], seed=7, dtype="float32")
        torch.testing.assert_close(written[name], expected, rtol=0, atol=0)


def test_norms_are_near_one_and_weights_small(tmp_path: Path) -> None:
    written = _tensors(_write(tmp_path, dtype="float32"))
    for name, tensor in written.items():
        if name.endswith("norm.weight"):
            assert abs(tensor.mean().item() - 1) < 0.1 and tensor.std().item() > 0.01, name
        elif tensor.numel() > 1000:
            assert abs(tensor.std().item() - 0.02) < 0.004, name


def test_index_layout(tmp_path: Path) -> None:
    model_dir = _write(tmp_path, num_shards=3)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shapes = checkpoint_shapes(SMALL)
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s in shapes.values())
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == names
    for file_name in names:
        in_file = load_file(str(model_dir / file_name))
        assert {n for n, f in index["weight_map"].items() if f == file_name} == set(in_file)
        assert all(t.dtype == torch.bfloat16 for t in in_file.values())


def test_layers_straddle_shards_under_a_byte_budget(tmp_path: Path) -> None:
    model_dir = _write(tmp_path, max_shard_bytes=100_000)
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    files_of_layer0 = {f for n, f in weight_map.items() if n.startswith("model.layers.0.")}
    assert len(files_of_layer0) > 1
    for path in model_dir.glob("model-*.safetensors"):
        tensors = load_file(str(path))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 100_000


def test_plan_shards_rules() -> None:
    sizes = {f"t{i}": size for i, size in enumerate([10, 1, 1, 1, 50, 1, 1, 30])}
    for count in range(1, len(sizes) + 1):
        shards = plan_shards(sizes, num_shards=count)
        assert len(shards) == count and all(shards)
        assert [n for shard in shards for n in shard] == list(sizes)  # contiguous, in order
    assert plan_shards(sizes) == [list(sizes)]
    assert plan_shards(sizes, max_shard_bytes=20)[0] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(ValueError, match="not both"):
        plan_shards(sizes, max_shard_bytes=10, num_shards=2)
    with pytest.raises(ValueError, match="num_shards"):
        plan_shards(sizes, num_shards=9)


def test_single_shard_replaces_stale_files(tmp_path: Path) -> None:
    _write(tmp_path, num_shards=3)
    model_dir = _write(tmp_path)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    load_model(model_dir, progress=False)


def test_config_and_generation_config(tmp_path: Path) -> None:
    model_dir = _write(tmp_path, dtype="float16", generation_config={"temperature": 0.5})
    config = ModelConfig.from_file(model_dir / "config.json")
    assert config == SMALL.replace(torch_dtype="float16")
    assert json.loads((model_dir / "generation_config.json").read_text()) == {"temperature": 0.5}
    default = json.loads((_write(tmp_path / "d") / "generation_config.json").read_text())
    assert default == default_generation_config()
    assert default["eos_token_id"] == [151645, 151643] and default["pad_token_id"] == 151643
    assert (default["temperature"], default["top_p"], default["top_k"]) == (0.7, 0.8, 20)
    assert default["repetition_penalty"] == 1.05 and default["do_sample"] is True


def test_tokenizer_files_are_requested(tmp_path: Path,
                                       fake_tokenizer: list[tuple[Path, str | None]]) -> None:
    write_random_checkpoint(tmp_path, tiny_moe_config(), chat_template="{{ x }}")
    assert fake_tokenizer == [(tmp_path, "{{ x }}")]
    with pytest.raises(ValueError, match="too small for the real tokenizer"):
        write_random_checkpoint(tmp_path, SMALL)
    with pytest.raises(ValueError, match="tokenizer=True"):
        write_random_checkpoint(tmp_path, SMALL, tokenizer=False, chat_template="x")


# ---- presets ----------------------------------------------------------------------------

def test_real_dims_preset_matches_model_card() -> None:
    config = qwen3_coder_30b_config()
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (2048, 48, 128)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (
        128, 8, True)
    shapes = checkpoint_shapes(config)
    assert len(shapes) == 18_867
    assert sum(2 * math.prod(s) for s in shapes.values()) == 61_064_245_248
    sizes = {name: 2 * math.prod(shape) for name, shape in shapes.items()}
    assert len(plan_shards(sizes, max_shard_bytes=4_000_000_000)) == 16


def test_real_dims_one_layer_names_and_shapes() -> None:
    shapes = checkpoint_shapes(qwen3_coder_30b_config(num_layers=1))
    layer = "model.layers.0."
    assert shapes[layer + "self_attn.q_proj.weight"] == (4096, 2048)
    assert shapes[layer + "self_attn.k_proj.weight"] == (512, 2048)
    assert shapes[layer + "self_attn.v_proj.weight"] == (512, 2048)
    assert shapes[layer + "self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes[layer + "self_attn.q_norm.weight"] == (128,)
    assert shapes[layer + "input_layernorm.weight"] == (2048,)
    assert shapes[layer + "mlp.gate.weight"] == (128, 2048)
    assert shapes[layer + "mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert shapes[layer + "mlp.experts.0.up_proj.weight"] == (768, 2048)
    assert shapes[layer + "mlp.experts.64.down_proj.weight"] == (2048, 768)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (151936, 2048)
    assert len(shapes) == 3 + 393


def test_tiny_presets() -> None:
    moe, dense = tiny_moe_config(), tiny_dense_config()
    assert moe.vocab_size >= 151669 and moe.is_moe and not moe.tie_word_embeddings
    assert tiny_moe_config(num_hidden_layers=1).num_hidden_layers == 1
    assert not dense.is_moe and dense.tie_word_embeddings
    dense_shapes = checkpoint_shapes(dense)
    assert "lm_head.weight" not in dense_shapes
    assert dense_shapes["model.layers.1.mlp.gate_proj.weight"] == (128, 64)


def test_make_test_model(tmp_path: Path, fake_tokenizer: list[tuple[Path, str | None]]) -> None:
    assert set(PRESETS) == {"tiny", "tiny-dense", "qwen3-coder-30b"}
    model_dir = make_test_model(tmp_path / "t", preset="tiny-dense", num_layers=1, seed=1)
    _, config = load_model(model_dir, progress=False)
    assert config.num_hidden_layers == 1 and config.tie_word_embeddings
    assert fake_tokenizer == [(model_dir, None)]
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        make_test_model(tmp_path / "x", preset="huge")
