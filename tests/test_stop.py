"""StopChecker: eos, stop ids, stop strings across token boundaries, lengths, hold-back."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from inference_pio.engine.stop import (
    StopChecker,
    StopDecision,
    find_stop_string,
    num_hold_back_chars,
)
from inference_pio.sampling_params import SamplingParams

EOS = (151645, 151643)
PLAIN = 100  # an ordinary token id


def _feed(checker: StopChecker, pieces: list[str],
          token_ids: list[int] | None = None) -> tuple[StopDecision | None, int]:
    """Feed detokenized pieces one token at a time; the decision and tokens consumed."""
    text = ""
    for count, piece in enumerate(pieces, start=1):
        text += piece
        token_id = token_ids[count - 1] if token_ids else PLAIN
        decision = checker.check(text, len(piece), token_id, count)
        if decision is not None:
            return decision, count
    return None, len(pieces)


def test_stop_and_sampling_params_do_not_import_torch() -> None:
    # The engine layer is plain Python (style rule 3); a fresh interpreter shows what loads.
    code = ("import sys, inference_pio.engine.stop, inference_pio.sampling_params; "
            "sys.exit('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_eos_stops_unless_ignored() -> None:
    params = SamplingParams(max_tokens=None)
    decision, count = _feed(StopChecker(params, EOS), ["a", "b", ""], [1, 2, 151643])
    assert count == 3 and decision == StopDecision("stop", None, "ab")
    ignoring = StopChecker(SamplingParams(ignore_eos=True, max_tokens=None), EOS)
    assert _feed(ignoring, ["a", "b", ""], [1, 2, 151645]) == (None, 3)


def test_stop_token_ids_report_the_id_and_drop_its_text() -> None:
    params = SamplingParams(stop_token_ids=[42], ignore_eos=True)
    decision, count = _feed(StopChecker(params, EOS), ["x", "\n\n"], [1, 42])
    assert count == 2 and decision == StopDecision("stop", 42, "x")
    params = SamplingParams(stop_token_ids=[42], include_stop_str_in_output=True)
    assert _feed(StopChecker(params, EOS), ["x", "\n\n"], [1, 42])[0] == StopDecision(
        "stop", 42, "x\n\n")


def test_stop_string_straddling_tokens() -> None:
    params = SamplingParams(stop=["STOP"], max_tokens=None)
    decision, count = _feed(StopChecker(params, EOS), ["Hel", "lo S", "T", "OP wor", "ld"])
    assert count == 4 and decision == StopDecision("stop", "STOP", "Hello ")


def test_stop_string_include_in_output_drops_what_follows() -> None:
    params = SamplingParams(stop="STOP", include_stop_str_in_output=True)
    decision, _ = _feed(StopChecker(params, EOS), ["Hello S", "TOP and more"])
    assert decision == StopDecision("stop", "STOP", "Hello STOP")


def test_stop_string_inside_one_token_and_first_to_complete_wins() -> None:
    params = SamplingParams(stop=["abcd", "c"])
    assert _feed(StopChecker(params, EOS), ["xxabcdyy"])[0] == StopDecision("stop", "c", "xxab")
    params = SamplingParams(stop=["c", "bc"])  # same end: the longer one cuts more
    assert _feed(StopChecker(params, EOS), ["abcd"])[0] == StopDecision("stop", "bc", "a")


def test_old_text_is_not_searched_again() -> None:
    # The stop string lies wholly before the new tail: it was already checked then.
    assert find_stop_string("STOP and then", 3, ["STOP"], False) is None
    assert find_stop_string("xxSTOP", 1, ["STOP"], False) == ("STOP", 2)
    assert find_stop_string("xxSTOPyy", 3, ["STOP"], True) == ("STOP", 6)
    assert find_stop_string("STOP", 0, ["STOP"], False) is None


def test_max_tokens_gives_length_but_a_stop_on_the_last_token_is_stop() -> None:
    params = SamplingParams(max_tokens=3)
    assert _feed(StopChecker(params, EOS), ["a", "b", "c", "d"]) == (
        StopDecision("length", None, "abc"), 3)
    decision, _ = _feed(StopChecker(params, EOS), ["a", "b", ""], [1, 2, 151645])
    assert decision == StopDecision("stop", None, "ab")


def test_engine_cap_and_unbounded_max_tokens() -> None:
    unbounded = StopChecker(SamplingParams(max_tokens=None), EOS)
    assert _feed(unbounded, ["a"] * 50) == (None, 50)
    capped = StopChecker(SamplingParams(max_tokens=None), EOS, max_output_tokens=5)
    assert _feed(capped, ["a"] * 50) == (StopDecision("length", None, "aaaaa"), 5)
    both = StopChecker(SamplingParams(max_tokens=4), EOS, max_output_tokens=9)
    assert both.max_output_tokens == 4


def test_min_tokens_delays_every_stop_condition() -> None:
    params = SamplingParams(min_tokens=3, stop=["x"], stop_token_ids=[7])
    checker = StopChecker(params, EOS)
    assert checker.check("x", 1, 151645, 1) is None
    assert checker.check("xx", 1, 7, 2) is None
    assert checker.check("xxx", 1, PLAIN, 3) == StopDecision("stop", "x", "xx")
    assert checker.suppress_token_ids(0) == {151645, 151643, 7}
    assert checker.suppress_token_ids(2) == {151645, 151643, 7}
    assert checker.suppress_token_ids(3) == frozenset()
    no_eos = StopChecker(SamplingParams(min_tokens=2, ignore_eos=True), EOS)
    assert no_eos.suppress_token_ids(0) == frozenset()


def test_hold_back_chars() -> None:
    assert num_hold_back_chars("Hello ST", ["STOP"]) == 2
    assert num_hold_back_chars("Hello S", ["STOP", "Sx"]) == 1
    assert num_hold_back_chars("Hello", ["STOP"]) == 0
    assert num_hold_back_chars("ab", ["abc", "b!"]) == 2
    assert num_hold_back_chars("", ["abc"]) == 0
    assert num_hold_back_chars("abc", []) == 0
    checker = StopChecker(SamplingParams(stop=["STOP"]), EOS)
    assert checker.num_hold_back_chars("Hello STO") == 3
    including = StopChecker(SamplingParams(stop=["STOP"], include_stop_str_in_output=True), EOS)
    assert including.num_hold_back_chars("Hello STO") == 0


def _reference_cut(text: str, stops: list[str]) -> str:
    """Character by character: cut before the first stop string to complete (longest on ties)."""
    for end in range(1, len(text) + 1):
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            return text[:end - max(map(len, matches))]
    return text


@settings(max_examples=300, deadline=None, database=None)
@given(pieces=st.lists(st.text("ab\n", max_size=4), max_size=12),
       stops=st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_streaming_never_sends_text_that_is_later_cut(pieces: list[str],
                                                      stops: list[str]) -> None:
    checker = StopChecker(SamplingParams(stop=stops, max_tokens=None), EOS)
    text, sent = "", ""
    decision = None
    for count, piece in enumerate(pieces, start=1):
        text += piece
        decision = checker.check(text, len(piece), PLAIN, count)
        if decision is not None:
            break
        hold = checker.num_hold_back_chars(text)
        new_sent = text[:len(text) - hold]
        assert new_sent.startswith(sent)  # a stream only appends
        sent = new_sent
    final = decision.text if decision is not None else text
    assert final.startswith(sent)
    assert final == _reference_cut("".join(pieces), stops)
