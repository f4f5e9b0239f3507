"""Expert paging (models/expert_offload.py): a weight budget below the model's size keeps the
experts on disk and pages them through a small LRU cache; outputs must not change."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inference_pio.config import ModelConfig
from inference_pio.layers.quantization import QuantConfig
from inference_pio.llm import LLM
from inference_pio.models.expert_offload import (
    ExpertPager,
    attach_expert_pager,
    read_shard_layout,
)
from inference_pio.models.loader import CheckpointError, LoadConfig, load_model, open_model_dir
from inference_pio.models.qwen3_moe import build_model
from inference_pio.models.weight_plan import WeightPlan, plan_weights
from inference_pio.sampling_params import SamplingParams
from inference_pio.utils.memory import format_bytes

CACHE_EXPERTS = 3  # below one layer's 8 experts, and below what the prompts' prefill routes to
EXPERTS = "model.layers.0.mlp.experts"
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [100, 200, 300], [5000, 6000, 7000, 8000]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _plan(config: ModelConfig, quant: QuantConfig) -> WeightPlan:
    return plan_weights(config, torch.float32, quant, None)


def _budget(config: ModelConfig, quant: QuantConfig, experts: int = CACHE_EXPERTS) -> int:
    """A weight_memory that leaves room for exactly `experts` cached experts."""
    plan = _plan(config, quant)
    return plan.resident_bytes + experts * plan.bytes_per_expert


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _llm(path: Path, **kwargs: object) -> LLM:
    return LLM(str(path), progress=False, kv_cache_memory=2**22, **kwargs)  # type: ignore[arg-type]


def _pager(llm_or_model: LLM | torch.nn.Module) -> ExpertPager:
    model = llm_or_model.model if isinstance(llm_or_model, LLM) else llm_or_model
    pager = getattr(model, "expert_pager", None)
    assert isinstance(pager, ExpertPager)
    return pager


def _tensor(path: Path, name: str) -> torch.Tensor:
    files = open_model_dir(path)
    with safe_open(str(files.weight_map[name]), framework="pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def reference_tokens(tiny_moe_dir: Path) -> list[list[int]]:
    """Greedy tokens with every expert resident in bf16 (the paged storage format)."""
    return _generate(_llm(tiny_moe_dir, quantization="bf16"))


@pytest.fixture(scope="module")
def paged_llm(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig) -> LLM:
    return _llm(tiny_moe_dir, weight_memory=_budget(tiny_moe_cfg, QuantConfig("bf16")))


@pytest.fixture(scope="module")
def paged_model(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig) -> torch.nn.Module:
    """The model alone (no engine), paged through 3 experts, for direct fetches."""
    budget = _budget(tiny_moe_cfg, QuantConfig("bf16"))
    model, _ = load_model(tiny_moe_dir, "float32", progress=False,
                          load_config=LoadConfig(weight_memory=budget))
    return model


# ---- same tokens as resident ------------------------------------------------------------

def test_plan_pages_through_a_small_cache(paged_llm: LLM, tiny_moe_cfg: ModelConfig) -> None:
    plan = paged_llm.weight_plan
    assert plan.offload and plan.cache_experts == CACHE_EXPERTS < tiny_moe_cfg.num_experts
    stats = _pager(paged_llm).stats()
    assert stats["capacity"] == CACHE_EXPERTS
    assert stats["cache_bytes"] == CACHE_EXPERTS * plan.bytes_per_expert  # no alignment pad here


def test_paged_bf16_equals_resident(paged_llm: LLM, reference_tokens: list[list[int]]) -> None:
    pager = _pager(paged_llm)
    widest = _widest_fetch(pager)
    assert _generate(paged_llm) == reference_tokens
    assert widest[0] > CACHE_EXPERTS  # the prefill asked for more experts than fit: waves ran


def test_prefetch_off_gives_the_same_tokens(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig,
                                            reference_tokens: list[list[int]]) -> None:
    llm = _llm(tiny_moe_dir, weight_memory=_budget(tiny_moe_cfg, QuantConfig("bf16")),
               prefetch_experts=False)
    assert not _pager(llm).prefetch
    assert _generate(llm) == reference_tokens


def _widest_fetch(pager: ExpertPager) -> list[int]:
    """Wrap pager.fetch (on this instance) to record the most experts one fetch asked for."""
    widest, fetch = [0], pager.fetch

    def recording(prefix: str, experts: list[int]) -> Iterator[tuple[int, object]]:
        widest[0] = max(widest[0], len(experts))
        return fetch(prefix, experts)

    pager.fetch = recording  # type: ignore[method-assign,assignment]
    return widest


def test_int4_prequantized_paged_equals_resident(tmp_path_factory: pytest.TempPathFactory,
                                                 tiny_moe_dir: Path,
                                                 tiny_moe_cfg: ModelConfig) -> None:
    quantize = pytest.importorskip("inference_pio.models.quantize")
    out = quantize.quantize_checkpoint(tiny_moe_dir, tmp_path_factory.mktemp("int4") / "ckpt",
                                       QuantConfig("int4"), progress=False)
    resident = _generate(_llm(out))
    paged = _llm(out, weight_memory=_budget(tiny_moe_cfg, QuantConfig("int4")))
    assert paged.weight_plan.offload and paged.weight_plan.cache_experts == CACHE_EXPERTS
    assert _generate(paged) == resident
    assert _pager(paged).stats()["misses"] > 0


# ---- counters and the LRU ---------------------------------------------------------------

def test_counters_add_up(paged_llm: LLM) -> None:
    pager = _pager(paged_llm)
    pager.reset_stats()
    fetched = [0]
    fetch = pager.fetch

    def counting(prefix: str, experts: list[int]) -> Iterator[tuple[int, object]]:
        for item in fetch(prefix, experts):
            fetched[0] += 1
            yield item

    pager.fetch = counting  # type: ignore[method-assign,assignment]
    try:
        _generate(paged_llm)
    finally:
        del pager.fetch  # back to the class's method
    stats = pager.stats()
    assert stats["hits"] + stats["misses"] == stats["experts_fetched"] == fetched[0] > 0
    assert stats["bytes_read"] == stats["misses"] * paged_llm.weight_plan.bytes_per_expert
    assert stats["cached"] == CACHE_EXPERTS
    pager.reset_stats()
    assert pager.stats()["hits"] == pager.stats()["misses"] == pager.stats()["bytes_read"] == 0


def _drain(pager: ExpertPager, experts: list[int], layer: str = EXPERTS) -> list[int]:
    return [e for e, _ in pager.fetch(layer, experts)]


def test_lru_eviction_order(paged_model: torch.nn.Module) -> None:
    pager = _pager(paged_model)
    _drain(pager, [5, 6, 7])  # clear out whatever was cached before
    pager.reset_stats()
    assert _drain(pager, [0, 1, 2]) == [0, 1, 2]
    assert pager.cached() == [(EXPERTS, 0), (EXPERTS, 1), (EXPERTS, 2)]
    _drain(pager, [0])  # a hit makes 0 the most recent
    assert pager.cached() == [(EXPERTS, 1), (EXPERTS, 2), (EXPERTS, 0)]
    _drain(pager, [3])  # evicts 1, the least recent
    assert pager.cached() == [(EXPERTS, 2), (EXPERTS, 0), (EXPERTS, 3)]
    other = "model.layers.1.mlp.experts"
    _drain(pager, [0], other)  # one cache for all layers: keyed by (layer, expert)
    assert pager.cached() == [(EXPERTS, 0), (EXPERTS, 3), (other, 0)]
    assert pager.stats()["hits"] == 1 and pager.stats()["misses"] == 5


def test_fetch_more_experts_than_capacity_works_in_waves(paged_model: torch.nn.Module,
                                                         tiny_moe_dir: Path) -> None:
    pager = _pager(paged_model)
    order = [5, 0, 7, 2, 6, 1, 4, 3]  # all 8 experts of the layer, through 3 slots
    seen = []
    for expert, parts in pager.fetch(EXPERTS, order):
        seen.append(expert)
        for proj, tensors in parts.items():
            want = _tensor(tiny_moe_dir, f"{EXPERTS}.{expert}.{proj}.weight")
            assert tensors["weight"].dtype == want.dtype
            assert torch.equal(tensors["weight"], want), (expert, proj)
    assert seen == order
    assert len(pager.cached()) == CACHE_EXPERTS


def test_a_fetch_never_evicts_its_own_hits(paged_model: torch.nn.Module) -> None:
    pager = _pager(paged_model)
    _drain(pager, [5, 6, 7])
    _drain(pager, [6, 7])  # LRU order now 5, 6, 7
    pager.reset_stats()
    assert _drain(pager, [6, 0, 7]) == [6, 0, 7]  # 0 must take 5's slot, not 6's or 7's
    assert pager.stats()["hits"] == 2 and pager.stats()["misses"] == 1
    assert pager.cached() == [(EXPERTS, 6), (EXPERTS, 0), (EXPERTS, 7)]


def test_abandoned_fetch_leaves_a_consistent_cache(paged_model: torch.nn.Module) -> None:
    pager = _pager(paged_model)
    fetch = pager.fetch(EXPERTS, [0, 1, 2, 3, 4])
    next(fetch)
    fetch.close()  # e.g. the consumer raised
    assert len(pager.cached()) <= CACHE_EXPERTS
    assert _drain(pager, [4, 5, 6, 7]) == [4, 5, 6, 7]  # no slot left pinned


# ---- errors -----------------------------------------------------------------------------

def test_too_small_budget_names_the_minimum(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig) -> None:
    plan = _plan(tiny_moe_cfg, QuantConfig("bf16"))
    minimum = plan.resident_bytes + tiny_moe_cfg.num_experts_per_tok * plan.bytes_per_expert
    with pytest.raises(ValueError, match=f"at least {format_bytes(minimum)}"):
        _llm(tiny_moe_dir, weight_memory=_budget(tiny_moe_cfg, QuantConfig("bf16"), experts=1))


def test_paging_a_float_checkpoint_as_int4_asks_for_pio_quantize(
        tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig) -> None:
    with pytest.raises(ValueError, match="pio quantize"):
        _llm(tiny_moe_dir, quantization="int4",
             weight_memory=_budget(tiny_moe_cfg, QuantConfig("int4")))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expert_shard(path: Path) -> Path:
    return open_model_dir(path).weight_map[f"{EXPERTS}.0.gate_proj.weight"]


def test_truncated_shard_is_refused(tmp_path: Path, tiny_moe_dir: Path,
                                    tiny_moe_cfg: ModelConfig) -> None:
    shard = _expert_shard(_copy(tiny_moe_dir, tmp_path / "m"))
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated or corrupt"):
        read_shard_layout(shard)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _llm(tmp_path / "m", weight_memory=_budget(tiny_moe_cfg, QuantConfig("bf16")))


def _with_length(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize(("data", "why"), [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (b"\xff" * 8 + b"{}", "header claims"),
    (_with_length(b"{{{{"), "not valid JSON"),
    (_with_length(b"[]"), "not a JSON object"),
    (_with_length(b'{"t": {"dtype": "BF16", "shape": [2], "data_offsets": 3}}'),
     "lacks dtype, shape or data_offsets"),
    (_with_length(b'{"t": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}'),
     "spans bytes"),
])
def test_corrupt_header_is_refused(tmp_path: Path, data: bytes, why: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=why):
        read_shard_layout(path)


@pytest.mark.parametrize("prefetch", [True, False])
def test_shard_truncated_after_loading_fails_the_read_clearly(
        tmp_path: Path, tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig, prefetch: bool) -> None:
    root = _copy(tiny_moe_dir, tmp_path / "m")
    model, _ = load_model(root, "float32", progress=False, load_config=LoadConfig(
        weight_memory=_budget(tiny_moe_cfg, QuantConfig("bf16")), prefetch=prefetch))
    pager = _pager(model)
    shard = _expert_shard(root)
    os.truncate(shard, 8)
    with pytest.raises(CheckpointError, match="shorter than when the model was loaded"):
        _drain(pager, [0])
    assert pager.cached() == []  # the failed read left no entry behind


@pytest.mark.parametrize(("method", "why"), [
    ("fp16", r"is BF16 \[32, 64\], paging expects F16"),
    ("int8", r"gate_proj.qweight is not in the checkpoint"),
])
def test_layout_mismatch_is_refused(tiny_moe_dir: Path, tiny_moe_cfg: ModelConfig, method: str,
                                    why: str) -> None:
    """A model built to page other expert tensors than the checkpoint's (the loader refuses
    this earlier; the pager checks again against the shard headers)."""
    quant = QuantConfig(method)
    model = build_model(tiny_moe_cfg, torch.float32, "cpu", quant, offload_experts=True)
    plan = plan_weights(tiny_moe_cfg, torch.float32, quant, _budget(tiny_moe_cfg, quant))
    with pytest.raises(CheckpointError, match=why):
        attach_expert_pager(model, open_model_dir(tiny_moe_dir), plan)
