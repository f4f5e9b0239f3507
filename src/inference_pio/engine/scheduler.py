"""Continuous batching with chunked prefill, prefix caching and preemption (plain Python).

One step: `schedule()` picks, under a token budget, how many tokens each request computes:
`min(num_tokens - num_computed_tokens, budget left)`. Prefill chunks, prefix hits and decodes
are one code path. Running requests go first (decodes, then continuing prefills), then waiting
ones are admitted FCFS. When a running request needs a block and none is free, the newest
running request not yet scheduled this step is preempted: its blocks are freed, its counter
reset to 0, and it is recomputed (prompt + outputs so far) when readmitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from inference_pio.engine.block_manager import BlockManager, PrefixCacheStats
from inference_pio.engine.request import Request, RequestStatus


class KVCacheTooSmallError(ValueError):
    """A request that could never fit in the KV cache, even alone."""


@dataclass(frozen=True)
class SchedulerConfig:
    """`num_blocks` comes from the KV memory budget; `max_model_len` caps prompt + output.
    With a sliding window prefix caching is off (`use_prefix_caching`): freed window blocks
    would leave holes in a cached prefix."""

    num_blocks: int
    max_model_len: int
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "block_size", "sliding_window"):
            value = getattr(self, name)
            if name == "sliding_window" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}) so every decode fits one step")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step: raise "
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) to max_model_len "
                f"({self.max_model_len}) or enable chunked prefill")

    @property
    def use_prefix_caching(self) -> bool:
        return self.enable_prefix_caching and self.sliding_window is None


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute `new_token_ids` at positions from
    `num_computed_tokens` on, with KV in `block_ids` (NULL_BLOCK_ID = freed window block)."""

    request_id: str
    new_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    needs_sample: bool  # the chunk reaches the end of the request's tokens

    @property
    def num_new_tokens(self) -> int:
        return len(self.new_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)  # freed since the last step


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size,
                                          config.use_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.block_manager.stats

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; raises KVCacheTooSmallError if it could never fit the pool."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self._check_fits(req)
        self.block_manager.update_block_hashes(req)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def _check_fits(self, req: Request) -> None:
        cfg = self.config
        max_output = req.stop_checker.max_output_tokens if req.stop_checker else None
        max_tokens = cfg.max_model_len if max_output is None else req.max_num_tokens
        num_needed = self.block_manager.num_blocks_for(max_tokens)
        if cfg.sliding_window is not None:
            # Live blocks: the window plus one step's chunk, plus one partly filled block.
            live = cfg.sliding_window + cfg.max_num_batched_tokens
            num_needed = min(num_needed, self.block_manager.num_blocks_for(live) + 1)
        if num_needed > cfg.num_blocks:
            raise KVCacheTooSmallError(
                f"request {req.request_id!r} may reach {max_tokens} tokens (prompt "
                f"{len(req.prompt_token_ids)} + max output tokens), needing {num_needed} KV blocks "
                f"of {cfg.block_size} tokens, but the KV cache has only {cfg.num_blocks} blocks: "
                "raise kv_cache_memory, or lower max_tokens / max_model_len")

    def finish_request(self, request_id: str, reason: str = "abort") -> None:
        """Finish (if not already) and free at once, whether waiting or running; the engine
        calls this when a request stops. Unknown or already freed ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if not req.is_finished:
            req.finish(reason)
        (self.running if req in self.running else self.waiting).remove(req)
        self.block_manager.free(req)
        self._finished_ids.append(request_id)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_request_ids:  # a preempted request must not bounce straight back
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled_ids: set[str] = set()
        # Decodes (one token left) first, then continuing prefills; each in admission order.
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            num_left = req.num_tokens - req.num_computed_tokens
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or num_left == 0:
                continue  # preempted earlier in this loop, or its sampled token never came
            num_new = min(num_left, budget)
            if num_new < num_left and not self.config.enable_chunked_prefill:
                continue
            if self.config.sliding_window is not None:
                self.block_manager.free_window_blocks(req, self.config.sliding_window)
            if not self._allocate_or_preempt(req, num_new, scheduled_ids, out):
                continue
            scheduled_ids.add(req.request_id)
            out.scheduled.append(self._make_scheduled(req, num_new))
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, req: Request, num_new: int, scheduled_ids: set[str],
                             out: SchedulerOutput) -> bool:
        """Allocate, preempting the newest unscheduled running request until it fits; False
        if that was `req` itself. Always ends: one request alone fits the pool."""
        while not self.block_manager.allocate_slots(req, num_new):
            victim = next(r for r in reversed(self.running) if r.request_id not in scheduled_ids)
            self.running.remove(victim)
            self.block_manager.free(victim)
            victim.num_computed_tokens = 0  # recomputed (prompt + outputs so far) when readmitted
            victim.status = RequestStatus.PREEMPTED
            victim.num_preemptions += 1
            self.waiting.appendleft(victim)
            out.preempted_request_ids.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit FCFS while budget, sequences and blocks allow; stop at the first that can't."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.block_manager.get_computed_blocks(req)
            num_hit = len(hits) * self.config.block_size
            num_new = req.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                return
            num_new = min(num_new, budget)
            if not self.block_manager.allocate_slots(req, num_new, hits):
                return
            self.waiting.popleft()
            self._admit(req, num_hit)
            out.scheduled.append(self._make_scheduled(req, num_new))
            budget -= num_new

    def _admit(self, req: Request, num_hit: int) -> None:
        req.num_computed_tokens = num_hit
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_hit
        if self.block_manager.enable_prefix_caching:
            self.prefix_cache_stats.num_queried_tokens += req.num_tokens
            self.prefix_cache_stats.num_hit_tokens += num_hit
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @staticmethod
    def _make_scheduled(req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(
            request_id=req.request_id, new_token_ids=req.get_token_ids(start, start + num_new),
            num_computed_tokens=start, block_ids=list(req.block_ids),
            needs_sample=start + num_new == req.num_tokens)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters by what was scheduled and append sampled tokens; returns the
        requests that got a new token (the engine detokenizes and checks stops for those)."""
        updated = []
        for sched in out.scheduled:
            req = self.requests.get(sched.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished (aborted) between schedule and update
            req.num_computed_tokens += sched.num_new_tokens
            self.block_manager.cache_full_blocks(req)
            token_id = sampled.get(sched.request_id)
            if sched.needs_sample and token_id is not None:
                req.output_token_ids.append(token_id)
                self.block_manager.update_block_hashes(req)
                updated.append(req)
        return updated

    def check_invariants(self) -> None:
        """Assert queues, statuses and the block pool agree (for tests)."""
        self.block_manager.check_invariants(r.block_ids for r in self.running)
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(not r.block_ids and r.num_computed_tokens == 0 and r.status in (
            RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in self.waiting)
        assert len(self.running) <= self.config.max_num_seqs
        assert len(self.waiting) + len(self.running) == len(self.requests)
