"""I/O classes: which request gets the next worker thread when media I/O is contended.

Every blocking store operation runs in one of `slots` worker threads.  When they are all
busy, waiting requests are granted a thread in this order:

1. strict priority between classes -- `interactive` (client GETs, lookups, deletes) >
   `prefetch` (hint and policy promotions) > `write` (client PUTs) > `background`
   (write-behind, expiry sweeps, retention, checkpoints).  `reserved` threads only ever
   run interactive requests, so one never waits for a thread behind a long write; and
   writes and background work yield the device to reads: none starts while an
   interactive request runs, and one at a time while interactive requests ran within
   `recent_s`;
2. except that a request of a lower class that has waited `starvation_s` is served
   then, interactive work or not (the anti-starvation bound: background work always
   progresses);
3. inside a class, weighted fair queueing between tenants: each request gets a virtual
   finish tag, `max(class virtual time, tenant's last tag) + cost / weight`, and the
   smallest tag goes first, so a tenant with a deep queue cannot starve one with a
   single request (cost: the request's bytes, at least one 4 KiB block).

Once running, `write` and `background` work runs at `low_class_nice` above the worker
thread's own CPU priority (kvtier.daemon.cpuprio), so on a machine with few cores the
kernel gives an interactive read the CPU first too.

A request may carry a deadline: if it is still waiting when the deadline passes, it
leaves the queue with `DeadlineMissed` -- the client hears at once that it will not make
it, instead of being served late.

Per class and tenant the scheduler counts requests, waits (sum and the recent maximum),
deadline misses and the queue depth; `observe` is called with every wait (the daemon
feeds a Prometheus histogram).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from kvtier.daemon import cpuprio
from kvtier.daemon.errors import StoreError

T = TypeVar("T")
MIN_COST = 4096


class IoClass(enum.IntEnum):
    INTERACTIVE = 0
    PREFETCH = 1
    WRITE = 2
    BACKGROUND = 3


class DeadlineMissed(StoreError):
    """A request could not get a worker thread before its deadline."""


@dataclass
class _Waiter:
    cls: IoClass
    tenant: str
    since: float
    granted: trio.Event = field(default_factory=trio.Event)
    gone: bool = False  # left the queue (deadline); skip it when granting


@dataclass
class ClassStats:
    requests: int = 0
    waited: int = 0  # requests that had to queue
    wait_s: float = 0.0
    max_wait_s: float = 0.0
    deadline_missed: int = 0
    starvation_grants: int = 0  # served ahead of higher classes by the bound


class IoScheduler:
    def __init__(self, slots: int, *, starvation_s: float = 0.05,
                 reserved: int | None = None, recent_s: float = 0.02,
                 weights: dict[str, float] | None = None,
                 observe: Callable[[str, str, float], None] | None = None,
                 low_class_nice: int = 0) -> None:
        if slots < 1:
            raise ValueError("the I/O scheduler needs at least one slot")
        # CPU priority of write and background work: off (with the reason) where this
        # process cannot lower a thread's priority and raise it back.
        self.low_class_nice_off = cpuprio.probe(low_class_nice) if low_class_nice else \
            "off in the config"
        self.low_class_nice = 0 if self.low_class_nice_off else low_class_nice
        self.slots = slots
        self.reserved = slots // 4 if reserved is None else reserved
        if not 0 <= self.reserved < slots:
            raise ValueError(f"reserved threads must be in [0, {slots - 1}]")
        self.running = [0 for _ in IoClass]
        self.recent_s = recent_s
        self._last_interactive = -1e9
        self.starvation_s = starvation_s
        self.weights = dict(weights or {})
        self.limiter = trio.CapacityLimiter(slots)
        self.observe = observe or (lambda cls, tenant, wait: None)
        self.busy = 0
        self._queues: list[list[tuple[float, int, _Waiter]]] = [[] for _ in IoClass]
        self._vtime = [0.0 for _ in IoClass]
        self._last_tag: dict[tuple[IoClass, str], float] = {}
        self._seq = itertools.count()
        self.stats: dict[tuple[IoClass, str], ClassStats] = {}

    # -- the queue --------------------------------------------------------------------------

    def queued(self, cls: IoClass | None = None) -> int:
        qs = self._queues if cls is None else [self._queues[cls]]
        return sum(1 for q in qs for _, _, w in q if not w.gone)

    def _stats(self, cls: IoClass, tenant: str) -> ClassStats:
        st = self.stats.get((cls, tenant))
        if st is None:
            st = self.stats[(cls, tenant)] = ClassStats()
        return st

    def _enqueue(self, w: _Waiter, cost: int) -> None:
        key = (w.cls, w.tenant)
        tag = max(self._vtime[w.cls], self._last_tag.get(key, 0.0)) + \
            max(cost, MIN_COST) / self.weights.get(w.tenant, 1.0)
        self._last_tag[key] = tag
        heapq.heappush(self._queues[w.cls], (tag, next(self._seq), w))

    def _head(self, cls: int) -> tuple[float, int, _Waiter] | None:
        q = self._queues[cls]
        while q and q[0][2].gone:
            heapq.heappop(q)
        return q[0] if q else None

    def _allowed(self, cls: IoClass, now: float) -> bool:
        """May a request of a non-interactive class start now (queue order aside)?

        No class takes the reserved threads.  Writes and background work also yield the
        device to reads: none starts while an interactive request runs, and only one
        runs while interactive requests ran within `recent_s`.  Prefetch is a read
        itself and is only kept off the reserve."""
        if self.busy >= self.slots - self.reserved:
            return False
        if cls == IoClass.PREFETCH:
            return True
        if self.running[IoClass.INTERACTIVE]:
            return False
        writers = self.running[IoClass.WRITE] + self.running[IoClass.BACKGROUND]
        return now - self._last_interactive >= self.recent_s or writers == 0

    def _pick(self) -> _Waiter | None:
        now = trio.current_time()
        heads = [(c, self._head(c)) for c in IoClass if c != IoClass.INTERACTIVE]
        # The anti-starvation bound first: the longest-waiting head past it (lower
        # classes first on ties) goes, as soon as a non-reserved thread is free.
        starving = [(h[2].since, -c, c, h[2].tenant) for c, h in heads
                    if h is not None and now - h[2].since >= self.starvation_s]
        chosen: IoClass | None = None
        if starving and self.busy < self.slots - self.reserved:
            _, _, chosen, tenant = min(starving)
            if self.running[IoClass.INTERACTIVE] or self._head(IoClass.INTERACTIVE):
                self._stats(chosen, tenant).starvation_grants += 1
        elif self._head(IoClass.INTERACTIVE) is not None:
            chosen = IoClass.INTERACTIVE
        else:
            for c, h in heads:
                if h is not None:
                    if self._allowed(c, now):
                        chosen = c
                    break  # strict priority: a lower class never passes a waiting higher
        if chosen is None:
            return None
        tag, _, w = heapq.heappop(self._queues[chosen])
        self._vtime[chosen] = max(self._vtime[chosen], tag)
        return w

    def _grant(self) -> None:
        while self.busy < self.slots:
            w = self._pick()
            if w is None:
                return
            self.busy += 1
            self.running[w.cls] += 1
            if w.cls == IoClass.INTERACTIVE:
                self._last_interactive = trio.current_time()
            w.granted.set()

    def _release(self, cls: IoClass) -> None:
        self.busy -= 1
        self.running[cls] -= 1
        if cls == IoClass.INTERACTIVE:
            self._last_interactive = trio.current_time()
        self._grant()

    def _free_for(self, cls: IoClass) -> bool:
        """Can `cls` start at once, with nobody queued?"""
        if cls == IoClass.INTERACTIVE:
            return self.busy < self.slots and not self.queued(IoClass.INTERACTIVE)
        return not self.queued() and self._allowed(cls, trio.current_time())

    # -- the API ------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, cls: IoClass, tenant: str, cost: int = MIN_COST,
                   deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one worker slot for the block; `deadline` is on the trio clock."""
        st = self._stats(cls, tenant)
        st.requests += 1
        now = trio.current_time()
        if self._free_for(cls):
            self.busy += 1
            self.running[cls] += 1
            if cls == IoClass.INTERACTIVE:
                self._last_interactive = now
        else:
            w = _Waiter(cls, tenant, now)
            self._enqueue(w, cost)
            st.waited += 1
            try:
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    if cls != IoClass.INTERACTIVE:
                        # Starving by then: ask for a grant even if no slot is released
                        # meanwhile (a long interactive read holding off the queue).
                        with trio.move_on_at(now + self.starvation_s):
                            await w.granted.wait()
                        self._grant()
                    await w.granted.wait()
            except BaseException:  # cancelled from outside (the client went away)
                if w.granted.is_set():
                    self._release(cls)
                else:
                    w.gone = True
                raise
            if not w.granted.is_set():
                w.gone = True
                st.deadline_missed += 1
                raise DeadlineMissed(f"no I/O thread free before the deadline "
                                     f"({self.queued()} requests queued)")
            wait = trio.current_time() - now
            st.wait_s += wait
            st.max_wait_s = max(st.max_wait_s, wait)
            self.observe(cls.name.lower(), tenant, wait)
        try:
            yield
        finally:
            self._release(cls)

    async def run(self, cls: IoClass, tenant: str, fn: Callable[..., T], *args: Any,
                  cost: int = MIN_COST, deadline: float | None = None) -> T:
        """Run blocking `fn(*args)` in a worker thread, in its turn."""
        async with self.slot(cls, tenant, cost, deadline):
            if cls >= IoClass.WRITE and self.low_class_nice:
                nice = self.low_class_nice

                def lowered() -> T:
                    with cpuprio.lowered(nice):
                        return fn(*args)
                return await trio.to_thread.run_sync(lowered, limiter=self.limiter)
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slots": self.slots, "busy": self.busy,
                               "reserved": self.reserved,
                               "low_class_nice": self.low_class_nice,
                               "low_class_nice_off": self.low_class_nice_off,
                               "starvation_s": self.starvation_s, "classes": {}}
        for c in IoClass:
            per = {t: vars(s).copy() for (cc, t), s in self.stats.items() if cc == c}
            for v in per.values():
                v["wait_s"] = round(v["wait_s"], 6)
                v["max_wait_s"] = round(v["max_wait_s"], 6)
            out["classes"][c.name.lower()] = {"queued": self.queued(c),
                                              "running": self.running[c], "tenants": per}
        return out
