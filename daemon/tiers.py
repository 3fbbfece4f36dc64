"""The tier stack: per-tenant DRAM tiers (a pool on a memfd each) in front of a media pool.

Each tenant has its own DRAM memfd, so the daemon can hand a tenant's clients a read-only
mapping of it (MAP/UNMAP): a DRAM hit then goes from that mapping to the GPU in one DMA,
with no memcpy through the client's arena, and no client ever maps another tenant's data.

* PUT, `ack = "media"`: the value is written to the media pool, then cached in DRAM; the
  put is acknowledged once the media write returned.
* PUT, `ack = "memory"`: the value is written to DRAM and acknowledged; a write-behind
  task copies it to the media pool (straight from DRAM memory, no intermediate copy).
  Until then its DRAM segment is pinned, so DRAM pressure cannot evict it.  If DRAM is
  full of unflushed data the put falls back to a direct media write (backpressure).
* GET: DRAM first (one memcpy into the caller's buffer); on a miss the media pool reads
  straight into the caller's buffer and the value is promoted to DRAM (whole-value reads
  from the caller's buffer; frame-range reads by a background promotion).
* LOOKUP reports per key which tier holds it.  DELETE and PURGE act on both tiers and
  cancel pending write-behind, so a flush can never resurrect what was deleted.

All methods are synchronous and thread-safe; the daemon calls them from worker threads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kvtier.client.protocol import Tier
from kvtier.daemon import record
from kvtier.daemon.blockdev import MemDevice, aligned_buffer, as_bytes_view
from kvtier.daemon.errors import (
    CorruptionError,
    NotFound,
    PoolFullError,
    StoreError,
    ValueTooLargeError,
)
from kvtier.daemon.pool import Buffer, GetResult, Pool, PoolOptions, PutReservation

log = logging.getLogger("kvtierd.tiers")

VERSION_SLOTS = 1 << 16
# promote_bytes' answers besides a byte count
PROMOTE_ABSENT = -1  # the key is on no tier
PROMOTE_SUPERSEDED = -2  # a GET read it from the media pool meanwhile: not read twice
READ_MEMORY = 1 << 16  # media reads by GETs remembered (key -> when), for supersede
SINGLE_FLIGHT_WAIT_S = 5.0  # a GET waits at most this long for a promotion of its key


@dataclass
class _Pending:
    tenant: str
    session: str
    key: bytes
    offset: int  # record offset in the DRAM pool (its segment is pinned)
    superseded: bool = False  # a newer put of the key will be flushed instead
    deleted: bool = False  # a delete or purge removed the key


@dataclass
class TierCounters:
    dram_hits: int = 0
    pool_hits: int = 0
    misses: int = 0
    promotions: int = 0
    writebehind_flushed: int = 0
    writebehind_bytes: int = 0
    writebehind_fallbacks: int = 0  # ack=memory puts written straight to media
    writebehind_corrupt: int = 0  # DRAM records that failed their header check: not written
    # RESERVEs and COMMITs done without waiting (on the event loop), and those that would
    # have had to wait and went to a worker thread instead
    inline_reserves: int = 0
    inline_reserve_fallbacks: int = 0
    inline_commits: int = 0
    inline_commit_fallbacks: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


class TieredStore:
    def __init__(self, drams: dict[str, Pool], media: Pool, *, ack: str = "media",
                 notify: Callable[[], None] | None = None) -> None:
        if ack not in ("memory", "media"):
            raise ValueError(f"ack must be 'memory' or 'media', got {ack!r}")
        self.drams = drams
        self.media = media
        self.ack = ack
        self.notify = notify or (lambda: None)
        self._mu = threading.Lock()
        self._local = threading.local()
        # GETs reading the media pool right now: prefetch promotion yields to them
        self.interactive_media_reads = 0
        # One media read per value at a time: promotions in progress (a GET of the same
        # key waits for it and reads DRAM), and when GETs last read a key from the media
        # (a hint's promotion of a key its client is reading already is dropped).
        self._promoting: dict[tuple[str, bytes], threading.Event] = {}
        self._media_read_at: collections.OrderedDict[tuple[str, bytes], float] = \
            collections.OrderedDict()
        self.single_flight_waits = 0
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._queue: collections.deque[_Pending] = collections.deque()
        # DRAM tiers whose cleaning ahead a commit on the event loop left to flush_some
        self._upkeep: set[str] = set()
        self._promote: collections.deque[tuple[str, bytes]] = collections.deque()
        self.counters = TierCounters()
        # Write versions, by key hash: a PUT or DELETE bumps its key's slot, a purge bumps
        # them all.  A promotion (media -> DRAM) remembers the version before it reads the
        # media and installs its copy only if nothing changed since, under `_mu`, so a
        # promotion that read an older value can never overwrite a newer one in DRAM.
        self._versions = np.zeros(VERSION_SLOTS, dtype=np.int64)
        self._epoch = 0
        # told (tenant, session or None for all) after a purge: reuse statistics forget it
        self.on_purge: Callable[[str, str | None], None] = lambda tenant, session: None

    @classmethod
    def create_dram(cls, size: int, segment_size: int, populate: bool = True,
                    tenant: str = "") -> Pool:
        name = f"kvtier-dram-{tenant}" if tenant else "kvtier-dram"
        return Pool.format(MemDevice(size, name=name, populate=populate),
                           segment_size=segment_size,
                           options=PoolOptions(verify_reads=False, volatile=True,
                                               checkpoint_every_bytes=1 << 62))

    @classmethod
    def create_drams(cls, shares: dict[str, int], segment_size: int,
                     populate: bool = True) -> dict[str, Pool]:
        return {t: cls.create_dram(size, segment_size, populate, t)
                for t, size in shares.items()}

    def dram(self, tenant: str) -> Pool:
        """The tenant's DRAM tier (NotFound for a tenant the daemon was not started with)."""
        try:
            return self.drams[tenant]
        except KeyError:
            raise NotFound(f"tenant {tenant!r} has no DRAM tier") from None

    def dram_fd(self, tenant: str) -> int:
        dev = self.dram(tenant).dev
        assert isinstance(dev, MemDevice)
        return dev.fd

    def pools(self) -> list[Pool]:
        return [*self.drams.values(), self.media]

    # -- writes ------------------------------------------------------------------------------

    def _slot(self, tenant: str, key: bytes) -> int:
        return hash((tenant, bytes(key))) & (VERSION_SLOTS - 1)

    def _version_locked(self, tenant: str, key: bytes) -> tuple[int, int]:
        return self._epoch, int(self._versions[self._slot(tenant, key)])

    def _version(self, tenant: str, key: bytes) -> tuple[int, int]:
        with self._mu:
            return self._version_locked(tenant, key)

    def _bump_locked(self, tenant: str, key: bytes) -> None:
        self._versions[self._slot(tenant, key)] += 1

    def put(self, tenant: str, session: str, key: bytes, frames: Sequence[Buffer], *,
            ttl_s: float | None = None) -> Tier:
        """Store a value; returns the tier that holds it when the put is acknowledged."""
        with self._mu:
            self._bump_locked(tenant, key)
        dram = self.drams.get(tenant)
        if self.ack == "memory" and dram is not None:
            try:
                r = dram.put(tenant, session, key, frames, ttl_s=ttl_s)
            except (PoolFullError, ValueTooLargeError):
                self.counters.writebehind_fallbacks += 1
            else:
                self._write_behind(dram, tenant, session, key, r.offset)
                return Tier.DRAM
        if dram is None:
            self.media.put(tenant, session, key, frames, ttl_s=ttl_s)
            return Tier.POOL
        # One CRC pass for both tiers' records (item 13 of #22: it was one per tier).
        views = [as_bytes_view(f) for f in frames]
        crcs = record.frame_crcs(views)
        self.media.put(tenant, session, key, views, ttl_s=ttl_s, crcs=crcs)
        try:
            dram.put(tenant, session, key, views, ttl_s=ttl_s, crcs=crcs)
        except (PoolFullError, ValueTooLargeError):
            pass  # the DRAM copy is a cache; the media copy is what was acknowledged
        return Tier.POOL

    def _write_behind(self, dram: Pool, tenant: str, session: str, key: bytes,
                      offset: int, *, pinned: bool = False) -> None:
        """Queue the DRAM record at `offset` for the media pool (ack = memory); it stays
        pinned in DRAM until written (`pinned`: the caller pinned it)."""
        if not pinned:
            dram.pin_offset(offset)
        item = _Pending(tenant, session, bytes(key), offset)
        with self._mu:
            old = self._pending.get((tenant, item.key))
            if old is not None:
                old.superseded = True
            self._pending[(tenant, item.key)] = item
            self._queue.append(item)
        self.notify()

    # -- writes in place (RESERVE / COMMIT) --------------------------------------------------

    def reserve_dram(self, tenant: str, session: str, key: bytes,
                     frame_lengths: Sequence[int], *,
                     ttl_s: float | None = None) -> PutReservation:
        """Place a value's record in the tenant's DRAM tier for its writer to fill in
        place (the client, through its mapping of that tier): `commit_dram` stores it,
        `abort_dram` gives it up.  Where the frames go: `dram(tenant).payload_offset`."""
        dram = self.dram(tenant)
        with self._mu:
            self._bump_locked(tenant, key)
        return dram.reserve(tenant, session, key, frame_lengths, ttl_s=ttl_s)

    def try_reserve_dram(self, tenant: str, session: str, key: bytes,
                         frame_lengths: Sequence[int], *,
                         ttl_s: float | None = None) -> PutReservation | None:
        """`reserve_dram` if it needs no waiting (`Pool.try_reserve`), else None."""
        dram = self.dram(tenant)
        with self._mu:
            self._bump_locked(tenant, key)
        r = dram.try_reserve(tenant, session, key, frame_lengths, ttl_s=ttl_s)
        with self._mu:
            if r is None:
                self.counters.inline_reserve_fallbacks += 1
            else:
                self.counters.inline_reserves += 1
        return r

    def try_commit_dram(self, r: PutReservation, crcs: Sequence[int]) -> Tier | None:
        """`commit_dram` with the writer's CRCs if it needs no waiting: ack = memory (the
        media copy is written behind) and `Pool.try_complete_in_place`; else None, with
        nothing done."""
        if self.ack != "memory":
            return None
        dram = self.dram(r.tenant)
        with self._mu:  # before the commit, as commit_dram (a second bump is harmless)
            self._bump_locked(r.tenant, r.key)
        done = dram.try_complete_in_place(r, crcs, pin=True)
        if done is None:
            with self._mu:
                self.counters.inline_commit_fallbacks += 1
            return None
        res, upkeep = done
        with self._mu:
            self.counters.inline_commits += 1
            if upkeep:
                self._upkeep.add(r.tenant)
        if res.live:
            self._write_behind(dram, r.tenant, r.session, r.key, res.offset, pinned=True)
        elif upkeep:
            self.notify()
        return Tier.DRAM

    def commit_dram(self, r: PutReservation, *, crcs: Sequence[int] | None = None) -> Tier:
        """Store a reserved value whose frames were written in place: its CRCs are the
        writer's `crcs` or read from DRAM (no copy), and it reaches the media pool as a
        put does -- written behind (ack = memory) or before this returns (ack = media)."""
        dram = self.dram(r.tenant)
        with self._mu:
            self._bump_locked(r.tenant, r.key)
        if self.ack == "memory":
            res, _crcs = dram.complete_in_place(r, crcs)
            if res.live:
                self._write_behind(dram, r.tenant, r.session, r.key, res.offset)
            return Tier.DRAM
        at = dram.payload_offset(r)
        dram.pin_offset(at)  # the DRAM record stays put while the media copy is written
        try:
            res, crcs = dram.complete_in_place(r, crcs)
            if not res.live:
                # a later put, delete or purge of the key won (in DRAM, where the LSN was
                # taken): it must win on media too, so nothing is written there
                return Tier.DRAM
            try:
                self.media.put(r.tenant, r.session, r.key, dram.payload_views(r),
                               expiry_s=r.exp or None, crcs=crcs)
            except BaseException:
                # not acknowledged: no copy of it may be served either
                dram.delete(r.tenant, r.key)
                raise
        finally:
            dram.unpin_offset(at)
        return Tier.POOL

    def abort_dram(self, r: PutReservation) -> None:
        self.dram(r.tenant).abort(r)

    def writebehind_backlog(self) -> int:
        with self._mu:
            return len(self._queue)

    def flush_some(self, max_items: int = 16) -> int:
        """Write up to `max_items` pending DRAM values to the media pool; returns how many
        (the DRAM tiers' upkeep that commits on the event loop left undone runs first)."""
        with self._mu:
            upkeep, self._upkeep = self._upkeep, set()
        for tenant in upkeep:
            try:
                self.drams[tenant].clean_ahead()
            except StoreError as e:  # counted by the pool; the next commit asks again
                log.warning("DRAM tier of %s: cleaning ahead failed: %s", tenant, e)
        done = 0
        while done < max_items:
            with self._mu:
                if not self._queue:
                    break
                item = self._queue.popleft()
            self._flush(item)
            done += 1
        return done

    def flush_all(self) -> None:
        while self.flush_some(1024):
            pass

    def _flush(self, item: _Pending) -> None:
        dram = self.drams[item.tenant]
        try:
            if item.superseded or item.deleted:
                return
            try:
                with dram.borrow(item.tenant, item.key) as (h, frames):
                    if h.expiry_us and h.expiry_us / 1e6 <= self.media.clock():
                        return
                    # The DRAM record's frame table holds the frames' CRCs: the media
                    # record takes them over rather than computing them again.
                    self.media.put(item.tenant, h.session, item.key, frames,
                                   expiry_s=h.expiry_us / 1e6 if h.expiry_us else None,
                                   key_generation=h.key_generation, crcs=h.frame_crcs)
                    self.counters.writebehind_bytes += h.payload_len
            except NotFound:
                return  # deleted, purged or expired meanwhile
            except CorruptionError as e:
                # The tenant can write its own DRAM tier (RESERVE): a record it damaged is
                # dropped, not written on, and the daemon goes on.
                self.counters.writebehind_corrupt += 1
                log.error("write-behind of %s/%s skipped: %s", item.tenant, item.key.hex(), e)
                return
            with self._mu:
                if item.deleted:
                    # A delete or purge ran while we wrote: make sure it wins on media too.
                    self.media.delete(item.tenant, item.key)
            self.counters.writebehind_flushed += 1
        finally:
            with self._mu:
                if self._pending.get((item.tenant, item.key)) is item:
                    del self._pending[(item.tenant, item.key)]
            dram.unpin_offset(item.offset)

    # -- reads -------------------------------------------------------------------------------

    def get_dram_into(self, tenant: str, key: bytes, dest: Buffer, *,
                      frames: tuple[int, int] | None = None) -> GetResult:
        """A DRAM hit: one memcpy, cheap enough to run on the event loop. NotFound if not
        in DRAM."""
        r = self.dram(tenant).get_into(tenant, key, dest, frames=frames)
        self.counters.dram_hits += 1
        return r

    def map_dram(self, tenant: str, keys: Sequence[bytes],
                 frames: tuple[int, int] | None = None) -> list[tuple[int, int] | None]:
        """Pin each key held in the tenant's DRAM tier: (offset in its memfd, length), or
        None for a key not in DRAM.  Every pin must be released with `unmap_dram`."""
        dram = self.dram(tenant)
        out: list[tuple[int, int] | None] = []
        for k in keys:
            try:
                off, n, _fl = dram.map_value(tenant, k, frames)
            except NotFound:
                out.append(None)
                continue
            except BaseException:
                for m in out:
                    if m is not None:
                        dram.unpin_offset(m[0])
                raise
            out.append((off, n))
        hits = sum(m is not None for m in out)
        self.counters.dram_hits += hits
        self.counters.by_op["map"] = self.counters.by_op.get("map", 0) + hits
        return out

    def unmap_dram(self, tenant: str, offsets: Sequence[int]) -> None:
        dram = self.dram(tenant)
        for off in offsets:
            dram.unpin_offset(off)

    def get_into(self, tenant: str, key: bytes, dest: Buffer, *,
                 frames: tuple[int, int] | None = None,
                 dram_checked: bool = False) -> tuple[GetResult, Tier]:
        """`dram_checked`: the caller has just missed in DRAM (`get_dram_into`); the miss
        is not looked up, nor counted, a second time."""
        if not dram_checked:
            try:
                return self.get_dram_into(tenant, key, dest, frames=frames), Tier.DRAM
            except NotFound:
                pass
        k = (tenant, bytes(key))
        busy = self._start_media_read(k, wait_for_promotion=True)
        if busy is not None:
            # A prefetch is reading this value right now: wait for it rather than read the
            # same bytes off the media a second time.
            if busy.wait(SINGLE_FLIGHT_WAIT_S):
                try:
                    return self.get_dram_into(tenant, key, dest, frames=frames), Tier.DRAM
                except NotFound:
                    pass  # not promoted (DRAM full, or gone): read it below
            self._start_media_read(k, wait_for_promotion=False)
        version = self._version(tenant, key)
        try:
            r = self.media.get_into(tenant, key, dest, frames=frames)
        except NotFound:
            self.counters.misses += 1
            raise
        finally:
            with self._mu:
                self.interactive_media_reads -= 1
        self.counters.pool_hits += 1
        if frames is None:
            self._promote_from(tenant, key, dest, r, version)
        else:
            with self._mu:
                self._promote.append((tenant, bytes(key)))
            self.notify()
        return r, Tier.POOL

    def _start_media_read(self, k: tuple[str, bytes], *, wait_for_promotion: bool
                          ) -> threading.Event | None:
        """A GET is about to read `k` from the media: unless a promotion of it is under
        way (its event is returned, to wait for), count the read and remember when it
        came, in one step under the lock -- so a prefetch that looks after this sees the
        read and drops the key, and one that looked before is the promotion waited for."""
        with self._mu:
            busy = self._promoting.get(k) if wait_for_promotion else None
            if busy is not None:
                self.single_flight_waits += 1
                return busy
            self.interactive_media_reads += 1
            self._media_read_at[k] = time.monotonic()
            self._media_read_at.move_to_end(k)
            if len(self._media_read_at) > READ_MEMORY:
                self._media_read_at.popitem(last=False)
            return None

    def _promote_from(self, tenant: str, key: bytes, dest: Buffer, r: GetResult,
                      version: tuple[int, int]) -> None:
        """Cache a value just read from the media pool in DRAM, unless a write, delete or
        purge of the key came after `version` (taken before the read)."""
        try:
            info = self.media.stat(tenant, key)
        except NotFound:
            return
        mv = memoryview(dest).cast("B")
        views, pos = [], 0
        for n in r.frame_lengths:
            views.append(mv[pos:pos + n])
            pos += n
        ttl = info.expiry - self.media.clock() if info.expiry else None
        if (ttl is not None and ttl <= 0) or tenant not in self.drams:
            return
        dram = self.drams[tenant]
        with self._mu:
            if self._version_locked(tenant, key) != version:
                return  # what we read may be older than what the tiers hold now
            # The DRAM record's LSN is taken here, so a later PUT or DELETE of the key
            # (which bumps the version under this lock first) supersedes it; the copy
            # itself runs outside the lock, in parallel with other promotions and GETs.
            try:
                res = dram.reserve(tenant, info.session, key, [v.nbytes for v in views],
                                   ttl_s=ttl, key_generation=info.key_generation)
            except (PoolFullError, ValueTooLargeError):
                return
        # The media read checked these frames against its record's CRCs (GetResult.
        # frame_crcs): the DRAM record takes them over rather than computing them again.
        dram.complete(res, views, crcs=r.frame_crcs)
        with self._mu:
            self.counters.promotions += 1

    def promote_bytes(self, tenant: str, key: bytes, *,
                      unless_read_within_s: float | None = None) -> int:
        """Copy a value from the media pool into DRAM (prefetch), saying how much it moved:
        payload bytes, 0 if the value was in DRAM already (or another thread promoted it
        meanwhile), PROMOTE_ABSENT if it is on no tier, PROMOTE_SUPERSEDED if a GET read it
        from the media within `unless_read_within_s` (that GET's client has it: a second
        read would only take disk bandwidth from its other reads).  Safe from many threads
        at once: one of them reads a given value, the others wait for it."""
        dram = self.drams.get(tenant)
        if dram is None:
            return PROMOTE_ABSENT
        if dram.contains(tenant, key):
            return 0
        k = (tenant, bytes(key))
        with self._mu:
            read_at = self._media_read_at.get(k)
            if (unless_read_within_s is not None and read_at is not None
                    and time.monotonic() - read_at < unless_read_within_s):
                return PROMOTE_SUPERSEDED
            busy = self._promoting.get(k)
            if busy is None:
                self._promoting[k] = mine = threading.Event()
        if busy is not None:
            busy.wait(SINGLE_FLIGHT_WAIT_S)
            return 0
        try:
            try:
                info = self.media.stat(tenant, key)
            except NotFound:
                return PROMOTE_ABSENT
            buf = self._scratch(info.record_bytes)
            version = self._version(tenant, key)
            try:
                r = self.media.get_into(tenant, key, buf)
            except NotFound:
                return PROMOTE_ABSENT
            self._promote_from(tenant, key, buf, r, version)
            return r.nbytes
        finally:
            with self._mu:
                del self._promoting[k]
            mine.set()

    def _scratch(self, nbytes: int) -> memoryview:
        """This thread's reusable aligned buffer of at least `nbytes` (a fresh mapping per
        value would page-fault its way through every byte)."""
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = aligned_buffer(max(nbytes, 1 << 20))
            self._local.buf = buf
        return buf[:nbytes]

    def take_promotions(self, max_items: int = 256) -> list[tuple[str, bytes]]:
        """Values read from the pool in part (a frame range), to promote in the background."""
        with self._mu:
            n = min(max_items, len(self._promote))
            return [self._promote.popleft() for _ in range(n)]

    def session_keys(self, tenant: str, session: str) -> list[bytes]:
        return [e.key for e in self.media.entries(tenant, session)]

    def lookup(self, tenant: str, keys: Sequence[bytes]) -> tuple[int, npt.NDArray[np.uint8]]:
        """Longest present prefix and the tier holding each key (0 none, 1 DRAM, 2 pool)."""
        dram = self.drams.get(tenant)
        in_dram = dram.lookup_many(tenant, keys) if dram is not None else \
            np.zeros(len(keys), dtype=bool)
        in_pool = self.media.lookup_many(tenant, keys)
        tiers = np.where(in_dram, np.uint8(Tier.DRAM),
                         np.where(in_pool, np.uint8(Tier.POOL), np.uint8(Tier.NONE)))
        missing = np.flatnonzero(tiers == 0)
        return (int(missing[0]) if len(missing) else len(keys)), tiers.astype(np.uint8)

    def owners(self, tenant: str, keys: Sequence[bytes]) -> dict[bytes, str]:
        """Which *other* tenant holds each of `keys`, for those some other tenant holds.

        For the audit of cross-tenant attempts only: the asking client gets the same answer
        as for a key nobody holds."""
        out: dict[bytes, str] = {}
        if not keys:
            return out
        for other, dram in self.drams.items():
            if other == tenant:
                continue
            held = self.media.lookup_many(other, keys) | dram.lookup_many(other, keys)
            for k, h in zip(keys, held.tolist(), strict=True):
                if h:
                    out.setdefault(bytes(k), other)
        return out

    # -- deletes ---------------------------------------------------------------------------

    def delete(self, tenant: str, key: bytes) -> bool:
        with self._mu:
            self._bump_locked(tenant, key)
            item = self._pending.pop((tenant, bytes(key)), None)
            if item is not None:
                item.deleted = True
            a = tenant in self.drams and self.drams[tenant].delete(tenant, key)
            b = self.media.delete(tenant, key)
        return a or b

    def purge_session(self, tenant: str, session: str) -> int:
        with self._mu:
            self._epoch += 1
            for k, item in list(self._pending.items()):
                if item.tenant == tenant and item.session == session:
                    item.deleted = True
                    del self._pending[k]
            a = self.drams[tenant].purge_session(tenant, session) \
                if tenant in self.drams else 0
            b = self.media.purge_session(tenant, session)
        self.on_purge(tenant, session)
        return max(a, b)

    def purge_tenant(self, tenant: str) -> int:
        with self._mu:
            self._epoch += 1
            for k, item in list(self._pending.items()):
                if item.tenant == tenant:
                    item.deleted = True
                    del self._pending[k]
            a = self.drams[tenant].purge_tenant(tenant) if tenant in self.drams else 0
            b = self.media.purge_tenant(tenant)
        self.on_purge(tenant, None)
        return max(a, b)

    # -- introspection ---------------------------------------------------------------------------

    def media_health(self) -> dict[str, Any]:
        """The media pool's device: state, errors, reconnects (an nvmf pool says more)."""
        out = self.media.dev.health()
        if out is None:
            return {"kind": "file", "state": "live", "name": self.media.dev.name}
        out["name"] = self.media.dev.name
        return out

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "ack": self.ack,
            "dram": _sum_stats([p.stats() for p in self.drams.values()]),
            "dram_by_tenant": {t: p.stats() for t, p in self.drams.items()},
            "media": self.media.stats(),
            "media_device": self.media_health(),
            "tiers": {"dram_hits": c.dram_hits, "pool_hits": c.pool_hits, "misses": c.misses,
                      "promotions": c.promotions,
                      "single_flight_waits": self.single_flight_waits,
                      "writebehind_backlog": self.writebehind_backlog(),
                      "writebehind_flushed": c.writebehind_flushed,
                      "writebehind_bytes": c.writebehind_bytes,
                      "writebehind_fallbacks": c.writebehind_fallbacks,
                      "writebehind_corrupt": c.writebehind_corrupt,
                      "inline_reserves": c.inline_reserves,
                      "inline_reserve_fallbacks": c.inline_reserve_fallbacks,
                      "inline_commits": c.inline_commits,
                      "inline_commit_fallbacks": c.inline_commit_fallbacks},
        }


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One view of the per-tenant DRAM pools' stats: counts and bytes add up."""
    if not parts:
        return {}
    out: dict[str, Any] = {}
    for k, v in parts[0].items():
        vals = [p[k] for p in parts]
        if k == "device":
            out[k] = f"memfd x{len(parts)} (one per tenant)"
        elif k in ("segment_size", "write_amplification", "recovery_seconds"):
            out[k] = max(vals)
        elif isinstance(v, dict):
            out[k] = _sum_stats(vals)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = sum(vals)
        else:
            out[k] = v
    return out
