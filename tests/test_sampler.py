"""Sampler: masks vs hand-computed and transformers' warpers, penalties, seeds, logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inference_pio.layers.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
    sample_from_probs,
    suppress_tokens,
)
from inference_pio.sampling_params import SamplingParams

INF = math.inf


def _probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


# --- masks -------------------------------------------------------------------------------


def test_top_k_hand_example() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [1.0, 4.0, 2.0, 3.0], [5.0, 1.0, 5.0, 0.0]])
    out = apply_top_k(logits.clone(), torch.tensor([2, 0, 1]))
    assert out[0].tolist() == [-INF, 4.0, -INF, 3.0]
    assert out[1].tolist() == [1.0, 4.0, 2.0, 3.0]  # 0 = off
    assert out[2].tolist() == [5.0, -INF, 5.0, -INF]  # ties at the k-th value are kept
    assert apply_top_k(logits[:1].clone(), torch.tensor([-1]))[0].tolist() == logits[0].tolist()


@pytest.mark.parametrize(("top_p", "kept"), [
    (0.35, [3]), (0.5, [2, 3]), (0.75, [1, 2, 3]), (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]),
    (1e-9, [3]),
])
def test_top_p_hand_example(top_p: float, kept: list[int]) -> None:
    # probs 0.1, 0.2, 0.3, 0.4: the smallest top set with mass >= top_p.
    logits = _probs_logits([0.1, 0.2, 0.3, 0.4])
    assert _kept(apply_top_p(logits, torch.tensor([top_p]))) == kept


@pytest.mark.parametrize(("min_p", "kept"), [
    (0.0, [0, 1, 2, 3]), (0.25, [1, 2, 3]), (0.5, [2, 3]), (0.7, [3]), (1.0, [3]),
])
def test_min_p_hand_example(min_p: float, kept: list[int]) -> None:
    # probs 0.05, 0.15, 0.3, 0.5; the threshold is min_p * 0.5.
    logits = _probs_logits([0.05, 0.15, 0.3, 0.5])
    assert _kept(apply_min_p(logits, torch.tensor([min_p]))) == kept


def test_masks_match_transformers_warpers() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    input_ids = torch.zeros(3, 0, dtype=torch.long)  # unused by these warpers
    for k in (1, 5, 50):
        ours = apply_top_k(logits.clone(), torch.full((3,), k))
        torch.testing.assert_close(ours, TopKLogitsWarper(k)(input_ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = apply_top_p(logits.clone(), torch.full((3,), p))
        torch.testing.assert_close(ours, TopPLogitsWarper(p)(input_ids, logits.clone()))
    for m in (0.01, 0.1, 0.5):
        ours = apply_min_p(logits.clone(), torch.full((3,), m))
        expected = MinPLogitsWarper(m)(input_ids, logits.clone())  # type: ignore[arg-type]
        torch.testing.assert_close(ours, expected)


def test_masks_handle_rows_with_one_finite_logit() -> None:
    logits = torch.full((1, 6), -INF)
    logits[0, 4] = 2.0
    for mask in (apply_top_p, apply_min_p):
        assert _kept(mask(logits.clone(), torch.tensor([0.5]))) == [4]
    assert _kept(apply_top_k(logits.clone(), torch.tensor([3]))) == [4]


@settings(max_examples=60, deadline=None, database=None)
@given(values=st.lists(st.floats(-20, 20), min_size=2, max_size=40),
       top_p=st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_set_reaching_top_p(values: list[float], top_p: float) -> None:
    logits = torch.tensor([values], dtype=torch.float64)
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(apply_top_p(logits.clone(), torch.tensor([top_p])))[0]
    assert float(probs[kept].max()) == float(probs.max())
    kept_mass = float(probs[kept].sum())
    assert kept_mass >= top_p - 1e-6
    # Minimal: without its least likely member, the kept set falls short of top_p.
    if int(kept.sum()) > 1:
        assert kept_mass - float(probs[kept].min()) < top_p + 1e-6
    # A prefix of the sorted order: nothing dropped is more likely than something kept.
    if not bool(kept.all()):
        assert float(probs[~kept].max()) <= float(probs[kept].min()) + 1e-12


# --- penalties ---------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 50) * 4
    prompt_ids, output_ids = [[1, 2, 3, 3, 40], [7, 8, 9, 1, 2]], [[5, 1, 6], [9, 10, 11]]
    params = [SamplingParams(repetition_penalty=1.05), SamplingParams(repetition_penalty=1.05)]
    ours = apply_penalties(logits.clone(), prompt_ids, output_ids, params)
    input_ids = torch.tensor([p + o for p, o in zip(prompt_ids, output_ids, strict=True)])
    expected = RepetitionPenaltyLogitsProcessor(1.05)(input_ids, logits.clone())
    torch.testing.assert_close(ours, expected)


def test_repetition_penalty_per_row_and_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0], [2.0, -2.0, 2.0, -2.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    out = apply_penalties(logits, [[0], [0]], [[1], [1]], params)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0], [2.0, -2.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties_hand_computed() -> None:
    logits = torch.zeros(2, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0)]
    # Prompt ids are not penalised by presence/frequency (OpenAI semantics).
    out = apply_penalties(logits, [[0, 4], [4]], [[1, 1, 1, 2], [3]], params)
    assert out[0].tolist() == [0.0, -(0.5 + 0.75), -(0.5 + 0.25), 0.0, 0.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_no_penalty_is_identity_and_empty_ids_ok() -> None:
    logits = torch.randn(2, 7)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=1.0)]
    out = apply_penalties(logits.clone(), [[], []], [[], []], params)
    torch.testing.assert_close(out, logits)
    out = apply_penalties(logits.clone(), [[1], [2]], [[3], [4]], [SamplingParams()] * 2)
    torch.testing.assert_close(out, logits)


def test_suppress_tokens() -> None:
    logits = torch.zeros(3, 4)
    out = suppress_tokens(logits, [{1, 3}, None, set()])
    assert out.tolist() == [[0.0, -INF, 0.0, -INF], [0.0] * 4, [0.0] * 4]


# --- the sampler -------------------------------------------------------------------------


def _call(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams],
          output_ids: list[list[int]] | None = None, prompt_ids: list[list[int]] | None = None,
          suppress_ids: list[set[int] | None] | None = None) -> list[int]:
    rows = len(params)
    out = sampler(logits, params, prompt_ids or [[]] * rows, output_ids or [[]] * rows,
                  [None] * rows, suppress_ids)
    return out.token_ids


def test_greedy_is_argmax_of_penalised_logits() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    greedy = [SamplingParams(temperature=0.0)] * 4
    assert _call(Sampler(), logits, greedy) == logits.argmax(-1).tolist()
    top = int(logits[0].argmax())
    penalised = [SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    logits0 = logits[:1].clone()
    logits0[0, top] = logits0[0].max() + 1.0  # beats the runner-up by 1, loses to a penalty 2
    expected = apply_penalties(logits0.clone(), [[]], [[top]], penalised).argmax(-1).tolist()
    assert _call(Sampler(), logits0, penalised, output_ids=[[top]]) == expected != [top]


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]
    assert _call(Sampler(), logits, params) == [1, 1]


def test_input_dtype_and_tensor_untouched() -> None:
    logits = torch.randn(2, 30).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.8, top_p=0.5, top_k=5, min_p=0.1)]
    tokens = _call(Sampler(), logits, params, output_ids=[[1, 2], [3]])
    assert torch.equal(logits, before)
    assert all(0 <= t < 30 for t in tokens)


def test_only_one_token_left_after_masks() -> None:
    logits = torch.full((2, 8), -INF)
    logits[:, 6] = 0.0
    params = [SamplingParams(temperature=1.5, top_p=0.3), SamplingParams(min_p=0.9, top_k=2)]
    for _ in range(5):
        assert _call(Sampler(), logits, params) == [6, 6]


def test_padding_vocab_is_never_sampled() -> None:
    logits = torch.zeros(2, 12)
    logits[:, 10:] = 100.0  # padded lm_head rows beyond the tokenizer's 10 tokens
    sampler = Sampler(num_valid_tokens=10)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=2.0)]
    for _ in range(20):
        out = sampler(logits, params, [[], []], [[], []], [None, None])
        assert all(t < 10 for t in out.token_ids)
        assert all(t < 10 for t in out.logprobs[0] or {})


def test_suppress_ids_skip_eos_until_min_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0], [0.0, 1.0, 9.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert _call(Sampler(), logits, params, suppress_ids=[{2}, None]) == [1, 2]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(3)
    counts = torch.zeros(4)
    for _ in range(50):
        ids = sample_from_probs(probs.repeat(800, 1), [None] * 800)
        counts += torch.bincount(ids, minlength=4)
    torch.testing.assert_close(counts / counts.sum(), probs, atol=0.01, rtol=0)


def test_temperature_top_k_support() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 64)
    allowed = set(logits[0].topk(3).indices.tolist())
    params = [SamplingParams(temperature=5.0, top_k=3)]
    assert {_call(Sampler(), logits, params)[0] for _ in range(100)} == allowed


def test_extreme_but_valid_values_keep_a_real_distribution() -> None:
    # top_k beyond the vocabulary (2**63 once overflowed int64) keeps every token; a top_p that
    # rounds to 0 in float32 keeps the top token; the largest temperature and penalties stay
    # finite, so no row turns into NaN (whose argmax was token 0, '!').
    torch.manual_seed(5)
    logits = torch.randn(4, 64) * 10
    params = [SamplingParams(temperature=0.5, top_k=2**63),
              SamplingParams(temperature=1.0, top_p=5e-324),
              SamplingParams(temperature=100.0, repetition_penalty=100.0),
              SamplingParams(temperature=1.0, repetition_penalty=0.01)]
    out = _call(Sampler(), logits, params, prompt_ids=[[1, 2]] * 4)
    assert out[1] == int(logits[1].argmax())
    seen = {_call(Sampler(), logits[:1] / 10, params[:1])[0] for _ in range(200)}
    assert len(seen) > 2  # sampled from the whole vocabulary, not top-1 or NaN-argmax


# --- seeds -------------------------------------------------------------------------------


def _generate_row(batch: list[tuple[SamplingParams, torch.Tensor]], row: int,
                  steps: int) -> list[int]:
    """Sample `steps` tokens for every row; return those of `row`. Logits are fixed per row."""
    sampler = Sampler()
    params = [p for p, _ in batch]
    generators = [make_generator(p.seed, "cpu") for p in params]
    logits = torch.stack([lg for _, lg in batch])
    outputs: list[list[int]] = [[] for _ in batch]
    for _ in range(steps):
        out = sampler(logits, params, [[0, 1]] * len(batch), outputs, generators)
        for ids, token in zip(outputs, out.token_ids, strict=True):
            ids.append(token)
    return outputs[row]


def test_seed_gives_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(5)
    target = (SamplingParams(temperature=1.0, top_p=0.95, seed=1234, repetition_penalty=1.1),
              torch.randn(200))
    others = [(SamplingParams(temperature=0.7, seed=s), torch.randn(200)) for s in (1, 2)]
    unseeded = [(SamplingParams(temperature=1.2), torch.randn(200)) for _ in range(3)]
    greedy = [(SamplingParams(temperature=0.0), torch.randn(200))]
    alone = _generate_row([target], 0, 12)
    assert _generate_row([others[0], target, *unseeded], 1, 12) == alone
    assert _generate_row([*unseeded, *greedy, others[1], target, others[0]], 5, 12) == alone
    torch.manual_seed(99)  # the global RNG does not matter for a seeded row
    assert _generate_row([*greedy, target], 1, 12) == alone
    reseeded = (dataclasses.replace(target[0], seed=4321), target[1])
    assert _generate_row([reseeded], 0, 12) != alone


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    a, b = make_generator(7, "cpu"), make_generator(7, torch.device("cpu"))
    assert a is not None and b is not None
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


# --- logprobs ----------------------------------------------------------------------------


def test_logprobs_are_raw_and_hold_sampled_plus_top_k() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, 40)
    raw = logits.log_softmax(-1)
    assert math.isclose(float(raw.exp().sum(-1)[0]), 1.0, rel_tol=1e-5)
    params = [SamplingParams(temperature=3.0, top_k=30, logprobs=4, repetition_penalty=1.5),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0, presence_penalty=2.0)]
    output_ids = [[int(raw[0].argmax())], [], [int(raw[2].argmax())]]
    out = Sampler()(logits, params, [[], [], []], output_ids, [None] * 3)
    row0, row1, row2 = out.logprobs
    assert row1 is None
    top4 = raw[0].topk(4).indices.tolist()
    assert set(row0) == set(top4) | {out.token_ids[0]}  # type: ignore[arg-type]
    assert next(iter(row0)) == out.token_ids[0]  # type: ignore[arg-type]
    for token_id, logprob in row0.items():  # type: ignore[union-attr]
        assert logprob == pytest.approx(float(raw[0, token_id]))
    assert row2 == {out.token_ids[2]: pytest.approx(float(raw[2, out.token_ids[2]]))}


def test_row_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="output_ids has 1 entries for 2 rows"):
        Sampler()(torch.randn(2, 5), [SamplingParams()] * 2, [[], []], [[]], [None] * 2)


def test_no_logprobs_requested() -> None:
    out = Sampler()(torch.randn(2, 5), [SamplingParams()] * 2, [[], []], [[], []], [None] * 2)
    assert out.logprobs == [None, None]
    assert len(out.token_ids) == 2


@settings(max_examples=40, deadline=None, database=None)
@given(values=st.lists(st.floats(-30, 30), min_size=2, max_size=50),
       penalty=st.floats(0.5, 2.0))
def test_greedy_property(values: list[float], penalty: float) -> None:
    logits = torch.tensor([values])
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty)]
    expected = apply_penalties(logits.clone(), [[0]], [[1]], params).argmax(-1).tolist()
    assert _call(Sampler(), logits, params, output_ids=[[1]], prompt_ids=[[0]]) == expected
