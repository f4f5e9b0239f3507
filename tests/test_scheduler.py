"""Scheduler driven by a fake runner that checks every KV read against a per-block store.

The fake runner's next token depends only on (request id, position), so a request's output is
known in advance whatever the batching, chunking, caching or preemption."""

from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from inference_pio.engine.block_manager import NULL_BLOCK_ID
from inference_pio.engine.request import Request, RequestStatus
from inference_pio.engine.scheduler import (
    KVCacheTooSmallError,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inference_pio.tokenizer import IncrementalDetokenizer


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id=request_id, prompt=None, prompt_token_ids=list(prompt),
                   params=params, stop_checker=StopChecker(params, (), max_tokens),
                   detokenizer=cast("IncrementalDetokenizer", None))


def next_token(request_id: str, position: int) -> int:
    return zlib.crc32(f"{request_id}:{position}".encode()) % 50


def expected_output(req: Request) -> list[int]:
    num_prompt = len(req.prompt_token_ids)
    return [next_token(req.request_id, num_prompt + i) for i in range(req.params.max_tokens or 0)]


class FakeRunner:
    """Writes each computed token into its KV slot; asserts every slot a step reads is right."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kv: dict[int, list[int | None]] = {}

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        cfg, sampled = self.scheduler.config, {}
        for s in out.scheduled:
            req = self.scheduler.requests[s.request_id]
            end = s.num_computed_tokens + s.num_new_tokens
            assert s.new_token_ids == req.all_token_ids[s.num_computed_tokens:end]
            assert len(s.block_ids) * cfg.block_size >= end
            window = cfg.sliding_window or end
            for pos in range(max(0, s.num_computed_tokens - window + 1), s.num_computed_tokens):
                assert self._slot(s.block_ids, pos) == req.all_token_ids[pos], (s, pos)
            for pos, token in zip(range(s.num_computed_tokens, end), s.new_token_ids,
                                  strict=True):
                block_id = s.block_ids[pos // cfg.block_size]
                # Only a request's private blocks are written; shared ones are read-only.
                assert self.scheduler.block_manager.blocks[block_id].ref_count == 1
                self.kv.setdefault(block_id, [None] * cfg.block_size)[pos % cfg.block_size] = token
            if s.needs_sample:
                sampled[s.request_id] = next_token(s.request_id, end)
        return sampled

    def _slot(self, block_ids: list[int], pos: int) -> int | None:
        block_id = block_ids[pos // self.scheduler.config.block_size]
        assert block_id != NULL_BLOCK_ID
        return self.kv[block_id][pos % self.scheduler.config.block_size]


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    """schedule -> execute -> update, finishing requests at max_tokens like the engine does."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    assert len(out.scheduled) <= sched.config.max_num_seqs
    for req in sched.update_from_output(out, runner.execute(out)):
        if len(req.output_token_ids) >= (req.params.max_tokens or 0):
            sched.finish_request(req.request_id, "length")
    sched.check_invariants()
    return out


def run_all(sched: Scheduler, reqs: list[Request], runner: FakeRunner | None = None,
            max_steps: int = 2000) -> list[SchedulerOutput]:
    for req in reqs:
        sched.add_request(req)
    runner, outs = runner or FakeRunner(sched), []
    while sched.has_unfinished_requests():
        outs.append(step(sched, runner))
        assert len(outs) < max_steps, "scheduler made no progress"
    assert sched.num_used_blocks == 0
    for req in reqs:
        assert req.output_token_ids == expected_output(req)
        assert req.finish_reason == "length"
    return outs


def config(**kwargs: object) -> SchedulerConfig:
    defaults: dict[str, object] = {"num_blocks": 64, "max_model_len": 256, "max_num_seqs": 4,
                                   "max_num_batched_tokens": 32, "block_size": 4}
    return SchedulerConfig(**{**defaults, **kwargs})  # type: ignore[arg-type]


# ---- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"block_size": 0}, "block_size"),
    ({"num_blocks": True}, "num_blocks"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"max_num_seqs": 64}, "max_num_seqs"),
    ({"enable_chunked_prefill": False}, "chunked prefill"),
])
def test_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_sliding_window_turns_prefix_caching_off() -> None:
    assert config().use_prefix_caching
    assert not config(sliding_window=8).use_prefix_caching


# ---- batching ----------------------------------------------------------------------------
def test_admission_respects_max_num_seqs_fcfs() -> None:
    sched = Scheduler(config(max_num_seqs=2))
    reqs = [make_request(f"r{i}", [i] * 3) for i in range(3)]
    for req in reqs:
        sched.add_request(req)
    out = step(sched, FakeRunner(sched))
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert reqs[2].status is RequestStatus.WAITING
    assert all(s.needs_sample and s.num_computed_tokens == 0 for s in out.scheduled)


def test_long_prompt_is_chunked_while_another_request_decodes() -> None:
    sched = Scheduler(config(max_num_batched_tokens=16, max_num_seqs=2))
    runner = FakeRunner(sched)
    short = make_request("short", [1, 2, 3], max_tokens=20)
    sched.add_request(short)
    step(sched, runner)
    long = make_request("long", list(range(60)), max_tokens=2)
    sched.add_request(long)
    chunks = []
    while long.num_computed_tokens < 60:
        out = step(sched, runner)
        by_id = {s.request_id: s for s in out.scheduled}
        assert by_id["short"].num_new_tokens == 1  # the decode keeps flowing
        chunks.append((by_id["long"].num_new_tokens, by_id["long"].needs_sample))
    assert chunks == [(15, False)] * 3 + [(15, True)]
    assert len(long.output_token_ids) == 1


def test_chunked_prefill_off_makes_a_prompt_wait_for_a_fresh_budget() -> None:
    sched = Scheduler(config(max_num_batched_tokens=16, max_model_len=16, max_num_seqs=2,
                             enable_chunked_prefill=False))
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", [1] * 10, max_tokens=3))
    sched.add_request(make_request("b", [2] * 10, max_tokens=3))
    outs = [step(sched, runner) for _ in range(2)]
    assert [s.request_id for s in outs[0].scheduled] == ["a"]  # b's 10 tokens don't fit in 6
    assert [(s.request_id, s.num_new_tokens) for s in outs[1].scheduled] == [("a", 1), ("b", 10)]


def test_every_request_finishes_with_its_tokens() -> None:
    reqs = [make_request(f"r{i}", list(range(i, i + 5 + 7 * i)), max_tokens=3 + i)
            for i in range(8)]
    outs = run_all(Scheduler(config()), reqs)
    assert max(o.num_batched_tokens for o in outs) == 32


# ---- prefix caching ----------------------------------------------------------------------
def test_prefix_hits_are_reused_and_counted() -> None:
    sched = Scheduler(config())
    runner = FakeRunner(sched)
    prefix = list(range(100, 112))  # 3 blocks of 4
    first = make_request("first", [*prefix, 1, 2], max_tokens=5)
    sched.add_request(first)
    step(sched, runner)
    second = make_request("second", [*prefix, 3], max_tokens=2)
    sched.add_request(second)
    out = step(sched, runner)
    sched_second = next(s for s in out.scheduled if s.request_id == "second")
    assert sched_second.num_computed_tokens == 12 and sched_second.new_token_ids == [3]
    assert second.num_cached_tokens == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    assert (sched.prefix_cache_stats.num_queried_tokens,
            sched.prefix_cache_stats.num_hit_tokens) == (14 + 13, 12)
    # Exactly the cached prefix as a prompt: its last block is recomputed for the logits.
    same = make_request("same", prefix, max_tokens=2)
    sched.add_request(same)
    step(sched, runner)
    assert same.num_cached_tokens == 8


def test_finished_requests_leave_a_reusable_cache() -> None:
    sched = Scheduler(config(num_blocks=8))
    runner = FakeRunner(sched)
    prompt = list(range(10, 22))
    a = make_request("a", prompt, max_tokens=6)
    run_all(sched, [a], runner)
    assert sched.num_free_blocks == 8 and len(sched.block_manager.hash_to_block) == 4
    # Block 3 was filled by generated tokens and is cached too.
    b = make_request("b", [*a.all_token_ids[:16], 1])
    run_all(sched, [b], runner)
    assert b.num_cached_tokens == 16
    # An unrelated request needing the whole pool evicts every cached block.
    run_all(sched, [make_request("big", list(range(200, 229)), max_tokens=3)], runner)
    a2 = make_request("a2", prompt)
    sched.block_manager.update_block_hashes(a2)
    assert len(a2.block_hashes) == 3 and sched.block_manager.get_computed_blocks(a2) == []


# ---- preemption --------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_small_pool_preempts_and_every_request_still_finishes(prefix_caching: bool) -> None:
    def reqs() -> list[Request]:
        return [make_request(f"r{i}", [i % 3] * (6 + i), max_tokens=12) for i in range(6)]

    small = Scheduler(config(num_blocks=10, enable_prefix_caching=prefix_caching))
    small_reqs = reqs()
    run_all(small, small_reqs)
    assert sum(r.num_preemptions for r in small_reqs) > 0
    large_reqs = reqs()
    run_all(Scheduler(config(num_blocks=1000)), large_reqs)
    assert [r.output_token_ids for r in small_reqs] == [r.output_token_ids for r in large_reqs]


def test_preempted_request_goes_to_the_front_and_reports_its_id() -> None:
    sched = Scheduler(config(num_blocks=4, max_model_len=16))
    runner = FakeRunner(sched)
    old, new = make_request("old", [1] * 7, max_tokens=8), make_request("new", [2] * 7, 8)
    sched.add_request(old)
    sched.add_request(new)
    preempted: list[str] = []
    while not preempted:
        preempted = step(sched, runner).preempted_request_ids
    assert preempted == ["new"] and sched.waiting[0] is new
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and new.block_ids == []


def test_request_that_can_never_fit_is_rejected_at_admission() -> None:
    sched = Scheduler(config(num_blocks=4))
    with pytest.raises(KVCacheTooSmallError, match=r"20 tokens.*5 KV blocks.*only 4.*kv_cache_"):
        sched.add_request(make_request("big", [1] * 12, max_tokens=8))
    assert not sched.has_unfinished_requests()
    assert issubclass(KVCacheTooSmallError, ValueError)
    sched.add_request(make_request("fits", [1] * 12, max_tokens=4))


# ---- abort -------------------------------------------------------------------------------
def test_abort_from_waiting_and_running_frees_at_once() -> None:
    sched = Scheduler(config(max_num_seqs=1, num_blocks=8))
    running, waiting = make_request("run", [1] * 9, 5), make_request("wait", [2] * 9, 5)
    sched.add_request(running)
    sched.add_request(waiting)
    out = sched.schedule()
    sched.finish_request("wait", "abort")
    sched.finish_request("run", "abort")
    assert sched.num_used_blocks == 0 and not sched.has_unfinished_requests()
    assert waiting.finish_reason == running.finish_reason == "abort"
    # The step was already scheduled; its results for aborted requests are dropped.
    assert sched.update_from_output(out, {"run": 1, "wait": 1}) == []
    assert running.output_token_ids == []
    sched.check_invariants()
    assert sched.schedule().finished_request_ids == ["wait", "run"]
    assert sched.schedule().finished_request_ids == []
    sched.finish_request("run", "abort")  # unknown ids are ignored


# ---- sliding window ----------------------------------------------------------------------
def test_sliding_window_bounds_the_blocks_of_a_long_generation() -> None:
    sched = Scheduler(config(sliding_window=8, num_blocks=12, max_model_len=512))
    req = make_request("long", list(range(20)), max_tokens=200)
    sched.add_request(req)
    runner, peak = FakeRunner(sched), 0
    while sched.has_unfinished_requests():
        step(sched, runner)
        if req.num_computed_tokens > 40 and not req.is_finished:
            assert req.block_ids[:5] == [NULL_BLOCK_ID] * 5
            peak = max(peak, sched.num_used_blocks)
    assert req.output_token_ids == expected_output(req)
    # Past the prompt (5 blocks, one chunk) a decode holds only its window: 9 positions.
    assert peak <= 4 and sched.num_used_blocks == 0


# ---- randomized ----------------------------------------------------------------------------
MACHINE_CONFIGS = [
    config(num_blocks=12, max_num_batched_tokens=12, max_model_len=40),
    config(num_blocks=12, max_num_batched_tokens=12, max_model_len=40, sliding_window=6),
    config(num_blocks=12, max_num_batched_tokens=40, max_model_len=40,
           enable_chunked_prefill=False),
]


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, aborts and steps on a small pool; the fake runner checks every KV read."""

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Request] = []

    @initialize(cfg=st.sampled_from(MACHINE_CONFIGS))
    def start(self, cfg: SchedulerConfig) -> None:
        self.sched = Scheduler(cfg)
        self.runner = FakeRunner(self.sched)

    @rule(prefix=st.sampled_from([[7] * 8, [5] * 4, []]), tail=st.lists(st.integers(0, 9),
          min_size=1, max_size=14), max_tokens=st.integers(1, 16))
    def add(self, prefix: list[int], tail: list[int], max_tokens: int) -> None:
        req = make_request(f"q{len(self.all)}", prefix + tail, max_tokens)
        self.sched.add_request(req)
        self.all.append(req)

    @rule(index=st.integers(0, 100))
    def abort(self, index: int) -> None:
        if self.all:
            self.sched.finish_request(self.all[index % len(self.all)].request_id, "abort")

    @rule(num_steps=st.integers(1, 6))
    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            step(self.sched, self.runner)

    @invariant()
    def consistent(self) -> None:
        self.sched.check_invariants()

    def teardown(self) -> None:
        for _ in range(1000):
            if not self.sched.has_unfinished_requests():
                break
            step(self.sched, self.runner)
        assert not self.sched.has_unfinished_requests() and self.sched.num_used_blocks == 0
        for req in self.all:
            expected = expected_output(req)
            assert req.output_token_ids == expected[:len(req.output_token_ids)]
            assert req.finish_reason == "abort" or req.output_token_ids == expected


SchedulerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                              deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


@pytest.mark.parametrize("cfg", MACHINE_CONFIGS)
def test_random_workload_preempts_hits_and_finishes(cfg: SchedulerConfig) -> None:
    rng, sched = random.Random(0), Scheduler(cfg)
    runner, reqs = FakeRunner(sched), []
    for i in range(200):
        if rng.random() < 0.3:
            prompt = rng.choice([[7] * 8, [5] * 4, []]) + [rng.randrange(10)] * rng.randint(1, 14)
            reqs.append(make_request(f"q{i}", prompt, rng.randint(1, 16)))
            sched.add_request(reqs[-1])
        if reqs and rng.random() < 0.03:
            sched.finish_request(rng.choice(reqs).request_id, "abort")
        step(sched, runner)
    run_all(sched, [], runner)
    for req in reqs:
        assert req.output_token_ids == expected_output(req)[:len(req.output_token_ids)]
        assert req.finish_reason == "abort" or req.output_token_ids == expected_output(req)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert (sched.prefix_cache_stats.num_hit_tokens > 0) == cfg.use_prefix_caching
