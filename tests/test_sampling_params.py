"""SamplingParams: validation messages, normalisation, generation_config defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_pio.sampling_params import (
    SamplingParams,
    eos_token_ids_from_generation_config,
)

# The real Qwen3-Coder-30B-A3B-Instruct generation_config.json.
QWEN3_CODER_GEN = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature) == (1, 16, 0, 1.0)
    assert (p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0, 1.0, 0.0, 1.0)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.is_greedy


@pytest.mark.parametrize(("stop", "expected"), [
    (None, ()), ("</s>", ("</s>",)), (["a", "bc"], ("a", "bc")), (("x",), ("x",)),
])
def test_stop_is_normalised_to_tuple(stop: Any, expected: tuple[str, ...]) -> None:
    params = SamplingParams(stop=stop, stop_token_ids=[7, 9])
    assert params.stop == expected
    assert params.stop_token_ids == (7, 9)
    assert params.max_stop_str_len == max(map(len, expected), default=0)


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("n", 2, "1"),
    ("n", 0, "1"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", 2.5, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("temperature", -0.1, "[0, 100]"),
    ("temperature", math.nan, "[0, 100]"),
    ("temperature", math.inf, "[0, 100]"),
    ("temperature", 1e308, "[0, 100]"),
    ("temperature", 100.5, "[0, 100]"),
    ("top_k", -2, "0 / -1"),
    ("top_k", 1.5, "integer"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("min_p", -0.1, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("repetition_penalty", 0.0, "[0.01, 100]"),
    ("repetition_penalty", 1e-300, "[0.01, 100]"),
    ("repetition_penalty", math.inf, "[0.01, 100]"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("frequency_penalty", -2.01, "[-2, 2]"),
    ("seed", "7", "integer"),
    ("logprobs", -1, "[0, 20]"),
    ("stop", [""], "non-empty"),
    ("stop", [3], "non-empty strings"),
    ("stop_token_ids", [-1], ">= 0"),
])
def test_validation_error_names_field_value_and_range(field: str, value: Any,
                                                      allowed: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**{field: value})
    message = str(excinfo.value)
    assert f"SamplingParams.{field}" in message
    assert repr(value) in message
    assert allowed in message


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5


def test_top_k_beyond_the_vocabulary_is_accepted() -> None:
    # The sampler treats it as "keep every token" (vLLM's rule); see test_sampler.
    assert SamplingParams(top_k=2**63).top_k == 2**63


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=True)


@pytest.mark.parametrize(("temperature", "greedy"), [(0, True), (0.0, True), (1e-6, True),
                                                     (0.01, False), (0.7, False)])
def test_is_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_off_values_are_accepted() -> None:
    for top_k in (0, -1, 1, 20):
        assert SamplingParams(top_k=top_k).top_k == top_k
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0  # type: ignore[misc]
    assert dataclasses.replace(params, top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(params, top_p=2.0)


def test_from_generation_config_reads_qwen3_coder_defaults() -> None:
    params = SamplingParams.from_generation_config(QWEN3_CODER_GEN)
    assert params.temperature == 0.7
    assert params.top_p == 0.8
    assert params.top_k == 20
    assert params.repetition_penalty == 1.05
    assert params.min_p == 0.0
    assert params.max_tokens == 16


def test_from_generation_config_overrides_win() -> None:
    params = SamplingParams.from_generation_config(
        QWEN3_CODER_GEN, temperature=0.0, top_k=0, max_tokens=None, stop="\n")
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 0, None)
    assert params.top_p == 0.8 and params.stop == ("\n",)


def test_from_generation_config_do_sample_false_is_greedy() -> None:
    gen = {**QWEN3_CODER_GEN, "do_sample": False}
    assert SamplingParams.from_generation_config(gen).is_greedy
    assert not SamplingParams.from_generation_config(gen, temperature=0.3).is_greedy
    # Absent do_sample is not treated as false: only an explicit false turns sampling off.
    gen_without = {k: v for k, v in QWEN3_CODER_GEN.items() if k != "do_sample"}
    assert SamplingParams.from_generation_config(gen_without).temperature == 0.7


def test_from_generation_config_misc() -> None:
    params = SamplingParams.from_generation_config(
        {"max_new_tokens": 128, "min_p": 0.05, "top_k": None})
    assert (params.max_tokens, params.min_p, params.top_k) == (128, 0.05, 0)
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    with pytest.raises(TypeError, match="no_such_field"):
        SamplingParams.from_generation_config({}, no_such_field=1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"top_p": 0.0})


def test_eos_token_ids_from_generation_config() -> None:
    assert eos_token_ids_from_generation_config(QWEN3_CODER_GEN) == (151645, 151643)
    assert eos_token_ids_from_generation_config({"eos_token_id": 2}) == (2,)
    assert eos_token_ids_from_generation_config({}) == ()
    assert eos_token_ids_from_generation_config({"eos_token_id": [5, 5, 3]}) == (5, 3)
    with pytest.raises(ValueError, match="eos_token_id"):
        eos_token_ids_from_generation_config({"eos_token_id": ["x"]})


@settings(database=None)
@given(
    temperature=st.floats(0, 10),
    top_k=st.integers(-1, 200_000),
    top_p=st.floats(0, 1, exclude_min=True),
    min_p=st.floats(0, 1),
    penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.01, 10),
)
def test_valid_ranges_always_construct(temperature: float, top_k: int, top_p: float,
                                       min_p: float, penalty: float,
                                       repetition_penalty: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            presence_penalty=penalty, frequency_penalty=-penalty,
                            repetition_penalty=repetition_penalty)
    assert params.is_greedy == (temperature < 1e-5)


@settings(database=None)
@given(top_p=st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True),
                       st.just(math.nan)))
def test_invalid_top_p_always_rejected(top_p: float) -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=top_p)


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -(2**63) - 1),
                                          ("logprobs", 21)])
def test_values_that_would_fail_an_engine_step_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
