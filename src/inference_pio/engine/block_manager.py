"""Paged KV bookkeeping: a pool of fixed-size blocks, ref counts and a prefix cache (no torch).

A request's KV lives in `req.block_ids` (its block table); token at position p is in block
`req.block_ids[p // block_size]`, slot `p % block_size`.

Prefix caching: a full, computed block is named by a hash of its tokens chained with its parent
block's hash, so equal hashes mean equal whole prefixes. Hashes are sha256 digests: stable
across processes (workers may compare them) and, unlike Python's 64-bit `hash`, collisions are
not a practical way to read another request's KV. A block whose ref count drops to 0 keeps its
hash and waits in an LRU free queue; it is evicted (hash dropped) only when allocation needs it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from inference_pio.engine.request import Request

# Block-table entry for a block freed because it slid out of the attention window. The attention
# side never reads it (every position it covers is masked out).
NULL_BLOCK_ID = -1


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block, chained to its parent's (b"" for the first block)."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixCacheStats:
    """Counted in tokens, once per admission (a preempted request counts again when resumed)."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix cache


class BlockManager:
    """Allocates blocks to requests; `allocate_slots` never over-commits (it returns False)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref count 0, evicted from the front. Cached ones join at the back (LRU);
        # uncached ones at the front, since they hold nothing worth keeping.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.stats = PrefixCacheStats()
        self._num_committed: dict[str, int] = {}  # request id -> leading blocks already cached

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free_queue)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------
    def update_block_hashes(self, req: Request) -> None:
        """Hash every full block of the request's tokens not hashed yet (computed or not)."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for i in range(len(req.block_hashes), req.num_tokens // size):
            parent = req.block_hashes[-1] if req.block_hashes else b""
            req.block_hashes.append(hash_block_tokens(parent, req.get_token_ids(i * size,
                                                                                (i + 1) * size)))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks of the request's longest cached prefix; does not take references.

        NOTE: at most `num_tokens - 1` tokens may hit, so at least one token is computed and
        the step yields logits (as vLLM). A prompt of exactly k full blocks hits k - 1."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for block_hash in req.block_hashes[:(req.num_tokens - 1) // self.block_size]:
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, req: Request) -> None:
        """Enter the request's full, computed blocks into the prefix cache.

        Call after `num_computed_tokens` advanced (the KV is written). A block whose hash is
        already cached (a recomputed duplicate) stays uncached and is freed first."""
        if not self.enable_prefix_caching:
            return
        start = self._num_committed.get(req.request_id, 0)
        end = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(start, end):
            block, block_hash = self.blocks[req.block_ids[i]], req.block_hashes[i]
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                self.hash_to_block[block_hash] = block.block_id
        self._num_committed[req.request_id] = max(start, end)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (e.g. between benchmark runs)."""
        for block_id in self.free_queue:
            self._evict(self.blocks[block_id])

    # ---- allocation ------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens after its computed ones (and after
        `computed_blocks`, prefix hits to append first). False, changing nothing, if too few
        blocks are free."""
        computed = computed_blocks or []
        num_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        num_new_blocks = self.num_blocks_for(num_tokens) - len(req.block_ids) - len(computed)
        # Hits that sit in the free queue stop being free once referenced.
        num_free_hits = sum(1 for block_id in computed if block_id in self.free_queue)
        if num_new_blocks > len(self.free_queue) - num_free_hits:
            return False
        for block_id in computed:
            self.blocks[block_id].ref_count += 1
            self.free_queue.pop(block_id, None)
        req.block_ids.extend(computed)
        req.block_ids.extend(self._pop_free() for _ in range(num_new_blocks))
        return True

    def free(self, req: Request) -> None:
        """Drop the request's references; its blocks go back to the free queue."""
        # Reversed, so a request's tail blocks (least likely shared) are evicted first.
        for block_id in reversed(req.block_ids):
            if block_id != NULL_BLOCK_ID:
                self._release(block_id)
        req.block_ids.clear()
        self._num_committed.pop(req.request_id, None)

    def free_window_blocks(self, req: Request, sliding_window: int) -> None:
        """Free the blocks whose every position lies before `num_computed_tokens - window`.

        NOTE: one token more conservative than strictly needed; the next query (at position
        num_computed_tokens) still sees its whole window."""
        num_skipped_blocks = max(0, req.num_computed_tokens - sliding_window) // self.block_size
        for i in range(min(num_skipped_blocks, len(req.block_ids))):
            if req.block_ids[i] != NULL_BLOCK_ID:
                self._release(req.block_ids[i])
                req.block_ids[i] = NULL_BLOCK_ID

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._evict(block)
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.hash_to_block[block.block_hash]
            block.block_hash = None

    # ---- checks ----------------------------------------------------------------------------
    def check_invariants(self, block_tables: Iterable[list[int]] | None = None) -> None:
        """Assert the pool is consistent; with the live block tables, that ref counts match."""
        assert all(b.ref_count >= 0 for b in self.blocks)
        free = {b.block_id for b in self.blocks if b.ref_count == 0}
        assert free == set(self.free_queue) and len(free) == self.num_free_blocks
        for block_hash, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].block_hash == block_hash
        assert sum(b.block_hash is not None for b in self.blocks) == len(self.hash_to_block)
        if block_tables is not None:
            counts = Counter(i for table in block_tables for i in table if i != NULL_BLOCK_ID)
            assert all(counts[b.block_id] == b.ref_count for b in self.blocks), "bad ref counts"
