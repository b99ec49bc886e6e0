"""A preallocated KV cache that accepts tree-shaped writes and keeps only an accepted path.

Hugging Face's DynamicCache concatenates on every forward and can only crop from the end; a tree
verification needs to drop arbitrary rejected nodes. This cache owns one [1, heads, capacity,
head_dim] buffer per layer, appends new entries at the current length, and `keep` compacts the
entries written since a given point down to a chosen subset, in place. Nothing is recomputed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class TreeKVCache(Cache):
    """A Cache that the model's attention layers write into; lengths are managed by the caller."""

    is_compileable = False

    def __init__(self, capacity: int):
        super().__init__(layer_class_to_replicate=DynamicLayer)
        self.capacity = capacity
        self.length = 0  # committed entries (identical in every layer after a forward)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    # -- the part of the Cache protocol that attention layers use ---------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self._keys):
            b, h, _, d = key_states.shape
            shape_k = (b, h, self.capacity, d)
            shape_v = (b, h, self.capacity, value_states.shape[-1])
            self._keys.append(torch.empty(shape_k, dtype=key_states.dtype, device=key_states.device))
            self._values.append(torch.empty(shape_v, dtype=value_states.dtype, device=value_states.device))
        n = key_states.shape[-2]
        start = self.length
        end = start + n
        if end > self._keys[layer_idx].shape[2]:
            self._grow(layer_idx, max(end, 2 * self._keys[layer_idx].shape[2]))
        self._keys[layer_idx][:, :, start:end] = key_states
        self._values[layer_idx][:, :, start:end] = value_states
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]

    def _grow(self, layer_idx: int, capacity: int) -> None:
        # Rare (the engine sizes the cache up front); layers grow one by one as the forward reaches them.
        for buffers in (self._keys, self._values):
            old = buffers[layer_idx]
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            buffers[layer_idx] = new
        self.capacity = max(self.capacity, capacity)  # layers created later start this big

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs):  # only consulted when no 4-D mask is passed
        q = args[0] if args else kwargs.get("query_length", 0)
        q = q.shape[0] if isinstance(q, torch.Tensor) else int(q)
        return self.length + q, 0

    def get_max_length(self) -> int:
        return self.capacity

    # -- bookkeeping used by the engine ------------------------------------------------------
    def commit(self, n: int) -> None:
        """Count the n entries the last forward wrote (models without a KV cache write none)."""
        self.length += n

    @torch.no_grad()
    def keep(self, start: int, rel_indices: torch.Tensor | list[int]) -> None:
        """Keep entries [0, start) plus entries start+rel_indices (sorted ascending), drop the rest."""
        idx = torch.as_tensor(rel_indices, dtype=torch.long)
        n = int(idx.numel())
        if n and self._keys:
            contiguous = bool((idx == torch.arange(n)).all())
            if not contiguous:
                src = (idx + start).to(self._keys[0].device)
                for buf in (*self._keys, *self._values):
                    buf[:, :, start : start + n] = buf.index_select(2, src)
        self.length = start + n

    def reset(self) -> None:
        self.length = 0
