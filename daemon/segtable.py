"""The segment table: the state of every segment of one pool, and where a record goes.

A pool's device is cut into fixed-size segments (docs/FORMAT.md).  Per segment the pool
keeps one packed `checkpoint.SEG_TABLE` row -- state, kind, epoch, write pointer, times,
expiry bucket, highest LSN: what a checkpoint saves -- and, at run time only, its live
blocks (derived from the index), its pins (I/Os in flight: a pinned segment is not
cleaned, evicted or reused) and which segments are open for what: one DATA segment per
expiry bucket for puts, others for the cleaner's copies, one META segment for
tombstones.  The log's next LSN is here too: a segment's epoch is the LSN at its opening.

Placement is by expiry bucket (`place`), so that most segments die whole.  Opening a
segment needs a free one, and taking one may first have to make room (wait for or take a
checkpoint, clean, evict): that is the cleaner's business, so the caller hands in its
`take_free`.  Every method expects the pool's metadata lock held by the caller; opening
a segment writes its header to the device under it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon.blockdev import aligned_buffer
from kvtier.daemon.errors import ValueTooLargeError
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_types import now_us
from kvtier.daemon.segment import SegKind, SegmentHeader

NEVER = 0xFFFFFFFF
TakeFree = Callable[[str], int]  # purpose ("put", "clean", "meta") -> a FREE segment


class SegState(enum.IntEnum):
    FREE = 0
    OPEN = 1
    SEALED = 2
    PENDING_FREE = 3  # dead, reusable after the next checkpoint
    CHECKPOINT = 4


class SegmentTable:
    """Per-segment state of one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext) -> None:
        sb = ctx.sb
        self.ctx = ctx
        self.B = sb.block_size
        self.seg_blocks = sb.segment_size // self.B
        self.data_offset = sb.data_offset
        self.segment_size = sb.segment_size
        n = sb.segment_count
        self.segs = np.zeros(n, dtype=ckpt.SEG_TABLE)
        self.live = np.zeros(n, dtype=np.int64)  # live blocks per segment (from the index)
        self.pins = np.zeros(n, dtype=np.int64)  # I/Os in flight per segment
        self.open_data: dict[int, int] = {}  # bucket end (s) -> segment
        self.open_clean: dict[int, int] = {}
        self.meta_seg = -1
        self.next_lsn = 1
        # What a segment becomes when it dies: free at once where nothing outlives the
        # process, else free after the next checkpoint.
        self.dead = SegState.FREE if ctx.opt.volatile else SegState.PENDING_FREE

    # -- geometry -------------------------------------------------------------------------

    def offset(self, seg: int) -> int:
        """Byte offset of segment `seg` on the device."""
        return self.data_offset + seg * self.segment_size

    def seg_of_block(self, blk: npt.NDArray[np.uint64] | int) -> Any:
        """The segment of device block `blk` (an int, or an array of them)."""
        return (blk * self.B - self.data_offset) // self.segment_size

    def seg_of_offset(self, offset: int) -> int:
        return (offset - self.data_offset) // self.segment_size

    # -- the log's clock -------------------------------------------------------------------

    def take_lsn(self) -> int:
        lsn = self.next_lsn
        self.next_lsn += 1
        return lsn

    # -- free, dead and candidate segments -------------------------------------------------

    def free_unpinned(self) -> npt.NDArray[np.intp]:
        return np.flatnonzero((self.segs["state"] == SegState.FREE) & (self.pins == 0))

    def free_count(self) -> int:
        return int(np.count_nonzero((self.segs["state"] == SegState.FREE) & (self.pins == 0)))

    def any_pending_free(self) -> bool:
        return bool(np.any(self.segs["state"] == SegState.PENDING_FREE))

    def kill(self, seg: int) -> None:
        """`seg` holds nothing live any more: sealed, and dead (see `self.dead`)."""
        self.seal(seg)
        self.segs["state"][seg] = self.dead

    def retire_empty(self) -> None:
        """SEALED (or idle OPEN) data segments without live records die."""
        st = self.segs["state"]
        kind = self.segs["kind"]
        now = int(self.ctx.clock())
        dead = (self.live == 0) & (kind == SegKind.DATA) & (
            (st == SegState.SEALED) |
            ((st == SegState.OPEN) & (self.segs["bucket_end"] <= now)))
        for seg in np.flatnonzero(dead).tolist():
            self.seal(seg)
            st[seg] = self.dead
            self.ctx.counters.freed_segments += 1

    def clean_candidates(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """SEALED data segments worth cleaning, with their LFS cost-benefit scores."""
        live = self.live
        st, kind = self.segs["state"], self.segs["kind"]
        used = self.segs["used"].astype(np.int64) - 1
        ok = (st == SegState.SEALED) & (kind == SegKind.DATA) & (used > 0) & (self.pins == 0)
        u = np.where(ok, live / np.maximum(used, 1), 1.0)
        ok &= u <= self.ctx.opt.clean_max_utilization
        age = np.maximum(int(self.ctx.clock()) - self.segs["last_write"].astype(np.int64), 1)
        score = (1 - u) * age / (1 + u)
        cand = np.flatnonzero(ok)
        return cand, score[cand]

    def evictable(self) -> npt.NDArray[np.bool_]:
        """Which segments capacity eviction may take: unpinned open or sealed DATA."""
        st, kind = self.segs["state"], self.segs["kind"]
        ok: npt.NDArray[np.bool_] = ((st == SegState.SEALED) | (st == SegState.OPEN)) & \
            (kind == SegKind.DATA) & (self.pins == 0)
        return ok

    # -- opening, sealing, placing -----------------------------------------------------------

    def open_segment(self, kind: SegKind, bucket_end: int, purpose: str,
                     take_free: TakeFree) -> int:
        """Take a free segment for `purpose` and open it: a fresh epoch, its header written."""
        seg = take_free(purpose)
        epoch = self.take_lsn()
        clock = self.ctx.clock
        now = int(clock())
        hdr = SegmentHeader(kind, self.ctx.sb.uuid, epoch, now_us(clock), bucket_end, seg)
        buf = aligned_buffer(self.B)
        hdr.encode_into(buf)
        self.ctx.dev.writev(self.offset(seg), [buf])
        s = self.segs[seg]
        s["state"], s["kind"], s["epoch"], s["used"] = SegState.OPEN, kind, epoch, 1
        s["opened"], s["last_write"], s["bucket_end"], s["max_lsn"] = now, now, bucket_end, epoch
        return seg

    def seal(self, seg: int) -> None:
        if self.segs["state"][seg] == SegState.OPEN:
            self.segs["state"][seg] = SegState.SEALED
        for d in (self.open_data, self.open_clean):
            for b, s in list(d.items()):
                if s == seg:
                    del d[b]
        if self.meta_seg == seg:
            self.meta_seg = -1

    def bucket_end(self, expiry_s: int) -> int:
        """The end of the expiry bucket of a deadline (unix s; 0 = never expires)."""
        if expiry_s == 0:
            return NEVER
        w = self.ctx.opt.expiry_bucket_s
        return min((expiry_s // w + 1) * w, NEVER - 1)

    def place(self, nblocks: int, bucket_end: int, *, cleaner: bool,
              take_free: TakeFree) -> tuple[int, int]:
        """Choose (segment, block offset in it) for a record of `nblocks` blocks."""
        if nblocks > self.seg_blocks - 1:
            raise ValueTooLargeError(
                f"record of {nblocks * self.B} bytes does not fit in a segment of "
                f"{self.segment_size} bytes (raise segment_size)")
        opened = self.open_clean if cleaner else self.open_data
        seg = opened.get(bucket_end, -1)
        if seg < 0 and len(opened) >= self.ctx.opt.max_open_buckets:
            # Share the open segment that dies soonest after this record; else retire
            # the one that dies first.
            later = [b for b in opened if b >= bucket_end]
            if later:
                bucket_end = min(later)
                seg = opened[bucket_end]
            else:
                self.seal(opened[min(opened)])
        if seg >= 0 and int(self.segs["used"][seg]) + nblocks > self.seg_blocks:
            self.seal(seg)
            seg = -1
        if seg < 0:
            seg = self.open_segment(SegKind.DATA, bucket_end, "clean" if cleaner else "put",
                                    take_free)
            # Opening may have waited (for a checkpoint); another thread may have opened
            # a segment for this bucket meanwhile.
            other = opened.get(bucket_end, -1)
            if other >= 0:
                self.seal(other)
            opened[bucket_end] = seg
        at = int(self.segs["used"][seg])
        self.segs["used"][seg] = at + nblocks
        return seg, at

    def place_open(self, nblocks: int, bucket_end: int,
                   free_now: Callable[[], int] | None = None) -> tuple[int, int] | None:
        """`place` for a put without waiting: in the data segment open for `bucket_end`
        if it has room, else (with `free_now`, which answers a free segment or -1 where
        taking one would clean, evict or wait for a checkpoint) in a segment opened
        there and then; None otherwise, with nothing changed."""
        if nblocks > self.seg_blocks - 1:
            return None
        seg = self.open_data.get(bucket_end, -1)
        if seg >= 0 and int(self.segs["used"][seg]) + nblocks <= self.seg_blocks:
            at = int(self.segs["used"][seg])
            self.segs["used"][seg] = at + nblocks
            return seg, at
        if free_now is None or (seg < 0 and len(self.open_data) >= self.ctx.opt.max_open_buckets):
            return None
        new = free_now()
        if new < 0:
            return None
        if seg >= 0:
            self.seal(seg)
        self.open_data[bucket_end] = seg = self.open_segment(SegKind.DATA, bucket_end, "put",
                                                             lambda purpose: new)
        at = int(self.segs["used"][seg])
        self.segs["used"][seg] = at + nblocks
        return seg, at

    def place_meta(self, nblocks: int, take_free: TakeFree) -> tuple[int, int]:
        """(segment, block offset) for a tombstone of `nblocks` blocks, in the META segment."""
        seg = self.meta_seg
        if seg >= 0 and int(self.segs["used"][seg]) + nblocks > self.seg_blocks:
            self.seal(seg)
            seg = -1
        if seg < 0:
            seg = self.open_segment(SegKind.META, NEVER, "meta", take_free)
            if self.meta_seg >= 0:
                self.seal(self.meta_seg)
            self.meta_seg = seg
        at = int(self.segs["used"][seg])
        self.segs["used"][seg] = at + nblocks
        return seg, at

    def account_write(self, seg: int, lsn: int) -> None:
        s = self.segs[seg]
        s["last_write"] = int(self.ctx.clock())
        s["max_lsn"] = max(int(s["max_lsn"]), lsn)

    # -- views ---------------------------------------------------------------------------

    def snapshot(self) -> npt.NDArray[np.void]:
        """The table as a checkpoint saves it: PENDING_FREE segments are free there."""
        segs = self.segs.copy()
        segs["state"][segs["state"] == SegState.PENDING_FREE] = SegState.FREE
        return segs

    def describe(self, live: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
        """Every segment that is not free: state, live and dead bytes, expiry bucket, age."""
        now = int(self.ctx.clock())
        out = []
        for i, s in enumerate(self.segs):
            if int(s["state"]) == SegState.FREE:
                continue
            used = int(s["used"]) * self.B
            out.append({"id": i, "state": SegState(int(s["state"])).name.lower(),
                        "used_bytes": used, "live_bytes": int(live[i]) * self.B,
                        "dead_bytes": max(0, used - int(live[i]) * self.B),
                        "expiry_bucket_end": None if int(s["bucket_end"]) == 0xFFFFFFFF
                        else int(s["bucket_end"]),
                        "opened": int(s["opened"]), "last_write": int(s["last_write"]),
                        "age_s": max(0, now - int(s["opened"])) if int(s["opened"]) else 0,
                        "pinned": int(self.pins[i])})
        return out

    def state_counts(self) -> dict[str, int]:
        st = self.segs["state"]
        return {s.name.lower(): int(np.count_nonzero(st == s)) for s in SegState}
