"""Recovery: rebuilding a pool's in-memory state when it is opened (docs/FORMAT.md,
"Recovery").

The superblock copy to use is the valid one with the higher generation
(`read_superblocks`).  The checkpoint it names gives the index rows, name tables and
segment table; then every segment that was OPEN at the checkpoint, or was opened since
(its header's epoch is at least the checkpoint's LSN), is scanned block by block for
records whose header and frame CRCs check.  Those records are replayed in LSN order --
puts insert or replace, tombstones remove -- so the result is the state after the last
record that landed whole; torn records are counted and never served.  Scanned segments
are sealed, expired entries dropped, and a new checkpoint written when anything changed.
"""

from __future__ import annotations

import crc32c
import numpy as np

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon import record
from kvtier.daemon.blockdev import BlockDevice, aligned_buffer
from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import CorruptionError, FormatError, StoreError
from kvtier.daemon.index import split_key
from kvtier.daemon.iovec import read_pieces
from kvtier.daemon.pool_checkpoint import Checkpointer
from kvtier.daemon.pool_cleaner import Cleaner
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_types import RecoveryReport
from kvtier.daemon.record import Kind, RecordHeader
from kvtier.daemon.segment import SegKind, SegmentHeader, decode_segment_header
from kvtier.daemon.segtable import SegmentTable, SegState
from kvtier.daemon.superblock import (
    HEADER_ZONE,
    SB_B_OFFSET,
    SB_SIZE,
    Superblock,
    decode_superblock,
)

Found = list[tuple[int, int, int, RecordHeader]]  # (lsn, segment, block, header)


def read_superblocks(dev: BlockDevice) -> tuple[Superblock, str, dict[str, str]]:
    """The superblock to use, which copy it is, and why the other one is not (by copy)."""
    if dev.size < HEADER_ZONE:
        raise FormatError(f"{dev.name}: {dev.size} bytes is too small to hold a pool")
    good: list[tuple[Superblock, str]] = []
    errors: list[StoreError] = []
    by_copy: dict[str, str] = {}
    for name, off in (("A", 0), ("B", SB_B_OFFSET)):
        buf = aligned_buffer(SB_SIZE)
        dev.readv_into(off, [buf])
        try:
            good.append((decode_superblock(buf, where=f"{dev.name}: superblock {name}"), name))
        except StoreError as e:
            errors.append(e)
            by_copy[name] = str(e)
    if not good:
        # A version error says more than "corrupt"; "not a pool" says more than either.
        for cls_ in (type(e) for e in errors):
            if cls_.__name__ == "VersionError":
                raise next(e for e in errors if type(e) is cls_)
        if all(isinstance(e, FormatError) for e in errors):
            raise FormatError(f"{dev.name}: not a kvtier pool (no superblock found)")
        raise CorruptionError(f"{dev.name}: both superblock copies are damaged: "
                              + "; ".join(str(e) for e in errors))
    sb, which = max(good, key=lambda g: g[0].generation)
    if len(good) == 2 and good[0][0].generation != good[1][0].generation:
        other = "B" if which == "A" else "A"
        old = good[1][0] if which == "A" else good[0][0]
        by_copy[other] = (f"{dev.name}: superblock {other}: generation {old.generation} is "
                          f"older than copy {which}'s {sb.generation} (a checkpoint was cut "
                          f"off between its two copies)")
    return sb, which, by_copy


class Recovery:
    """One recovery of one pool (see the module docstring); `run` does it."""

    def __init__(self, ctx: PoolContext, table: SegmentTable, catalog: Catalog,
                 checkpointer: Checkpointer, cleaner: Cleaner, report: RecoveryReport) -> None:
        self.ctx = ctx
        self.table = table
        self.catalog = catalog
        self.checkpointer = checkpointer
        self.cleaner = cleaner
        self.report = report

    def run(self) -> None:
        ctx, table, rep = self.ctx, self.table, self.report
        dev, sb = ctx.dev, ctx.sb
        ckpt_lsn = sb.ckpt_lsn
        open_at_ckpt: dict[int, int] = {}
        if sb.ckpt_segments:
            state = self._read_checkpoint()
            table.next_lsn = state.next_lsn
            self.catalog.load(state)
            if len(state.segments) != len(table.segs):
                raise CorruptionError(f"{dev.name}: checkpoint segment table size differs")
            table.segs = state.segments
            st = table.segs["state"]
            st[st == SegState.CHECKPOINT] = SegState.FREE
            for seg in sb.ckpt_segments:
                st[seg] = SegState.CHECKPOINT
            for seg in np.flatnonzero(st == SegState.OPEN).tolist():
                open_at_ckpt[seg] = int(table.segs["used"][seg])
            rep.checkpoint_entries = len(state.rows)
            table.live = self.catalog.live_blocks()
        # Which segments hold records written after the checkpoint?
        hb = aligned_buffer(table.B)
        scan: list[tuple[int, int, SegmentHeader]] = []
        max_epoch = 0
        for seg in range(sb.segment_count):
            if table.segs["state"][seg] == SegState.CHECKPOINT:
                continue
            where = f"{dev.name}: segment {seg}"
            dev.readv_into(table.offset(seg), [hb])
            try:
                h = decode_segment_header(hb, where=where)
            except CorruptionError as e:
                if seg in open_at_ckpt:
                    raise
                rep.warnings.append(str(e))
                continue
            if h is None or h.pool_uuid != sb.uuid:
                continue
            max_epoch = max(max_epoch, h.epoch)
            if seg in open_at_ckpt and h.epoch == int(table.segs["epoch"][seg]):
                scan.append((seg, open_at_ckpt[seg], h))
            elif h.epoch >= ckpt_lsn and h.kind != SegKind.CHECKPOINT:
                scan.append((seg, 1, h))
        table.next_lsn = max(table.next_lsn, max_epoch + 1)
        found: Found = []
        for seg, start, h in scan:
            end = self._scan_segment(seg, start, h, ckpt_lsn, found)
            s = table.segs[seg]
            s["kind"], s["epoch"], s["used"] = h.kind, h.epoch, end
            s["state"] = SegState.SEALED
            s["opened"] = h.opened_us // 1_000_000
            s["bucket_end"] = h.bucket_end_s
            rep.segments_scanned += 1
        found.sort(key=lambda r: r[0])
        for lsn, seg, at, rh in found:
            self._replay(seg, at, rh)
            table.next_lsn = max(table.next_lsn, lsn + 1)
            s = table.segs[seg]
            s["max_lsn"] = max(int(s["max_lsn"]), lsn)
            s["last_write"] = max(int(s["last_write"]), rh.created_us // 1_000_000)
        rep.records_replayed = len(found)
        # Open segments are not reopened: new writes start in fresh segments.
        st = table.segs["state"]
        st[st == SegState.OPEN] = SegState.SEALED
        self.cleaner.sweep()
        if found or np.any(st == SegState.PENDING_FREE) or rep.torn_records:
            self.checkpointer.checkpoint()

    def _read_checkpoint(self) -> ckpt.CheckpointState:
        dev, sb, table = self.ctx.dev, self.ctx.sb, self.table
        B = table.B
        per = (table.seg_blocks - 1) * B
        buf = aligned_buffer(len(sb.ckpt_segments) * per)
        for i, seg in enumerate(sb.ckpt_segments):
            if not 0 <= seg < sb.segment_count:
                raise CorruptionError(f"{dev.name}: checkpoint segment {seg} out of range")
            n = min(per, sb.ckpt_len - i * per)
            n += -n % B
            read_pieces(dev, table.offset(seg) + B, [buf[i * per:i * per + n]])
        data = buf[:sb.ckpt_len]
        if crc32c.crc32c(data) != sb.ckpt_crc:
            raise CorruptionError(f"{dev.name}: checkpoint checksum mismatch")
        return ckpt.decode(data, where=f"{dev.name}: checkpoint")

    def _scan_segment(self, seg: int, start: int, sh: SegmentHeader, min_lsn: int,
                      found: Found) -> int:
        """Collect valid records of `seg` from block `start`; returns the write pointer.

        After an invalid record the scan steps block by block, so a record acknowledged
        after a torn neighbour (concurrent writes) is still found.
        """
        dev, table, rep = self.ctx.dev, self.table, self.report
        B = table.B
        base = table.offset(seg)
        nblk = table.seg_blocks - start
        if nblk <= 0:
            return table.seg_blocks
        buf = aligned_buffer(nblk * B)
        dev.readv_into(base + start * B, [buf])
        rep.bytes_scanned += nblk * B
        blk = 0
        end = start
        where = f"{dev.name}: segment {seg}"
        while blk < nblk:
            view = buf[blk * B:]
            if not record.peek_is_header(view):
                blk += 1
                continue
            try:
                h = record.decode(view, where=where)
            except (CorruptionError, FormatError, UnicodeDecodeError):
                rep.torn_records += 1  # a damaged header: step past it
                blk += 1
                continue
            if h.epoch != sh.epoch:
                blk += 1  # a record from an earlier life of this segment
                continue
            hb = record.header_blocks(h.nframes, h.tenant, h.session, B)
            rec_blocks = hb + -(-h.payload_len // B)
            ok = blk + rec_blocks <= nblk
            if ok:
                payload = buf[(blk + hb) * B:(blk + hb) * B + h.payload_len]
                offs = h.frame_offsets()
                try:
                    record.verify_frames(h, 0, [payload[offs[i]:offs[i + 1]]
                                                for i in range(h.nframes)], where=where)
                except CorruptionError:
                    ok = False
            if not ok:
                rep.torn_records += 1  # header landed, payload did not
                blk += 1
                continue
            if h.lsn >= min_lsn:
                found.append((h.lsn, seg, start + blk, h))
            blk += rec_blocks
            end = start + blk
        return end

    def _replay(self, seg: int, at: int, h: RecordHeader) -> None:
        cat = self.catalog
        if h.kind == Kind.PUT:
            B = self.table.B
            hb = record.header_blocks(h.nframes, h.tenant, h.session, B)
            nblocks = hb + -(-h.payload_len // B)
            cat.put_row(h.tenant, h.session, h.key, seg, at, nblocks, h.nframes,
                        h.key_generation, h.expiry_us // 1_000_000, h.created_us // 1_000_000)
            return
        t = cat.tenant_id(h.tenant, False)
        if t < 0:
            return
        if h.kind == Kind.DELETE:
            row = cat.index.find(t, *split_key(h.key))
            if row >= 0:
                cat.remove_rows(np.array([row], dtype=np.int64))
        elif h.kind == Kind.PURGE_SESSION:
            s = cat.session_id(h.session, False)
            if s >= 0:
                cat.remove_rows(cat.index.select(tenant=t, session=s))
        elif h.kind == Kind.PURGE_TENANT:
            cat.remove_rows(cat.index.select(tenant=t))
