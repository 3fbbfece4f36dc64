"""The checkpointer: writing a pool's whole in-memory state (index rows, name tables,
segment table) into fresh CHECKPOINT segments and publishing it in both superblocks.

A checkpoint bounds recovery (only records written since are replayed) and is what makes
dead segments reusable: a segment that died stays PENDING_FREE until a checkpoint that no
longer points into it is published (docs/FORMAT.md, "Invariants").  Its state is taken
under the metadata lock with no put in flight; `checkpoint_concurrently` then writes and
flushes without the lock (reads and puts go on) and takes it again only to free what the
new checkpoint covers.  One checkpoint runs at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import crc32c
import numpy as np
import numpy.typing as npt

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon.blockdev import aligned_buffer
from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import PoolFullError
from kvtier.daemon.iovec import write_pieces
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_inflight import PutsInFlight
from kvtier.daemon.pool_types import now_us
from kvtier.daemon.segment import SegKind, SegmentHeader
from kvtier.daemon.segtable import NEVER, SegmentTable, SegState
from kvtier.daemon.superblock import SB_B_OFFSET, SB_SIZE


@dataclass(slots=True)
class _CheckpointPlan:
    """A checkpoint between taking its state (under the lock) and freeing what it covers."""
    data: bytes
    segments: list[int]
    epochs: list[int]
    lsn: int
    old_segments: list[int]
    pending: npt.NDArray[np.bool_]  # PENDING_FREE when the state was taken
    bytes_covered: int


class Checkpointer:
    """Checkpoints and superblocks of one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext, table: SegmentTable, catalog: Catalog,
                 in_flight: PutsInFlight) -> None:
        self.ctx = ctx
        self.table = table
        self.catalog = catalog
        self.in_flight = in_flight
        # The superblock copy that may not name the current checkpoint (older, damaged),
        # None while both do: it is written first, so that the copy recovery would use
        # is never the one being overwritten (two power losses in a row, the second
        # tearing the only good copy, left a pool that did not open).
        self.sb_stale: str | None = None
        self.running = False  # a checkpoint is between its state and its end
        self.bytes_since = 0  # record bytes written since the last checkpoint's state

    def note_written(self, nbytes: int) -> bool:
        """Under the lock: `nbytes` of records were written; True if a checkpoint is due."""
        self.bytes_since += nbytes
        return self.bytes_since >= self.ctx.opt.checkpoint_every_bytes

    def due_after(self, nbytes: int) -> bool:
        """Under the lock: whether `nbytes` more of records would make a checkpoint due."""
        return self.bytes_since + nbytes >= self.ctx.opt.checkpoint_every_bytes

    def segments_needed(self) -> int:
        """Segments the next checkpoint needs (an upper bound)."""
        cat, table = self.catalog, self.table
        ckpt_bytes = 4096 + cat.index.count * 52 + len(table.segs) * ckpt.SEG_TABLE.itemsize
        ckpt_bytes += sum(len(s.encode()) + 3 for s in cat.sessions)
        ckpt_bytes += sum(len(t.encode()) + 3 for t in cat.tenants)
        per = (table.seg_blocks - 1) * table.B
        return -(-ckpt_bytes // per)

    def write_superblocks(self) -> None:
        sb = self.ctx.sb
        dev = self.ctx.dev
        sb.generation += 1
        buf = aligned_buffer(SB_SIZE)
        sb.encode_into(buf)
        copies = {"A": 0, "B": SB_B_OFFSET}
        order = ("B", "A") if self.sb_stale == "B" else ("A", "B")
        for n, name in enumerate(order):
            dev.writev(copies[name], [buf])
            dev.flush()
            # the first written now names the newest checkpoint; the other may not
            self.sb_stale = order[1] if n == 0 else None

    def checkpoint(self) -> None:
        """Write the index and segment table, then point the superblocks at them.

        Afterwards PENDING_FREE segments are free, and META segments whose tombstones the
        checkpoint covers are released.  The metadata lock is held throughout; see
        `checkpoint_concurrently` for the version that writes without it.
        """
        ctx = self.ctx
        with ctx.lock:
            ctx.check_open()
            # Puts in flight have LSNs below the checkpoint's but are not in the index
            # yet: wait until they have committed; and for a checkpoint running without
            # the lock (it may start while this one waits).
            while self.in_flight.count or self.running:
                ctx.idle.wait()
            plan = self._begin()
            try:
                self._write(plan)
            finally:
                self.running = False
            self._end(plan)

    def checkpoint_concurrently(self) -> bool:
        """A checkpoint whose writes and flushes run without the metadata lock: the state
        is taken (and its segments reserved) under the lock, written, and only then are
        the segments that were PENDING_FREE at that moment freed.  Reads, puts and cleaning
        go on meanwhile.  False (nothing done) if another checkpoint is running."""
        ctx = self.ctx
        with ctx.lock:
            if ctx.closed or self.running:
                return False
            while self.in_flight.count:
                ctx.idle.wait()
                if ctx.closed or self.running:
                    return False
            plan = self._begin()
        try:
            self._write(plan)
        except BaseException:
            with ctx.lock:  # its segments stay reserved: the superblocks may name them
                self.running = False
                ctx.idle.notify_all()
            raise
        with ctx.lock:
            self._end(plan)
        return True

    def _state(self) -> ckpt.CheckpointState:
        rows, sessions = self.catalog.snapshot()
        return ckpt.CheckpointState(self.table.next_lsn, self.catalog.index.salt,
                                    list(self.catalog.tenants), sessions, rows,
                                    self.table.snapshot(), {})

    def _take_segment(self) -> int:
        """A FREE segment for the checkpoint: any will do (the reserve is for this)."""
        free = self.table.free_unpinned()
        if len(free) > 0:
            return int(free[0])
        raise PoolFullError(f"{self.ctx.dev.name}: no free segment for a checkpoint")

    def _begin(self) -> _CheckpointPlan:
        """Under the lock, with no put in flight: the state to write, its segments."""
        table = self.table
        data = ckpt.encode(self._state())
        per = (table.seg_blocks - 1) * table.B
        nseg = max(1, -(-len(data) // per))
        new: list[int] = []
        for _ in range(nseg):
            seg = self._take_segment()
            table.segs["state"][seg] = SegState.CHECKPOINT
            new.append(seg)
        lsn = table.next_lsn
        epochs = []
        for i, seg in enumerate(new):
            epochs.append(table.take_lsn())
            s = table.segs[seg]
            s["kind"], s["epoch"] = SegKind.CHECKPOINT, epochs[-1]
            s["used"] = 1 + -(-min(per, len(data) - i * per) // table.B)
        self.running = True
        return _CheckpointPlan(data, new, epochs, lsn, list(self.ctx.sb.ckpt_segments),
                               table.segs["state"] == SegState.PENDING_FREE,
                               self.bytes_since)

    def _write(self, plan: _CheckpointPlan) -> None:
        """The I/O: checkpoint segments, flush, both superblocks (no lock needed)."""
        ctx, table = self.ctx, self.table
        sb = ctx.sb
        per = (table.seg_blocks - 1) * table.B
        mv = memoryview(plan.data)
        for i, seg in enumerate(plan.segments):
            chunk = mv[i * per:(i + 1) * per]
            hdr = aligned_buffer(table.B)
            SegmentHeader(SegKind.CHECKPOINT, sb.uuid, plan.epochs[i],
                          now_us(ctx.clock), NEVER, seg).encode_into(hdr)
            pad = -chunk.nbytes % table.B
            tail: list[memoryview | int] = [pad] if pad else []
            write_pieces(ctx.dev, table.offset(seg), [hdr, chunk, *tail])
        ctx.dev.flush()
        sb.ckpt_lsn = plan.lsn
        sb.ckpt_len = len(plan.data)
        sb.ckpt_crc = crc32c.crc32c(plan.data)
        sb.ckpt_segments = plan.segments
        self.write_superblocks()

    def _end(self, plan: _CheckpointPlan) -> None:
        """Under the lock, once the superblocks name the new checkpoint: free what it no
        longer needs -- the old checkpoint, the segments that were PENDING_FREE when its
        state was taken (later ones wait for the next), covered META segments."""
        segs = self.table.segs
        st = segs["state"]
        for seg in plan.old_segments:
            st[seg] = SegState.FREE
        st[plan.pending & (st == SegState.PENDING_FREE)] = SegState.FREE
        covered = (segs["kind"] == SegKind.META) & (st == SegState.SEALED) & \
            (segs["max_lsn"] < plan.lsn)
        st[covered] = SegState.FREE
        self.bytes_since = max(0, self.bytes_since - plan.bytes_covered)
        self.in_flight.forget_doubtful_below(plan.lsn)
        self.ctx.counters.checkpoints += 1
        self.running = False
        self.ctx.idle.notify_all()
