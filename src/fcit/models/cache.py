"""A byte-bounded LRU map of tensors, shared by the Batcher's pixel cache and the vision-feature cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional, Union

import torch

Entry = Union[torch.Tensor, dict[str, torch.Tensor]]


def nbytes(value: Entry) -> int:
    tensors = value.values() if isinstance(value, dict) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


class TensorLRU:
    """At most ``cap_mb`` MB of tensors (or dicts of tensors); the least recently used entries go first. ``cap_mb = 0`` stores nothing."""

    def __init__(self, cap_mb: float):
        self.cap = int(cap_mb * 2**20)
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self._store: OrderedDict[Hashable, Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.cap > 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def get(self, key: Hashable) -> Optional[Entry]:
        t = self._store.get(key)
        if t is None:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: Hashable, value: Entry) -> None:
        size = nbytes(value)
        if size > self.cap or key in self._store:
            return
        while self.used + size > self.cap:
            _, old = self._store.popitem(last=False)
            self.used -= nbytes(old)
            self.evictions += 1
        self._store[key] = value
        self.used += size

    def clear(self) -> None:
        self._store.clear()
        self.used = 0
