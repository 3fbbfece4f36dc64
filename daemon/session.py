"""One connected client: its rings, its arena, and the execution of its requests.

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
from collections.abc import Callable
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
from kvtier.daemon.pool import GetResult
from kvtier.daemon.prefetch import PrefetchScheduler
from kvtier.daemon.qos import QoS, QuotaExceeded
from kvtier.daemon.reuse import ReuseStats
from kvtier.daemon.tiers import TieredStore

log = logging.getLogger("kvtierd.session")

CQ_FULL_TIMEOUT_S = 30.0
MAX_MAPS = 1 << 16  # DRAM pins one client may hold at once
INLINE_MAX = 256 * 1024  # DRAM GETs up to this size complete on the event loop
INLINE_MAP_KEYS = 64  # ... and MAPs of up to this many keys (pure Python: a thread
# would only fight the event loop for the GIL)


class _Posted(Completion):
    """A completion a worker thread has already pushed to the ring: the task only records
    it."""

class DropClient(Exception):
    """The client broke the protocol; it is disconnected."""


@dataclass
class SessionResources:
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


class ClientSession:
    def __init__(self, *, client_id: int, tenant: str, uid: int, pid: int,
                 store: TieredStore, res: SessionResources, ring_entries: int,
                 inflight: int, io: IoScheduler,
                 record: Callable[[str, str, str, int, float], None],
                 stats: Callable[[], dict[str, Any]],
                 stalled_timeout_s: float = CQ_FULL_TIMEOUT_S,
                 audit: Callable[..., None] | None = None,
                 prefetch: PrefetchScheduler,
                 qos: QoS, reuse: ReuseStats) -> None:
        self.id = client_id
        self.tenant = tenant
        self.uid = uid
        self.pid = pid
        self.store = store
        self.res = res
        self.sq = Ring(memoryview(res.sq_map), SQE_SIZE)
        self.cq = Ring(memoryview(res.cq_map), CQE_SIZE)
        # The ring has one producer at a time: the trio thread, or a worker thread posting
        # a media GET's completion itself (_dispatch).
        self._cq_lock = threading.Lock()
        self.arena = memoryview(res.arena_map)
        self.ring_entries = ring_entries
        self._max_inflight = min(inflight, ring_entries)
        self._slots = trio.Semaphore(self._max_inflight)
        self._io = io
        self._record = record
        self._stats = stats
        self._stalled_timeout_s = stalled_timeout_s
        self._audit = audit or (lambda event, **fields: None)
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

    def ops_in_flight(self) -> int:
        return self._max_inflight - self._slots.value

    # -- the loop ----------------------------------------------------------------------------------

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
                posted = False
                while True:
                    try:
                        raw = self.sq.try_pop()
                    except ProtocolError as e:
                        raise DropClient(str(e)) from None
                    if raw is None:
                        break
                    # Cheap requests (NOP, DRAM hits) complete right here, without a task.
                    if self._inline(raw):
                        posted = True
                        if raw[0] == Op.MAP:  # a few ms of work: let the others run too
                            os.eventfd_write(self.res.cq_efd, 1)
                            posted = False
                            await trio.lowlevel.checkpoint()
                        continue
                    if posted:  # tell the client before anything here can wait
                        os.eventfd_write(self.res.cq_efd, 1)
                        posted = False
                    await self._slots.acquire()
                    nursery.start_soon(self._run_one, raw)
                if posted:
                    os.eventfd_write(self.res.cq_efd, 1)

    def _inline(self, raw: bytes) -> bool:
        """Complete a request synchronously if that is cheap; False: run it as a task."""
        op = raw[0]
        if op == Op.MAP:
            return self._inline_map(raw)
        if op not in (Op.NOP, Op.GET):
            return False
        if op == Op.GET and int.from_bytes(raw[24:32], "little") > INLINE_MAX:
            return False  # large copies run in parallel worker threads (numpy drops the GIL)
        t0 = time.perf_counter()
        try:
            req = decode_request(raw)
        except ProtocolError:
            return False
        tier = Tier.NONE
        if op == Op.NOP:
            comp = Completion(req.tag, Status.OK)
        else:
            try:
                key = self._key(req)
                dest = self._range(req.data_off, req.data_len, "destination")
                rng = None if req.frame_b == ALL_FRAMES else (req.frame_a, req.frame_b)
                r = self.store.get_dram_into(self.tenant, key, dest, frames=rng)
                self._frame_table(req, r.frame_lengths)
                self._reuse.read(self.tenant, [key])
            except NotFound:
                return False  # not in DRAM: the media path runs in a worker thread
            except (StoreError, ValueError) as e:
                comp = Completion(req.tag, _status_of(e))
            else:
                comp = Completion(req.tag, Status.OK, int(Tier.DRAM), r.nbytes,
                                  len(r.frame_lengths))
                tier = Tier.DRAM
        if not self._post(comp):
            return False
        self.ops += 1
        if comp.status != Status.OK:
            self.errors += 1
        self._record(Op(op).name.lower(), Status(comp.status).name.lower(), tier.name.lower(),
                     comp.result if comp.status == Status.OK else 0, time.perf_counter() - t0)
        return True

    def _post(self, comp: Completion) -> bool:
        """Push a completion if there is room (no eventfd write: the caller batches)."""
        try:
            with self._cq_lock:
                return self.cq.try_push(comp.encode())
        except ProtocolError as e:
            raise DropClient(str(e)) from None

    def _post_from_thread(self, comp: Completion) -> bool:
        """From a worker thread: push `comp` and wake the client; False (nothing done) if
        the ring is full or broken -- the task then completes it the usual way."""
        try:
            with self._cq_lock:
                if not self.cq.try_push(comp.encode()):
                    return False
        except ProtocolError:
            return False
        os.eventfd_write(self.res.cq_efd, 1)
        return True

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
        n = 0
        for i, m in enumerate(maps):
            if m is None:
                tab[i] = (NOT_MAPPED, 0)
            else:
                tab[i] = m
                self.maps[m[0]] += 1
                n += 1
        return Completion(req.tag, Status.OK, int(Tier.DRAM), n, len(keys))

    def _inline_map(self, raw: bytes) -> bool:
        """A MAP of up to INLINE_MAP_KEYS keys, all in DRAM, completes on the event loop.
        Pinning is pure Python under the pool lock: in worker threads the MAPs a loader
        submits together fought the event loop for the GIL, and its first (small) batch
        came back 1-15 ms late.  Anything else -- more keys, an absent key (audited), an
        error -- runs as a task."""
        t0 = time.perf_counter()
        try:
            req = decode_request(raw)
            if req.count > INLINE_MAP_KEYS:
                return False
            keys, table, rng = self._map_args(req)
            maps = self.store.map_dram(self.tenant, keys, rng)
        except (ProtocolError, StoreError, ValueError):
            return False
        pinned = [m[0] for m in maps if m is not None]
        if len(pinned) < len(maps):
            self.store.unmap_dram(self.tenant, pinned)
            return False
        comp = self._mapped(req, keys, table, maps)
        if not self._post(comp):
            self._unpin(pinned)  # the ring is full: the task path maps them again
            return False
        self.ops += 1
        self._record("map", "ok", "dram", comp.result, time.perf_counter() - t0)
        return True

    async def _run_one(self, raw: bytes) -> None:
        t0 = time.perf_counter()
        op_name, tier = "invalid", Tier.NONE
        try:
            try:
                req = decode_request(raw)
            except ProtocolError as e:
                tag = int.from_bytes(raw[8:16], "little")
                comp = Completion(tag, Status.INVALID)
                log.warning("client %d (%s): bad entry: %s", self.id, self.tenant, e)
            else:
                op_name = Op(req.op).name.lower() if req.op in Op._value2member_map_ else "bad"
                comp = await self._execute(req)
                tier = Tier(comp.flags) if comp.flags in (0, 1, 2) else Tier.NONE
            self.ops += 1
            if comp.status != Status.OK:
                self.errors += 1
            self._record(op_name, Status(comp.status).name.lower(), tier.name.lower(),
                         comp.result if comp.status == Status.OK else 0,
                         time.perf_counter() - t0)
            if not isinstance(comp, _Posted):
                await self._complete(comp)
        finally:
            self._slots.release()

    async def _complete(self, comp: Completion) -> None:
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

    async def _thread(self, fn: Callable[[], Any], cls: IoClass = IoClass.INTERACTIVE,
                      cost: int = MIN_COST, deadline: float | None = None) -> Any:
        return await self._io.run(cls, self.tenant, fn, cost=cost, deadline=deadline)

    # -- operations --------------------------------------------------------------------------------

    async def _execute(self, req: Request) -> Completion:
        try:
            return await self._dispatch(req)
        except (StoreError, ValueError) as e:
            st = _status_of(e)
            if st in (Status.CORRUPT, Status.IO_ERROR, Status.INTERNAL):
                log.error("client %d (%s): %s", self.id, self.tenant, e)
            elif isinstance(e, QuotaExceeded):
                log.warning("client %d: %s", self.id, e)
            return Completion(req.tag, st)

    async def _dispatch(self, req: Request) -> Completion:
        t = self.tenant
        if req.op == Op.NOP:
            return Completion(req.tag, Status.OK)
        if req.op == Op.PUT:
            key = self._key(req)
            if not req.session:
                raise InvalidArgument("PUT needs a session name")
            data = self._range(req.data_off, req.data_len, "data")
            views = self._frames(req, data)
            ttl = float(req.ttl) if req.ttl else None
            await self._qos.admit_put(t, req.data_len)
            await self._qos.throttle(t, req.data_len)
            tier = await self._thread(lambda: self.store.put(t, req.session, key, views,
                                                             ttl_s=ttl),
                                      IoClass.WRITE, req.data_len)
            self._reuse.put(t, req.session, key, req.data_len)
            if req.session == KEYS_SESSION:  # a wrapped tenant-scope data key (crypto.py)
                self._audit("data_key_stored", client=self.id, tenant=t, uid=self.uid,
                            pid=self.pid, key=key.hex())
            return Completion(req.tag, Status.OK, int(tier), req.data_len)
        if req.op == Op.GET:
            key = self._key(req)
            dest = self._range(req.data_off, req.data_len, "destination")
            rng = None if req.frame_b == ALL_FRAMES else (req.frame_a, req.frame_b)
            # A deadline (ttl, ms): not served by then, the GET fails with DEADLINE at once.
            deadline = trio.current_time() + req.ttl / 1000 if req.ttl else None
            await self._qos.throttle(t, 0)  # a request now; its bytes once known
            # Without a bandwidth limit to charge the bytes to first, the worker thread
            # posts the completion itself: the client does not wait for this task to be
            # scheduled again in a trio loop busy with other tenants' requests (under a
            # write storm that hop was 0.22 -> 0.63 ms of a GET's p99; test_isolation).
            direct = not self._qos.meters_bytes(t)

            def read() -> tuple[GetResult, Tier, _Posted | None]:
                got, tr = self.store.get_into(t, key, dest, frames=rng)
                if not direct:
                    return got, tr, None
                self._frame_table(req, got.frame_lengths)
                c = _Posted(req.tag, Status.OK, int(tr), got.nbytes, len(got.frame_lengths))
                return got, tr, (c if self._post_from_thread(c) else None)

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
        if req.op == Op.LOOKUP:
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
        if req.op == Op.DELETE:
            keys = self._keylist(req)
            gone = await self._thread(lambda: [self.store.delete(t, k) for k in keys])
            if not all(gone):
                self._audit_misses("delete", [k for k, g in zip(keys, gone, strict=True)
                                              if not g])
            return Completion(req.tag, Status.OK, 0, sum(gone))
        if req.op == Op.PURGE_SESSION:
            if not req.session:
                raise InvalidArgument("PURGE_SESSION needs a session name")
            n = await self._thread(lambda: self.store.purge_session(t, req.session))
            self._audit("purge_session", client=self.id, tenant=t, session=req.session,
                        uid=self.uid, pid=self.pid, values=n)
            return Completion(req.tag, Status.OK, 0, n)
        if req.op == Op.PREFETCH:
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
        if req.op == Op.MAP:
            keys, table, rng = self._map_args(req)
            maps = await self._thread(lambda: self.store.map_dram(t, keys, rng))
            if any(m is None for m in maps):
                self._audit_misses("map", [k for k, m in zip(keys, maps, strict=True)
                                           if m is None], absent=False)
            return self._mapped(req, keys, table, maps)
        if req.op == Op.UNMAP:
            if not 0 < req.count <= MAX_MAPS:
                raise InvalidArgument(f"unmap count {req.count} out of range")
            offs = np.frombuffer(self._range(req.data_off, req.count * 8, "offset list"),
                                 dtype="<u8").tolist()
            mine = self._unpin(offs)
            if len(mine) != len(offs):
                return Completion(req.tag, Status.INVALID, 0, len(mine))
            return Completion(req.tag, Status.OK, 0, len(mine))
        if req.op == Op.STATS:
            dest = self._range(req.data_off, req.data_len, "destination")
            st = await self._thread(self._stats)
            blob = json.dumps(st, default=str).encode()
            if len(blob) > dest.nbytes:
                return Completion(req.tag, Status.BUFFER_TOO_SMALL, 0, len(blob))
            dest[:len(blob)] = blob
            return Completion(req.tag, Status.OK, 0, len(blob))
        return Completion(req.tag, Status.BAD_OP)

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
            self._audit("cross_tenant_attempt", client=self.id, tenant=t, uid=self.uid,
                        pid=self.pid, op=op, owner=owner, keys=held)
        if self._misses_skipped:
            self._audit("cross_tenant_checks_skipped", client=self.id, tenant=t,
                        uid=self.uid, pid=self.pid, keys=self._misses_skipped)
            self._misses_skipped = 0

    def _frames(self, req: Request, data: memoryview) -> list[memoryview]:
        if req.count <= 1:
            return [data]
        if req.count > 65535:
            raise InvalidArgument(f"{req.count} frames; a value has at most 65535")
        # Python ints: a u64 (or i64) sum wraps, and [100 + 2^62, 2^62, 2^62, 2^62] would
        # "add up" to 100.
        lengths = np.frombuffer(self._range(req.aux_off, req.count * 8, "frame table"),
                                dtype="<u8").tolist()
        if sum(lengths) != data.nbytes:
            raise InvalidArgument("frame lengths do not add up to the data length")
        out, pos = [], 0
        for n in lengths:
            out.append(data[pos:pos + n])
            pos += n
        return out
