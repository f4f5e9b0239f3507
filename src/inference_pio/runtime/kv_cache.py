"""KV caches behind the `KVCacheStore` protocol, and their sizing from a memory budget.

`ContiguousKVCache`: one growing row per sequence slot; simple and exact, used by tests.
`PagedKVCache`: fixed blocks of `block_size` tokens addressed through per-request block tables
from the block manager, in any `kv_cache_dtype` (int8 / fp8 quantized on write)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch

from inference_pio.config import ConfigError, ModelConfig
from inference_pio.kernels import cpu as native_cpu
from inference_pio.runtime.kv_quant import SCALE_DTYPE, KVCacheFormat, resolve_kv_cache_format
from inference_pio.utils.memory import advise_huge_pages, format_bytes, free_memory_bytes


class ContiguousKVCache:
    """Per layer, K and V [capacity * num_regions, Hkv, Hd], position-major: KV slot r keeps
    position p in row p * num_regions + r. Allocated per slot when a sequence is admitted; when
    a sequence outgrows the capacity, rows are appended (row ids never change within a step).
    Batch sequence i of a forward pass uses slot `slot_ids[i]`, set by `bind`. Simple and
    exact: the tests' and `testing.reference`'s cache."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> None:
        self.num_layers = config.num_hidden_layers
        self.row_shape = (config.num_key_value_heads, config.head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = self.num_regions = 0
        self.regions: set[int] = set()
        self._k = [self._empty(0) for _ in range(self.num_layers)]
        self._v = [self._empty(0) for _ in range(self.num_layers)]
        self.slot_ids: tuple[int, ...] = ()

    def _empty(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, *self.row_shape), dtype=self.dtype, device=self.device)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.row_shape[0] * self.row_shape[1] * self.dtype.itemsize

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def allocate(self, slot: int, capacity: int) -> None:
        if slot in self.regions:
            raise ValueError(f"KV slot {slot} is already in use")
        self.regions.add(slot)
        self._resize(max(capacity, self.capacity), max(slot + 1, self.num_regions))

    def free(self, slot: int) -> None:
        self.regions.discard(slot)

    def _resize(self, capacity: int, num_regions: int) -> None:
        if (capacity, num_regions) == (self.capacity, self.num_regions):
            return
        old = (self.capacity, self.num_regions)
        for rows in (self._k, self._v):
            for layer, data in enumerate(rows):
                new = self._empty(capacity * num_regions)
                new.view(capacity, num_regions, *self.row_shape)[: old[0], : old[1]] = \
                    data.view(*old, *self.row_shape)
                rows[layer] = new
        self.capacity, self.num_regions = capacity, num_regions

    def bind(self, slot_ids: tuple[int, ...]) -> ContiguousKVCache:
        self.slot_ids = tuple(slot_ids)
        return self

    def slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor:
        """Rows of batch sequence `seq_idx`'s positions start..end (past the capacity, rows are
        appended first: the row ids handed out before stay valid)."""
        if end > self.capacity:
            self._resize(max(end, 2 * self.capacity), self.num_regions)
        region = self.slot_ids[seq_idx]
        return torch.arange(start, end, device=self.device) * self.num_regions + region

    def write_slots(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        self._k[layer_idx][slots] = k.to(self.dtype)
        self._v[layer_idx][slots] = v.to(self.dtype)

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer_idx][slots], self._v[layer_idx][slots]

    def write(self, layer_idx: int, seq_idx: int, start: int,
              k: torch.Tensor, v: torch.Tensor) -> None:
        self.write_slots(layer_idx, self.slots(seq_idx, start, start + k.shape[0]), k, v)

    def read(self, layer_idx: int, seq_idx: int, end: int,
             start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(layer_idx, self.slots(seq_idx, start, end))


def kv_bytes_per_token(config: ModelConfig, kv_format: KVCacheFormat) -> int:
    """True bytes one token takes over all layers: K and V rows plus their scales."""
    rows = 2 * config.num_hidden_layers * config.num_key_value_heads
    return rows * kv_format.bytes_per_head_row(config.head_dim)


class PagedKVCache:
    """Per layer, K and V [num_blocks, block_size, Hkv, Hd] in the storage dtype, plus scales
    [num_blocks, block_size, Hkv] when quantized. Batch sequence i of a step owns the blocks of
    `block_tables[i]` (set by `bind`): position p lives in slot
    `table[p // block_size] * block_size + p % block_size`. A table entry of -1 is a freed
    sliding-window block: touching it is an error, never a silent read of another request."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 kv_cache_dtype: str = "auto", model_dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"a paged KV cache needs num_blocks >= 1 and block_size >= 1, "
                              f"got {num_blocks} and {block_size}")
        self.config = config
        self.num_blocks, self.block_size = num_blocks, block_size
        self.format = resolve_kv_cache_format(kv_cache_dtype, model_dtype, device)
        self.compute_dtype = model_dtype
        self.device = torch.device(device)
        self.row_shape = (config.num_key_value_heads, config.head_dim)
        self.k, self.v = self._alloc(self.row_shape, self.format.storage_dtype)
        self.k_scale: list[torch.Tensor] | None = None
        self.v_scale: list[torch.Tensor] | None = None
        if self.format.is_quantized:
            self.k_scale, self.v_scale = self._alloc(self.row_shape[:1], SCALE_DTYPE)
        self.block_tables: tuple[tuple[int, ...], ...] = ()
        # per layer, flat views of the storage (built once: `paged_rows` is on the hot path)
        self._paged_rows = [self._flat_views(i) for i in range(config.num_hidden_layers)]
        self._native_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if (not self.format.is_quantized and self.format.storage_dtype == torch.float32
                and self.device.type == "cpu"):
            self._native_rows = [(k, v) for k, v, _, _ in self._paged_rows]
        # chosen once: the native kernel copies rows straight into an fp32 CPU cache
        self._native_store = self._native_rows is not None and native_cpu.available()
        self._slot_memo: dict[tuple[int, int, int], torch.Tensor] = {}

    @classmethod
    def from_plan(cls, config: ModelConfig, plan: KVCachePlan, model_dtype: torch.dtype,
                  device: str | torch.device = "cpu") -> PagedKVCache:
        return cls(config, plan.num_blocks, plan.block_size, plan.kv_cache_dtype, model_dtype,
                   device)

    def _alloc(self, row_shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (self.num_blocks, self.block_size, *row_shape)
        layers = range(self.config.num_hidden_layers)
        # NOTE: empty, not zeros: attention reads only slots written before, and untouched
        # pages of a large budget then cost no resident memory.
        k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in layers]
        v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in layers]
        advise_huge_pages(k + v)  # decode reads them in place: fewer TLB misses
        return k, v

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.format)

    @property
    def num_bytes(self) -> int:
        """Bytes actually allocated (data and scales)."""
        tensors = self.k + self.v + (self.k_scale or []) + (self.v_scale or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def bind(self, block_tables: Sequence[Sequence[int]]) -> Self:
        """Set this step's block table of each batch sequence (in ForwardContext order)."""
        self.block_tables = tuple(tuple(table) for table in block_tables)
        self._slot_memo.clear()
        return self

    def write(self, layer_idx: int, seq_idx: int, start: int,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v [n, Hkv, Hd] of batch sequence `seq_idx` to positions start..start+n."""
        self.write_slots(layer_idx, self._slots(seq_idx, start, start + k.shape[0]), k, v)

    def write_slots(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """k, v [n, Hkv, Hd] to flat slots [n] (the whole step's new tokens in one call)."""
        if self._native_store:
            native_cpu.kv_store_(*self._native_rows[layer_idx], slots, k, v)  # type: ignore[index]
            return
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            quantized, scale = self.format.quantize(x)
            data[layer_idx].view(-1, *self.row_shape)[slots] = quantized
            if scales is not None and scale is not None:
                scales[layer_idx].view(-1, self.row_shape[0])[slots] = scale

    def read(self, layer_idx: int, seq_idx: int, end: int,
             start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather K, V [end - start, Hkv, Hd] of positions start..end (only that sequence's
        blocks in that range), in the compute dtype."""
        return self.gather(layer_idx, self._slots(seq_idx, start, end))

    def gather(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat slot ids of any shape S -> [*S, Hkv, Hd], in the compute dtype."""
        return (self._gather(self.k, self.k_scale, layer_idx, slots),
                self._gather(self.v, self.v_scale, layer_idx, slots))

    def native_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `layer_idx`'s K and V as flat [slots, Hkv, Hd] views when they are stored
        unquantized in fp32 on the CPU (what the native kernels read and write in place,
        addressed by `slots`); None otherwise."""
        if self._native_rows is None:
            return None
        return self._native_rows[layer_idx]

    def paged_rows(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor,
                                                  torch.Tensor | None, torch.Tensor | None]:
        """Layer `layer_idx`'s storage as flat views, for kernels that read it in place: K and
        V [slots, Hkv, Hd] in the storage dtype, and their scales [slots, Hkv] (None unless
        quantized); row `slot` holds the token `slots(...)` maps there."""
        return self._paged_rows[layer_idx]

    def _flat_views(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor,
                                                   torch.Tensor | None, torch.Tensor | None]:
        flat = (self.k[layer_idx].view(-1, *self.row_shape),
                self.v[layer_idx].view(-1, *self.row_shape))
        if self.k_scale is None or self.v_scale is None:
            return (*flat, None, None)
        heads = self.row_shape[0]
        return (*flat, self.k_scale[layer_idx].view(-1, heads),
                self.v_scale[layer_idx].view(-1, heads))

    def slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor:
        """Flat slot ids (int64 [end - start]) of batch sequence `seq_idx`'s positions
        start..end in this step's block tables."""
        return self._slots(seq_idx, start, end)

    def _gather(self, data: list[torch.Tensor], scales: list[torch.Tensor] | None,
                layer_idx: int, slots: torch.Tensor) -> torch.Tensor:
        rows = data[layer_idx].view(-1, *self.row_shape)[slots]  # [*S, Hkv, Hd]
        scale = None if scales is None else scales[layer_idx].view(-1, self.row_shape[0])[slots]
        return self.format.dequantize(rows, scale, self.compute_dtype)

    def _slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor:
        """Flat slot ids [end - start] of positions start..end; built once per step and
        sequence range, then shared by every layer."""
        key = (seq_idx, start, end)
        if key not in self._slot_memo:
            self._slot_memo[key] = self._build_slots(seq_idx, start, end)
        return self._slot_memo[key]

    def _build_slots(self, seq_idx: int, start: int, end: int) -> torch.Tensor:
        if end <= start:
            return torch.empty(0, dtype=torch.long, device=self.device)
        table, bs = self.block_tables[seq_idx], self.block_size
        first, last = start // bs, (end - 1) // bs
        if last >= len(table):
            raise IndexError(f"sequence {seq_idx}: position {end - 1} needs block index {last}, "
                             f"but its block table has {len(table)} blocks")
        blocks = table[first: last + 1]
        if not all(0 <= b < self.num_blocks for b in blocks):
            raise ValueError(f"sequence {seq_idx}: positions {start}..{end} touch block ids "
                             f"{blocks}; -1 marks a freed sliding-window block and valid ids "
                             f"are 0..{self.num_blocks - 1}")
        ids = torch.tensor(blocks, dtype=torch.long, device=self.device)  # [nb]
        slots = (ids[:, None] * bs + torch.arange(bs, device=self.device)).flatten()  # [nb * bs]
        return slots[start - first * bs: end - first * bs]


@dataclass(frozen=True)
class KVCachePlan:
    """How big the paged KV cache is; `describe()` is the start-up log line."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    kv_cache_dtype: str  # resolved: "auto" becomes the model dtype's name

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def describe(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = "
                f"{self.num_tokens} tokens, {format_bytes(self.total_bytes)}, "
                f"{self.kv_cache_dtype} ({format_bytes(self.bytes_per_token)}/token)")


def kv_cache_budget_bytes(kv_cache_memory: float, device: str | torch.device) -> int:
    """An int is bytes; a float is a fraction in (0, 1] of the device's free memory."""
    if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int | float):
        raise ConfigError(f"kv_cache_memory must be bytes (int) or a fraction of free memory "
                          f"(float in (0, 1]), got {kv_cache_memory!r}")
    if isinstance(kv_cache_memory, int):
        if kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be positive, got {kv_cache_memory} bytes")
        return kv_cache_memory
    if not 0 < kv_cache_memory <= 1:
        raise ConfigError(f"a float kv_cache_memory is a fraction of free memory in (0, 1], got "
                          f"{kv_cache_memory}; give an int for a size in bytes")
    return int(free_memory_bytes(device) * kv_cache_memory)


def plan_kv_cache(config: ModelConfig, kv_cache_memory: float, block_size: int = 16,
                  kv_cache_dtype: str = "auto", model_dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device = "cpu") -> KVCachePlan:
    """As many blocks as `kv_cache_memory` (int: bytes; float in (0, 1]: fraction of free
    memory) holds; call after the weights are loaded, so a fraction is of what they left."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    kv_format = resolve_kv_cache_format(kv_cache_dtype, model_dtype, device)
    bytes_per_token = kv_bytes_per_token(config, kv_format)
    budget = kv_cache_budget_bytes(kv_cache_memory, device)
    block_bytes = block_size * bytes_per_token
    if budget < block_bytes:
        raise ConfigError(
            f"kv_cache_memory {kv_cache_memory!r} gives {format_bytes(budget)} ({budget} bytes), "
            f"less than one KV block of {block_size} tokens x {format_bytes(bytes_per_token)}"
            f"/token ({kv_format.name}) = {block_bytes} bytes; raise kv_cache_memory, lower "
            f"block_size, or use kv_cache_dtype 'int8' (about half the bytes of bf16)")
    return KVCachePlan(budget // block_bytes, block_size, bytes_per_token, kv_format.name)
