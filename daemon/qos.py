"""Per-tenant limits: bandwidth and IOPS token buckets, and a capacity quota.

* `TokenBucket` -- tokens accrue at `rate` per second up to a burst of `BURST_S` seconds'
  worth.  A request waits until the bucket is not in debt, then takes what it needs,
  going into debt when it is larger than the burst, so a big value is admitted and the
  requests after it pay for it.  Over any window the admitted amount stays within one
  burst of rate x window.
* `TenantQoS` -- one tenant's buckets (bytes of GET/PUT payload, and requests) and its
  quota; time spent waiting is counted (`throttled_s`).
* `QoS` -- every tenant's, live-changeable (`kvtier limits`).  Quota checks use the pool's
  per-tenant usage, recomputed at most every `USAGE_REFRESH_S` (one vectorised pass over
  the index) plus what was admitted since: a PUT that would take its tenant past the
  quota is refused (NO_SPACE) before anything is written.  The pool's eviction is still
  global LRU: quotas keep a tenant from evicting others' values when the quotas, and what
  unlimited tenants store, fit the pool's usable space (capacity less its free-segment
  reserve); the daemon warns at start when the quotas alone do not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from kvtier.daemon.config import TenantConfig
from kvtier.daemon.errors import PoolFullError

BURST_S = 0.1
RECORD_BLOCK = 4096  # a PUT takes its payload rounded up to blocks, plus a header block
USAGE_REFRESH_S = 0.1


class QuotaExceeded(PoolFullError):
    """A PUT would take its tenant past its quota."""


class TokenBucket:
    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"token bucket rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = self.rate * BURST_S if burst is None else float(burst)
        self.tokens = self.burst
        self.stamp = trio.current_time()

    def _refill(self) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def ready(self) -> bool:
        """Whether a request would be admitted now (the bucket is not in debt)."""
        self._refill()
        return self.tokens >= 0

    async def take(self, n: float) -> float:
        """Wait until admitted; returns the seconds waited."""
        waited = 0.0
        self._refill()
        while self.tokens < 0:
            delay = -self.tokens / self.rate
            await trio.sleep(delay)
            waited += delay
            self._refill()
        self.tokens -= n
        return waited


@dataclass
class TenantQoS:
    quota: int | None = None
    bandwidth: TokenBucket | None = None
    iops: TokenBucket | None = None
    throttled_s: float = 0.0
    refused_puts: int = 0
    admitted_since_refresh: int = 0

    def describe(self) -> dict[str, Any]:
        return {"quota": self.quota,
                "bandwidth": int(self.bandwidth.rate) if self.bandwidth else None,
                "iops": int(self.iops.rate) if self.iops else None,
                "throttled_s": round(self.throttled_s, 3), "refused_puts": self.refused_puts}


@dataclass
class QoS:
    usage_of: Callable[[], dict[str, int]]  # the media pool's bytes per tenant (blocking)
    tenants: dict[str, TenantQoS] = field(default_factory=dict)
    # runs the blocking usage scan: the daemon's I/O scheduler (write class), so it is
    # counted like any other store work; plain worker threads where none is given
    run_blocking: Callable[[Callable[[], dict[str, int]]], Awaitable[dict[str, int]]] | None = None
    _usage: dict[str, int] = field(default_factory=dict)
    _usage_at: float = -1e9

    @classmethod
    def from_config(cls, tenants: list[TenantConfig], usage_of: Callable[[], dict[str, int]],
                    run_blocking: Callable[[Callable[[], dict[str, int]]],
                                           Awaitable[dict[str, int]]] | None = None) -> QoS:
        q = cls(usage_of, run_blocking=run_blocking)
        for t in tenants:
            q.set_limits(t.id, quota=t.quota, bandwidth=t.bandwidth, iops=t.iops)
        return q

    def set_limits(self, tenant: str, *, quota: int | None, bandwidth: int | None,
                   iops: int | None) -> TenantQoS:
        """Replace a tenant's limits (None: unlimited)."""
        old = self.tenants.get(tenant, TenantQoS())
        tq = TenantQoS(quota=quota,
                       bandwidth=TokenBucket(bandwidth) if bandwidth else None,
                       iops=TokenBucket(iops) if iops else None,
                       throttled_s=old.throttled_s, refused_puts=old.refused_puts)
        self.tenants[tenant] = tq
        return tq

    async def throttle(self, tenant: str, nbytes: int) -> None:
        """Admit one request of `nbytes` payload under the tenant's rate limits."""
        tq = self.tenants.get(tenant)
        if tq is None:
            return
        if tq.iops is not None:
            tq.throttled_s += await tq.iops.take(1)
        if tq.bandwidth is not None:  # waits out a debt even when `nbytes` is known later
            tq.throttled_s += await tq.bandwidth.take(nbytes)

    def admit_now(self, tenant: str, nbytes: int = 0) -> bool:
        """Admit one request of `nbytes` payload at once if no bucket of the tenant is in
        debt (the same buckets and charges as `throttle`, without waiting); False: nothing
        was charged, and the request must `throttle` (wait its turn) instead.  This is how
        requests served on the event loop pass the same admission as the others."""
        tq = self.tenants.get(tenant)
        if tq is None:
            return True
        if (tq.iops is not None and not tq.iops.ready()) or \
                (tq.bandwidth is not None and not tq.bandwidth.ready()):
            return False
        if tq.iops is not None:
            tq.iops.tokens -= 1
        if tq.bandwidth is not None:
            tq.bandwidth.tokens -= nbytes
        return True

    def charge_bytes(self, tenant: str, nbytes: int) -> None:
        """Charge bytes known only after the fact, without waiting: the bucket may go into
        debt, and the tenant's next request waits for it (`admit_now` refuses it)."""
        tq = self.tenants.get(tenant)
        if tq is not None and tq.bandwidth is not None and nbytes:
            tq.bandwidth.tokens -= nbytes

    def meters_bytes(self, tenant: str) -> bool:
        """Whether the tenant's bytes are charged to a bandwidth bucket (throttle_bytes)."""
        tq = self.tenants.get(tenant)
        return tq is not None and tq.bandwidth is not None

    async def throttle_bytes(self, tenant: str, nbytes: int) -> None:
        """Charge bytes known only after the fact (a GET's value size) to the bandwidth
        bucket; the request waits while the tenant is in debt."""
        tq = self.tenants.get(tenant)
        if tq is not None and tq.bandwidth is not None and nbytes:
            tq.throttled_s += await tq.bandwidth.take(nbytes)

    async def admit_put(self, tenant: str, nbytes: int) -> None:
        """Raise QuotaExceeded if `nbytes` more would pass the tenant's quota."""
        tq = self.tenants.get(tenant)
        if tq is None or tq.quota is None:
            return
        now = trio.current_time()
        if now - self._usage_at > USAGE_REFRESH_S:
            self._usage = await (self.run_blocking(self.usage_of) if self.run_blocking
                                 else trio.to_thread.run_sync(self.usage_of))
            self._usage_at = trio.current_time()
            for t in self.tenants.values():
                t.admitted_since_refresh = 0
        self._charge_put(tenant, tq, nbytes)

    def try_admit_put(self, tenant: str, nbytes: int) -> int | None:
        """`admit_put` without waiting: the bytes charged against the quota (0 without
        one; give them back with `refund_put` if the put does not happen), or None if
        the usage must be read again first (then `admit_put`)."""
        tq = self.tenants.get(tenant)
        if tq is None or tq.quota is None:
            return 0
        if trio.current_time() - self._usage_at > USAGE_REFRESH_S:
            return None
        return self._charge_put(tenant, tq, nbytes)

    def refund_put(self, tenant: str, charged: int) -> None:
        tq = self.tenants.get(tenant)
        if tq is not None and charged:
            tq.admitted_since_refresh = max(0, tq.admitted_since_refresh - charged)

    def _charge_put(self, tenant: str, tq: TenantQoS, nbytes: int) -> int:
        assert tq.quota is not None
        used = self._usage.get(tenant, 0) + tq.admitted_since_refresh
        nbytes = -(-nbytes // RECORD_BLOCK) * RECORD_BLOCK + RECORD_BLOCK  # + header, padding
        if used + nbytes > tq.quota:
            tq.refused_puts += 1
            raise QuotaExceeded(f"tenant {tenant!r}: a PUT of {nbytes} bytes would pass its "
                                f"quota of {tq.quota} bytes ({used} in use)")
        tq.admitted_since_refresh += nbytes
        return nbytes

    def describe(self) -> dict[str, Any]:
        return {t: q.describe() for t, q in self.tenants.items()}
