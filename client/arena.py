"""Allocation of ranges in the client's shared arena (first fit, coalescing, 4 KiB aligned).

Slots start on page boundaries, so the daemon's O_DIRECT reads and writes go straight
between the device and the arena, and a CUDA-registered arena copies at pinned speed.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

ALIGN = 4096


class ArenaFullError(MemoryError):
    """No free range of the requested size (the arena is too small or fragmented)."""


@dataclass(frozen=True, slots=True)
class Slot:
    offset: int
    size: int
    view: memoryview


class ArenaAllocator:
    def __init__(self, arena: memoryview) -> None:
        self.arena = arena
        self._free: list[tuple[int, int]] = [(0, arena.nbytes)]  # (offset, size), sorted
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._free)

    def alloc(self, nbytes: int) -> Slot:
        if nbytes <= 0:
            raise ValueError(f"slot size must be positive, got {nbytes}")
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            for i, (off, sz) in enumerate(self._free):
                if sz >= size:
                    if sz == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, sz - size)
                    self._used[off] = size
                    return Slot(off, nbytes, self.arena[off:off + nbytes])
        raise ArenaFullError(f"no free arena range of {size} bytes "
                             f"({self.free_bytes} bytes free in total)")

    def free(self, slot: Slot) -> None:
        with self._lock:
            size = self._used.pop(slot.offset, None)
            if size is None:
                raise ValueError(f"slot at {slot.offset} is not allocated")
            i = bisect.bisect_left(self._free, (slot.offset, 0))
            self._free.insert(i, (slot.offset, size))
            # coalesce with the neighbours
            if i + 1 < len(self._free) and self._free[i][0] + self._free[i][1] == \
                    self._free[i + 1][0]:
                self._free[i] = (self._free[i][0], self._free[i][1] + self._free[i + 1][1])
                del self._free[i + 1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
                self._free[i - 1] = (self._free[i - 1][0],
                                     self._free[i - 1][1] + self._free[i][1])
                del self._free[i]
