"""One connected client: its rings, its arena, and the one path its requests take.

Every submission goes the same way, whatever its op, size or tier:

1. decoded once (`decode`): a malformed entry gets an INVALID completion;
2. admitted (`admit_now`, else `QoS.throttle` in the request's task): the tenant's IOPS
   and bandwidth buckets and, for PUT, its quota -- the requests served on the event loop
   pass exactly the same admission as those run in worker threads;
3. executed by its op's handler (`HANDLERS`); a handler in `INLINE` may complete a cheap
   request (NOP, a DRAM-hit GET, a DRAM MAP, a RESERVE in the open DRAM segment, a COMMIT
   carrying its CRCs with ack = memory -- metadata only, never waiting for a lock) on
   the event loop, or decline (None) and leave it to the task;
4. completed (`_finish`): counted, recorded in the metrics and posted once.

`RequestHandler` is steps 1-4 without rings (a test drives it with an arena of its own);
`ClientConnection` adds the submission and completion rings and their eventfds.
Everything a client sends is validated against *its own* arena before any byte moves:
ranges past the arena, bad ops, bad key lengths and malformed tables get an error
completion; a client that corrupts its ring counters, floods past its ring size or stops
draining completions is dropped.  Store calls run in worker threads under the daemon's
I/O limiter; no payload is copied into Python objects on the way.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from kvtier.client.protocol import (
    ALL_FRAMES,
    CQE_SIZE,
    KEYS_SESSION,
    MAP_ENTRY,
    NOT_MAPPED,
    SQE_SIZE,
    Completion,
    Flag,
    Op,
    ProtocolError,
    Request,
    Ring,
    Status,
    Tier,
    decode_request,
)
from kvtier.daemon.errors import (
    BufferTooSmall,
    CorruptionError,
    DeviceError,
    InvalidArgument,
    NotFound,
    PoolFullError,
    StoreError,
    ValueTooLargeError,
)
from kvtier.daemon.iosched import MIN_COST, DeadlineMissed, IoClass, IoScheduler
from kvtier.daemon.pool import GetResult, PutReservation
from kvtier.daemon.prefetch import PrefetchScheduler
from kvtier.daemon.qos import QoS, QuotaExceeded
from kvtier.daemon.reuse import ReuseStats
from kvtier.daemon.tiers import TieredStore

log = logging.getLogger("kvtierd.connection")

CQ_FULL_TIMEOUT_S = 30.0
MAX_MAPS = 1 << 16  # DRAM pins one client may hold at once
MAX_RESERVED = 256  # RESERVEs one client may hold uncommitted (each pins a DRAM segment)
INLINE_MAX = 256 * 1024  # DRAM GETs up to this size complete on the event loop
INLINE_MAP_KEYS = 64  # ... and MAPs of up to this many keys (pure Python: a thread
# would only fight the event loop for the GIL)


class _Posted(Completion):
    """A completion a worker thread has already pushed to the ring: the task only records
    it."""


class DropClient(Exception):
    """The client broke the protocol; it is disconnected."""


@dataclass
class ConnectionResources:
    sq_map: mmap.mmap
    cq_map: mmap.mmap
    arena_map: mmap.mmap
    sq_efd: int
    cq_efd: int

    def close(self) -> None:
        for fd in (self.sq_efd, self.cq_efd):
            try:
                os.close(fd)
            except OSError:
                pass
        for m in (self.sq_map, self.cq_map, self.arena_map):
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with the process


def _status_of(e: BaseException) -> Status:
    if isinstance(e, DeadlineMissed):
        return Status.DEADLINE
    if isinstance(e, NotFound):
        return Status.NOT_FOUND
    if isinstance(e, BufferTooSmall):
        return Status.BUFFER_TOO_SMALL
    if isinstance(e, ValueTooLargeError):
        return Status.TOO_LARGE
    if isinstance(e, PoolFullError):
        return Status.NO_SPACE
    if isinstance(e, CorruptionError):
        return Status.CORRUPT
    if isinstance(e, DeviceError):
        return Status.IO_ERROR
    if isinstance(e, InvalidArgument | ValueError):
        return Status.INVALID
    return Status.INTERNAL


MISS_CHECKS_QUEUED = 8  # requests' misses waiting for the cross-tenant check, per client
# Requests charged to a tenant's IOPS bucket (and, by their payload, its bandwidth bucket);
# the others (LOOKUP, DELETE, UNMAP, ...) pass the same admission at no charge.
DATA_OPS = frozenset({Op.GET, Op.PUT, Op.MAP, Op.RESERVE})
# Ops whose payload bytes are charged at admission (GET and MAP: by what they read)
WRITE_OPS = frozenset({Op.PUT, Op.RESERVE})
# Metric label values, resolved once (an enum lookup and a lower() per request showed in
# the profile of a 4 KiB GET).
_OP_NAMES = {o.value: o.name.lower() for o in Op}
_STATUS_NAMES = {st.value: st.name.lower() for st in Status}
_TIER_NAMES = {t.value: t.name.lower() for t in Tier}

Handler = Callable[["RequestHandler", Request], Awaitable[Completion]]
InlineHandler = Callable[["RequestHandler", Request], "Completion | None"]


class RequestHandler:
    """One client's requests against the store, from a decoded request to its completion:
    admission, its op's handler, counting.  No rings: `ClientConnection` adds them."""

    def __init__(self, *, client_id: int, tenant: str, uid: int, pid: int,
                 store: TieredStore, arena: memoryview, io: IoScheduler,
                 record: Callable[[str, str, str, int, float], None],
                 stats: Callable[[], dict[str, Any]],
                 audit: Callable[..., Any] | None = None,
                 audit_ok: Callable[[], bool] | None = None,
                 attempt: Callable[..., None] | None = None,
                 prefetch: PrefetchScheduler,
                 qos: QoS, reuse: ReuseStats) -> None:
        self.id = client_id
        self.tenant = tenant
        self.uid = uid
        self.pid = pid
        self.store = store
        self.arena = arena
        self._io = io
        self._record = record
        self._stats = stats
        self._audit = audit or (lambda event, **fields: None)
        # Whether the audit log can take a record now (what must be audited is refused
        # while it cannot), and where cross-tenant attempts go (rate-limited per tenant).
        self._audit_ok = audit_ok or (lambda: True)
        self._attempt = attempt or (lambda tenant, owner, op, keys, **who: self._audit(
            "cross_tenant_attempt", tenant=tenant, op=op, owner=owner, keys=keys, **who))
        # Misses to check for cross-tenant attempts, checked and audited by a task of their
        # own after the answer went out (a synchronous check per request was a timing
        # oracle on other tenants' keys): (op, keys, whether the keys may include this
        # tenant's own).  Bounded: what does not fit is counted and audited as a number.
        self._misses_in, self._misses_out = trio.open_memory_channel[
            tuple[str, list[bytes], bool]](MISS_CHECKS_QUEUED)
        self._misses_skipped = 0
        self._prefetch = prefetch
        self._qos = qos
        self._reuse = reuse
        self.ops = 0
        self.errors = 0
        self.maps: collections.Counter[int] = collections.Counter()  # MAP pins held
        # RESERVEs not yet committed, by the DRAM offset of their first frame
        self.reserved: dict[int, PutReservation] = {}
        # Requests (by id, while they run) whose inline GET found no DRAM copy: the media
        # path does not look again (nor count a second miss).
        self._dram_missed: set[int] = set()

    # -- steps 1-4 ---------------------------------------------------------------------------------

    @staticmethod
    def decode(raw: bytes) -> Request | Completion:
        """A submission entry, decoded once; an INVALID completion if it is malformed."""
        try:
            return decode_request(raw)
        except ProtocolError:
            return Completion(int.from_bytes(raw[8:16], "little"), Status.INVALID)

    def admit_now(self, req: Request) -> bool:
        """Admission without waiting: True if the tenant's buckets let `req` through now
        (and charged it), False if it must wait its turn (`_admit`, in its task)."""
        if req.op not in DATA_OPS:
            return True
        return self._qos.admit_now(self.tenant, req.data_len if req.op in WRITE_OPS else 0)

    async def _admit(self, req: Request) -> None:
        """Admission that waits its turn: the same buckets and charges as `admit_now`."""
        if req.op in DATA_OPS:
            await self._qos.throttle(self.tenant, req.data_len if req.op in WRITE_OPS else 0)

    def inline(self, req: Request) -> Completion | None:
        """Complete an admitted request on the event loop if its op allows and it is cheap;
        None: run it as a task (`run`, with admitted=True)."""
        fn = INLINE.get(req.op)
        if fn is None:
            return None
        t0 = time.perf_counter()
        comp = fn(self, req)
        if comp is not None:
            self._finish(req, comp, t0)
        return comp

    async def run(self, req: Request, *, admitted: bool) -> Completion:
        """Admit (unless done already), execute and count one request."""
        t0 = time.perf_counter()
        try:
            if not admitted:
                await self._admit(req)
            handler = HANDLERS.get(req.op)
            comp = (await handler(self, req) if handler is not None
                    else Completion(req.tag, Status.BAD_OP))
        except (StoreError, ValueError) as e:
            st = _status_of(e)
            if st in (Status.CORRUPT, Status.IO_ERROR, Status.INTERNAL):
                log.error("client %d (%s): %s", self.id, self.tenant, e)
            elif isinstance(e, QuotaExceeded):
                log.warning("client %d: %s", self.id, e)
            comp = Completion(req.tag, st)
        finally:
            self._dram_missed.discard(id(req))
        self._finish(req, comp, t0)
        return comp

    async def execute(self, req: Request) -> Completion:
        """The whole path for one decoded request, as the rings drive it (for callers with
        no rings: tests)."""
        admitted = self.admit_now(req)
        if admitted:
            comp = self.inline(req)
            if comp is not None:
                return comp
        return await self.run(req, admitted=admitted)

    def _finish(self, req: Request | None, comp: Completion, t0: float) -> None:
        ok = comp.status == Status.OK
        name = "invalid" if req is None else _OP_NAMES.get(req.op, "bad")
        tier = _TIER_NAMES[comp.flags] if ok and comp.flags in (Tier.DRAM, Tier.POOL) \
            else "none"
        self.ops += 1
        if not ok:
            self.errors += 1
        self._record(name, _STATUS_NAMES[comp.status], tier, comp.result if ok else 0,
                     time.perf_counter() - t0)

    # -- MAP pins ----------------------------------------------------------------------------------

    def release_reservations(self) -> None:
        """Give up the reservations this client left uncommitted (it went away)."""
        while self.reserved:
            _off, r = self.reserved.popitem()
            self.store.abort_dram(r)

    def release_maps(self) -> None:
        """Unpin whatever this client still holds mapped (it went away)."""
        offsets = [off for off, n in self.maps.items() for _ in range(n)]
        self.maps.clear()
        if offsets:
            self.store.unmap_dram(self.tenant, offsets)

    def _unpin(self, offsets: list[int]) -> list[int]:
        """Release one of this client's pins at each offset it holds; returns those."""
        mine = []
        for off in offsets:
            if self.maps[off] <= 0:
                continue
            self.maps[off] -= 1
            if not self.maps[off]:
                del self.maps[off]
            mine.append(off)
        self.store.unmap_dram(self.tenant, mine)
        return mine

    # -- validation helpers ------------------------------------------------------------------------

    def _range(self, off: int, length: int, what: str) -> memoryview:
        if off < 0 or length < 0 or off + length > self.arena.nbytes:
            raise InvalidArgument(f"{what} range [{off}, {off + length}) outside the arena "
                                  f"of {self.arena.nbytes} bytes")
        return self.arena[off:off + length]

    def _key(self, req: Request) -> bytes:
        if len(req.key) not in (16, 32):
            raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(req.key)}")
        return req.key

    def _keylist(self, req: Request) -> list[bytes]:
        if not req.flags & Flag.KEYLIST:
            return [self._key(req)]
        klen = len(req.key) if req.key else 0
        klen = klen or 16
        if req.count <= 0 or req.count > 1 << 20:
            raise InvalidArgument(f"key count {req.count} out of range")
        raw = bytes(self._range(req.data_off, req.count * klen, "key list"))
        return [raw[i * klen:(i + 1) * klen] for i in range(req.count)]

    def _frame_table(self, req: Request, lengths: list[int]) -> None:
        if req.count:
            table = self._range(req.aux_off, req.count * 8, "frame table")
            fl = np.frombuffer(table, dtype="<u8")
            n = min(req.count, len(lengths))
            fl[:n] = lengths[:n]

    def _map_args(self, req: Request) -> tuple[list[bytes], memoryview,
                                               tuple[int, int] | None]:
        keys = self._keylist(req)
        table = self._range(req.aux_off, len(keys) * MAP_ENTRY.size, "map table")
        held = sum(self.maps.values())
        if held + len(keys) > MAX_MAPS:
            raise InvalidArgument(f"{held} values mapped already; at most {MAX_MAPS} "
                                  f"(UNMAP some first)")
        rng = None if req.frame_b == ALL_FRAMES else (req.frame_a, req.frame_b)
        return keys, table, rng

    def _mapped(self, req: Request, keys: list[bytes], table: memoryview,
                maps: list[tuple[int, int] | None]) -> Completion:
        """Fill a MAP's table and hold its pins for this client."""
        self._reuse.read(self.tenant, [k for k, m in zip(keys, maps, strict=True)
                                       if m is not None])
        tab = np.frombuffer(table, dtype="<u8").reshape(len(keys), 2)
        n = nbytes = 0
        for i, m in enumerate(maps):
            if m is None:
                tab[i] = (NOT_MAPPED, 0)
            else:
                tab[i] = m
                self.maps[m[0]] += 1
                n += 1
                nbytes += m[1]
        self._qos.charge_bytes(self.tenant, nbytes)  # mapped bytes are read bytes
        return Completion(req.tag, Status.OK, int(Tier.DRAM), n, len(keys))

    async def _thread(self, fn: Callable[[], Any], cls: IoClass = IoClass.INTERACTIVE,
                      cost: int = MIN_COST, deadline: float | None = None) -> Any:
        return await self._io.run(cls, self.tenant, fn, cost=cost, deadline=deadline)

    def _post_direct(self, comp: Completion) -> bool:
        """From a worker thread: post `comp` to the client at once; False: not done (the
        task completes it the usual way).  No rings here: never."""
        return False

    # -- inline handlers (event loop; None: not here, run it as a task) ----------------------------

    def _inline_nop(self, req: Request) -> Completion | None:
        return Completion(req.tag, Status.OK)

    def _inline_get(self, req: Request) -> Completion | None:
        if req.data_len > INLINE_MAX:
            return None  # large copies run in parallel worker threads (numpy drops the GIL)
        try:
            key = self._key(req)
            dest = self._range(req.data_off, req.data_len, "destination")
            rng = None if req.frame_b == ALL_FRAMES else (req.frame_a, req.frame_b)
            r = self.store.get_dram_into(self.tenant, key, dest, frames=rng)
            self._frame_table(req, r.frame_lengths)
        except NotFound:
            self._dram_missed.add(id(req))  # _op_get does not look in DRAM again
            return None  # not in DRAM: the media path runs in a worker thread
        except (StoreError, ValueError) as e:
            return Completion(req.tag, _status_of(e))
        self._reuse.read(self.tenant, [key])
        self._qos.charge_bytes(self.tenant, r.nbytes)
        return Completion(req.tag, Status.OK, int(Tier.DRAM), r.nbytes, len(r.frame_lengths))

    def _inline_map(self, req: Request) -> Completion | None:
        """A MAP of up to INLINE_MAP_KEYS keys, all in DRAM, completes on the event loop.
        Pinning is pure Python under the pool lock: in worker threads the MAPs a loader
        submits together fought the event loop for the GIL, and its first (small) batch
        came back late.  Anything else -- more keys, an absent key (audited), an error --
        runs as a task."""
        if req.count > INLINE_MAP_KEYS:
            return None
        try:
            keys, table, rng = self._map_args(req)
            maps = self.store.map_dram(self.tenant, keys, rng)
        except (StoreError, ValueError):
            return None
        pinned = [m[0] for m in maps if m is not None]
        if len(pinned) < len(maps):
            self.store.unmap_dram(self.tenant, pinned)
            return None
        return self._mapped(req, keys, table, maps)

    # -- task handlers -----------------------------------------------------------------------------

    async def _op_nop(self, req: Request) -> Completion:
        return Completion(req.tag, Status.OK)

    async def _op_put(self, req: Request) -> Completion:
        t = self.tenant
        key = self._key(req)
        if not req.session:
            raise InvalidArgument("PUT needs a session name")
        data = self._range(req.data_off, req.data_len, "data")
        views = self._frames(req, data)
        ttl = float(req.ttl) if req.ttl else None
        if req.session == KEYS_SESSION and not await self._thread(self._audit_ok):
            # a tenant-scope data key is stored only on the record (docs/SECURITY.md)
            return Completion(req.tag, Status.DENIED)
        await self._qos.admit_put(t, req.data_len)
        tier = await self._thread(lambda: self.store.put(t, req.session, key, views,
                                                         ttl_s=ttl),
                                  IoClass.WRITE, req.data_len)
        self._reuse.put(t, req.session, key, req.data_len)
        if req.session == KEYS_SESSION:  # a wrapped tenant-scope data key (crypto.py)
            self._audit("data_key_stored", client=self.id, tenant=t, uid=self.uid,
                        pid=self.pid, key=key.hex())
        return Completion(req.tag, Status.OK, int(tier), req.data_len)

    def _inline_reserve(self, req: Request) -> Completion | None:
        """A RESERVE whose record fits the tenant's open DRAM segment, with the lock free
        and the quota's usage fresh, completes on the event loop (metadata only); else it
        runs as a task (`_op_reserve`: opening a segment may clean or evict)."""
        t = self.tenant
        try:
            key, lengths, ttl = self._reserve_args(req)
            charged = self._qos.try_admit_put(t, req.data_len)
            if charged is None:
                return None
            r = self.store.try_reserve_dram(t, req.session, key, lengths, ttl_s=ttl)
            if r is None:
                self._qos.refund_put(t, charged)
                return None
        except (StoreError, ValueError) as e:
            return Completion(req.tag, _status_of(e))
        return self._reserved(req, r)

    def _inline_commit(self, req: Request) -> Completion | None:
        """A COMMIT carrying its CRCs needs no pass over the frames: with ack = memory it
        completes on the event loop when the tenant's DRAM tier needs no waiting
        (`TieredStore.try_commit_dram`); else it runs as a task."""
        if not req.flags & Flag.CRCS or req.flags & Flag.ABORT:
            return None
        try:
            r, crcs = self._commit_args(req)
            assert crcs is not None
            # out of `reserved` first: if the commit raises, the pool ended it already
            del self.reserved[req.data_off]
            tier = self.store.try_commit_dram(r, crcs)
            if tier is None:  # nothing done: the task commits it
                self.reserved[req.data_off] = r
                return None
        except (StoreError, ValueError) as e:
            return Completion(req.tag, _status_of(e))
        nbytes = sum(r.frame_lengths)
        self._reuse.put(self.tenant, r.session, r.key, nbytes)
        return Completion(req.tag, Status.OK, int(tier), nbytes)

    def _reserve_args(self, req: Request) -> tuple[bytes, list[int], float | None]:
        """A RESERVE's key, frame lengths and TTL, checked (raises InvalidArgument)."""
        t = self.tenant
        key = self._key(req)
        if not req.session:
            raise InvalidArgument("RESERVE needs a session name")
        if req.session == KEYS_SESSION:
            raise InvalidArgument(f"session {KEYS_SESSION} is written with PUT only (its "
                                  f"records are audited)")
        if t not in self.store.drams:
            raise InvalidArgument(f"tenant {t} has no DRAM tier to reserve in: use PUT")
        if len(self.reserved) >= MAX_RESERVED:
            raise InvalidArgument(f"{MAX_RESERVED} reservations open already; COMMIT or "
                                  f"abort some first")
        lengths = self._frame_lengths(req, req.data_len)
        return key, lengths, float(req.ttl) if req.ttl else None

    def _reserved(self, req: Request, r: PutReservation) -> Completion:
        off = self.store.dram(self.tenant).payload_offset(r)
        self.reserved[off] = r
        return Completion(req.tag, Status.OK, int(Tier.DRAM), off, len(r.frame_lengths))

    def _commit_args(self, req: Request) -> tuple[PutReservation, list[int] | None]:
        """The reservation a COMMIT names and the CRCs it carries (CRCS), checked."""
        key = self._key(req)
        r = self.reserved.get(req.data_off)
        if r is None or r.key != key:
            raise InvalidArgument(f"no reservation of key {key.hex()} at {req.data_off}")
        if not req.flags & Flag.CRCS or req.flags & Flag.ABORT:
            return r, None
        n = len(r.frame_lengths)
        if req.count != n:
            raise InvalidArgument(f"COMMIT carries {req.count} CRCs for a value of {n} frames")
        # copied out of the arena now: the client may reuse the slot once answered
        return r, np.frombuffer(self._range(req.aux_off, 4 * n, "CRC table"),
                                dtype="<u4").tolist()

    async def _op_reserve(self, req: Request) -> Completion:
        """Place a value in this tenant's DRAM tier; the client writes its frames there
        through its mapping of the tier (no copy by the daemon), then COMMITs."""
        t = self.tenant
        key, lengths, ttl = self._reserve_args(req)
        await self._qos.admit_put(t, req.data_len)
        r = await self._thread(lambda: self.store.reserve_dram(t, req.session, key, lengths,
                                                               ttl_s=ttl), IoClass.WRITE)
        return self._reserved(req, r)

    async def _op_commit(self, req: Request) -> Completion:
        """Store (or with ABORT give up) the reservation at data_off, of this key."""
        key = self._key(req)
        r, crcs = self._commit_args(req)
        abort = bool(req.flags & Flag.ABORT)

        def finish() -> Tier:
            # Taken out of `reserved` only here: a COMMIT cancelled before its thread ran
            # leaves it for release_reservations.
            if self.reserved.pop(req.data_off, None) is not r:
                raise InvalidArgument(f"reservation at {req.data_off} committed already")
            if abort:
                self.store.abort_dram(r)
                return Tier.NONE
            return self.store.commit_dram(r, crcs=crcs)

        nbytes = sum(r.frame_lengths)
        tier = await self._thread(finish, IoClass.WRITE, nbytes)
        if abort:
            return Completion(req.tag, Status.OK)
        self._reuse.put(self.tenant, r.session, key, nbytes)
        return Completion(req.tag, Status.OK, int(tier), nbytes)

    async def _op_get(self, req: Request) -> Completion:
        t = self.tenant
        key = self._key(req)
        dest = self._range(req.data_off, req.data_len, "destination")
        rng = None if req.frame_b == ALL_FRAMES else (req.frame_a, req.frame_b)
        dram_checked = id(req) in self._dram_missed
        # A deadline (ttl, ms): not served by then, the GET fails with DEADLINE at once.
        deadline = trio.current_time() + req.ttl / 1000 if req.ttl else None
        # Without a bandwidth limit to charge the bytes to first, the worker thread posts
        # the completion itself: the client does not wait for this task to be scheduled
        # again in a trio loop busy with other tenants' requests (test_isolation).
        direct = not self._qos.meters_bytes(t)

        def read() -> tuple[GetResult, Tier, _Posted | None]:
            got, tr = self.store.get_into(t, key, dest, frames=rng, dram_checked=dram_checked)
            if not direct:
                return got, tr, None
            self._frame_table(req, got.frame_lengths)
            c = _Posted(req.tag, Status.OK, int(tr), got.nbytes, len(got.frame_lengths))
            return got, tr, (c if self._post_direct(c) else None)

        try:
            done: tuple[GetResult, Tier, _Posted | None] = await self._thread(
                read, IoClass.INTERACTIVE, req.data_len, deadline)
        except NotFound:
            self._audit_misses("get", [key])
            raise
        value, tier, posted = done
        self._reuse.read(t, [key])
        if posted is not None:
            return posted
        await self._qos.throttle_bytes(t, value.nbytes)
        self._frame_table(req, value.frame_lengths)
        return Completion(req.tag, Status.OK, int(tier), value.nbytes,
                          len(value.frame_lengths))

    async def _op_lookup(self, req: Request) -> Completion:
        t = self.tenant
        keys = self._keylist(req)
        out = self._range(req.aux_off, len(keys), "tier list")
        prefix, tiers = await self._thread(lambda: self.store.lookup(t, keys))
        out[:] = tiers.tobytes()
        if req.session:  # a turn of that session starts (reuse statistics)
            self._reuse.turn(t, req.session, keys, prefix)
        if prefix < len(keys):
            self._audit_misses("lookup", [k for k, tier in zip(keys, tiers.tolist(),
                                                              strict=True) if not tier])
        return Completion(req.tag, Status.OK, 0, prefix, len(keys))

    async def _op_delete(self, req: Request) -> Completion:
        t = self.tenant
        keys = self._keylist(req)
        gone = await self._thread(lambda: [self.store.delete(t, k) for k in keys])
        if not all(gone):
            self._audit_misses("delete", [k for k, g in zip(keys, gone, strict=True)
                                          if not g])
        return Completion(req.tag, Status.OK, 0, sum(gone))

    async def _op_purge_session(self, req: Request) -> Completion:
        t = self.tenant
        if not req.session:
            raise InvalidArgument("PURGE_SESSION needs a session name")
        n = await self._thread(lambda: self.store.purge_session(t, req.session))
        self._audit("purge_session", client=self.id, tenant=t, session=req.session,
                    uid=self.uid, pid=self.pid, values=n)
        return Completion(req.tag, Status.OK, 0, n)

    async def _op_prefetch(self, req: Request) -> Completion:
        t = self.tenant
        if req.flags & Flag.SESSION:
            if not req.session:
                raise InvalidArgument("PREFETCH of a session needs its name")
            keys = await self._thread(lambda: self.store.session_keys(t, req.session))
        else:
            keys = self._keylist(req)
        deadline = (req.ttl or 1000) / 1000.0
        self._reuse.expect(t, keys, self._reuse.clock() + deadline)
        r = await self._prefetch.hint(t, keys, deadline)
        n, met = r.promoted, r.met
        if not req.flags & Flag.SESSION:
            self._audit_misses("prefetch", keys, absent=False)
        return Completion(req.tag, Status.OK if met else Status.DEADLINE, 0, n, int(met))

    async def _op_map(self, req: Request) -> Completion:
        t = self.tenant
        keys, table, rng = self._map_args(req)
        maps = await self._thread(lambda: self.store.map_dram(t, keys, rng))
        if any(m is None for m in maps):
            self._audit_misses("map", [k for k, m in zip(keys, maps, strict=True)
                                       if m is None], absent=False)
        return self._mapped(req, keys, table, maps)

    async def _op_unmap(self, req: Request) -> Completion:
        if not 0 < req.count <= MAX_MAPS:
            raise InvalidArgument(f"unmap count {req.count} out of range")
        offs = np.frombuffer(self._range(req.data_off, req.count * 8, "offset list"),
                             dtype="<u8").tolist()
        mine = self._unpin(offs)
        if len(mine) != len(offs):
            return Completion(req.tag, Status.INVALID, 0, len(mine))
        return Completion(req.tag, Status.OK, 0, len(mine))

    async def _op_stats(self, req: Request) -> Completion:
        dest = self._range(req.data_off, req.data_len, "destination")
        st = await self._thread(self._stats)
        blob = json.dumps(st, default=str).encode()
        if len(blob) > dest.nbytes:
            return Completion(req.tag, Status.BUFFER_TOO_SMALL, 0, len(blob))
        dest[:len(blob)] = blob
        return Completion(req.tag, Status.OK, 0, len(blob))

    # -- cross-tenant checks -----------------------------------------------------------------------

    AUDIT_MISSES_MAX = 64  # keys checked per request for cross-tenant attempts

    def _audit_misses(self, op: str, missed: list[bytes], *, absent: bool = True) -> None:
        """Have every key this tenant asked for and another tenant holds audited.

        The client's answer does not change (a miss is a miss), and neither does its
        timing: the check runs after the answer, in `_check_misses`.  `absent=False`: some
        of `missed` may be this tenant's own (not in DRAM, say) and are sorted out there."""
        missed = missed[:self.AUDIT_MISSES_MAX]
        if not missed:
            return
        try:
            self._misses_in.send_nowait((op, missed, absent))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._misses_skipped += len(missed)

    async def _check_misses(self) -> None:
        """Check queued misses for other tenants' keys and audit each attempt; what the
        queue could not hold is audited as a count.  Whatever is queued when the client
        goes is checked before the task ends."""
        try:
            async for op, keys, absent in self._misses_out:
                try:
                    await self._thread(functools.partial(self._audit_attempts, op, keys,
                                                         absent), IoClass.BACKGROUND)
                except (StoreError, ValueError, OSError) as e:  # the answer is long gone
                    log.warning("client %d (%s): cross-tenant check of %d keys failed: %s",
                                self.id, self.tenant, len(keys), e)
        finally:
            while True:
                try:
                    op, keys, absent = self._misses_out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                try:
                    self._audit_attempts(op, keys, absent)
                except (StoreError, ValueError, OSError) as e:
                    log.warning("client %d (%s): cross-tenant check of %d keys failed: %s",
                                self.id, self.tenant, len(keys), e)
            if self._misses_skipped:
                self._audit("cross_tenant_checks_skipped", client=self.id, tenant=self.tenant,
                            uid=self.uid, pid=self.pid, keys=self._misses_skipped)
                self._misses_skipped = 0

    def _audit_attempts(self, op: str, keys: list[bytes], absent: bool) -> None:
        """(blocking) Audit each of `keys` that another tenant holds."""
        t = self.tenant
        if not absent:
            _, tiers = self.store.lookup(t, keys)
            keys = [k for k, tier in zip(keys, tiers.tolist(), strict=True) if not tier]
        by_owner: dict[str, list[str]] = {}
        for key, owner in self.store.owners(t, keys).items():
            by_owner.setdefault(owner, []).append(key.hex())
        for owner, held in by_owner.items():  # one record per owner, not per key
            self._attempt(t, owner, op, held, client=self.id, uid=self.uid, pid=self.pid)
        if self._misses_skipped:
            self._audit("cross_tenant_checks_skipped", client=self.id, tenant=t,
                        uid=self.uid, pid=self.pid, keys=self._misses_skipped)
            self._misses_skipped = 0

    def _frame_lengths(self, req: Request, total: int) -> list[int]:
        """The frame table of a PUT or RESERVE (count u64 lengths at aux_off, adding up
        to `total`; one frame of `total` bytes when count <= 1)."""
        if req.count <= 1:
            return [total]
        if req.count > 65535:
            raise InvalidArgument(f"{req.count} frames; a value has at most 65535")
        # Python ints: a u64 (or i64) sum wraps, and [100 + 2^62, 2^62, 2^62, 2^62] would
        # "add up" to 100.
        lengths: list[int] = np.frombuffer(self._range(req.aux_off, req.count * 8,
                                                       "frame table"), dtype="<u8").tolist()
        if sum(lengths) != total:
            raise InvalidArgument("frame lengths do not add up to the data length")
        return lengths

    def _frames(self, req: Request, data: memoryview) -> list[memoryview]:
        if req.count <= 1:
            return [data]
        lengths = self._frame_lengths(req, data.nbytes)
        out, pos = [], 0
        for n in lengths:
            out.append(data[pos:pos + n])
            pos += n
        return out


# Every op's handler; an op not here completes with BAD_OP.
HANDLERS: dict[int, Handler] = {
    Op.NOP: RequestHandler._op_nop, Op.PUT: RequestHandler._op_put,
    Op.GET: RequestHandler._op_get, Op.LOOKUP: RequestHandler._op_lookup,
    Op.DELETE: RequestHandler._op_delete, Op.PURGE_SESSION: RequestHandler._op_purge_session,
    Op.PREFETCH: RequestHandler._op_prefetch, Op.STATS: RequestHandler._op_stats,
    Op.MAP: RequestHandler._op_map, Op.UNMAP: RequestHandler._op_unmap,
    Op.RESERVE: RequestHandler._op_reserve, Op.COMMIT: RequestHandler._op_commit,
}
# The ops that may complete on the event loop when cheap (after the same admission).
INLINE: dict[int, InlineHandler] = {
    Op.NOP: RequestHandler._inline_nop, Op.GET: RequestHandler._inline_get,
    Op.MAP: RequestHandler._inline_map, Op.RESERVE: RequestHandler._inline_reserve,
    Op.COMMIT: RequestHandler._inline_commit,
}


class ClientConnection(RequestHandler):
    """A `RequestHandler` behind a client's shared-memory rings and eventfds."""

    def __init__(self, *, res: ConnectionResources, ring_entries: int, inflight: int,
                 stalled_timeout_s: float = CQ_FULL_TIMEOUT_S, **kw: Any) -> None:
        super().__init__(arena=memoryview(res.arena_map), **kw)
        self.res = res
        self.sq = Ring(memoryview(res.sq_map), SQE_SIZE)
        self.cq = Ring(memoryview(res.cq_map), CQE_SIZE)
        # The ring has one producer at a time: the trio thread, or a worker thread posting
        # a media GET's completion itself (_op_get).
        self._cq_lock = threading.Lock()
        self.ring_entries = ring_entries
        self._max_inflight = min(inflight, ring_entries)
        self._slots = trio.Semaphore(self._max_inflight)
        self._stalled_timeout_s = stalled_timeout_s

    def ops_in_flight(self) -> int:
        return self._max_inflight - self._slots.value

    async def serve(self) -> None:
        """Consume the submission ring until cancelled; raises DropClient on abuse."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_misses)
            while True:
                await trio.lowlevel.wait_readable(self.res.sq_efd)
                try:
                    os.eventfd_read(self.res.sq_efd)
                except BlockingIOError:
                    pass
                posted = False  # completions pushed that the client was not told of yet
                while True:
                    try:
                        raw = self.sq.try_pop()
                    except ProtocolError as e:
                        raise DropClient(str(e)) from None
                    if raw is None:
                        break
                    req = self.decode(raw)
                    if isinstance(req, Completion):
                        log.warning("client %d (%s): bad entry", self.id, self.tenant)
                        self._finish(None, req, time.perf_counter())
                        await self._complete(req)
                        continue
                    admitted = self.admit_now(req)
                    if admitted:
                        comp = self.inline(req)
                        if comp is not None and self._post(comp):
                            posted = True
                            if req.op == Op.MAP:  # a few ms of work: let the others run
                                os.eventfd_write(self.res.cq_efd, 1)
                                posted = False
                                await trio.lowlevel.checkpoint()
                            continue
                        if comp is not None:  # the ring is full: the task posts it
                            if posted:
                                os.eventfd_write(self.res.cq_efd, 1)
                                posted = False
                            await self._complete(comp)
                            continue
                    if posted:  # tell the client before anything here can wait
                        os.eventfd_write(self.res.cq_efd, 1)
                        posted = False
                    await self._slots.acquire()
                    nursery.start_soon(self._run_one, req, admitted)
                if posted:
                    os.eventfd_write(self.res.cq_efd, 1)

    async def _run_one(self, req: Request, admitted: bool) -> None:
        try:
            comp = await self.run(req, admitted=admitted)
            if not isinstance(comp, _Posted):
                await self._complete(comp)
        finally:
            self._slots.release()

    def _post(self, comp: Completion) -> bool:
        """Push a completion if there is room (no eventfd write: the caller batches)."""
        try:
            with self._cq_lock:
                return self.cq.try_push(comp.encode())
        except ProtocolError as e:
            raise DropClient(str(e)) from None

    def _post_direct(self, comp: Completion) -> bool:
        try:
            with self._cq_lock:
                if not self.cq.try_push(comp.encode()):
                    return False
        except ProtocolError:
            return False
        os.eventfd_write(self.res.cq_efd, 1)
        return True

    async def _complete(self, comp: Completion) -> None:
        """Post `comp`, waiting (bounded) for room in the completion ring."""
        data = comp.encode()
        deadline = trio.current_time() + self._stalled_timeout_s
        while True:
            try:
                with self._cq_lock:
                    pushed = self.cq.try_push(data)
            except ProtocolError as e:
                raise DropClient(str(e)) from None
            if pushed:
                break
            if trio.current_time() > deadline:
                raise DropClient("completion ring full: the client stopped draining it")
            await trio.sleep(0.0005)
        os.eventfd_write(self.res.cq_efd, 1)
