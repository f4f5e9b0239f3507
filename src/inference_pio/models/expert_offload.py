"""Expert paging: with a weight budget below the model's size, routed experts (about 97% of the
bytes) stay on disk and are read on demand into one bounded LRU cache shared by every layer.

The cache is one uint8 buffer [capacity, slot_bytes] allocated up front; an expert's parts are
views of its slot, typed as the QuantMethod's part_specs say. Byte ranges come from the
shards' own safetensors headers (parsed here, checked against part_specs), and each expert is
read with `os.preadv` straight into its slot (contiguous parts in one call), through file
descriptors opened once. With `prefetch`, every miss of a fetch is submitted at once to a small
thread pool (pread releases the GIL), so reads overlap the compute of the experts already
present; experts are still yielded in the order asked. A fetch never evicts an expert it has
yet to yield: when it asks for more experts than the cache holds, it works in waves.

Not done: speculative reads of the next layer's experts. In benchmarks/bench_offload.py the
forward waits for reads under 2% of decode time even from a cold page cache, so guessing could
gain little and each wrong guess would cost a read and evict a useful expert."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference_pio.layers.quantization.modules import EXPERT_PROJS, ExpertParts, QuantExperts
from inference_pio.models.loader import SAFETENSORS_DTYPE, CheckpointError, ModelFiles
from inference_pio.models.weight_plan import WeightPlan
from inference_pio.utils.memory import advise_huge_pages

Key = tuple[str, int]  # (experts module prefix, e.g. "model.layers.3.mlp.experts", expert id)
_ALIGN = 64  # slot and part offsets, so every dtype view of the uint8 buffer is aligned
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DEFAULT_READ_THREADS = 2


# ---- safetensors headers ----------------------------------------------------------------

@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: dtype (safetensors spelling), shape, absolute bytes."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is truncated or corrupt: {what}; re-download it "
                           f"(in {path.parent})")


def read_shard_layout(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor's dtype, shape and absolute byte range in a safetensors file, from its
    header (8-byte little-endian length, then JSON; offsets count from the end of the JSON)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path, f"its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _corrupt(path, f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    return {name: _stored(path, name, info, 8 + length, size)
            for name, info in header.items() if name != "__metadata__"}


def _stored(path: Path, name: str, info: Any, base: int, size: int) -> StoredTensor:
    """One header entry, its offsets made absolute and checked against the file size."""
    try:
        dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"the header entry of {name} lacks dtype, shape or "
                             "data_offsets") from None
    if not 0 <= start <= end or base + end > size:
        raise _corrupt(path, f"tensor {name} spans bytes {base + start}..{base + end} of a "
                             f"{size}-byte file")
    return StoredTensor(dtype, shape, base + start, base + end)


# ---- where each expert lives, on disk and in a slot -------------------------------------

@dataclass(frozen=True)
class PartSlot:
    """Where one part of an expert lives in a cache slot."""

    proj: str
    part: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Run:
    """One preadv: `pieces` (slot offset, bytes) lie back to back in file `fd` from `offset`."""

    fd: int
    offset: int
    pieces: tuple[tuple[int, int], ...]


def slot_layout(module: QuantExperts) -> tuple[list[PartSlot], int]:
    """The parts of one expert of `module` laid out in a slot, and the slot's size."""
    parts, offset = [], 0
    for proj in EXPERT_PROJS:
        rows, cols = module.shapes[proj]
        for part, (shape, dtype) in module.method.part_specs(rows, cols).items():
            nbytes = math.prod(shape) * dtype.itemsize
            parts.append(PartSlot(proj, part, offset, nbytes, tuple(shape), dtype))
            offset += -(-nbytes // _ALIGN) * _ALIGN
    return parts, offset


def _check_part(name: str, path: Path, stored: StoredTensor, part: PartSlot) -> None:
    """The stored tensor must be exactly the part the model's QuantMethod expects."""
    want = SAFETENSORS_DTYPE.get(part.dtype, str(part.dtype))
    if stored.dtype != want or stored.shape != part.shape:
        raise CheckpointError(
            f"tensor {name} in {path.name} is {stored.dtype} {list(stored.shape)}, paging "
            f"expects {want} {list(part.shape)}: config.json (its quantization_config) and "
            "the weights disagree; re-download the checkpoint or rewrite it with `pio quantize`")
    if stored.end - stored.start != part.nbytes:
        raise _corrupt(path, f"tensor {name} holds {stored.end - stored.start} bytes, its "
                             f"dtype and shape need {part.nbytes}")


def _expert_runs(prefix: str, expert: int, layout: list[PartSlot], files: ModelFiles,
                 shards: _Shards) -> tuple[Run, ...]:
    """The reads that fill one expert's slot, parts contiguous on disk merged into one."""
    pieces = []
    for part in layout:
        name = f"{prefix}.{expert}.{part.proj}.{part.part}"
        path = files.weight_map.get(name)
        if path is None:
            raise CheckpointError(
                f"tensor {name} is not in the checkpoint at {files.root}: it stores experts in "
                "another format than the one paged; load it without a quantization option, or "
                "write that format first with `pio quantize`")
        stored = shards.layout(path).get(name)
        if stored is None:
            raise CheckpointError(f"the index says {name} is in {path.name}, which does not "
                                  f"hold it; re-download {files.root}")
        _check_part(name, path, stored, part)
        pieces.append((shards.fd(path), stored.start, part.offset, part.nbytes))
    runs: list[Run] = []
    for fd, start, slot_offset, nbytes in sorted(pieces):
        last = runs[-1] if runs else None
        if last and last.fd == fd and last.offset + sum(n for _, n in last.pieces) == start:
            runs[-1] = Run(fd, last.offset, (*last.pieces, (slot_offset, nbytes)))
        else:
            runs.append(Run(fd, start, ((slot_offset, nbytes),)))
    return tuple(runs)


class _Shards:
    """Headers parsed and files opened once per shard."""

    def __init__(self) -> None:
        self.layouts: dict[Path, dict[str, StoredTensor]] = {}
        self.fds: dict[Path, int] = {}

    def layout(self, path: Path) -> dict[str, StoredTensor]:
        if path not in self.layouts:
            self.layouts[path] = read_shard_layout(path)
        return self.layouts[path]

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self.fds[path]

    def close(self) -> None:
        _close_fds(list(self.fds.values()))


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- reading ----------------------------------------------------------------------------

def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers still to fill after `n` more bytes were read into `views`."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    return [views[0][n:], *views[1:]] if views and n else views


def preadv_full(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill `views` from `offset` of `fd`, retrying short reads; returns the bytes read (less
    than asked only at the end of the file)."""
    done = 0
    while views:
        got = os.preadv(fd, views, offset + done)
        if got <= 0:
            break
        done += got
        views = _advance(views, got)
    return done


# ---- the pager --------------------------------------------------------------------------

class ExpertPager:
    """The expert cache of one model: `fetch(prefix, experts)` yields each expert's parts,
    reading misses from disk into LRU slots. Counters: `stats()`, `reset_stats()`."""

    def __init__(self, runs: Mapping[Key, tuple[Run, ...]],
                 layouts: Mapping[str, list[PartSlot]], slot_bytes: int, capacity: int,
                 fd_paths: Mapping[int, Path], device: torch.device, prefetch: bool,
                 read_threads: int = DEFAULT_READ_THREADS) -> None:
        if capacity < 1:
            raise ValueError(f"the expert cache needs at least one slot, got {capacity}")
        self.capacity, self.slot_bytes, self.device = capacity, slot_bytes, device
        self.prefetch = prefetch
        self._runs, self._layouts, self._fd_paths = dict(runs), dict(layouts), dict(fd_paths)
        self._buffer = torch.empty((capacity, slot_bytes), dtype=torch.uint8)
        advise_huge_pages([self._buffer])
        self._array = self._buffer.numpy()  # memoryviews of slots for preadv
        self._lru: OrderedDict[Key, int] = OrderedDict()  # key -> slot, least recent first
        self._free = list(range(capacity - 1, -1, -1))
        self._pinned: set[Key] = set()
        self._lock = threading.Lock()
        self._pool = (ThreadPoolExecutor(read_threads, thread_name_prefix="pio-expert-read")
                      if prefetch else None)
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, list(self._fd_paths))
        self.reset_stats()

    # ---- public API ----------------------------------------------------------------------
    def source(self, prefix: str) -> LayerExpertSource:
        """The ExpertSource of the experts module at `prefix`."""
        if prefix not in self._layouts:
            raise KeyError(f"no offloaded experts at {prefix!r}")
        return LayerExpertSource(self, prefix)

    def fetch(self, prefix: str, experts: Sequence[int]) -> Iterator[tuple[int, ExpertParts]]:
        """Yield (expert, parts) for each id in `experts`, in that order, in waves of at most
        `capacity` experts; the parts are views of cache slots valid until the next wave."""
        keys = [(prefix, int(e)) for e in experts]
        self._counts["fetches"] += 1
        for start in range(0, len(keys), self.capacity):
            yield from self._wave(keys[start:start + self.capacity])

    def cached(self) -> list[Key]:
        """Cached (prefix, expert) keys, least recently used first."""
        with self._lock:
            return list(self._lru)

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: hits, misses, bytes and seconds read, and the cache."""
        c = dict(self._counts)
        fetched = c["hits"] + c["misses"]
        return {**c, "experts_fetched": fetched,
                "hit_rate": round(c["hits"] / fetched, 4) if fetched else None,
                "read_gib_per_s": (round(c["bytes_read"] / c["read_s"] / 2**30, 2)
                                   if c["read_s"] else None),
                "capacity": self.capacity, "cached": len(self._lru),
                "slot_bytes": self.slot_bytes, "cache_bytes": self._buffer.nbytes,
                "prefetch": self.prefetch}

    def reset_stats(self) -> None:
        """Zero the counters (the cache keeps its contents)."""
        self._counts: dict[str, Any] = {"fetches": 0, "hits": 0, "misses": 0, "bytes_read": 0,
                                        "read_s": 0.0, "wait_s": 0.0}

    def close(self) -> None:
        """Stop the read threads and close the shard files (also done when collected)."""
        self._finalizer()

    # ---- one wave ------------------------------------------------------------------------
    def _wave(self, keys: list[Key]) -> Iterator[tuple[int, ExpertParts]]:
        """Claim slots for at most `capacity` experts, then yield them in order as each
        read completes; unpin them when done (or abandoned)."""
        pending: dict[Key, Future | None] = {}
        try:
            self._claim(keys, pending)
            for key in keys:
                if key in pending:
                    self._finish(key, pending[key])
                    del pending[key]
                yield key[1], self._views(key)
        finally:
            self._release(keys, pending)

    def _claim(self, keys: list[Key], pending: dict[Key, Future | None]) -> None:
        """Pin every key of the wave, give each miss a slot, and start its read (prefetch) or
        leave it to be read when its turn comes (None), recording misses in `pending`."""
        with self._lock:
            for key in keys:
                if key not in self._runs:
                    raise KeyError(f"expert {key[1]} of {key[0]} is not offloaded here")
                self._pinned.add(key)
                if key in self._lru:
                    self._lru.move_to_end(key)
                    self._counts["hits"] += 1
                    continue
                self._counts["misses"] += 1
                slot = self._lru[key] = self._take_slot()
                pending[key] = self._pool.submit(self._read, key, slot) if self._pool else None

    def _take_slot(self) -> int:
        """A free slot, else the least recently used unpinned one's."""
        if self._free:
            return self._free.pop()
        victim = next((key for key in self._lru if key not in self._pinned), None)
        if victim is None:
            raise RuntimeError(f"all {self.capacity} expert cache slots are in use by fetches "
                               "in progress: fetch from one thread at a time")
        return self._lru.pop(victim)

    def _finish(self, key: Key, future: Future | None) -> None:
        """Wait for (or do) the read of a miss, and count it; a failed read leaves no entry
        (a slot is never freed while a read thread may still write into it)."""
        t0 = time.perf_counter()
        try:
            nbytes, seconds = future.result() if future else self._read(key, self._lru[key])
        except BaseException:
            if future is None or future.done():  # the read failed; else only the wait did
                self._drop(key)
            raise
        finally:
            self._counts["wait_s"] += time.perf_counter() - t0
        self._counts["bytes_read"] += nbytes
        self._counts["read_s"] += seconds

    def _release(self, keys: list[Key], pending: dict[Key, Future | None]) -> None:
        """End of a wave (or a fetch abandoned midway): settle unread misses, unpin."""
        for key, future in pending.items():
            if future is not None and not future.cancel():
                try:  # the read has run or is running: wait for it, keep it if it worked
                    self._finish(key, future)
                except (CheckpointError, OSError):  # dropped by _finish; the caller has its error
                    pass
            else:
                self._drop(key)  # never read
        with self._lock:
            self._pinned.difference_update(keys)

    def _drop(self, key: Key) -> None:
        """Forget a cache entry whose slot holds no valid expert; its slot becomes free."""
        with self._lock:
            slot = self._lru.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def _read(self, key: Key, slot: int) -> tuple[int, float]:
        """Read one expert into its slot (any thread); returns (bytes, seconds)."""
        t0, total = time.perf_counter(), 0
        row = self._array[slot]
        for run in self._runs[key]:
            views = [memoryview(row[off:off + n]) for off, n in run.pieces]
            want = sum(n for _, n in run.pieces)
            got = preadv_full(run.fd, views, run.offset)
            if got != want:
                path = self._fd_paths[run.fd]
                raise CheckpointError(
                    f"reading expert {key[1]} of {key[0]} from {path.name} got {got} of {want} "
                    f"bytes at offset {run.offset}: the file is shorter than when the model was "
                    f"loaded (truncated or replaced); restore {path} and reload the model")
            total += want
        return total, time.perf_counter() - t0

    def _views(self, key: Key) -> ExpertParts:
        """The parts of a cached expert as typed views of its slot (copied to an accelerator)."""
        row = self._buffer[self._lru[key]]
        parts: ExpertParts = {proj: {} for proj in EXPERT_PROJS}
        for p in self._layouts[key[0]]:
            t = row[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape)
            parts[p.proj][p.part] = t if self.device.type == "cpu" else t.to(self.device)
        return parts


def _shutdown(pool: ThreadPoolExecutor | None, fds: list[int]) -> None:
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    _close_fds(fds)


class LayerExpertSource:
    """The ExpertSource of one experts module: the shared pager, bound to its prefix."""

    def __init__(self, pager: ExpertPager, prefix: str) -> None:
        self.pager, self.prefix = pager, prefix

    def fetch(self, experts: Sequence[int]) -> Iterator[tuple[int, ExpertParts]]:
        return self.pager.fetch(self.prefix, experts)


# ---- attaching to a model ---------------------------------------------------------------

def offloaded_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """Prefix -> every QuantExperts of `model` built without its expert weights."""
    return {prefix: m for prefix, m in model.named_modules()
            if isinstance(m, QuantExperts) and m.offloaded}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def attach_expert_pager(model: nn.Module, files: ModelFiles, plan: WeightPlan,
                        prefetch: bool = True, read_threads: int = DEFAULT_READ_THREADS
                        ) -> ExpertPager:
    """Page every offloaded experts module of `model` from the checkpoint `files` through one
    cache of `plan.cache_experts` experts: sets each module's `source` and
    `model.expert_pager`. Checks every expert tensor's header against the model's layout."""
    modules = offloaded_experts(model)
    if not modules:
        raise ValueError("the model has no offloaded experts: build it with "
                         "offload_experts=True (load_model does when the plan says offload)")
    shards = _Shards()
    try:
        layouts = {prefix: slot_layout(m) for prefix, m in modules.items()}
        runs = {(prefix, e): _expert_runs(prefix, e, layouts[prefix][0], files, shards)
                for prefix, m in modules.items() for e in range(m.num_experts)}
    except BaseException:
        shards.close()
        raise
    pager = ExpertPager(runs, {p: lay for p, (lay, _) in layouts.items()},
                        max(size for _, size in layouts.values()), plan.cache_experts,
                        {fd: path for path, fd in shards.fds.items()}, _model_device(model),
                        prefetch, read_threads)
    for prefix, module in modules.items():
        module.source = pager.source(prefix)
    model.expert_pager = pager  # type: ignore[assignment]  # a plain attribute
    return pager
