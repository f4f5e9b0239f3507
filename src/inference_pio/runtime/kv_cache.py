"""Contiguous KV cache: one row of `capacity` positions per sequence slot and layer.

Simple and exact; a paged block cache replaces it for serving many requests at once."""

from __future__ import annotations

import torch

from inference_pio.config import ModelConfig


class ContiguousKVCache:
    """Per slot and layer, K and V [capacity, Hkv, Hd]: allocated when a sequence is admitted,
    doubled when it outgrows them, dropped when it finishes. Batch sequence i of a forward pass
    uses slot `slot_ids[i]`, set by `bind`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_layers = config.num_hidden_layers
        self.row_shape = (config.num_key_value_heads, config.head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self._k: dict[int, list[torch.Tensor]] = {}
        self._v: dict[int, list[torch.Tensor]] = {}
        self.slot_ids: tuple[int, ...] = ()

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.row_shape[0] * self.row_shape[1] * self.dtype.itemsize

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in self._k.values() for t in rows) * 2

    def allocate(self, slot: int, capacity: int) -> None:
        if slot in self._k:
            raise ValueError(f"KV slot {slot} is already in use")
        shape = (capacity, *self.row_shape)
        self._k[slot] = [torch.empty(shape, dtype=self.dtype, device=self.device)
                         for _ in range(self.num_layers)]
        self._v[slot] = [torch.empty(shape, dtype=self.dtype, device=self.device)
                         for _ in range(self.num_layers)]

    def free(self, slot: int) -> None:
        self._k.pop(slot, None)
        self._v.pop(slot, None)

    def bind(self, slot_ids: tuple[int, ...]) -> ContiguousKVCache:
        self.slot_ids = tuple(slot_ids)
        return self

    def write(self, layer_idx: int, seq_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.slot_ids[seq_idx]
        end = start + k.shape[0]
        if end > self._k[slot][layer_idx].shape[0]:
            self._grow(slot, layer_idx, end)
        k_row, v_row = self._k[slot][layer_idx], self._v[slot][layer_idx]
        k_row[start:end] = k
        v_row[start:end] = v

    def _grow(self, slot: int, layer_idx: int, needed: int) -> None:
        for rows in (self._k[slot], self._v[slot]):
            old = rows[layer_idx]
            new = torch.empty((max(needed, 2 * old.shape[0]), *self.row_shape),
                              dtype=self.dtype, device=self.device)
            new[: old.shape[0]] = old
            rows[layer_idx] = new

    def read(self, layer_idx: int, seq_idx: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slot_ids[seq_idx]
        return self._k[slot][layer_idx][:end], self._v[slot][layer_idx][:end]
