"""Prefetch hints: promote values from the media pool into DRAM before they are asked for.

A hint is (tenant, keys, deadline).  Its keys join one queue ordered by deadline, so the
most urgent hint is served first whatever arrived before it (and every client's hint
before work nobody waits on: partial-read promotions, the DRAM policy's predictions);
`workers` tasks take keys from the front and promote them (`TieredStore.promote_bytes`,
a media read and a DRAM put) in I/O threads of the `prefetch` class, which interactive
requests overtake.

Interactive reads come first: while GETs are reading the media pool, the workers hold
back (strict priority), each for at most `max_yield_s` before it promotes one value anyway
(the anti-starvation bound).  Without this a hint given shortly before its request made
that request slower than no hint at all: the request's reads and the promotion shared
the disk.

Values that a GET read only in part (a frame range, e.g. one layer group) are promoted
through the same queue (`background`), due a minute later, so they too yield to reads.

A hint answers when its last key is in DRAM, or at its deadline -- whichever is first --
with how many values it promoted and whether it made the deadline.  A hint past its
deadline is not dropped: its keys stay queued (behind more urgent ones) so the GET that
comes later still finds them in DRAM.  Keys already in DRAM, or on no tier at all, cost
nothing.  `rate` is the measured promotion throughput (bytes/s, moving average).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from kvtier.daemon.iosched import IoClass, IoScheduler
from kvtier.daemon.tiers import TieredStore

BACKGROUND_DEADLINE_S = 60.0


@dataclass
class Hint:
    tenant: str
    deadline: float  # trio clock
    left: int
    promoted: int = 0
    bytes: int = 0
    done: trio.Event = field(default_factory=trio.Event)

    def finish_one(self, promoted: bool, nbytes: int) -> None:
        self.left -= 1
        if promoted:
            self.promoted += 1
            self.bytes += nbytes
        if self.left <= 0:
            self.done.set()


@dataclass
class HintResult:
    keys: int
    promoted: int
    met: bool
    seconds: float


@dataclass
class PrefetchStats:
    hints: int = 0
    hints_met: int = 0
    values: int = 0
    bytes: int = 0
    yielded_s: float = 0.0  # time workers held back for interactive reads


class PrefetchScheduler:
    def __init__(self, store: TieredStore, io: IoScheduler, *, workers: int = 4,
                 max_yield_s: float = 0.25) -> None:
        if workers < 1:
            raise ValueError("prefetch needs at least one worker")
        self.store = store
        self.io = io
        self.workers = workers
        self.max_yield_s = max_yield_s
        self.stats = PrefetchStats()
        self.rate = 1e9  # bytes/s; replaced by measurements
        # (0 for a client's hint, 1 for work nobody waits on; deadline; order; key; hint)
        self._heap: list[tuple[int, float, int, bytes, Hint]] = []
        self._seq = itertools.count()
        self._work = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as n:
            for _ in range(self.workers):
                n.start_soon(self._worker)
            task_status.started()

    def background(self, tenant: str, keys: Sequence[bytes],
                   due_in_s: float = BACKGROUND_DEADLINE_S) -> Hint:
        """Queue keys nobody waits for: values a GET read only in part (behind every hint
        due within BACKGROUND_DEADLINE_S), or a DRAM policy's predictions (due when the
        policy expects them to be read).  The returned hint's `done` is set once every key
        was promoted (or found in DRAM, or on no tier)."""
        h = Hint(tenant, trio.current_time() + max(due_in_s, 0.0), len(keys))
        if not keys:
            h.done.set()
        self._queue(h, keys, 1)
        return h

    async def hint(self, tenant: str, keys: Sequence[bytes], deadline_s: float) -> HintResult:
        """Queue `keys` for promotion; answer when done or at the deadline."""
        t0 = trio.current_time()
        h = Hint(tenant, t0 + deadline_s, len(keys))
        self.stats.hints += 1
        if not keys:
            h.done.set()
        self._queue(h, keys, 0)
        with trio.move_on_at(h.deadline):
            await h.done.wait()
        met = h.done.is_set()
        self.stats.hints_met += met
        return HintResult(len(keys), h.promoted, met, trio.current_time() - t0)

    def _queue(self, h: Hint, keys: Sequence[bytes], level: int) -> None:
        for k in keys:
            heapq.heappush(self._heap, (level, h.deadline, next(self._seq), bytes(k), h))
        self._work.set()

    @property
    def queued(self) -> int:
        """Keys waiting for a worker."""
        return len(self._heap)

    async def _yield_to_interactive(self) -> None:
        t0 = trio.current_time()
        end = t0 + self.max_yield_s
        while self.store.interactive_media_reads > 0 and trio.current_time() < end:
            await trio.sleep(0.002)
        self.stats.yielded_s += trio.current_time() - t0

    async def _worker(self) -> None:
        while True:
            while not self._heap:
                await self._work.wait()
                self._work = trio.Event()
            await self._yield_to_interactive()
            if not self._heap:
                continue
            _, _, _, key, h = heapq.heappop(self._heap)
            t0 = time.perf_counter()
            nbytes = await self.io.run(IoClass.PREFETCH, h.tenant, self.store.promote_bytes,
                                       h.tenant, key)
            dt = time.perf_counter() - t0
            if nbytes > 0:
                self.stats.values += 1
                self.stats.bytes += nbytes
                # one worker's rate times the workers: the queue's throughput
                self.rate = 0.8 * self.rate + 0.2 * (nbytes / max(dt, 1e-6) * self.workers)
            h.finish_one(nbytes >= 0, max(nbytes, 0))
