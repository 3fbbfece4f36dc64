"""The reader: serving values out of a pool -- into a caller's buffer (`get_into`), as
views of device memory (`borrow`, `map_value`: memfd pools), as raw record bytes
(`read_raw`) -- and checking every live record (`scrub`).

Every read starts with the same step, `pin`: under the metadata lock, find the live entry
(NotFound if it is absent, deleted, purged or expired) and pin its segment, which keeps
the record where it is -- not cleaned, evicted or reused -- while its bytes are read
without the lock.  What is read is then checked against what the pin saw: the header's
CRC, that it names the expected tenant, key and segment epoch, and the CRC of every frame
returned (unless the pool's `verify_reads` is off).  A memory-backed device (`caps.
memory_view`) is read in place; any other one with vectored reads straight into the
caller's buffer, bouncing at most one block at each end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kvtier.daemon import record
from kvtier.daemon.blockdev import BlockDevice, aligned_buffer, as_bytes_view
from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import (
    BufferTooSmall,
    CorruptionError,
    InvalidArgument,
    NotFound,
    StoreError,
)
from kvtier.daemon.index import split_key
from kvtier.daemon.iovec import read_pieces
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_types import Buffer, GetResult
from kvtier.daemon.record import Kind, RecordHeader
from kvtier.daemon.segtable import SegmentTable, SegState


@dataclass(slots=True)
class Pinned:
    """A live value found and its segment pinned (`Reader.pin`; `Reader.unpin` undoes)."""
    row: int  # its index row
    loc: int  # the record's first device block
    nblocks: int  # the record's length in blocks
    seg: int  # the segment pinned
    epoch: int  # that segment's epoch, which the record's header must name


def check_header(buf: memoryview, where: str, tenant: str, key: bytes,
                 epoch: int) -> RecordHeader:
    """Decode (CRC-checked) the header at the start of `buf` and check that it is the PUT
    of (tenant, key) written in the segment's current epoch."""
    h = record.decode(buf, where=where)
    if h.kind != Kind.PUT or h.key != key or h.tenant != tenant or h.epoch != epoch:
        raise CorruptionError(f"{where}: header names another record")
    return h


def load_record(dev: BlockDevice, B: int, loc: int,
                nblocks: int) -> tuple[RecordHeader, memoryview]:
    """Read a whole record and verify header and frames; returns header and payload."""
    buf = aligned_buffer(nblocks * B)
    read_pieces(dev, loc * B, [buf])
    where = f"{dev.name}: record at {loc * B}"
    h = record.decode(buf, where=where)
    hb = record.header_blocks(h.nframes, h.tenant, h.session, B)
    if hb * B + h.payload_len > nblocks * B:
        raise CorruptionError(f"{where}: record longer than its index entry")
    payload = buf[hb * B: hb * B + h.payload_len]
    offs = h.frame_offsets()
    record.verify_frames(h, 0, [payload[offs[i]:offs[i + 1]] for i in range(h.nframes)],
                         where=where)
    return h, payload


class Reader:
    """Reads of one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext, table: SegmentTable, catalog: Catalog) -> None:
        self.ctx = ctx
        self.table = table
        self.catalog = catalog
        self.memory = ctx.dev.caps.memory_view

    # -- the one locate step --------------------------------------------------------------

    def pin(self, tenant: str, key: bytes, *, count_miss: bool = False) -> Pinned:
        """With the lock held: find the live value of (tenant, key) and pin its segment.
        NotFound (counted as a miss if `count_miss`) if it is not live."""
        cat = self.catalog
        row = cat.live_row(tenant, key)
        if row < 0:
            if count_miss:
                self.ctx.counters.misses += 1
            raise NotFound(f"{tenant}/{key.hex()}: not found")
        ix = cat.index
        loc, nblocks = int(ix.loc[row]), int(ix.blocks[row])
        table = self.table
        seg = int(table.seg_of_block(loc))
        table.pins[seg] += 1
        return Pinned(row, loc, nblocks, seg, int(table.segs["epoch"][seg]))

    def unpin(self, p: Pinned) -> None:
        with self.ctx.lock:
            self.table.pins[p.seg] -= 1

    def _where(self, tenant: str, key: bytes, p: Pinned) -> str:
        return f"{self.ctx.dev.name}: record {tenant}/{key.hex()} at {p.loc * self.table.B}"

    def _in_memory(self, p: Pinned, where: str, tenant: str, key: bytes,
                   frames: tuple[int, int] | None
                   ) -> tuple[memoryview, RecordHeader, int, int, int, list[int]]:
        """A pinned record of a memory-backed device, in place: the record's memory, its
        checked header, where its payload starts in the record, the frame range asked for
        (all if None; InvalidArgument if outside) and the frame offsets in the payload."""
        B = self.table.B
        rec = self.ctx.dev.view(p.loc * B, p.nblocks * B)
        h = check_header(rec, where, tenant, key, p.epoch)
        first, last = (0, h.nframes) if frames is None else frames
        if not 0 <= first <= last <= h.nframes:
            raise InvalidArgument(f"frame range [{first}, {last}) outside 0..{h.nframes}")
        base = record.header_blocks(h.nframes, h.tenant, h.session, B) * B
        return rec, h, base, first, last, h.frame_offsets()

    # -- reads ----------------------------------------------------------------------------

    def get_into(self, tenant: str, key: bytes, dest: Buffer, *,
                 frames: tuple[int, int] | None = None) -> GetResult:
        """Read the value (or frames [a, b) of it) into `dest` (see `Pool.get_into`)."""
        out = as_bytes_view(dest)
        if out.readonly:
            raise InvalidArgument("destination buffer is read-only")
        ctx, cat = self.ctx, self.catalog
        with ctx.lock:
            ctx.check_open()
            p = self.pin(tenant, key, count_miss=True)
            nframes = int(cat.index.nframes[p.row])
            session = cat.sessions[int(cat.index.session[p.row])]
        try:
            where = self._where(tenant, key, p)
            if self.memory:
                h, n, first, last, bounced = self._copy_from_memory(p, where, tenant, key,
                                                                    out, frames)
            else:
                h, n, first, last, bounced = self._read_from_device(
                    p, where, tenant, key, out, frames, nframes, session)
            fl = [int(x) for x in h.frame_lengths[first:last]]
            if ctx.opt.verify_reads:
                views, pos = [], 0
                for ln in fl:
                    views.append(out[pos:pos + ln])
                    pos += ln
                record.verify_frames(h, first, views, where=where)
        finally:
            self.unpin(p)
        with ctx.lock:
            ix = cat.index
            row = ix.find(cat.tenant_id(tenant, False), *split_key(key))
            if row >= 0 and int(ix.loc[row]) == p.loc:
                cat.touch(row)
            c = ctx.counters
            c.gets += 1
            c.bytes_read += n
            c.bounced_bytes += bounced
        crcs = h.frame_crcs if frames is None else h.frame_crcs[first:last]
        return GetResult(n, fl, h.key_generation, bounced, crcs)

    def _copy_from_memory(self, p: Pinned, where: str, tenant: str, key: bytes,
                          out: memoryview, frames: tuple[int, int] | None
                          ) -> tuple[RecordHeader, int, int, int, int]:
        """A get from a memory-backed pool: the header is parsed in place and the payload
        (or frame range) is one memcpy into `out`.  (header, bytes, first and last frame,
        bytes bounced)."""
        rec, h, base, first, last, offs = self._in_memory(p, where, tenant, key, frames)
        lo, hi = offs[first], offs[last]
        n = hi - lo
        if n > out.nbytes:
            raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for {n} bytes")
        if n:
            np.copyto(np.frombuffer(out, np.uint8, n),
                      np.frombuffer(rec, np.uint8, n, base + lo))
        return h, n, first, last, 0

    def _read_from_device(self, p: Pinned, where: str, tenant: str, key: bytes,
                          out: memoryview, frames: tuple[int, int] | None, nframes: int,
                          session: str) -> tuple[RecordHeader, int, int, int, int]:
        """A get from any other device: vectored reads, the payload straight into `out`.
        (header, bytes, first and last frame, bytes bounced)."""
        B = self.table.B
        dev = self.ctx.dev
        loc, nblocks = p.loc, p.nblocks
        hb = record.header_blocks(nframes, tenant, session, B)
        hbuf = aligned_buffer(hb * B)
        payload_blocks = nblocks - hb
        bounced = 0
        if frames is None:
            # One vectored read: header, payload straight into `dest`, last block bounced.
            body = (payload_blocks - 1) * B if payload_blocks else 0
            if out.nbytes >= payload_blocks * B:
                body = payload_blocks * B  # the whole payload lands in `dest`
            if out.nbytes < body:
                raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for value "
                                      f"of more than {body} bytes")
            tail = aligned_buffer(B) if body < payload_blocks * B else None
            pieces: list[memoryview | int] = [hbuf, out[:body]]
            if tail is not None:
                pieces.append(tail)
            bounced = read_pieces(dev, loc * B, pieces)
            h = check_header(hbuf, where, tenant, key, p.epoch)
            n = h.payload_len
            if n > out.nbytes:
                raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for value of "
                                      f"{n} bytes")
            if tail is not None:
                out[body:n] = tail[:n - body]
                bounced += n - body
            return h, n, 0, h.nframes, bounced
        a, b = frames
        if not 0 <= a <= b <= nframes:
            raise InvalidArgument(f"frame range [{a}, {b}) outside 0..{nframes}")
        read_pieces(dev, loc * B, [hbuf])
        h = check_header(hbuf, where, tenant, key, p.epoch)
        offs = h.frame_offsets()
        lo, hi = offs[a], offs[b]
        n = hi - lo
        if n > out.nbytes:
            raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for frames "
                                  f"[{a}, {b}) of {n} bytes")
        start = loc * B + hb * B + lo
        aligned_start = start - start % B
        head = start - aligned_start
        tailpad = -(start + n) % B
        pieces = [head, out[:n]] if head else [out[:n]]
        if tailpad:
            pieces.append(tailpad)
        if n:
            bounced = read_pieces(dev, aligned_start, pieces)
        return h, n, a, b, bounced

    @contextmanager
    def borrow(self, tenant: str, key: bytes) -> Iterator[tuple[RecordHeader, list[memoryview]]]:
        """Views of a value's frames in device memory (see `Pool.borrow`)."""
        if not self.memory:
            raise InvalidArgument(f"{self.ctx.dev.name}: borrow() needs a memory-backed pool")
        with self.ctx.lock:
            p = self.pin(tenant, key)
        try:
            rec, h, base, _first, _last, offs = self._in_memory(
                p, self._where(tenant, key, p), tenant, key, None)
            yield h, [rec[base + offs[i]:base + offs[i + 1]] for i in range(h.nframes)]
        finally:
            self.unpin(p)

    def map_value(self, tenant: str, key: bytes,
                  frames: tuple[int, int] | None = None) -> tuple[int, int, list[int]]:
        """Pin a value of a memory-backed pool; where its payload (or frames) lies (see
        `Pool.map_value`)."""
        ctx = self.ctx
        if not self.memory:
            raise InvalidArgument(f"{ctx.dev.name}: map needs a memory-backed pool")
        with ctx.lock:
            ctx.check_open()
            p = self.pin(tenant, key, count_miss=True)
            self.catalog.touch(p.row)
        try:
            _rec, h, base, first, last, offs = self._in_memory(
                p, self._where(tenant, key, p), tenant, key, frames)
            base += p.loc * self.table.B
        except BaseException:
            self.unpin(p)
            raise
        with ctx.lock:
            ctx.counters.gets += 1
            ctx.counters.bytes_read += offs[last] - offs[first]
        return (base + offs[first], offs[last] - offs[first],
                [int(x) for x in h.frame_lengths[first:last]])

    def read_raw(self, tenant: str, key: bytes, offset: int, size: int) -> bytes:
        """Bytes of a value's record exactly as stored (see `Pool.read_raw`)."""
        ctx = self.ctx
        B = self.table.B
        with ctx.lock:
            ctx.check_open()
            p = self.pin(tenant, key)
        try:
            end = min(offset + size, p.nblocks * B)
            if offset >= end:
                return b""
            a = offset // B * B
            b = -(-end // B) * B
            buf = aligned_buffer(b - a)
            ctx.dev.readv_into(p.loc * B + a, [memoryview(buf)])
            return bytes(memoryview(buf)[offset - a:end - a])
        finally:
            self.unpin(p)

    def pin_offset(self, offset: int) -> None:
        """Keep the segment holding byte `offset` from being cleaned, evicted or reused."""
        with self.ctx.lock:
            self.table.pins[self.table.seg_of_offset(offset)] += 1

    def unpin_offset(self, offset: int) -> None:
        with self.ctx.lock:
            self.table.pins[self.table.seg_of_offset(offset)] -= 1

    # -- scrubbing ------------------------------------------------------------------------

    def scrub(self) -> list[str]:
        """Read every live record and verify all its checksums; returns the problems.

        Records are read one at a time with their segment pinned, so the pool stays
        usable meanwhile.
        """
        ctx, table = self.ctx, self.table
        with ctx.lock:
            ix = self.catalog.index
            rows = ix.live_rows()
            todo = [(int(ix.loc[r]), int(ix.blocks[r])) for r in rows.tolist()]
        problems: list[str] = []
        for loc, nblocks in todo:
            with ctx.lock:
                seg = int(table.seg_of_block(loc))
                if table.segs["state"][seg] not in (SegState.OPEN, SegState.SEALED):
                    continue
                epoch = int(table.segs["epoch"][seg])
                table.pins[seg] += 1
            try:
                h, _ = load_record(ctx.dev, table.B, loc, nblocks)
                if h.epoch != epoch:
                    problems.append(f"{ctx.dev.name}: record at {loc * table.B} belongs to "
                                    f"another segment epoch")
            except StoreError as err:
                problems.append(str(err))
            finally:
                with ctx.lock:
                    table.pins[seg] -= 1
        return problems
