"""A pool: a log-structured store of KV values on one block device.

Layout and invariants are specified in docs/FORMAT.md; the short version:

* Two superblock copies, then fixed-size segments.  A segment is opened by writing its
  header (with a fresh *epoch*), filled by appending records, sealed, and eventually freed
  whole: by expiry (records are placed by expiry bucket, so most segments die whole), by
  cleaning (live records copied forward, cost-benefit choice), or by capacity eviction.
* Every record gets a log sequence number (LSN).  Deletes and purges are tombstone
  records in META segments.  Recovery loads the latest checkpoint (index + segment table)
  and replays, in LSN order, every record written since -- CRC-verified; torn records are
  skipped and never served.
* A segment freed after the latest checkpoint stays PENDING_FREE until the next
  checkpoint, so a checkpoint never points into reused space.

The class is synchronous and thread-safe: each method does its own blocking I/O, and
many threads may call it at once (the trio daemon calls it through `trio.to_thread` with
an explicit limiter).  Metadata changes happen under one lock; payload reads and writes
happen outside it, on segments *pinned* so that nothing cleans, evicts or reuses them
meanwhile.  A put in flight is superseded by a later put, delete or purge of its key;
checkpoints wait until no put is in flight.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import crc32c
import numpy as np
import numpy.typing as npt

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon import record
from kvtier.daemon.blockdev import BlockDevice, aligned_buffer, as_bytes_view
from kvtier.daemon.errors import (
    BufferTooSmall,
    CorruptionError,
    FormatError,
    InvalidArgument,
    NotFound,
    PoolFullError,
    StoreError,
    ValueTooLargeError,
)
from kvtier.daemon.index import Index, split_key, split_keys
from kvtier.daemon.iovec import read_pieces, write_pieces
from kvtier.daemon.record import Kind, RecordHeader
from kvtier.daemon.segment import SegKind, SegmentHeader, decode_segment_header
from kvtier.daemon.superblock import (
    HEADER_ZONE,
    SB_B_OFFSET,
    SB_SIZE,
    Superblock,
    decode_superblock,
)

NEVER = 0xFFFFFFFF
MIN_SEGMENT = 64 * 1024
MAX_SEGMENT = 1024 * 1024 * 1024
DEFAULT_SEGMENT = 64 * 1024 * 1024
Clock = Callable[[], float]
Buffer = Any  # anything exposing the buffer protocol (bytes, memoryview, numpy array, mmap)


T = TypeVar("T")
log = logging.getLogger("kvtierd.pool")
PUT_RESERVE = 2  # free segments puts leave beyond a checkpoint's: one cleaner, one META
STATS_LOCK_WAIT_S = 0.25  # how long stats() waits for the lock before reading without it


class SegState(enum.IntEnum):
    FREE = 0
    OPEN = 1
    SEALED = 2
    PENDING_FREE = 3  # dead, reusable after the next checkpoint
    CHECKPOINT = 4


@dataclass
class PoolOptions:
    expiry_bucket_s: int = 300  # records whose deadlines share a bucket share segments
    max_open_buckets: int = 8  # open DATA segments at once
    clean_max_utilization: float = 0.9  # never clean segments fuller than this
    clean_ahead: int = 2  # free segments above the puts' floor at which a finished put
    #                       cleans one segment without the metadata lock (see clean_ahead)
    checkpoint_every_bytes: int = 1 << 30  # bounds the recovery replay
    sync: bool = False  # fdatasync after every write (power-loss durability)
    evict: bool = True  # when full, evict LRU segments (a cache); False: PoolFullError
    verify_reads: bool = True  # check frame CRCs on every read (DRAM tier: off)
    volatile: bool = False  # nothing outlives the process (DRAM tier): a dead segment is
    #                         free at once, with no checkpoint to wait for


@dataclass(slots=True)
class PutResult:
    lsn: int
    offset: int  # byte offset of the record on the device
    record_bytes: int
    replaced: bool
    bounced: int


@dataclass(slots=True)
class PutReservation:
    """A placed record with its LSN, waiting for its frames (Pool.reserve -> complete)."""
    tenant: str
    session: str
    key: bytes
    key_generation: int
    frame_lengths: list[int]
    seg: int
    at: int  # block within the segment
    lsn: int
    epoch: int
    ikey: tuple[int, int, int]
    hblocks: int
    nblocks: int
    exp: float
    now: float


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


@dataclass(slots=True)
class GetResult:
    nbytes: int  # bytes written into the caller's buffer
    frame_lengths: list[int]  # lengths of the frames returned
    key_generation: int
    bounced: int


@dataclass(slots=True)
class EntryInfo:
    tenant: str
    session: str
    key: bytes
    record_bytes: int
    nframes: int
    key_generation: int
    created: int
    expiry: int  # 0 = never
    atime: int
    hits: int
    offset: int


@dataclass
class RecoveryReport:
    seconds: float = 0.0
    checkpoint_entries: int = 0
    segments_scanned: int = 0
    bytes_scanned: int = 0
    records_replayed: int = 0
    torn_records: int = 0
    superblock_used: str = "A"
    # Why a copy was not used ("A"/"B" -> the reason), also among `warnings`: a damaged or
    # missing copy, or (for A) one older than B.  Empty when both copies agree.
    superblock_errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Counters:
    puts: int = 0
    gets: int = 0
    misses: int = 0
    deletes: int = 0
    purged_entries: int = 0
    expired_entries: int = 0
    evicted_entries: int = 0
    evicted_segments: int = 0
    cleaned_segments: int = 0
    cleaned_ahead: int = 0  # of those, cleaned by a put outside the lock (clean_ahead)
    upkeep_errors: int = 0  # a put's cleaning ahead or checkpoint failed (the put stood)
    freed_segments: int = 0
    checkpoints: int = 0
    user_bytes: int = 0  # record bytes written for puts
    clean_bytes: int = 0  # record bytes rewritten by the cleaner
    meta_bytes: int = 0  # tombstones
    bytes_read: int = 0
    bounced_bytes: int = 0

    @property
    def write_amplification(self) -> float:
        return (self.user_bytes + self.clean_bytes) / self.user_bytes if self.user_bytes else 1.0


def _now_us(clock: Clock) -> int:
    return int(clock() * 1_000_000)


class Pool:
    """One pool on one device.  Create with `Pool.format(...)` or `Pool.open(...)`."""

    # -- construction -----------------------------------------------------------------

    def __init__(self, dev: BlockDevice, sb: Superblock, *, clock: Clock,
                 options: PoolOptions) -> None:
        self.dev = dev
        self.sb = sb
        # The superblock copy that may not name the current checkpoint (older, damaged),
        # None while both do: it is written first, so that the copy recovery would use
        # is never the one being overwritten (two power losses in a row, the second
        # tearing the only good copy, left a pool that did not open).
        self._sb_stale: str | None = None
        self.clock = clock
        self.opt = options
        self.B = sb.block_size
        self.seg_blocks = sb.segment_size // self.B
        n = sb.segment_count
        self.segs = np.zeros(n, dtype=ckpt.SEG_TABLE)
        self.live = np.zeros(n, dtype=np.int64)  # live blocks per segment (from the index)
        self.pins = np.zeros(n, dtype=np.int64)  # I/Os in flight per segment
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        # (tenant, k0, k1) -> (LSN of the newest put in flight, session)
        self._inflight: dict[tuple[int, int, int], tuple[int, int]] = {}
        # Puts whose write failed but may have reached the media whole (an NVMe-oF write
        # whose answer timed out, a write whose flush failed): (lsn, session) by key,
        # until a checkpoint past their LSN means they are never replayed.  A delete or
        # purge of such a key writes its tombstone as if it were live, else a restart
        # would replay the record and bring a deleted value back.
        self._doubtful: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._n_inflight = 0
        self.index = Index()
        self.tenants: list[str] = []
        self._tenant_ids: dict[str, int] = {}
        self.sessions: list[str] = []
        self._session_ids: dict[str, int] = {}
        self.next_lsn = 1
        self._open_data: dict[int, int] = {}  # bucket end (s) -> segment
        self._open_clean: dict[int, int] = {}
        self._meta_seg = -1
        self._bytes_since_ckpt = 0
        # Set while this thread cleans or checkpoints under the lock, so that it does not
        # clean again from inside (per thread: opening a segment may wait with the lock
        # released, and another thread's put must still be able to clean then).
        self._maintenance = threading.local()
        self._cleaning_ahead = False  # a put is cleaning a segment outside the lock
        self._ckpt_running = False  # a checkpoint is between its state and its end
        self.counters = Counters()
        self.recovery = RecoveryReport()
        self._closed = False
        self._dead = SegState.FREE if options.volatile else SegState.PENDING_FREE
        # Which candidate segment to evict (a DRAM policy, kvtier.daemon.policy); None: LRU.
        self.evictor: Callable[[Pool, npt.NDArray[np.int64]], int] | None = None

    @classmethod
    def format(cls, dev: BlockDevice, *, segment_size: int = DEFAULT_SEGMENT,
               clock: Clock = time.time, options: PoolOptions | None = None) -> Pool:
        """Write a new, empty pool onto `dev` (destroys what was there)."""
        B = getattr(dev, "pool_block_size", 4096)
        if segment_size % B or not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise InvalidArgument(
                f"segment size {segment_size} must be a multiple of the block size {B} "
                f"between {MIN_SEGMENT} and {MAX_SEGMENT} bytes")
        if dev.size % B:
            raise InvalidArgument(f"{dev.name}: size {dev.size} is not a multiple of {B}")
        count = (dev.size - HEADER_ZONE) // segment_size
        if count < 4:
            raise InvalidArgument(
                f"{dev.name}: {dev.size} bytes hold {max(count, 0)} segments of "
                f"{segment_size} bytes; a pool needs at least 4 (1 MiB + 4 segments)")
        sb = Superblock(block_size=B, device_size=dev.size, segment_size=segment_size,
                        segment_count=count, data_offset=HEADER_ZONE,
                        uuid=uuidlib.uuid4().bytes, created_us=_now_us(clock))
        pool = cls(dev, sb, clock=clock, options=options or PoolOptions())
        # Wipe the first block of every segment: headers of an earlier pool on the same
        # media must never be mistaken for ours (they carry another uuid anyway).
        zero = aligned_buffer(B)
        for i in range(count):
            dev.writev(pool._seg_offset(i), [zero])
        # The superblock is what makes the device a pool: only once the wipe is durable
        # may it land (a crash before it leaves no magic anywhere -- blank media, formatted
        # again -- and one after it a valid, empty pool).
        dev.flush()
        pool._write_superblocks()
        pool.checkpoint()
        return pool

    @classmethod
    def open(cls, dev: BlockDevice, *, clock: Clock = time.time,
             options: PoolOptions | None = None) -> Pool:
        """Open an existing pool and recover its state (checkpoint + log replay)."""
        t0 = time.perf_counter()
        sb, which, errors = _read_superblocks(dev)
        B = getattr(dev, "pool_block_size", 4096)
        if sb.block_size != B:
            raise FormatError(f"{dev.name}: pool block size {sb.block_size}, device opened "
                              f"with {B}")
        if dev.size < sb.device_size:
            raise FormatError(f"{dev.name}: device has {dev.size} bytes, the pool was "
                              f"formatted for {sb.device_size}")
        pool = cls(dev, sb, clock=clock, options=options or PoolOptions())
        pool.recovery.superblock_used = which
        pool._sb_stale = ("B" if which == "A" else "A") if errors else None
        pool.recovery.superblock_errors = dict(errors)
        pool.recovery.warnings.extend(errors.values())
        pool._recover()
        pool.recovery.seconds = time.perf_counter() - t0
        return pool

    # -- geometry helpers ------------------------------------------------------------------

    def _seg_offset(self, seg: int) -> int:
        return self.sb.data_offset + seg * self.sb.segment_size

    def _seg_of_block(self, blk: npt.NDArray[np.uint64] | int) -> Any:
        return (blk * self.B - self.sb.data_offset) // self.sb.segment_size

    @property
    def capacity_bytes(self) -> int:
        return self.sb.segment_count * self.sb.segment_size

    # -- names ----------------------------------------------------------------------------

    def _tenant_id(self, name: str, create: bool) -> int:
        t = self._tenant_ids.get(name)
        if t is None:
            if not create:
                return -1
            if len(self.tenants) >= 0xFFFF:
                raise StoreError("too many tenants in one pool (65535)")
            t = len(self.tenants)
            self.tenants.append(name)
            self._tenant_ids[name] = t
        return t

    def _session_id(self, name: str, create: bool) -> int:
        s = self._session_ids.get(name)
        if s is None:
            if not create:
                return -1
            s = len(self.sessions)
            self.sessions.append(name)
            self._session_ids[name] = s
        return s

    # -- segment allocation ------------------------------------------------------------------

    @property
    def segment_count(self) -> int:
        return self.sb.segment_count

    def segments_of_rows(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The segment holding each index row's record."""
        return np.asarray(self._seg_of_block(self.index.loc[rows]), dtype=np.int64)

    def inspect(self, fn: Callable[[Pool], T]) -> T:
        """Run `fn(self)` with the pool locked (a policy reading the index and the
        segment table consistently)."""
        with self._lock:
            return fn(self)

    def lru_victim(self, cand: npt.NDArray[np.int64]) -> int:
        """The candidate whose newest access is oldest; ties: the oldest segment."""
        ix = self.index
        rows = ix.live_rows()
        recent = np.zeros(len(self.segs), dtype=np.int64)
        if len(rows):
            np.maximum.at(recent, self.segments_of_rows(rows), ix.atime[rows].astype(np.int64))
        order = np.lexsort((self.segs["epoch"][cand], recent[cand]))
        return int(cand[order[0]])

    def _checkpoint_segments(self) -> int:
        """Segments the next checkpoint needs (an upper bound)."""
        ckpt_bytes = 4096 + self.index.count * 52 + len(self.segs) * ckpt.SEG_TABLE.itemsize
        ckpt_bytes += sum(len(s.encode()) + 3 for s in self.sessions)
        ckpt_bytes += sum(len(t.encode()) + 3 for t in self.tenants)
        per = (self.seg_blocks - 1) * self.B
        return -(-ckpt_bytes // per)

    def _take_free_segment(self, purpose: str) -> int:
        """A FREE segment for `purpose` ("put", "clean", "meta" or "checkpoint").

        Puts leave room for a checkpoint plus one cleaner and one META segment; the
        cleaner and tombstones leave room for a checkpoint; a checkpoint takes any.
        """
        while True:
            free = np.flatnonzero((self.segs["state"] == SegState.FREE) & (self.pins == 0))
            ck = self._checkpoint_segments()
            floor = {"put": ck + PUT_RESERVE, "clean": ck, "meta": ck,
                     "checkpoint": 0}[purpose]
            if len(free) > floor:
                return int(free[0])
            if purpose == "checkpoint":
                raise PoolFullError(f"{self.dev.name}: no free segment for a checkpoint")
            if self._ckpt_running:
                self._idle.wait()  # a checkpoint without the lock frees segments at its end
                continue
            if np.any(self.segs["state"] == SegState.PENDING_FREE):
                self.checkpoint()
                continue
            if purpose != "put" or getattr(self._maintenance, "active", False):
                raise PoolFullError(f"{self.dev.name}: no free segment left for {purpose}")
            if self._clean_one() or (self.opt.evict and self._evict_one()):
                continue
            raise PoolFullError(
                f"{self.dev.name}: pool full ({self.sb.segment_count} segments of "
                f"{self.sb.segment_size} bytes; nothing left to clean"
                + (" or evict)" if self.opt.evict else ", eviction is off)"))

    def _open_segment(self, kind: SegKind, bucket_end: int, purpose: str) -> int:
        seg = self._take_free_segment(purpose)
        epoch = self._next_lsn()
        now = int(self.clock())
        hdr = SegmentHeader(kind, self.sb.uuid, epoch, _now_us(self.clock), bucket_end, seg)
        buf = aligned_buffer(self.B)
        hdr.encode_into(buf)
        self.dev.writev(self._seg_offset(seg), [buf])
        s = self.segs[seg]
        s["state"], s["kind"], s["epoch"], s["used"] = SegState.OPEN, kind, epoch, 1
        s["opened"], s["last_write"], s["bucket_end"], s["max_lsn"] = now, now, bucket_end, epoch
        return seg

    def _seal(self, seg: int) -> None:
        if self.segs["state"][seg] == SegState.OPEN:
            self.segs["state"][seg] = SegState.SEALED
        for d in (self._open_data, self._open_clean):
            for b, s in list(d.items()):
                if s == seg:
                    del d[b]
        if self._meta_seg == seg:
            self._meta_seg = -1

    def _bucket_end(self, expiry_s: int) -> int:
        if expiry_s == 0:
            return NEVER
        w = self.opt.expiry_bucket_s
        return min((expiry_s // w + 1) * w, NEVER - 1)

    def _place(self, nblocks: int, bucket_end: int, *, cleaner: bool) -> tuple[int, int]:
        """Choose (segment, block offset in it) for a record of `nblocks` blocks."""
        if nblocks > self.seg_blocks - 1:
            raise ValueTooLargeError(
                f"record of {nblocks * self.B} bytes does not fit in a segment of "
                f"{self.sb.segment_size} bytes (raise segment_size)")
        opened = self._open_clean if cleaner else self._open_data
        seg = opened.get(bucket_end, -1)
        if seg < 0 and len(opened) >= self.opt.max_open_buckets:
            # Share the open segment that dies soonest after this record; else retire
            # the one that dies first.
            later = [b for b in opened if b >= bucket_end]
            if later:
                bucket_end = min(later)
                seg = opened[bucket_end]
            else:
                self._seal(opened[min(opened)])
        if seg >= 0 and int(self.segs["used"][seg]) + nblocks > self.seg_blocks:
            self._seal(seg)
            seg = -1
        if seg < 0:
            seg = self._open_segment(SegKind.DATA, bucket_end, "clean" if cleaner else "put")
            # Opening may have waited (for a checkpoint); another thread may have opened
            # a segment for this bucket meanwhile.
            other = opened.get(bucket_end, -1)
            if other >= 0:
                self._seal(other)
            opened[bucket_end] = seg
        at = int(self.segs["used"][seg])
        self.segs["used"][seg] = at + nblocks
        return seg, at

    def _next_lsn(self) -> int:
        lsn = self.next_lsn
        self.next_lsn += 1
        return lsn

    # -- writing records -----------------------------------------------------------------

    def _write_record(self, seg: int, at: int, h: RecordHeader,
                      payload: Sequence[memoryview], hblocks: int) -> int:
        """Write header + payload at block `at` of `seg`; returns bytes bounced."""
        hbuf = aligned_buffer(hblocks * self.B)
        record.encode_into(h, hbuf)
        pad = -h.payload_len % self.B
        off = self._seg_offset(seg) + at * self.B
        pieces: list[memoryview | int] = [hbuf, *payload]
        if pad:
            pieces.append(pad)
        bounced = write_pieces(self.dev, off, pieces)
        if self.opt.sync:
            self.dev.flush()
        return bounced

    def _account_write(self, seg: int, lsn: int) -> None:
        s = self.segs[seg]
        s["last_write"] = int(self.clock())
        s["max_lsn"] = max(int(s["max_lsn"]), lsn)

    def _append_meta(self, kind: Kind, tenant: str, session: str, key: bytes) -> None:
        hb = record.header_blocks(0, tenant, session, self.B)
        seg = self._meta_seg
        if seg >= 0 and int(self.segs["used"][seg]) + hb > self.seg_blocks:
            self._seal(seg)
            seg = -1
        if seg < 0:
            seg = self._open_segment(SegKind.META, NEVER, "meta")
            if self._meta_seg >= 0:
                self._seal(self._meta_seg)
            self._meta_seg = seg
        at = int(self.segs["used"][seg])
        self.segs["used"][seg] = at + hb
        now = _now_us(self.clock)
        h = RecordHeader(kind, self._next_lsn(), int(self.segs["epoch"][seg]), now, 0, key,
                         tenant, session)
        self._write_record(seg, at, h, [], hb)
        self._account_write(seg, h.lsn)
        self.counters.meta_bytes += hb * self.B
        self._bytes_since_ckpt += hb * self.B

    # -- public operations -------------------------------------------------------------------

    def put(self, tenant: str, session: str, key: bytes, frames: Sequence[Buffer], *,
            ttl_s: float | None = None, expiry_s: float | None = None,
            key_generation: int = 0, crcs: Sequence[int] | None = None) -> PutResult:
        """Store a value (a list of frames) under (tenant, key); replaces an older value.

        Returns once the record is written (and flushed when `options.sync`).  `crcs`: the
        frames' CRC32Cs when the caller has them already (`record.frame_crcs` of these
        very frames: a put to two tiers computes them once).
        """
        views = [as_bytes_view(f) for f in frames]
        r = self.reserve(tenant, session, key, [v.nbytes for v in views], ttl_s=ttl_s,
                         expiry_s=expiry_s, key_generation=key_generation)
        return self.complete(r, views, crcs=crcs)

    def reserve(self, tenant: str, session: str, key: bytes, frame_lengths: Sequence[int], *,
                ttl_s: float | None = None, expiry_s: float | None = None,
                key_generation: int = 0) -> PutReservation:
        """The first half of a put: place the record and take its LSN (its order among
        puts, deletes and purges of the key), without writing it.  `complete` must follow
        (it writes and commits; the reservation is released however it ends).  A caller
        that orders its puts under a lock of its own reserves under that lock and copies
        the payload outside it."""
        self._check_open()
        record.validate_names(tenant, session)
        if len(key) not in record.KEY_LENGTHS:
            raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(key)}")
        if not 0 <= key_generation <= 0xFFFF:
            raise InvalidArgument(f"key generation {key_generation} out of range 0..65535")
        if not frame_lengths:
            raise InvalidArgument("a value needs at least one frame")
        if len(frame_lengths) > record.MAX_FRAMES:
            raise InvalidArgument(f"a value has at most {record.MAX_FRAMES} frames")
        now = self.clock()
        exp = _deadline(now, ttl_s, expiry_s)
        payload_len = sum(frame_lengths)
        hblocks = record.header_blocks(len(frame_lengths), tenant, session, self.B)
        nblocks = hblocks + -(-payload_len // self.B)
        with self._lock:
            self._check_open()
            seg, at = self._place(nblocks, self._bucket_end(exp), cleaner=False)
            lsn = self._next_lsn()
            t = self._tenant_id(tenant, True)
            sid = self._session_id(session, True)
            ikey = (t, *split_key(key))
            self._inflight[ikey] = (lsn, sid)
            self._n_inflight += 1
            self.pins[seg] += 1
            epoch = int(self.segs["epoch"][seg])
        return PutReservation(tenant, session, bytes(key), key_generation,
                              list(frame_lengths), seg, at, lsn, epoch, ikey, hblocks,
                              nblocks, exp, now)

    def complete(self, r: PutReservation, frames: Sequence[Buffer], *,
                 crcs: Sequence[int] | None = None) -> PutResult:
        """Write a reserved record's frames and commit it (unless a later put, a delete or
        a purge of its key came first: then it is written and stays dead)."""
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
            bounced = self._write_record(seg, at, h, views, r.hblocks)
            ok = True
        finally:
            with self._lock:
                self.pins[seg] -= 1
                self._n_inflight -= 1
                entry = self._inflight.get(ikey, (0, 0))
                current = entry[0] == lsn
                if current:
                    del self._inflight[ikey]
                    if not ok:
                        self._doubtful[ikey] = entry
                replaced = False
                if ok and current:
                    replaced = self._index_put(r.tenant, r.session, r.key, seg, at, nblocks,
                                               len(views), r.key_generation, int(r.exp),
                                               int(r.now))
                self._account_write(seg, lsn)
                if self._n_inflight == 0:
                    self._idle.notify_all()
        c = self.counters
        with self._lock:
            c.puts += 1
            c.user_bytes += nblocks * self.B
            c.bounced_bytes += bounced
            self._bytes_since_ckpt += nblocks * self.B
            due = self._bytes_since_ckpt >= self.opt.checkpoint_every_bytes
        # Upkeep after the put, without the metadata lock held across I/O.  The put is
        # committed whatever happens here; a failure is counted and the next put retries.
        try:
            if due:
                self.checkpoint_concurrently()
            self.clean_ahead()
        except StoreError as e:
            with self._lock:
                c.upkeep_errors += 1
            log.warning("%s: upkeep after a put failed (the put stands): %s", self.dev.name, e)
        return PutResult(lsn, self._seg_offset(seg) + at * self.B, nblocks * self.B,
                         replaced, bounced)

    def _cancel_inflight(self, t: int, key: tuple[int, int] | None = None,
                         session: int | None = None) -> None:
        """A delete or purge supersedes puts of the same keys that are still in flight:
        forgetting them here means they find themselves superseded when they commit."""
        for ik, (_lsn, sid) in list(self._inflight.items()):
            if ik[0] != t or (key is not None and ik[1:] != key) or \
                    (session is not None and sid != session):
                continue
            del self._inflight[ik]
        for ik, (_lsn, sid) in list(self._doubtful.items()):
            if ik[0] != t or (key is not None and ik[1:] != key) or \
                    (session is not None and sid != session):
                continue
            del self._doubtful[ik]

    def _index_put(self, tenant: str, session: str, key: bytes, seg: int, at: int,
                   nblocks: int, nframes: int, keygen: int, exp: int, now: int) -> bool:
        ix = self.index
        t = self._tenant_id(tenant, True)
        s = self._session_id(session, True)
        k0, k1 = split_key(key)
        row, created = ix.insert(t, k0, k1)
        if not created:
            self.live[int(self._seg_of_block(int(ix.loc[row])))] -= int(ix.blocks[row])
        self.live[seg] += nblocks
        ix.loc[row] = (self._seg_offset(seg) + at * self.B) // self.B
        ix.blocks[row] = nblocks
        ix.session[row] = s
        ix.nframes[row] = nframes
        ix.gen[row] = keygen
        ix.expiry[row] = min(exp, NEVER - 1)
        ix.created[row] = now
        ix.atime[row] = now
        ix.hits[row] = 0
        return not created

    def _remove_rows(self, rows: npt.NDArray[np.int64]) -> None:
        """Drop entries from the index; their records become dead space."""
        if len(rows) == 0:
            return
        ix = self.index
        segs = self._seg_of_block(ix.loc[rows]).astype(np.int64)
        np.subtract.at(self.live, segs, ix.blocks[rows].astype(np.int64))
        ix.remove_many(rows)

    def _live_row(self, tenant: str, key: bytes) -> int:
        t = self._tenant_id(tenant, False)
        if t < 0 or len(key) not in record.KEY_LENGTHS:
            return -1
        row = self.index.find(t, *split_key(key))
        if row < 0:
            return -1
        exp = int(self.index.expiry[row])
        if exp and exp <= self.clock():
            return -1
        return row

    def contains(self, tenant: str, key: bytes) -> bool:
        with self._lock:
            return self._live_row(tenant, key) >= 0

    def lookup_many(self, tenant: str, keys: Sequence[bytes]) -> npt.NDArray[np.bool_]:
        """Presence (stored and not expired) of each key."""
        t = self._tenant_id(tenant, False)
        if t < 0 or not keys:
            return np.zeros(len(keys), dtype=bool)
        for k in keys:
            if len(k) not in record.KEY_LENGTHS:
                raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(k)}")
        k0, k1 = split_keys(list(keys))
        with self._lock:
            rows = self.index.lookup_many(t, k0, k1)
            return self.index.live_mask(rows, int(self.clock()))

    def lookup_prefix(self, tenant: str, keys: Sequence[bytes]) -> int:
        """How many leading keys of a chained key list are present."""
        present = self.lookup_many(tenant, keys)
        missing = np.flatnonzero(~present)
        return int(missing[0]) if len(missing) else len(keys)

    def get_into(self, tenant: str, key: bytes, dest: Buffer, *,
                 frames: tuple[int, int] | None = None) -> GetResult:
        """Read the value (or frames [a, b) of it) into `dest`; returns what was read.

        Raises NotFound for a key that is absent, deleted, purged or expired, and
        CorruptionError (never data) when checksums disagree.  When `dest` reaches past
        the value's last device block, bytes of `dest` beyond the value up to that block
        boundary may be overwritten: that lets a whole-value read go straight from the
        device into `dest` with no bounce copy.
        """
        out = as_bytes_view(dest)
        if out.readonly:
            raise InvalidArgument("destination buffer is read-only")
        with self._lock:
            self._check_open()
            row, loc, nblocks, seg, epoch = self._pin_live_locked(tenant, key, count_miss=True)
            nframes = int(self.index.nframes[row])
            session = self.sessions[int(self.index.session[row])]
        try:
            h, n, fl, bounced = self._read_record(tenant, key, out, frames, loc, nblocks,
                                                  nframes, session, epoch)
        finally:
            self._unpin_segment(seg)
        with self._lock:
            row = self.index.find(self._tenant_id(tenant, False), *split_key(key))
            if row >= 0 and int(self.index.loc[row]) == loc:
                self.index.atime[row] = int(self.clock())
                self.index.hits[row] = min(int(self.index.hits[row]) + 1, 0xFFFF)
            c = self.counters
            c.gets += 1
            c.bytes_read += n
            c.bounced_bytes += bounced
        return GetResult(n, fl, h.key_generation, bounced)

    def _read_record(self, tenant: str, key: bytes, out: memoryview,
                     frames: tuple[int, int] | None, loc: int, nblocks: int, nframes: int,
                     session: str, epoch: int) -> tuple[RecordHeader, int, list[int], int]:
        """The I/O half of a get (no lock held; the segment is pinned)."""
        view_of = getattr(self.dev, "view", None)
        if view_of is not None:
            return self._read_record_mem(view_of, tenant, key, out, frames, loc, nblocks,
                                         epoch)
        hb = record.header_blocks(nframes, tenant, session, self.B)
        where = f"{self.dev.name}: record {tenant}/{key.hex()} at {loc * self.B}"
        hbuf = aligned_buffer(hb * self.B)
        payload_blocks = nblocks - hb
        bounced = 0
        if frames is None:
            # One vectored read: header, payload straight into `dest`, last block bounced.
            body = (payload_blocks - 1) * self.B if payload_blocks else 0
            if out.nbytes >= payload_blocks * self.B:
                body = payload_blocks * self.B  # the whole payload lands in `dest`
            if out.nbytes < body:
                raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for value "
                                      f"of more than {body} bytes")
            tail = aligned_buffer(self.B) if body < payload_blocks * self.B else None
            pieces: list[memoryview | int] = [hbuf, out[:body]]
            if tail is not None:
                pieces.append(tail)
            bounced = read_pieces(self.dev, loc * self.B, pieces)
            h = self._check_header(hbuf, where, tenant, key, epoch)
            n = h.payload_len
            if n > out.nbytes:
                raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for value of "
                                      f"{n} bytes")
            if tail is not None:
                out[body:n] = tail[:n - body]
                bounced += n - body
            first, last = 0, h.nframes
            lo = 0
        else:
            a, b = frames
            if not 0 <= a <= b <= nframes:
                raise InvalidArgument(f"frame range [{a}, {b}) outside 0..{nframes}")
            read_pieces(self.dev, loc * self.B, [hbuf])
            h = self._check_header(hbuf, where, tenant, key, epoch)
            offs = h.frame_offsets()
            lo, hi = offs[a], offs[b]
            n = hi - lo
            if n > out.nbytes:
                raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for frames "
                                      f"[{a}, {b}) of {n} bytes")
            start = loc * self.B + hb * self.B + lo
            aligned_start = start - start % self.B
            head = start - aligned_start
            tailpad = -(start + n) % self.B
            pieces = [head, out[:n]] if head else [out[:n]]
            if tailpad:
                pieces.append(tailpad)
            if n:
                bounced = read_pieces(self.dev, aligned_start, pieces)
            first, last = a, b
        fl = [int(x) for x in h.frame_lengths[first:last]]
        views, pos = [], 0
        for ln in fl:
            views.append(out[pos:pos + ln])
            pos += ln
        if self.opt.verify_reads:
            record.verify_frames(h, first, views, where=where)
        return h, n, fl, bounced

    @contextmanager
    def borrow(self, tenant: str, key: bytes) -> Iterator[tuple[RecordHeader, list[memoryview]]]:
        """Views of a value's frames in device memory, without copying (memfd pools).

        The segment stays pinned (not cleaned, evicted or reused) until the block exits.
        """
        view_of = getattr(self.dev, "view", None)
        if view_of is None:
            raise InvalidArgument(f"{self.dev.name}: borrow() needs a memory-backed pool")
        with self._lock:
            _row, loc, nblocks, seg, epoch = self._pin_live_locked(tenant, key)
        try:
            buf = view_of(loc * self.B, nblocks * self.B)
            where = f"{self.dev.name}: record {tenant}/{key.hex()}"
            h, base, _first, _last, offs = self._locate_frames(buf, where, tenant, key, epoch,
                                                               None)
            yield h, [buf[base + offs[i]:base + offs[i + 1]] for i in range(h.nframes)]
        finally:
            self._unpin_segment(seg)

    def map_value(self, tenant: str, key: bytes,
                  frames: tuple[int, int] | None = None) -> tuple[int, int, list[int]]:
        """Pin a value held in a memory-backed pool and say where its payload (or frames
        [a, b)) lies in device memory: (byte offset, length, frame lengths).

        The segment stays pinned until `unpin_offset(offset)`; until then the bytes there
        are exactly the value's (a mapping of the device can be read, e.g. by DMA).
        """
        view_of = getattr(self.dev, "view", None)
        if view_of is None:
            raise InvalidArgument(f"{self.dev.name}: map needs a memory-backed pool")
        with self._lock:
            self._check_open()
            row, loc, nblocks, seg, epoch = self._pin_live_locked(tenant, key, count_miss=True)
            ix = self.index
            ix.atime[row] = int(self.clock())
            ix.hits[row] = min(int(ix.hits[row]) + 1, 0xFFFF)
        try:
            rec = view_of(loc * self.B, nblocks * self.B)
            where = f"{self.dev.name}: record {tenant}/{key.hex()} at {loc * self.B}"
            h, base, first, last, offs = self._locate_frames(rec, where, tenant, key, epoch,
                                                             frames)
            base += loc * self.B
        except BaseException:
            self._unpin_segment(seg)
            raise
        with self._lock:
            self.counters.gets += 1
            self.counters.bytes_read += offs[last] - offs[first]
        return (base + offs[first], offs[last] - offs[first],
                [int(x) for x in h.frame_lengths[first:last]])

    def read_raw(self, tenant: str, key: bytes, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of a value's record exactly as stored on the
        device (header, frames, padding: what an admin may see, never decoded)."""
        with self._lock:
            self._check_open()
            _row, loc, nblocks, seg, _epoch = self._pin_live_locked(tenant, key)
        try:
            end = min(offset + size, nblocks * self.B)
            if offset >= end:
                return b""
            a = offset // self.B * self.B
            b = -(-end // self.B) * self.B
            buf = aligned_buffer(b - a)
            self.dev.readv_into(loc * self.B + a, [memoryview(buf)])
            return bytes(memoryview(buf)[offset - a:end - a])
        finally:
            self._unpin_segment(seg)

    def segment_table(self) -> list[dict[str, Any]]:
        """Every segment that is not free: state, live and dead bytes, expiry bucket, age."""
        with self._lock:
            live = self.segment_live_blocks()
            now = int(self.clock())
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

    def pin_offset(self, offset: int) -> None:
        """Keep the segment holding byte `offset` from being cleaned, evicted or reused."""
        with self._lock:
            self.pins[(offset - self.sb.data_offset) // self.sb.segment_size] += 1

    def unpin_offset(self, offset: int) -> None:
        with self._lock:
            self.pins[(offset - self.sb.data_offset) // self.sb.segment_size] -= 1

    def _read_record_mem(self, view_of: Callable[[int, int], memoryview], tenant: str,
                         key: bytes, out: memoryview, frames: tuple[int, int] | None,
                         loc: int, nblocks: int,
                         epoch: int) -> tuple[RecordHeader, int, list[int], int]:
        """A get from a memory-backed pool: the header is parsed in place and the payload
        (or frame range) is one memcpy into `out`."""
        rec = view_of(loc * self.B, nblocks * self.B)
        where = f"{self.dev.name}: record {tenant}/{key.hex()} at {loc * self.B}"
        h, base, first, last, offs = self._locate_frames(rec, where, tenant, key, epoch, frames)
        lo, hi = offs[first], offs[last]
        n = hi - lo
        if n > out.nbytes:
            raise BufferTooSmall(f"buffer of {out.nbytes} bytes too small for {n} bytes")
        if n:
            np.copyto(np.frombuffer(out, np.uint8, n),
                      np.frombuffer(rec, np.uint8, n, base + lo))
        fl = [int(x) for x in h.frame_lengths[first:last]]
        if self.opt.verify_reads:
            views, pos = [], 0
            for ln in fl:
                views.append(out[pos:pos + ln])
                pos += ln
            record.verify_frames(h, first, views, where=where)
        return h, n, fl, 0

    def _pin_live_locked(self, tenant: str, key: bytes, *,
                         count_miss: bool = False) -> tuple[int, int, int, int, int]:
        """With the lock held: pin the segment of a live value; (row, first block, blocks,
        segment, segment epoch).  NotFound if it is not live.  `_unpin_segment` undoes."""
        row = self._live_row(tenant, key)
        if row < 0:
            if count_miss:
                self.counters.misses += 1
            raise NotFound(f"{tenant}/{key.hex()}: not found")
        loc, nblocks = int(self.index.loc[row]), int(self.index.blocks[row])
        seg = int(self._seg_of_block(loc))
        self.pins[seg] += 1
        return row, loc, nblocks, seg, int(self.segs["epoch"][seg])

    def _unpin_segment(self, seg: int) -> None:
        with self._lock:
            self.pins[seg] -= 1

    def _locate_frames(self, rec: memoryview, where: str, tenant: str, key: bytes, epoch: int,
                       frames: tuple[int, int] | None
                       ) -> tuple[RecordHeader, int, int, int, list[int]]:
        """A record in memory: its checked header, where its payload starts in the record,
        the frame range asked for (all if None; InvalidArgument if outside) and the frame
        offsets within the payload."""
        h = self._check_header(rec, where, tenant, key, epoch)
        first, last = (0, h.nframes) if frames is None else frames
        if not 0 <= first <= last <= h.nframes:
            raise InvalidArgument(f"frame range [{first}, {last}) outside 0..{h.nframes}")
        base = record.header_blocks(h.nframes, h.tenant, h.session, self.B) * self.B
        return h, base, first, last, h.frame_offsets()

    def _check_header(self, hbuf: memoryview, where: str, tenant: str, key: bytes,
                      epoch: int) -> RecordHeader:
        h = record.decode(hbuf, where=where)
        if h.kind != Kind.PUT or h.key != key or h.tenant != tenant or h.epoch != epoch:
            raise CorruptionError(f"{where}: header names another record")
        return h

    def stat(self, tenant: str, key: bytes) -> EntryInfo:
        with self._lock:
            row = self._live_row(tenant, key)
            if row < 0:
                raise NotFound(f"{tenant}/{key.hex()}: not found")
            return self._entry_info(row, key)

    def _entry_info(self, row: int, key: bytes) -> EntryInfo:
        ix = self.index
        return EntryInfo(
            tenant=self.tenants[int(ix.tenant[row])],
            session=self.sessions[int(ix.session[row])], key=key,
            record_bytes=int(ix.blocks[row]) * self.B, nframes=int(ix.nframes[row]),
            key_generation=int(ix.gen[row]), created=int(ix.created[row]),
            expiry=int(ix.expiry[row]), atime=int(ix.atime[row]), hits=int(ix.hits[row]),
            offset=int(ix.loc[row]) * self.B)

    def delete(self, tenant: str, key: bytes) -> bool:
        """Delete one key durably; False if it was not there."""
        with self._lock:
            self._check_open()
            row = self._live_row(tenant, key)
            t = self._tenant_id(tenant, False)
            pending = t >= 0 and len(key) in record.KEY_LENGTHS and (
                (t, *split_key(key)) in self._inflight or
                (t, *split_key(key)) in self._doubtful)
            if row < 0 and not pending:
                return False
            # Opening a META segment may wait (for a checkpoint) with the lock released:
            # what the tombstone covers is looked up again once its LSN is taken.
            self._append_meta(Kind.DELETE, tenant, "", bytes(key))
            row = self._live_row(tenant, key)
            self._cancel_inflight(t, key=split_key(key))
            if row >= 0:
                self._drop_rows(np.array([row], dtype=np.int64))
            self.counters.deletes += 1
            return row >= 0

    def purge_session(self, tenant: str, session: str) -> int:
        """Delete every value of a session durably; returns how many."""
        record.validate_names(tenant, session)
        with self._lock:
            self._check_open()
            t, s = self._tenant_id(tenant, False), self._session_id(session, False)
            if t < 0 or s < 0:
                return 0
            rows = self.index.select(tenant=t, session=s)
            pending = any(k[0] == t and v[1] == s for k, v in
                          (*self._inflight.items(), *self._doubtful.items()))
            if len(rows) == 0 and not pending:
                return 0
            self._append_meta(Kind.PURGE_SESSION, tenant, session, b"")
            rows = self.index.select(tenant=t, session=s)  # again: see delete
            self._cancel_inflight(t, session=s)
            self._drop_rows(rows)
            self.counters.purged_entries += len(rows)
            return len(rows)

    def purge_tenant(self, tenant: str) -> int:
        """Delete every value of a tenant durably; returns how many."""
        with self._lock:
            self._check_open()
            t = self._tenant_id(tenant, False)
            if t < 0:
                return 0
            rows = self.index.select(tenant=t)
            pending = any(k[0] == t for k in (*self._inflight, *self._doubtful))
            if len(rows) == 0 and not pending:
                return 0
            self._append_meta(Kind.PURGE_TENANT, tenant, "", b"")
            rows = self.index.select(tenant=t)  # again: see delete
            self._cancel_inflight(t)
            self._drop_rows(rows)
            self.counters.purged_entries += len(rows)
            return len(rows)

    def _drop_rows(self, rows: npt.NDArray[np.int64]) -> None:
        self._remove_rows(rows)
        self._retire_dead_segments()

    # -- space accounting --------------------------------------------------------------------

    def segment_live_blocks(self) -> npt.NDArray[np.int64]:
        """Live blocks per segment, from the index (the source of truth)."""
        ix = self.index
        rows = ix.live_rows()
        live = np.zeros(len(self.segs), dtype=np.int64)
        if len(rows):
            segs = self._seg_of_block(ix.loc[rows]).astype(np.int64)
            np.add.at(live, segs, ix.blocks[rows].astype(np.int64))
        return live

    def _retire_dead_segments(self) -> None:
        """SEALED (or idle OPEN) data segments without live records become PENDING_FREE."""
        st = self.segs["state"]
        kind = self.segs["kind"]
        now = int(self.clock())
        dead = (self.live == 0) & (kind == SegKind.DATA) & (
            (st == SegState.SEALED) |
            ((st == SegState.OPEN) & (self.segs["bucket_end"] <= now)))
        for seg in np.flatnonzero(dead).tolist():
            self._seal(seg)
            st[seg] = self._dead
            self.counters.freed_segments += 1

    def sweep(self) -> int:
        """Drop expired entries; segments left without live data become free.

        Returns the number of entries that expired.  (Expired entries are never served
        even before a sweep; this reclaims their space.)
        """
        with self._lock:
            self._check_open()
            rows = self.index.select(expired_at=int(self.clock()))
            if len(rows):
                self._remove_rows(rows)
                self.counters.expired_entries += len(rows)
            self._retire_dead_segments()
            return len(rows)

    # -- cleaning and eviction ---------------------------------------------------------------

    def _clean_candidates(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        live = self.live
        st, kind = self.segs["state"], self.segs["kind"]
        used = self.segs["used"].astype(np.int64) - 1
        ok = (st == SegState.SEALED) & (kind == SegKind.DATA) & (used > 0) & (self.pins == 0)
        u = np.where(ok, live / np.maximum(used, 1), 1.0)
        ok &= u <= self.opt.clean_max_utilization
        age = np.maximum(int(self.clock()) - self.segs["last_write"].astype(np.int64), 1)
        score = (1 - u) * age / (1 + u)
        cand = np.flatnonzero(ok)
        return cand, score[cand]

    def _clean_one(self) -> bool:
        """Clean the best segment by LFS cost-benefit ((1-u)*age/(1+u))."""
        cand, score = self._clean_candidates()
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
        with self._lock:
            while done < max_segments and self._clean_one():
                done += 1
        return done

    @contextmanager
    def _maintaining(self) -> Iterator[None]:
        """This thread cleans or checkpoints: it must not start cleaning from inside."""
        before = getattr(self._maintenance, "active", False)
        self._maintenance.active = True
        try:
            yield
        finally:
            self._maintenance.active = before

    def _free_segments(self) -> int:
        return int(np.count_nonzero((self.segs["state"] == SegState.FREE) & (self.pins == 0)))

    def clean_ahead(self) -> int:
        """Clean one segment, with its reads and writes outside the metadata lock, when
        free segments run low (at most `clean_ahead` above what puts must leave free);
        returns the segments cleaned (0 or 1).  Called by puts once they completed.

        Otherwise the put that finds no free segment cleans under the lock, and every
        reader of the pool waits for that segment's records to be read and rewritten.
        One thread cleans ahead at a time; others go on."""
        with self._lock:
            floor = self._checkpoint_segments() + PUT_RESERVE + self.opt.clean_ahead
            if self._closed or self._cleaning_ahead or self._free_segments() > floor:
                return 0
            cand, score = self._clean_candidates()
            if len(cand) == 0:
                return 0
            seg = int(cand[np.argmax(score)])
            self._cleaning_ahead = True
            self.pins[seg] += 1  # not cleaned, evicted or reused by anyone else meanwhile
            ix = self.index
            lo = self._seg_offset(seg) // self.B
            rows = ix.rows[ix.select(loc_range=(lo, lo + self.seg_blocks))]
            todo = [(int(r["tenant"]), int(r["k0"]), int(r["k1"]), int(r["loc"]),
                     int(r["blocks"])) for r in rows]
        moved = False
        try:
            for t, k0, k1, loc, nblocks in todo:
                if not self._move_unlocked(t, k0, k1, loc, nblocks):
                    return 0  # no room to copy into: leave the rest where it is
            moved = True
        finally:
            with self._lock:
                self.pins[seg] -= 1
                self._cleaning_ahead = False
                if moved and self.live[seg] == 0 and \
                        self.segs["state"][seg] == SegState.SEALED:
                    self._retire_cleaned(seg)
                    self.counters.cleaned_ahead += 1
                # Cleaned segments are reusable after the next checkpoint: take it here,
                # without the lock, rather than in the put that finds none free.
                due = self._free_segments() <= floor and \
                    bool(np.any(self.segs["state"] == SegState.PENDING_FREE))
        if due:
            self.checkpoint_concurrently()
        return 1 if moved else 0

    def _move_unlocked(self, t: int, k0: int, k1: int, loc: int, nblocks: int) -> bool:
        """Copy the record at `loc` forward if the index still points there: read and
        write without the lock (source and destination pinned), then repoint the index
        unless a put, delete or purge of the key came meanwhile (the copy is then dead).
        False if there is no room to copy into."""
        h, payload = self._load_record(loc, nblocks)
        hb = nblocks - -(-h.payload_len // self.B)
        with self._lock:
            row = self.index.find(t, k0, k1)
            if row < 0 or int(self.index.loc[row]) != loc:
                return True  # overwritten, deleted or purged since: nothing to move
            try:
                new_seg, at = self._place(nblocks, self._bucket_end(
                    int(h.expiry_us // 1_000_000)), cleaner=True)
            except PoolFullError:
                return False
            self.pins[new_seg] += 1
            # The copy keeps its LSN (replay orders it by when it was put).
            h.epoch = int(self.segs["epoch"][new_seg])
        written = False
        try:
            self._write_record(new_seg, at, h, [payload], hb)
            written = True
        finally:
            # One step with the unpin: unpinned first, the destination could be cleaned
            # (the copy is not in the index yet) and reused before the index pointed at it.
            with self._lock:
                self.pins[new_seg] -= 1
                self._moved((t, k0, k1), loc, nblocks, new_seg, at, h.lsn, written)
        return True

    def _moved(self, ident: tuple[int, int, int], loc: int, nblocks: int, new_seg: int,
               at: int, lsn: int, written: bool = True) -> None:
        """Under the lock, after the cleaner wrote a copy of the record at `loc` to block
        `at` of `new_seg`: account the write, and point the index at the copy if it still
        names `loc` -- opening a segment, or the copy itself, may have run with the lock
        released, and a put, delete or purge of the key meanwhile leaves the copy dead."""
        self._account_write(new_seg, lsn)
        self.counters.clean_bytes += nblocks * self.B
        self._bytes_since_ckpt += nblocks * self.B
        row = self.index.find(*ident)
        if written and row >= 0 and int(self.index.loc[row]) == loc:
            self.live[int(self._seg_of_block(loc))] -= nblocks
            self.live[new_seg] += nblocks
            self.index.loc[row] = (self._seg_offset(new_seg) + at * self.B) // self.B

    def clean_segment(self, seg: int) -> None:
        """Copy the live records of `seg` forward, then retire it."""
        ix = self.index
        lo = self._seg_offset(seg) // self.B
        rows = ix.select(loc_range=(lo, lo + self.seg_blocks))
        with self._maintaining():
            for row in rows.tolist():
                self._move_row(row, seg)
        self._retire_cleaned(seg)

    def _retire_cleaned(self, seg: int) -> None:
        """A segment whose live records the cleaner moved is dead (free once a checkpoint
        no longer needs it)."""
        self._seal(seg)
        self.segs["state"][seg] = self._dead
        self.counters.cleaned_segments += 1
        self.counters.freed_segments += 1

    def _move_row(self, row: int, seg: int) -> None:
        ix = self.index
        loc, nblocks = int(ix.loc[row]), int(ix.blocks[row])
        if nblocks == 0 or int(self._seg_of_block(loc)) != seg:
            return  # gone (or its row reused) while an earlier move waited
        ident = (int(ix.tenant[row]), int(ix.k0[row]), int(ix.k1[row]))
        h, payload = self._load_record(loc, nblocks)
        hb = nblocks - -(-h.payload_len // self.B)
        exp_s = int(h.expiry_us // 1_000_000)
        new_seg, at = self._place(nblocks, self._bucket_end(exp_s), cleaner=True)
        # The copy keeps its LSN: replay must order it by when it was *put*, so that a
        # newer put of the same key always wins over a moved older copy.
        h.epoch = int(self.segs["epoch"][new_seg])
        self._write_record(new_seg, at, h, [payload], hb)
        self._moved(ident, loc, nblocks, new_seg, at, h.lsn)

    def _load_record(self, loc: int, nblocks: int) -> tuple[RecordHeader, memoryview]:
        """Read a whole record and verify header and frames; returns header and payload."""
        buf = aligned_buffer(nblocks * self.B)
        read_pieces(self.dev, loc * self.B, [buf])
        where = f"{self.dev.name}: record at {loc * self.B}"
        h = record.decode(buf, where=where)
        hb = record.header_blocks(h.nframes, h.tenant, h.session, self.B)
        if hb * self.B + h.payload_len > nblocks * self.B:
            raise CorruptionError(f"{where}: record longer than its index entry")
        payload = buf[hb * self.B: hb * self.B + h.payload_len]
        offs = h.frame_offsets()
        record.verify_frames(h, 0, [payload[offs[i]:offs[i + 1]] for i in range(h.nframes)],
                             where=where)
        return h, payload

    def _evict_one(self) -> bool:
        """Evict one data segment: the one `self.evictor` picks (default: least recently
        used, by its newest access)."""
        ix = self.index
        st, kind = self.segs["state"], self.segs["kind"]
        ok = ((st == SegState.SEALED) | (st == SegState.OPEN)) & (kind == SegKind.DATA) & \
            (self.pins == 0)
        if not ok.any():
            return False
        cand = np.flatnonzero(ok)
        victim = self.evictor(self, cand) if self.evictor is not None else \
            self.lru_victim(cand)
        if not ok[victim]:
            raise AssertionError(f"eviction policy chose segment {victim}, not a candidate")
        lo = self._seg_offset(victim) // self.B
        victims = ix.select(loc_range=(lo, lo + self.seg_blocks))
        self._remove_rows(victims)
        self._seal(victim)
        st[victim] = self._dead
        c = self.counters
        c.evicted_entries += len(victims)
        c.evicted_segments += 1
        c.freed_segments += 1
        return True

    # -- checkpoint and superblock ---------------------------------------------------------

    def _write_superblocks(self) -> None:
        self.sb.generation += 1
        buf = aligned_buffer(SB_SIZE)
        self.sb.encode_into(buf)
        copies = {"A": 0, "B": SB_B_OFFSET}
        order = ("B", "A") if self._sb_stale == "B" else ("A", "B")
        for n, name in enumerate(order):
            self.dev.writev(copies[name], [buf])
            self.dev.flush()
            # the first written now names the newest checkpoint; the other may not
            self._sb_stale = order[1] if n == 0 else None

    def _checkpoint_state(self) -> ckpt.CheckpointState:
        ix = self.index
        rows = ix.rows[ix.live_rows()].copy()
        # Drop session names no live entry uses, renumbering densely.
        used, inverse = np.unique(rows["session"], return_inverse=True)
        sessions = [self.sessions[int(s)] for s in used]
        rows["session"] = inverse.astype(np.uint32)
        segs = self.segs.copy()
        segs["state"][segs["state"] == SegState.PENDING_FREE] = SegState.FREE
        return ckpt.CheckpointState(self.next_lsn, ix.salt, list(self.tenants), sessions,
                                    rows, segs, {})

    def checkpoint(self) -> None:
        """Write the index and segment table, then point the superblocks at them.

        Afterwards PENDING_FREE segments are free, and META segments whose tombstones the
        checkpoint covers are released.  The metadata lock is held throughout; see
        `checkpoint_concurrently` for the version that writes without it.
        """
        with self._lock:
            self._check_open()
            # Puts in flight have LSNs below the checkpoint's but are not in the index
            # yet: wait until they have committed; and for a checkpoint running without
            # the lock (it may start while this one waits).
            while self._n_inflight or self._ckpt_running:
                self._idle.wait()
            self._checkpoint_locked()

    def checkpoint_concurrently(self) -> bool:
        """A checkpoint whose writes and flushes run without the metadata lock: the state
        is taken (and its segments reserved) under the lock, written, and only then are
        the segments that were PENDING_FREE at that moment freed.  Reads, puts and cleaning
        go on meanwhile.  False (nothing done) if another checkpoint is running."""
        with self._lock:
            if self._closed or self._ckpt_running:
                return False
            while self._n_inflight:
                self._idle.wait()
                if self._closed or self._ckpt_running:
                    return False
            plan = self._checkpoint_begin()
        try:
            self._checkpoint_write(plan)
        except BaseException:
            with self._lock:  # its segments stay reserved: the superblocks may name them
                self._ckpt_running = False
                self._idle.notify_all()
            raise
        with self._lock:
            self._checkpoint_end(plan)
        return True

    def _checkpoint_locked(self) -> None:
        plan = self._checkpoint_begin()
        try:
            self._checkpoint_write(plan)
        finally:
            self._ckpt_running = False
        self._checkpoint_end(plan)

    def _checkpoint_begin(self) -> _CheckpointPlan:
        """Under the lock, with no put in flight: the state to write, its segments."""
        state = self._checkpoint_state()
        data = ckpt.encode(state)
        per = (self.seg_blocks - 1) * self.B
        nseg = max(1, -(-len(data) // per))
        with self._maintaining():
            new: list[int] = []
            for _ in range(nseg):
                seg = self._take_free_segment("checkpoint")
                self.segs["state"][seg] = SegState.CHECKPOINT
                new.append(seg)
        lsn = self.next_lsn
        epochs = []
        for i, seg in enumerate(new):
            epochs.append(self._next_lsn())
            s = self.segs[seg]
            s["kind"], s["epoch"] = SegKind.CHECKPOINT, epochs[-1]
            s["used"] = 1 + -(-min(per, len(data) - i * per) // self.B)
        self._ckpt_running = True
        return _CheckpointPlan(data, new, epochs, lsn, list(self.sb.ckpt_segments),
                               self.segs["state"] == SegState.PENDING_FREE,
                               self._bytes_since_ckpt)

    def _checkpoint_write(self, plan: _CheckpointPlan) -> None:
        """The I/O: checkpoint segments, flush, both superblocks (no lock needed)."""
        per = (self.seg_blocks - 1) * self.B
        mv = memoryview(plan.data)
        for i, seg in enumerate(plan.segments):
            chunk = mv[i * per:(i + 1) * per]
            hdr = aligned_buffer(self.B)
            SegmentHeader(SegKind.CHECKPOINT, self.sb.uuid, plan.epochs[i],
                          _now_us(self.clock), NEVER, seg).encode_into(hdr)
            pad = -chunk.nbytes % self.B
            tail: list[memoryview | int] = [pad] if pad else []
            write_pieces(self.dev, self._seg_offset(seg), [hdr, chunk, *tail])
        self.dev.flush()
        self.sb.ckpt_lsn = plan.lsn
        self.sb.ckpt_len = len(plan.data)
        self.sb.ckpt_crc = crc32c.crc32c(plan.data)
        self.sb.ckpt_segments = plan.segments
        self._write_superblocks()

    def _checkpoint_end(self, plan: _CheckpointPlan) -> None:
        """Under the lock, once the superblocks name the new checkpoint: free what it no
        longer needs -- the old checkpoint, the segments that were PENDING_FREE when its
        state was taken (later ones wait for the next), covered META segments."""
        st = self.segs["state"]
        for seg in plan.old_segments:
            st[seg] = SegState.FREE
        st[plan.pending & (st == SegState.PENDING_FREE)] = SegState.FREE
        covered = (self.segs["kind"] == SegKind.META) & (st == SegState.SEALED) & \
            (self.segs["max_lsn"] < plan.lsn)
        st[covered] = SegState.FREE
        self._bytes_since_ckpt = max(0, self._bytes_since_ckpt - plan.bytes_covered)
        self._doubtful = {ik: v for ik, v in self._doubtful.items() if v[0] >= plan.lsn}
        self.counters.checkpoints += 1
        self._ckpt_running = False
        self._idle.notify_all()

    # -- recovery --------------------------------------------------------------------------

    def _recover(self) -> None:
        rep = self.recovery
        sb = self.sb
        ckpt_lsn = sb.ckpt_lsn
        open_at_ckpt: dict[int, int] = {}
        if sb.ckpt_segments:
            state = self._read_checkpoint()
            self.next_lsn = state.next_lsn
            self.index = Index(capacity=len(state.rows) + 1024, salt=state.salt)
            self.index.bulk_load(state.rows)
            self.tenants = list(state.tenants)
            self._tenant_ids = {t: i for i, t in enumerate(self.tenants)}
            self.sessions = list(state.sessions)
            self._session_ids = {s: i for i, s in enumerate(self.sessions)}
            if len(state.segments) != len(self.segs):
                raise CorruptionError(f"{self.dev.name}: checkpoint segment table size differs")
            self.segs = state.segments
            st = self.segs["state"]
            st[st == SegState.CHECKPOINT] = SegState.FREE
            for seg in sb.ckpt_segments:
                st[seg] = SegState.CHECKPOINT
            for seg in np.flatnonzero(st == SegState.OPEN).tolist():
                open_at_ckpt[seg] = int(self.segs["used"][seg])
            rep.checkpoint_entries = len(state.rows)
            self.live = self.segment_live_blocks()
        # Which segments hold records written after the checkpoint?
        hb = aligned_buffer(self.B)
        scan: list[tuple[int, int, SegmentHeader]] = []
        max_epoch = 0
        for seg in range(sb.segment_count):
            if self.segs["state"][seg] == SegState.CHECKPOINT:
                continue
            where = f"{self.dev.name}: segment {seg}"
            self.dev.readv_into(self._seg_offset(seg), [hb])
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
            if seg in open_at_ckpt and h.epoch == int(self.segs["epoch"][seg]):
                scan.append((seg, open_at_ckpt[seg], h))
            elif h.epoch >= ckpt_lsn and h.kind != SegKind.CHECKPOINT:
                scan.append((seg, 1, h))
        self.next_lsn = max(self.next_lsn, max_epoch + 1)
        found: list[tuple[int, int, int, RecordHeader]] = []  # lsn, seg, block, header
        for seg, start, h in scan:
            end = self._scan_segment(seg, start, h, ckpt_lsn, found)
            s = self.segs[seg]
            s["kind"], s["epoch"], s["used"] = h.kind, h.epoch, end
            s["state"] = SegState.SEALED
            s["opened"] = h.opened_us // 1_000_000
            s["bucket_end"] = h.bucket_end_s
            rep.segments_scanned += 1
        found.sort(key=lambda r: r[0])
        for lsn, seg, at, rh in found:
            self._replay(lsn, seg, at, rh)
            self.next_lsn = max(self.next_lsn, lsn + 1)
            s = self.segs[seg]
            s["max_lsn"] = max(int(s["max_lsn"]), lsn)
            s["last_write"] = max(int(s["last_write"]), rh.created_us // 1_000_000)
        rep.records_replayed = len(found)
        # Open segments are not reopened: new writes start in fresh segments.
        st = self.segs["state"]
        st[st == SegState.OPEN] = SegState.SEALED
        self.sweep()
        if found or np.any(st == SegState.PENDING_FREE) or rep.torn_records:
            self.checkpoint()

    def _read_checkpoint(self) -> ckpt.CheckpointState:
        sb = self.sb
        per = (self.seg_blocks - 1) * self.B
        buf = aligned_buffer(len(sb.ckpt_segments) * per)
        for i, seg in enumerate(sb.ckpt_segments):
            if not 0 <= seg < sb.segment_count:
                raise CorruptionError(f"{self.dev.name}: checkpoint segment {seg} out of range")
            n = min(per, sb.ckpt_len - i * per)
            n += -n % self.B
            read_pieces(self.dev, self._seg_offset(seg) + self.B, [buf[i * per:i * per + n]])
        data = buf[:sb.ckpt_len]
        if crc32c.crc32c(data) != sb.ckpt_crc:
            raise CorruptionError(f"{self.dev.name}: checkpoint checksum mismatch")
        return ckpt.decode(data, where=f"{self.dev.name}: checkpoint")

    def _scan_segment(self, seg: int, start: int, sh: SegmentHeader, min_lsn: int,
                      found: list[tuple[int, int, int, RecordHeader]]) -> int:
        """Collect valid records of `seg` from block `start`; returns the write pointer.

        After an invalid record the scan steps block by block, so a record acknowledged
        after a torn neighbour (concurrent writes) is still found.
        """
        B = self.B
        base = self._seg_offset(seg)
        nblk = self.seg_blocks - start
        if nblk <= 0:
            return self.seg_blocks
        buf = aligned_buffer(nblk * B)
        self.dev.readv_into(base + start * B, [buf])
        self.recovery.bytes_scanned += nblk * B
        blk = 0
        end = start
        where = f"{self.dev.name}: segment {seg}"
        while blk < nblk:
            view = buf[blk * B:]
            if not record.peek_is_header(view):
                blk += 1
                continue
            try:
                h = record.decode(view, where=where)
            except (CorruptionError, FormatError, UnicodeDecodeError):
                self.recovery.torn_records += 1  # a damaged header: step past it
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
                self.recovery.torn_records += 1  # header landed, payload did not
                blk += 1
                continue
            if h.lsn >= min_lsn:
                found.append((h.lsn, seg, start + blk, h))
            blk += rec_blocks
            end = start + blk
        return end

    def _replay(self, lsn: int, seg: int, at: int, h: RecordHeader) -> None:
        if h.kind == Kind.PUT:
            hb = record.header_blocks(h.nframes, h.tenant, h.session, self.B)
            nblocks = hb + -(-h.payload_len // self.B)
            self._index_put(h.tenant, h.session, h.key, seg, at, nblocks, h.nframes,
                            h.key_generation, h.expiry_us // 1_000_000, h.created_us // 1_000_000)
            return
        t = self._tenant_id(h.tenant, False)
        if t < 0:
            return
        if h.kind == Kind.DELETE:
            row = self.index.find(t, *split_key(h.key))
            if row >= 0:
                self._remove_rows(np.array([row], dtype=np.int64))
        elif h.kind == Kind.PURGE_SESSION:
            s = self._session_id(h.session, False)
            if s >= 0:
                self._remove_rows(self.index.select(tenant=t, session=s))
        elif h.kind == Kind.PURGE_TENANT:
            self._remove_rows(self.index.select(tenant=t))

    # -- scrubbing -----------------------------------------------------------------------

    def scrub(self) -> list[str]:
        """Read every live record and verify all its checksums; returns the problems.

        Records are read one at a time with their segment pinned, so the pool stays
        usable meanwhile.
        """
        with self._lock:
            rows = self.index.live_rows()
            todo = [(int(self.index.loc[r]), int(self.index.blocks[r])) for r in rows.tolist()]
        problems: list[str] = []
        for loc, nblocks in todo:
            with self._lock:
                seg = int(self._seg_of_block(loc))
                if self.segs["state"][seg] not in (SegState.OPEN, SegState.SEALED):
                    continue
                epoch = int(self.segs["epoch"][seg])
                self.pins[seg] += 1
            try:
                h, _ = self._load_record(loc, nblocks)
                if h.epoch != epoch:
                    problems.append(f"{self.dev.name}: record at {loc * self.B} belongs to "
                                    f"another segment epoch")
            except StoreError as err:
                problems.append(str(err))
            finally:
                with self._lock:
                    self.pins[seg] -= 1
        return problems

    # -- introspection and shutdown --------------------------------------------------------

    def entries(self, tenant: str | None = None, session: str | None = None) -> list[EntryInfo]:
        """Live entries (optionally of one tenant / session), for listings."""
        with self._lock:
            return self._entries(tenant, session)

    def _entries(self, tenant: str | None, session: str | None) -> list[EntryInfo]:
        ix = self.index
        t = None if tenant is None else self._tenant_id(tenant, False)
        s = None if session is None else self._session_id(session, False)
        if (t is not None and t < 0) or (s is not None and s < 0):
            return []
        rows = ix.select(tenant=t, session=s)
        now = int(self.clock())
        out = []
        for r in rows.tolist():
            exp = int(ix.expiry[r])
            if exp and exp <= now:
                continue
            key = int(ix.k0[r]).to_bytes(8, "little") + int(ix.k1[r]).to_bytes(8, "little")
            out.append(self._entry_info(r, key))
        return out

    def tenant_bytes(self) -> dict[str, int]:
        """Pool space (record bytes) held by each tenant: one vectorised pass over the
        index, for quotas."""
        with self._lock:
            ix = self.index
            n = ix.n_rows
            sums = np.bincount(ix.tenant[:n].astype(np.int64),
                               weights=ix.blocks[:n].astype(np.float64),
                               minlength=len(self.tenants))
            return {name: int(sums[i]) * self.B for i, name in enumerate(self.tenants)
                    if sums[i]}

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Entries and record bytes of one tenant: one vectorised pass over the index."""
        with self._lock:
            t = self._tenant_id(tenant, False)
            if t < 0:
                return {"entries": 0, "live_bytes": 0}
            rows = self.index.select(tenant=t)  # live rows only
            return {"entries": len(rows),
                    "live_bytes": int(self.index.blocks[rows].sum()) * self.B}

    def usage(self, tenant: str | None = None) -> dict[str, dict[str, int]]:
        """Entries and bytes per tenant, or per session of `tenant` (for listings)."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries(tenant):
            u = out.setdefault(e.tenant if tenant is None else e.session,
                               {"entries": 0, "bytes": 0})
            u["entries"] += 1
            u["bytes"] += e.record_bytes
        return out

    def stats(self) -> dict[str, Any]:
        """The pool's counts and counters.  The lock is held across some device I/O (a
        segment header, a tombstone, a checkpoint), and a write to a target that stopped
        answering holds it up to the device's I/O timeout; status must answer meanwhile, so
        past STATS_LOCK_WAIT_S the same figures are read without the lock (`lock_busy`):
        each is one plain read, so together they may be a moment apart, and live bytes
        come from the per-segment counts the pool keeps rather than from the index."""
        if not self._lock.acquire(timeout=STATS_LOCK_WAIT_S):
            return self._stats(int(self.live.sum()), lock_busy=True)
        try:
            return self._stats(int(self.segment_live_blocks().sum()), lock_busy=False)
        finally:
            self._lock.release()

    def _stats(self, live_blocks: int, *, lock_busy: bool) -> dict[str, Any]:
        st = self.segs["state"]
        c = self.counters
        return {
            "device": self.dev.name,
            "capacity_bytes": self.capacity_bytes,
            "segment_size": self.sb.segment_size,
            "segments": {s.name.lower(): int(np.count_nonzero(st == s)) for s in SegState},
            "entries": self.index.count,
            "live_bytes": live_blocks * self.B,
            "index_bytes": self.index.nbytes,
            "write_amplification": round(c.write_amplification, 4),
            "counters": {k: getattr(c, k) for k in c.__dataclass_fields__},
            "recovery_seconds": round(self.recovery.seconds, 6),
            "lock_busy": lock_busy,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.dev.name}: pool is closed")

    def close(self, *, checkpoint: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            if checkpoint:
                self.checkpoint()
            self._closed = True
            self.dev.close()


def _deadline(now: float, ttl_s: float | None, expiry_s: float | None) -> int:
    if ttl_s is not None and expiry_s is not None:
        raise InvalidArgument("give ttl_s or expiry_s, not both")
    if ttl_s is not None:
        if ttl_s <= 0:
            raise InvalidArgument(f"ttl must be positive, got {ttl_s}")
        return int(now + ttl_s)
    if expiry_s is not None:
        if expiry_s <= now:
            raise InvalidArgument(f"expiry {expiry_s} is in the past (now {now:.0f})")
        return int(expiry_s)
    return 0


def _read_superblocks(dev: BlockDevice) -> tuple[Superblock, str, dict[str, str]]:
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

