"""BlockManager alone: allocation, ref counts, prefix cache, LRU eviction, window freeing."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import pytest

from inference_pio.engine.block_manager import NULL_BLOCK_ID, BlockManager, hash_block_tokens
from inference_pio.engine.request import Request
from inference_pio.engine.stop import StopChecker
from inference_pio.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inference_pio.tokenizer import IncrementalDetokenizer

BS = 4


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id=request_id, prompt=None, prompt_token_ids=list(prompt),
                   params=params, stop_checker=StopChecker(params, (), max_tokens),
                   detokenizer=cast("IncrementalDetokenizer", None))


def check(bm: BlockManager, *reqs: Request) -> None:
    bm.check_invariants([r.block_ids for r in reqs])
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def compute(bm: BlockManager, req: Request, num_hit_blocks: int = 0) -> None:
    """Admit `req` with its prefix hits and mark its whole prompt computed and cached."""
    bm.update_block_hashes(req)
    hits = bm.get_computed_blocks(req)
    assert len(hits) == num_hit_blocks
    assert bm.allocate_slots(req, req.num_tokens - len(hits) * BS, hits)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)


def test_allocate_and_free_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    req = make_request("a", list(range(10)))
    assert bm.allocate_slots(req, 10)
    assert len(req.block_ids) == 3 and bm.num_used_blocks == 3
    check(bm, req)
    req.num_computed_tokens = 10
    assert bm.allocate_slots(req, 2)  # 12 tokens still fit 3 blocks
    assert len(req.block_ids) == 3
    assert bm.allocate_slots(req, 3)
    assert len(req.block_ids) == 4
    check(bm, req)
    bm.free(req)
    assert req.block_ids == [] and bm.num_free_blocks == 8
    check(bm)


def test_allocate_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=True)
    req = make_request("a", list(range(9)))
    assert not bm.allocate_slots(req, 9)
    assert req.block_ids == [] and bm.num_free_blocks == 2
    check(bm)


def test_hash_chain_depends_on_parent() -> None:
    tokens = [1, 2, 3, 4]
    assert hash_block_tokens(b"", tokens) == hash_block_tokens(b"", list(tokens))
    assert hash_block_tokens(b"", tokens) != hash_block_tokens(hash_block_tokens(b"", tokens),
                                                               tokens)
    # The same block under another prefix is another cache entry.
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a, b = make_request("a", [9, 9, 9, 9, 1, 2, 3, 4]), make_request("b", [1, 2, 3, 4, 5])
    bm.update_block_hashes(a)
    bm.update_block_hashes(b)
    assert a.block_hashes[1] != b.block_hashes[0]


def test_shared_prefix_reuses_blocks_and_keeps_last_token_uncached() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=True)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make_request("a", [*prefix, 1, 2])
    compute(bm, a)
    b = make_request("b", [*prefix, 7])
    compute(bm, b, num_hit_blocks=3)
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    # A prompt of exactly the 3 cached blocks may hit only 2: its last token must be computed.
    c = make_request("c", prefix)
    compute(bm, c, num_hit_blocks=2)
    check(bm, a, b, c)
    # c's recomputed third block duplicates a cached one, so it stays uncached.
    assert bm.blocks[c.block_ids[2]].block_hash is None
    for req in (a, b, c):
        bm.free(req)
    check(bm)


def test_generated_tokens_fill_cacheable_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])
    compute(bm, a)
    a.output_token_ids.append(4)  # completes block 0 with a generated token
    bm.update_block_hashes(a)
    assert len(a.block_hashes) == 1 and bm.blocks[a.block_ids[0]].block_hash is None
    assert bm.allocate_slots(a, 1)
    a.num_computed_tokens += 1
    bm.cache_full_blocks(a)
    assert bm.hash_to_block[a.block_hashes[0]] == a.block_ids[0]
    check(bm, a)


def test_unreferenced_cached_blocks_stay_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=7, block_size=BS, enable_prefix_caching=True)
    old, new = make_request("old", list(range(9))), make_request("new", list(range(50, 59)))
    compute(bm, old)  # blocks 0,1 cached, block 2 partial (uncached)
    compute(bm, new)  # blocks 3,4 cached, block 5 partial
    bm.free(old)
    bm.free(new)
    assert len(bm.hash_to_block) == 4 and bm.num_free_blocks == 7
    # Never-used and partial (uncached) blocks go first, then the least recently freed cached
    # ones, a request's tail first (block 1 of "old" before its block 0).
    filler = make_request("filler", list(range(200, 216)))
    assert bm.allocate_slots(filler, 16)
    assert sorted(filler.block_ids) == [1, 2, 5, 6]
    assert set(bm.hash_to_block.values()) == {0, 3, 4}
    # "new" is still cached: a request with its prompt hits both full blocks.
    again = make_request("again", list(range(50, 59)))
    compute(bm, again, num_hit_blocks=2)
    check(bm, filler, again)


def test_reset_prefix_cache_drops_only_unreferenced() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(20, 29)))
    compute(bm, a)
    compute(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert set(bm.hash_to_block.values()) == set(b.block_ids[:2])
    check(bm, b)


def test_free_window_blocks_replaces_with_sentinel() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    req = make_request("a", list(range(14)))
    assert bm.allocate_slots(req, 14)
    req.num_computed_tokens = 14
    bm.free_window_blocks(req, sliding_window=5)  # positions < 9 may go: blocks 0 and 1
    assert req.block_ids[:2] == [NULL_BLOCK_ID, NULL_BLOCK_ID] and bm.num_used_blocks == 2
    bm.free_window_blocks(req, sliding_window=5)  # idempotent
    check(bm, req)
    bm.free(req)
    check(bm)


def test_check_invariants_catches_wrong_ref_count() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    req = make_request("a", [1, 2, 3])
    assert bm.allocate_slots(req, 3)
    with pytest.raises(AssertionError):
        bm.check_invariants([req.block_ids, req.block_ids])
