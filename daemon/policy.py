"""DRAM policies: what the DRAM tier evicts, and what it promotes before anyone asks.

A policy is any object with the `DramPolicy` methods; `POLICIES` names the built-in ones
(config: `[policy] name`).  The daemon feeds every policy the same `ReuseStats` (turns are
LOOKUPs that carry a session name, puts carry theirs), and calls:

* `victim(pool, candidates)` when a tenant's DRAM pool must free a segment: which of the
  candidate segments to evict.  Called from a worker thread with the pool locked, so it
  must be quick and must not call back into the pool's locking methods.
* `plan(store, now)` every `PLAN_EVERY_S`: promotions to queue (tenant, keys, due time).

Built in:

* `lru` -- evicts the segment whose newest access is oldest (the pool's own order) and
  promotes nothing on its own.  The baseline.
* `reuse` -- predicts when each value is next used (`ReuseStats`: a prefetch hint's
  deadline, the session's turn interval, the tenant's median for a session with one
  turn, a shared key's own interval across sessions, recency for values nobody
  predicted) and

  * evicts the segment that loses the least *value* per block it frees, where a record's
    value is its size over the time until its next use (bytes that will be read soon are
    worth keeping; a session that just finished a turn is not back for a while, however
    recently used);
  * pre-promotes: it ranks the tenant's sessions by predicted next use and walks them in
    that order until their bytes fill `fill` of the tenant's DRAM tier -- the set a
    clairvoyant cache would hold -- and queues the values of those due
    within `horizon_s` that are not in DRAM (at most every REQUEUE_S per session), with
    their predicted time as the deadline -- but only a session worth PROMOTE_MARGIN times
    more per block than the least valuable segment DRAM would evict for it, so
    promotions never chase each other out.  Evicting by the same prediction keeps the
    promoted values in: what they displace is due later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from kvtier.daemon.config import POLICY_NAMES
from kvtier.daemon.index import split_keys
from kvtier.daemon.pool import SegState
from kvtier.daemon.reuse import ReuseStats

if TYPE_CHECKING:
    from kvtier.daemon.pool import Pool
    from kvtier.daemon.tiers import TieredStore

PLAN_EVERY_S = 0.1
REQUEUE_S = 0.5  # queue a session's missing values at most this often
MIN_WAIT_S = 0.01  # a record due now is worth size / MIN_WAIT_S
PROMOTE_MARGIN = 2.0  # promote only what is worth this much more than what it evicts


@dataclass
class Promotion:
    tenant: str
    session: str
    keys: list[bytes]
    due: float  # wall-clock seconds (the stats' clock)


class DramPolicy(Protocol):
    name: str
    stats: ReuseStats

    def victim(self, pool: Pool, candidates: npt.NDArray[np.int64]) -> int: ...

    def plan(self, store: TieredStore, now: float) -> list[Promotion]: ...

    def describe(self) -> dict[str, Any]: ...


class LruPolicy:
    name = "lru"

    def __init__(self, stats: ReuseStats) -> None:
        self.stats = stats

    def victim(self, pool: Pool, candidates: npt.NDArray[np.int64]) -> int:
        return pool.lru_victim(candidates)

    def plan(self, store: TieredStore, now: float) -> list[Promotion]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stats": self.stats.describe()}


class ReusePolicy:
    name = "reuse"

    def __init__(self, stats: ReuseStats, *, horizon_s: float = 60.0,
                 fill: float = 0.9) -> None:
        if horizon_s <= 0 or not 0 < fill <= 1:
            raise ValueError("reuse policy: horizon_s must be > 0 and fill in (0, 1]")
        self.stats = stats
        self.horizon_s = horizon_s
        self.fill = fill
        self._queued: dict[tuple[str, str], float] = {}  # session -> when last queued
        self.planned_sessions = 0
        self.planned_keys = 0
        self.evictions = 0

    # -- eviction --------------------------------------------------------------------------

    def row_next_use(self, pool: Pool, rows: npt.NDArray[np.int64], now: float
                     ) -> npt.NDArray[np.float64]:
        """Predicted next use of each row's value (the module docstring)."""
        ix = pool.index
        tenant = ix.tenant[rows].astype(np.int64)
        pair = (tenant << 32) | ix.session[rows].astype(np.int64)
        uniq, inv = np.unique(pair, return_inverse=True)
        per = np.full(len(uniq), np.nan)
        for i, p in enumerate(uniq.tolist()):
            nu = self.stats.next_use(pool.tenants[p >> 32], pool.sessions[p & 0xFFFFFFFF], now)
            if nu is not None:
                per[i] = nu
        nxt = per[inv]
        recency = now + 2 * np.maximum(now - ix.atime[rows].astype(np.float64), 0.0)
        nxt = np.where(np.isnan(nxt), recency, nxt)
        for tid in np.unique(tenant).tolist():
            keys, knext = self.stats.key_predictions(pool.tenants[tid], now)
            if not keys:
                continue
            k0 = split_keys(keys)[0]
            order = np.argsort(k0)
            k0s, kn = k0[order], np.asarray(knext)[order]
            mine = np.flatnonzero(tenant == tid)
            rk = ix.k0[rows[mine]]
            pos = np.minimum(np.searchsorted(k0s, rk), len(k0s) - 1)
            hit = k0s[pos] == rk
            sel = mine[hit]
            nxt[sel] = np.minimum(nxt[sel], kn[pos[hit]])
        return nxt

    def segment_density(self, pool: Pool, now: float) -> npt.NDArray[np.float64]:
        """Each segment's value per block it holds: the sum over its records of
        blocks / time to next use, over the segment's used blocks (an open segment frees
        only what it holds)."""
        ix = pool.index
        rows = ix.live_rows()
        value = np.zeros(pool.segment_count)
        if len(rows):
            nxt = self.row_next_use(pool, rows, now)
            w = ix.blocks[rows].astype(np.float64) / np.maximum(nxt - now, MIN_WAIT_S)
            np.add.at(value, pool.segments_of_rows(rows), w)
        return value / np.maximum(pool.segs["used"].astype(np.float64), 1.0)

    def victim(self, pool: Pool, candidates: npt.NDArray[np.int64]) -> int:
        """The candidate that loses the least value per block it frees."""
        density = self.segment_density(pool, self.stats.clock())[candidates]
        order = np.lexsort((pool.segs["epoch"][candidates], density))
        self.evictions += 1
        return int(candidates[order[0]])

    def _eviction_floor(self, pool: Pool, now: float) -> float:
        """Value per block of what a promotion would evict now: 0 while free segments
        are left, else the least valuable sealed segment's."""
        st = pool.segs["state"]
        if np.count_nonzero(st == SegState.FREE) > 4:
            return 0.0
        sealed = np.flatnonzero(st == SegState.SEALED)
        if not len(sealed):
            return 0.0
        return float(self.segment_density(pool, now)[sealed].min())

    # -- pre-promotion -----------------------------------------------------------------------

    def plan(self, store: TieredStore, now: float) -> list[Promotion]:
        out: list[Promotion] = []
        for tenant, dram in store.drams.items():
            budget = self.fill * dram.capacity_bytes
            if self.stats.prior(tenant) is None:
                continue  # no session came back yet: nothing to predict a return from
            ranked = []
            for _, session, s in self.stats.sessions(tenant):
                nu = self.stats.next_use(tenant, session, now)
                if nu is not None:
                    ranked.append((nu, session, s))
            ranked.sort(key=lambda r: r[0])
            used = 0.0
            floor: float | None = None
            for nu, session, s in ranked:
                used += s.nbytes
                if used > budget:
                    break
                if nu <= now or nu > now + self.horizon_s or not s.keys:
                    continue  # running now (its GETs promote it), or too far ahead
                if now - self._queued.get((tenant, session), -1e18) < REQUEUE_S:
                    continue
                if floor is None:
                    floor = dram.inspect(lambda p: self._eviction_floor(p, now))
                if 1.0 / max(nu - now, MIN_WAIT_S) <= PROMOTE_MARGIN * floor:
                    continue  # it would displace values worth as much: not worth a read
                keys = list(s.keys)
                missing = [key for key, held in
                           zip(keys, dram.lookup_many(tenant, keys).tolist(), strict=True)
                           if not held]
                if missing:
                    self._queued[(tenant, session)] = now
                    out.append(Promotion(tenant, session, missing, nu))
        self.planned_sessions += len(out)
        self.planned_keys += sum(len(p.keys) for p in out)
        if len(self._queued) > self.stats.max_sessions:
            self._queued = {k: t for k, t in self._queued.items() if now - t < REQUEUE_S}
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "horizon_s": self.horizon_s, "fill": self.fill,
                "evictions": self.evictions, "planned_sessions": self.planned_sessions,
                "planned_keys": self.planned_keys, "stats": self.stats.describe()}


POLICIES = {"lru": LruPolicy, "reuse": ReusePolicy}
if set(POLICIES) != set(POLICY_NAMES):  # the config validates `[policy] name` by the names
    raise ImportError(f"kvtier.daemon.policy.POLICIES {sorted(POLICIES)} differ from "
                      f"kvtier.daemon.config.POLICY_NAMES {sorted(POLICY_NAMES)}")


def make_policy(name: str, stats: ReuseStats, **options: Any) -> DramPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown DRAM policy {name!r} (known: {', '.join(POLICIES)})"
                         ) from None
    if cls is LruPolicy:
        return LruPolicy(stats)
    return ReusePolicy(stats, **options)
