"""Prefetch hints: promote values from the media pool into DRAM before they are asked for.

A hint is (tenant, keys, deadline).  Its keys join one queue ordered by deadline, so the
most urgent hint is served first whatever arrived before it (and every client's hint
before work nobody waits on: partial-read promotions, the DRAM policy's predictions);
`workers` tasks take keys from the front and promote them (`TieredStore.promote_bytes`,
a media read and a DRAM put) in I/O threads of the `prefetch` class, which interactive
requests overtake.

Interactive reads come first: while GETs are reading the media pool, the workers hold
back (strict priority), each for at most `max_yield_s` (work nobody waits on: 8 times
that) before it promotes one value anyway (the anti-starvation bound).  Without this a
hint given shortly before its request made that request slower than no hint at all: the
request's reads and the promotion shared the disk.

Each value is read from the media once: a GET of a key whose promotion is under way
waits for it and is served from DRAM, and a hint's key that a GET has read from the
media in the last `SUPERSEDE_S` (its client is loading it right now) is dropped rather
than read a second time.  Measured before this on an H100 host (1.6 GB/s disk, 7.5 GB
prefix): a hint 1 s before turn 2 saved 0.1 s instead of the ~1 s that its head start
was worth, the rest lost to the same chunks read by both the hint and the loader.

Values that a GET read only in part (a frame range, e.g. one layer group) are promoted
through the same queue (`background`), due a minute later, so they too yield to reads.

A hint answers when its last key is in DRAM, or at its deadline -- whichever is first --
with how many values it promoted and whether it made the deadline.  A hint past its
deadline is not dropped: its keys stay queued (behind more urgent ones) so the GET that
comes later still finds them in DRAM.  Keys already in DRAM, or on no tier at all, cost
nothing.  `rate` is the measured promotion throughput (bytes/s, moving average).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from kvtier.daemon.iosched import IoClass, IoScheduler
from kvtier.daemon.tiers import PROMOTE_SUPERSEDED, TieredStore

BACKGROUND_DEADLINE_S = 60.0
SUPERSEDE_S = 10.0  # a hinted key read by a GET this recently is not promoted
BACKGROUND_YIELD = 8  # work nobody waits on holds back this many times longer for GETs


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
    superseded: int = 0  # hinted keys not promoted: a GET had read them already


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
        """Hold back while GETs read the media: a client's hint for at most `max_yield_s`,
        work nobody waits on for at most `BACKGROUND_YIELD` times that (a loading client
        reads for seconds; re-reading what it has just read would slow it by a share of
        the disk)."""
        t0 = trio.current_time()
        level = self._heap[0][0] if self._heap else 0
        end = t0 + self.max_yield_s * (BACKGROUND_YIELD if level else 1)
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
            level, _, _, key, h = heapq.heappop(self._heap)
            t0 = time.perf_counter()
            # A client's hint for a key its GETs already read is late: drop it.  Work
            # nobody waits on (level 1) is often queued *because* of such a read (the rest
            # of a partially read value), so it is not.
            within = SUPERSEDE_S if level == 0 else None
            nbytes = await self.io.run(IoClass.PREFETCH, h.tenant,
                                       functools.partial(self.store.promote_bytes,
                                                         unless_read_within_s=within),
                                       h.tenant, key)
            self.stats.superseded += nbytes == PROMOTE_SUPERSEDED
            dt = time.perf_counter() - t0
            if nbytes > 0:
                self.stats.values += 1
                self.stats.bytes += nbytes
                # one worker's rate times the workers: the queue's throughput
                self.rate = 0.8 * self.rate + 0.2 * (nbytes / max(dt, 1e-6) * self.workers)
            h.finish_one(nbytes >= 0, max(nbytes, 0))
