"""The writer: appending records to a pool -- puts (`reserve` then `complete`), and the
tombstones of deletes and purges.

A put is placed and given its LSN under the metadata lock (`reserve`: its order among
puts, deletes and purges of the key), written without it on its pinned segment, and
committed to the index under the lock again (`complete`) unless a later put, delete or
purge of its key came first (`PutsInFlight`).  A tombstone is small and written under the
lock, into the META segment.  After a put completes, and without the lock, the writer
does the pool's upkeep: a checkpoint every `checkpoint_every_bytes`, and cleaning ahead
when free segments run low.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kvtier.daemon import record
from kvtier.daemon.blockdev import aligned_buffer, as_bytes_view
from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import InvalidArgument, StoreError
from kvtier.daemon.index import split_key
from kvtier.daemon.iovec import write_pieces
from kvtier.daemon.pool_checkpoint import Checkpointer
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_inflight import PutsInFlight
from kvtier.daemon.pool_types import Buffer, PutReservation, PutResult, deadline, now_us
from kvtier.daemon.record import Kind, RecordHeader
from kvtier.daemon.segtable import SegmentTable

if TYPE_CHECKING:  # the cleaner writes records with `write_record` from here
    from kvtier.daemon.pool_cleaner import Cleaner

log = logging.getLogger("kvtierd.pool")


def write_record(ctx: PoolContext, table: SegmentTable, seg: int, at: int, h: RecordHeader,
                 payload: Sequence[memoryview] | None, hblocks: int) -> int:
    """Write header + payload at block `at` of `seg`; returns bytes bounced.  `payload`
    None: it is in place already (`Writer.complete_in_place`): the header and the last
    block's padding are written."""
    B = table.B
    hbuf = aligned_buffer(hblocks * B)
    record.encode_into(h, hbuf)
    pad = -h.payload_len % B
    off = table.offset(seg) + at * B
    if payload is None:
        if pad:
            ctx.dev.view(off + hblocks * B + h.payload_len, pad)[:] = bytes(pad)
        pieces: list[memoryview | int] = [hbuf]
    else:
        pieces = [hbuf, *payload]
        if pad:
            pieces.append(pad)
    bounced = write_pieces(ctx.dev, off, pieces)
    if ctx.opt.sync:
        ctx.dev.flush()
    return bounced


class Writer:
    """Puts and tombstones of one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext, table: SegmentTable, catalog: Catalog,
                 in_flight: PutsInFlight, checkpointer: Checkpointer,
                 cleaner: Cleaner) -> None:
        self.ctx = ctx
        self.table = table
        self.catalog = catalog
        self.in_flight = in_flight
        self.checkpointer = checkpointer
        self.cleaner = cleaner

    # -- puts -----------------------------------------------------------------------------

    def reserve(self, tenant: str, session: str, key: bytes, frame_lengths: Sequence[int], *,
                ttl_s: float | None = None, expiry_s: float | None = None,
                key_generation: int = 0, wait: bool = True) -> PutReservation | None:
        """The first half of a put (see `Pool.reserve`).  `wait=False`: None instead of
        waiting for the lock or placing the record anywhere but the segment open for it
        (opening one may clean, evict or checkpoint) -- for callers that must not block."""
        ctx = self.ctx
        ctx.check_open()
        record.validate_names(tenant, session)
        if len(key) not in record.KEY_LENGTHS:
            raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(key)}")
        if not 0 <= key_generation <= 0xFFFF:
            raise InvalidArgument(f"key generation {key_generation} out of range 0..65535")
        if not frame_lengths:
            raise InvalidArgument("a value needs at least one frame")
        if len(frame_lengths) > record.MAX_FRAMES:
            raise InvalidArgument(f"a value has at most {record.MAX_FRAMES} frames")
        now = ctx.clock()
        exp = deadline(now, ttl_s, expiry_s)
        payload_len = sum(frame_lengths)
        table, cat = self.table, self.catalog
        B = table.B
        hblocks = record.header_blocks(len(frame_lengths), tenant, session, B)
        nblocks = hblocks + -(-payload_len // B)
        if not ctx.lock.acquire(blocking=wait):
            return None
        try:
            ctx.check_open()
            if wait:
                seg, at = table.place(nblocks, table.bucket_end(exp), cleaner=False,
                                      take_free=self.cleaner.take_free_segment)
            else:
                # opening a segment is a header copy on a memory device, I/O elsewhere
                placed = table.place_open(nblocks, table.bucket_end(exp),
                                          self.cleaner.free_segment_now
                                          if ctx.dev.caps.memory_view else None)
                if placed is None:
                    return None
                seg, at = placed
            lsn = table.take_lsn()
            t = cat.tenant_id(tenant, True)
            sid = cat.session_id(session, True)
            ikey = (t, *split_key(key))
            self.in_flight.begin(ikey, lsn, sid)
            table.pins[seg] += 1
            epoch = int(table.segs["epoch"][seg])
        finally:
            ctx.lock.release()
        return PutReservation(tenant, session, bytes(key), key_generation,
                              list(frame_lengths), seg, at, lsn, epoch, ikey, hblocks,
                              nblocks, exp, now)

    def payload_offset(self, r: PutReservation) -> int:
        return self.table.offset(r.seg) + (r.at + r.hblocks) * self.table.B

    def payload_views(self, r: PutReservation) -> list[memoryview]:
        """Where a reserved record's frames go, in the device's memory (memory-backed
        devices only): the caller fills them, then `complete_in_place`."""
        ctx = self.ctx
        if not ctx.dev.caps.memory_view:
            raise InvalidArgument(f"{ctx.dev.name}: frames in place need a memory-backed pool")
        pos = self.payload_offset(r)
        out = []
        for n in r.frame_lengths:
            out.append(ctx.dev.view(pos, n))
            pos += n
        return out

    def try_complete_in_place(self, r: PutReservation, crcs: Sequence[int], *,
                              pin: bool = False) -> tuple[PutResult, bool] | None:
        """`complete_in_place` with the writer's CRCs, without blocking: on a memory
        device (the header write is a copy), when the lock is free and no checkpoint
        falls due; None, having done nothing, otherwise.  The upkeep a put does after
        it (cleaning ahead copies segments) is left out: the second value says whether
        it is due (`Pool.clean_ahead`, in a worker).  `pin`: a live result's segment is
        pinned too (as `pin_offset`), under the same lock."""
        ctx, table = self.ctx, self.table
        if not ctx.dev.caps.memory_view or len(crcs) != len(r.frame_lengths):
            return None
        if not ctx.lock.acquire(blocking=False):
            return None
        try:
            if self.checkpointer.due_after(r.nblocks * table.B):
                return None
            # under the lock, which is ours anyway: a copy of one header into memory
            res = self.complete(r, self.payload_views(r), crcs=list(crcs), in_place=True,
                                upkeep=False)
            if pin and res.live:
                table.pins[r.seg] += 1
            return res, self.cleaner.ahead_due()
        finally:
            ctx.lock.release()

    def complete_in_place(self, r: PutReservation, crcs: Sequence[int] | None = None
                          ) -> tuple[PutResult, list[int]]:
        """Commit a reserved record whose frames were written into `payload_views`: its
        CRCs are the writer's (`crcs`, one per frame) or taken from there (one read, no
        copy), and its header written.  Returns the result and the frames' CRCs."""
        views = self.payload_views(r)
        if crcs is None:
            crcs = record.frame_crcs(views)
        elif len(crcs) != len(views):
            raise InvalidArgument(f"{len(crcs)} CRCs for {len(views)} frames")
        crcs = list(crcs)
        return self.complete(r, views, crcs=crcs, in_place=True), crcs

    def abort(self, r: PutReservation) -> None:
        """Give up a reservation nothing was written for: its space stays dead (the
        cleaner takes it back), the key's older value stays."""
        ctx = self.ctx
        with ctx.lock:
            self.table.pins[r.seg] -= 1
            self.in_flight.end(r.ikey, r.lsn, True)  # nothing written: nothing doubtful
            self.table.account_write(r.seg, r.lsn)
            if self.in_flight.count == 0:
                ctx.idle.notify_all()

    def complete(self, r: PutReservation, frames: Sequence[Buffer], *,
                 crcs: Sequence[int] | None = None, in_place: bool = False,
                 upkeep: bool = True) -> PutResult:
        """Write a reserved record's frames and commit it (see `Pool.complete`);
        `in_place`: the frames are the record's own memory already (`payload_views`);
        `upkeep=False`: no checkpoint or cleaning ahead after it (the caller's)."""
        ctx, table = self.ctx, self.table
        views = [as_bytes_view(f) for f in frames]
        seg, at, lsn, ikey, nblocks = r.seg, r.at, r.lsn, r.ikey, r.nblocks
        ok = False
        try:
            if [v.nbytes for v in views] != r.frame_lengths:
                raise InvalidArgument("frames differ from the reserved frame lengths")
            h = RecordHeader(Kind.PUT, lsn, r.epoch, int(r.now * 1e6),
                             int(r.exp * 1e6) if r.exp else 0, r.key, r.tenant, r.session,
                             r.key_generation, r.frame_lengths,
                             record.frame_crcs(views) if crcs is None else list(crcs))
            # If the write fails the space stays allocated (dead): nothing is acknowledged.
            bounced = write_record(ctx, table, seg, at, h, None if in_place else views,
                                   r.hblocks)
            ok = True
        finally:
            with ctx.lock:
                table.pins[seg] -= 1
                current = self.in_flight.end(ikey, lsn, ok)
                replaced = False
                if ok and current:
                    replaced = self.catalog.put_row(r.tenant, r.session, r.key, seg, at,
                                                    nblocks, len(views), r.key_generation,
                                                    int(r.exp), int(r.now))
                table.account_write(seg, lsn)
                if self.in_flight.count == 0:
                    ctx.idle.notify_all()
        c = ctx.counters
        B = table.B
        with ctx.lock:
            c.puts += 1
            c.user_bytes += nblocks * B
            c.bounced_bytes += bounced
            due = self.checkpointer.note_written(nblocks * B)
        # Upkeep after the put, without the metadata lock held across I/O.  The put is
        # committed whatever happens here; a failure is counted and the next put retries.
        try:
            if upkeep:
                if due:
                    self.checkpointer.checkpoint_concurrently()
                self.cleaner.clean_ahead()
        except StoreError as e:
            with ctx.lock:
                c.upkeep_errors += 1
            log.warning("%s: upkeep after a put failed (the put stands): %s", ctx.dev.name, e)
        return PutResult(lsn, table.offset(seg) + at * B, nblocks * B, replaced, bounced,
                         current)

    # -- tombstones -----------------------------------------------------------------------

    def _append_meta(self, kind: Kind, tenant: str, session: str, key: bytes) -> None:
        """Write a tombstone (under the lock, which opening a META segment may release)."""
        ctx, table = self.ctx, self.table
        hb = record.header_blocks(0, tenant, session, table.B)
        seg, at = table.place_meta(hb, self.cleaner.take_free_segment)
        h = RecordHeader(kind, table.take_lsn(), int(table.segs["epoch"][seg]),
                         now_us(ctx.clock), 0, key, tenant, session)
        write_record(ctx, table, seg, at, h, [], hb)
        table.account_write(seg, h.lsn)
        ctx.counters.meta_bytes += hb * table.B
        self.checkpointer.note_written(hb * table.B)

    def _drop_rows(self, rows: npt.NDArray[np.int64]) -> None:
        self.catalog.remove_rows(rows)
        self.table.retire_empty()

    def delete(self, tenant: str, key: bytes) -> bool:
        """Delete one key durably; False if it was not there."""
        ctx, cat = self.ctx, self.catalog
        with ctx.lock:
            ctx.check_open()
            row = cat.live_row(tenant, key)
            t = cat.tenant_id(tenant, False)
            pending = t >= 0 and len(key) in record.KEY_LENGTHS and \
                self.in_flight.pending_key((t, *split_key(key)))
            if row < 0 and not pending:
                return False
            # Opening a META segment may wait (for a checkpoint) with the lock released:
            # what the tombstone covers is looked up again once its LSN is taken.
            self._append_meta(Kind.DELETE, tenant, "", bytes(key))
            row = cat.live_row(tenant, key)
            self.in_flight.cancel(t, key=split_key(key))
            if row >= 0:
                self._drop_rows(np.array([row], dtype=np.int64))
            ctx.counters.deletes += 1
            return row >= 0

    def purge_session(self, tenant: str, session: str) -> int:
        """Delete every value of a session durably; returns how many."""
        record.validate_names(tenant, session)
        ctx, cat = self.ctx, self.catalog
        with ctx.lock:
            ctx.check_open()
            t, s = cat.tenant_id(tenant, False), cat.session_id(session, False)
            if t < 0 or s < 0:
                return 0
            rows = cat.index.select(tenant=t, session=s)
            if len(rows) == 0 and not self.in_flight.pending_session(t, s):
                return 0
            self._append_meta(Kind.PURGE_SESSION, tenant, session, b"")
            rows = cat.index.select(tenant=t, session=s)  # again: see delete
            self.in_flight.cancel(t, session=s)
            self._drop_rows(rows)
            ctx.counters.purged_entries += len(rows)
            return len(rows)

    def purge_tenant(self, tenant: str) -> int:
        """Delete every value of a tenant durably; returns how many."""
        ctx, cat = self.ctx, self.catalog
        with ctx.lock:
            ctx.check_open()
            t = cat.tenant_id(tenant, False)
            if t < 0:
                return 0
            rows = cat.index.select(tenant=t)
            if len(rows) == 0 and not self.in_flight.pending_tenant(t):
                return 0
            self._append_meta(Kind.PURGE_TENANT, tenant, "", b"")
            rows = cat.index.select(tenant=t)  # again: see delete
            self.in_flight.cancel(t)
            self._drop_rows(rows)
            ctx.counters.purged_entries += len(rows)
            return len(rows)
