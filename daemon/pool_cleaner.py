"""The cleaner: getting a pool the free segments its writes need.

In order of cost: expired entries are dropped (`sweep`) and segments left without live
data die whole; dead segments become free at the next checkpoint; SEALED segments with
dead space are cleaned by LFS cost-benefit ((1-u)*age/(1+u)), their live records copied
forward with their LSNs into segments of the cleaner's own; and when nothing is left to
clean, capacity eviction drops a whole data segment (the one the pool's `evictor` picks;
LRU by default).  `take_free_segment` is where a writer that found no free segment for
its purpose gets one, with the reserve kept for tombstones and checkpoints
(docs/FORMAT.md, "Space management").  `clean_ahead` cleans one segment with its reads
and writes outside the metadata lock before puts run out of free segments.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import PoolFullError
from kvtier.daemon.pool_checkpoint import Checkpointer
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_reader import load_record
from kvtier.daemon.pool_writer import write_record
from kvtier.daemon.segtable import SegmentTable, SegState

PUT_RESERVE = 2  # free segments puts leave beyond a checkpoint's: one cleaner, one META
Victim = Callable[[npt.NDArray[np.int64]], int]  # candidate segments -> the one to evict


class Maintenance(threading.local):
    """Per thread: whether this thread is cleaning under the lock, so that it does not
    clean again from inside (per thread: opening a segment may wait with the lock
    released, and another thread's put must still be able to clean then)."""

    def __init__(self) -> None:
        self.active = False


class Cleaner:
    """Free space for one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext, table: SegmentTable, catalog: Catalog,
                 checkpointer: Checkpointer, victim: Victim) -> None:
        self.ctx = ctx
        self.table = table
        self.catalog = catalog
        self.checkpointer = checkpointer
        self.victim = victim
        self.maintenance = Maintenance()
        self.cleaning_ahead = False  # a put is cleaning a segment outside the lock

    # -- free segments --------------------------------------------------------------------

    def take_free_segment(self, purpose: str) -> int:
        """A FREE segment for `purpose` ("put", "clean", "meta" or "checkpoint").

        Puts leave room for a checkpoint plus one cleaner and one META segment; the
        cleaner and tombstones leave room for a checkpoint; a checkpoint takes any.
        """
        ctx, table, ckpt = self.ctx, self.table, self.checkpointer
        while True:
            free = table.free_unpinned()
            ck = ckpt.segments_needed()
            floor = {"put": ck + PUT_RESERVE, "clean": ck, "meta": ck,
                     "checkpoint": 0}[purpose]
            if len(free) > floor:
                return int(free[0])
            if purpose == "checkpoint":
                raise PoolFullError(f"{ctx.dev.name}: no free segment for a checkpoint")
            if ckpt.running:
                ctx.idle.wait()  # a checkpoint without the lock frees segments at its end
                continue
            if table.any_pending_free():
                ckpt.checkpoint()
                continue
            if purpose != "put" or self.maintenance.active:
                raise PoolFullError(f"{ctx.dev.name}: no free segment left for {purpose}")
            if self._clean_one() or (ctx.opt.evict and self._evict_one()):
                continue
            sb = ctx.sb
            raise PoolFullError(
                f"{ctx.dev.name}: pool full ({sb.segment_count} segments of "
                f"{sb.segment_size} bytes; nothing left to clean"
                + (" or evict)" if ctx.opt.evict else ", eviction is off)"))

    def sweep(self) -> int:
        """Drop expired entries; segments left without live data die (see `Pool.sweep`)."""
        ctx = self.ctx
        with ctx.lock:
            ctx.check_open()
            rows = self.catalog.index.select(expired_at=int(ctx.clock()))
            if len(rows):
                self.catalog.remove_rows(rows)
                ctx.counters.expired_entries += len(rows)
            self.table.retire_empty()
            return len(rows)

    # -- cleaning -------------------------------------------------------------------------

    def _clean_one(self) -> bool:
        """Clean the best segment by LFS cost-benefit ((1-u)*age/(1+u))."""
        cand, score = self.table.clean_candidates()
        if len(cand) == 0:
            return False
        try:
            self.clean_segment(int(cand[np.argmax(score)]))
        except PoolFullError:
            return False  # no room to copy into; the caller falls back to eviction
        return True

    def clean(self, max_segments: int = 1) -> int:
        """Run the cleaner on up to `max_segments` segments; returns how many it cleaned."""
        done = 0
        with self.ctx.lock:
            while done < max_segments and self._clean_one():
                done += 1
        return done

    @contextmanager
    def _maintaining(self) -> Iterator[None]:
        """This thread cleans under the lock: it must not start cleaning from inside."""
        before = self.maintenance.active
        self.maintenance.active = True
        try:
            yield
        finally:
            self.maintenance.active = before

    def free_segment_now(self) -> int:
        """Under the lock: a FREE segment a put may take without cleaning, evicting or
        waiting for a checkpoint (`take_free_segment`'s first case), else -1."""
        if self.checkpointer.running:
            return -1
        free = self.table.free_unpinned()
        return int(free[0]) if len(free) > self.checkpointer.segments_needed() + PUT_RESERVE \
            else -1

    def ahead_due(self) -> bool:
        """Under the lock: whether free segments run low enough for `clean_ahead` to
        clean one (and none is being cleaned ahead already)."""
        return not self.cleaning_ahead and self.table.free_count() <= self._ahead_floor()

    def _ahead_floor(self) -> int:
        return self.checkpointer.segments_needed() + PUT_RESERVE + self.ctx.opt.clean_ahead

    def clean_ahead(self) -> int:
        """Clean one segment, with its reads and writes outside the metadata lock, when
        free segments run low (see `Pool.clean_ahead`); returns 0 or 1."""
        ctx, table, cat = self.ctx, self.table, self.catalog
        with ctx.lock:
            if ctx.closed or not self.ahead_due():
                return 0
            cand, score = table.clean_candidates()
            if len(cand) == 0:
                return 0
            seg = int(cand[np.argmax(score)])
            self.cleaning_ahead = True
            table.pins[seg] += 1  # not cleaned, evicted or reused by anyone else meanwhile
            rows = cat.index.rows[cat.rows_in_segment(seg)]
            todo = [(int(r["tenant"]), int(r["k0"]), int(r["k1"]), int(r["loc"]),
                     int(r["blocks"])) for r in rows]
        moved = False
        try:
            for t, k0, k1, loc, nblocks in todo:
                if not self._move_unlocked(t, k0, k1, loc, nblocks):
                    return 0  # no room to copy into: leave the rest where it is
            moved = True
        finally:
            with ctx.lock:
                table.pins[seg] -= 1
                self.cleaning_ahead = False
                if moved and table.live[seg] == 0 and \
                        table.segs["state"][seg] == SegState.SEALED:
                    self._retire_cleaned(seg)
                    ctx.counters.cleaned_ahead += 1
                # Cleaned segments are reusable after the next checkpoint: take it here,
                # without the lock, rather than in the put that finds none free.
                due = table.free_count() <= self._ahead_floor() and table.any_pending_free()
        if due:
            self.checkpointer.checkpoint_concurrently()
        return 1 if moved else 0

    def _move_unlocked(self, t: int, k0: int, k1: int, loc: int, nblocks: int) -> bool:
        """Copy the record at `loc` forward if the index still points there: read and
        write without the lock (source and destination pinned), then repoint the index
        unless a put, delete or purge of the key came meanwhile (the copy is then dead).
        False if there is no room to copy into."""
        ctx, table = self.ctx, self.table
        h, payload = load_record(ctx.dev, table.B, loc, nblocks)
        hb = nblocks - -(-h.payload_len // table.B)
        with ctx.lock:
            ix = self.catalog.index
            row = ix.find(t, k0, k1)
            if row < 0 or int(ix.loc[row]) != loc:
                return True  # overwritten, deleted or purged since: nothing to move
            try:
                new_seg, at = table.place(nblocks, table.bucket_end(
                    int(h.expiry_us // 1_000_000)), cleaner=True,
                    take_free=self.take_free_segment)
            except PoolFullError:
                return False
            table.pins[new_seg] += 1
            # The copy keeps its LSN (replay orders it by when it was put).
            h.epoch = int(table.segs["epoch"][new_seg])
        written = False
        try:
            write_record(ctx, table, new_seg, at, h, [payload], hb)
            written = True
        finally:
            # One step with the unpin: unpinned first, the destination could be cleaned
            # (the copy is not in the index yet) and reused before the index pointed at it.
            with ctx.lock:
                table.pins[new_seg] -= 1
                self._moved((t, k0, k1), loc, nblocks, new_seg, at, h.lsn, written)
        return True

    def _moved(self, ident: tuple[int, int, int], loc: int, nblocks: int, new_seg: int,
               at: int, lsn: int, written: bool = True) -> None:
        """Under the lock, after the cleaner wrote a copy of the record at `loc` to block
        `at` of `new_seg`: account the write, and point the index at the copy if it still
        names `loc` -- opening a segment, or the copy itself, may have run with the lock
        released, and a put, delete or purge of the key meanwhile leaves the copy dead."""
        self.table.account_write(new_seg, lsn)
        self.ctx.counters.clean_bytes += nblocks * self.table.B
        self.checkpointer.note_written(nblocks * self.table.B)
        if written:
            self.catalog.repoint(ident, loc, nblocks, new_seg, at)

    def clean_segment(self, seg: int) -> None:
        """Copy the live records of `seg` forward, then retire it."""
        rows = self.catalog.rows_in_segment(seg)
        with self._maintaining():
            for row in rows.tolist():
                self._move_row(row, seg)
        self._retire_cleaned(seg)

    def _retire_cleaned(self, seg: int) -> None:
        """A segment whose live records the cleaner moved is dead (free once a checkpoint
        no longer needs it)."""
        self.table.kill(seg)
        self.ctx.counters.cleaned_segments += 1
        self.ctx.counters.freed_segments += 1

    def _move_row(self, row: int, seg: int) -> None:
        ctx, table = self.ctx, self.table
        ix = self.catalog.index
        loc, nblocks = int(ix.loc[row]), int(ix.blocks[row])
        if nblocks == 0 or int(table.seg_of_block(loc)) != seg:
            return  # gone (or its row reused) while an earlier move waited
        ident = (int(ix.tenant[row]), int(ix.k0[row]), int(ix.k1[row]))
        h, payload = load_record(ctx.dev, table.B, loc, nblocks)
        hb = nblocks - -(-h.payload_len // table.B)
        exp_s = int(h.expiry_us // 1_000_000)
        new_seg, at = table.place(nblocks, table.bucket_end(exp_s), cleaner=True,
                                  take_free=self.take_free_segment)
        # The copy keeps its LSN: replay must order it by when it was *put*, so that a
        # newer put of the same key always wins over a moved older copy.
        h.epoch = int(table.segs["epoch"][new_seg])
        write_record(ctx, table, new_seg, at, h, [payload], hb)
        self._moved(ident, loc, nblocks, new_seg, at, h.lsn)

    # -- eviction -------------------------------------------------------------------------

    def lru_victim(self, cand: npt.NDArray[np.int64]) -> int:
        """The candidate whose newest access is oldest; ties: the oldest segment."""
        cat, table = self.catalog, self.table
        ix = cat.index
        rows = ix.live_rows()
        recent = np.zeros(len(table.segs), dtype=np.int64)
        if len(rows):
            np.maximum.at(recent, cat.segments_of_rows(rows), ix.atime[rows].astype(np.int64))
        order = np.lexsort((table.segs["epoch"][cand], recent[cand]))
        return int(cand[order[0]])

    def _evict_one(self) -> bool:
        """Evict one data segment: the one `self.victim` picks."""
        ok = self.table.evictable()
        if not ok.any():
            return False
        cand = np.flatnonzero(ok)
        victim = self.victim(cand)
        if not ok[victim]:
            raise AssertionError(f"eviction policy chose segment {victim}, not a candidate")
        victims = self.catalog.rows_in_segment(victim)
        self.catalog.remove_rows(victims)
        self.table.kill(victim)
        c = self.ctx.counters
        c.evicted_entries += len(victims)
        c.evicted_segments += 1
        c.freed_segments += 1
        return True
