"""What every part of one pool shares: its device and superblock, options, clock, counters,
the one metadata lock, and whether the pool is closed.

A pool is built from parts that each hold one kind of state or play one role (segment
table, catalog, writer, reader, cleaner, checkpointer, recovery; see `pool.py`).  They
must agree on one lock -- metadata changes happen under it, payload I/O outside it on
pinned segments -- and on the few things every one of them reads.  That is this object;
each part takes it instead of a reference to the `Pool` facade.
"""

from __future__ import annotations

import threading

from kvtier.daemon.blockdev import BlockDevice
from kvtier.daemon.errors import StoreError
from kvtier.daemon.pool_types import Clock, Counters, PoolOptions
from kvtier.daemon.superblock import Superblock


class PoolContext:
    """The shared state of one pool's parts (see the module docstring)."""

    __slots__ = ("B", "clock", "closed", "counters", "dev", "idle", "lock", "opt", "sb")

    def __init__(self, dev: BlockDevice, sb: Superblock, *, clock: Clock,
                 options: PoolOptions) -> None:
        self.dev = dev
        self.sb = sb
        self.clock = clock
        self.opt = options
        self.B = sb.block_size
        self.counters = Counters()
        # The metadata lock; `idle` is notified when the last put in flight commits and
        # when a checkpoint running without the lock ends.
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise StoreError(f"{self.dev.name}: pool is closed")
