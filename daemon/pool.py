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

`Pool` is the facade over the parts that do the work, each holding one kind of state or
playing one role, all sharing one `PoolContext` (device, options, clock, counters, the
lock):

* state: `segtable.SegmentTable` (per-segment state, placement by expiry bucket) and
  `catalog.Catalog` (tenant and session names, the index rows);
* roles: `pool_writer.Writer` (puts and tombstones, with `pool_inflight.PutsInFlight`),
  `pool_reader.Reader` (gets, borrows, maps, raw reads, scrub: one locate-and-pin step),
  `pool_cleaner.Cleaner` (free segments: sweep, cleaning, eviction),
  `pool_checkpoint.Checkpointer` (checkpoints and superblocks) and
  `pool_recovery.Recovery` (opening: superblocks, checkpoint, log replay).
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt

from kvtier.daemon import record
from kvtier.daemon.blockdev import BlockDevice, aligned_buffer, as_bytes_view
from kvtier.daemon.catalog import Catalog
from kvtier.daemon.errors import FormatError, InvalidArgument, NotFound
from kvtier.daemon.index import Index, split_keys
from kvtier.daemon.pool_checkpoint import Checkpointer
from kvtier.daemon.pool_cleaner import PUT_RESERVE, Cleaner
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_inflight import PutsInFlight
from kvtier.daemon.pool_reader import Reader
from kvtier.daemon.pool_recovery import Recovery, read_superblocks
from kvtier.daemon.pool_types import (
    Buffer,
    Clock,
    Counters,
    EntryInfo,
    GetResult,
    PoolOptions,
    PutReservation,
    PutResult,
    RecoveryReport,
    now_us,
)
from kvtier.daemon.pool_writer import Writer
from kvtier.daemon.record import RecordHeader
from kvtier.daemon.segtable import NEVER, SegmentTable, SegState
from kvtier.daemon.superblock import HEADER_ZONE, Superblock

__all__ = [
    "DEFAULT_SEGMENT", "MAX_SEGMENT", "MIN_SEGMENT", "NEVER", "PUT_RESERVE",
    "STATS_LOCK_WAIT_S", "Buffer", "Clock", "Counters", "EntryInfo", "GetResult", "Pool",
    "PoolOptions", "PutReservation", "PutResult", "RecoveryReport", "SegState",
]

MIN_SEGMENT = 64 * 1024
MAX_SEGMENT = 1024 * 1024 * 1024
DEFAULT_SEGMENT = 64 * 1024 * 1024
STATS_LOCK_WAIT_S = 0.25  # how long stats() waits for the lock before reading without it

T = TypeVar("T")
V = TypeVar("V")


class _PartState(Generic[V]):
    """A read-only attribute of `Pool` that is the attribute of the same name of one of
    its parts (`_ctx`, `_table`, `_catalog`): always the part's current one (recovery
    replaces the segment table's arrays and the catalog's index)."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _PartState[V]: ...
    @overload
    def __get__(self, obj: Pool, objtype: type | None = None) -> V: ...

    def __get__(self, obj: Pool | None, objtype: type | None = None) -> V | _PartState[V]:
        if obj is None:
            return self
        value: V = getattr(getattr(obj, self.part), self.name)
        return value

    def __set__(self, obj: Pool, value: V) -> None:
        raise AttributeError(f"Pool.{self.name} is read-only (it is {self.part}'s)")


class Pool:
    """One pool on one device.  Create with `Pool.format(...)` or `Pool.open(...)`."""

    # -- construction -----------------------------------------------------------------

    def __init__(self, dev: BlockDevice, sb: Superblock, *, clock: Clock,
                 options: PoolOptions) -> None:
        self._ctx = ctx = PoolContext(dev, sb, clock=clock, options=options)
        self._table = SegmentTable(ctx)
        self._catalog = Catalog(ctx, self._table)
        self._in_flight = PutsInFlight()
        self._checkpointer = Checkpointer(ctx, self._table, self._catalog, self._in_flight)
        self._cleaner = Cleaner(ctx, self._table, self._catalog, self._checkpointer,
                                self._eviction_victim)
        self._writer = Writer(ctx, self._table, self._catalog, self._in_flight,
                              self._checkpointer, self._cleaner)
        self._reader = Reader(ctx, self._table, self._catalog)
        self.recovery = RecoveryReport()
        # Which candidate segment to evict (a DRAM policy, kvtier.daemon.policy); None: LRU.
        self.evictor: Callable[[Pool, npt.NDArray[np.int64]], int] | None = None

    @classmethod
    def format(cls, dev: BlockDevice, *, segment_size: int = DEFAULT_SEGMENT,
               clock: Clock = time.time, options: PoolOptions | None = None) -> Pool:
        """Write a new, empty pool onto `dev` (destroys what was there)."""
        sb = _new_superblock(dev, segment_size, clock)
        pool = cls(dev, sb, clock=clock, options=options or PoolOptions())
        # Wipe the first block of every segment: headers of an earlier pool on the same
        # media must never be mistaken for ours (they carry another uuid anyway).
        zero = aligned_buffer(sb.block_size)
        for i in range(sb.segment_count):
            dev.writev(pool._table.offset(i), [zero])
        # The superblock is what makes the device a pool: only once the wipe is durable
        # may it land (a crash before it leaves no magic anywhere -- blank media, formatted
        # again -- and one after it a valid, empty pool).
        dev.flush()
        pool._checkpointer.write_superblocks()
        pool.checkpoint()
        return pool

    @classmethod
    def open(cls, dev: BlockDevice, *, clock: Clock = time.time,
             options: PoolOptions | None = None) -> Pool:
        """Open an existing pool and recover its state (checkpoint + log replay)."""
        t0 = time.perf_counter()
        sb, which, errors = read_superblocks(dev)
        B = dev.caps.pool_block_size
        if sb.block_size != B:
            raise FormatError(f"{dev.name}: pool block size {sb.block_size}, device opened "
                              f"with {B}")
        if dev.size < sb.device_size:
            raise FormatError(f"{dev.name}: device has {dev.size} bytes, the pool was "
                              f"formatted for {sb.device_size}")
        pool = cls(dev, sb, clock=clock, options=options or PoolOptions())
        pool.recovery.superblock_used = which
        pool._checkpointer.sb_stale = ("B" if which == "A" else "A") if errors else None
        pool.recovery.superblock_errors = dict(errors)
        pool.recovery.warnings.extend(errors.values())
        Recovery(pool._ctx, pool._table, pool._catalog, pool._checkpointer, pool._cleaner,
                 pool.recovery).run()
        pool.recovery.seconds = time.perf_counter() - t0
        return pool

    # -- the parts' state, as policies, tools and tests read it ----------------------------

    dev: _PartState[BlockDevice] = _PartState("_ctx")
    sb: _PartState[Superblock] = _PartState("_ctx")
    opt: _PartState[PoolOptions] = _PartState("_ctx")
    counters: _PartState[Counters] = _PartState("_ctx")
    B: _PartState[int] = _PartState("_table")  # the pool block size
    seg_blocks: _PartState[int] = _PartState("_table")
    segs: _PartState[npt.NDArray[np.void]] = _PartState("_table")  # `SEG_TABLE` rows
    live: _PartState[npt.NDArray[np.int64]] = _PartState("_table")  # live blocks per segment
    pins: _PartState[npt.NDArray[np.int64]] = _PartState("_table")  # I/Os in flight per segment
    next_lsn: _PartState[int] = _PartState("_table")
    index: _PartState[Index] = _PartState("_catalog")
    tenants: _PartState[list[str]] = _PartState("_catalog")
    sessions: _PartState[list[str]] = _PartState("_catalog")

    @property
    def clock(self) -> Clock:
        return self._ctx.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:  # a test's fake clock, set after opening
        self._ctx.clock = clock

    @property
    def capacity_bytes(self) -> int:
        return self.sb.segment_count * self.sb.segment_size

    @property
    def segment_count(self) -> int:
        return self.sb.segment_count

    def segments_of_rows(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The segment holding each index row's record."""
        return self._catalog.segments_of_rows(rows)

    def inspect(self, fn: Callable[[Pool], T]) -> T:
        """Run `fn(self)` with the pool locked (a policy reading the index and the
        segment table consistently)."""
        with self._ctx.lock:
            return fn(self)

    def lru_victim(self, cand: npt.NDArray[np.int64]) -> int:
        """The candidate whose newest access is oldest; ties: the oldest segment."""
        return self._cleaner.lru_victim(cand)

    def _eviction_victim(self, cand: npt.NDArray[np.int64]) -> int:
        return self.evictor(self, cand) if self.evictor is not None else \
            self._cleaner.lru_victim(cand)

    # -- writes ---------------------------------------------------------------------------

    def put(self, tenant: str, session: str, key: bytes, frames: Sequence[Buffer], *,
            ttl_s: float | None = None, expiry_s: float | None = None,
            key_generation: int = 0, crcs: Sequence[int] | None = None) -> PutResult:
        """Store a value (a list of frames) under (tenant, key); replaces an older value.

        Returns once the record is written (and flushed when `options.sync`).  `crcs`: the
        frames' CRC32Cs when the caller has them already (`record.frame_crcs` of these
        very frames: a put to two tiers computes them once; a copy from another pool
        passes the ones its record holds).
        """
        views = [as_bytes_view(f) for f in frames]
        r = self.reserve(tenant, session, key, [v.nbytes for v in views], ttl_s=ttl_s,
                         expiry_s=expiry_s, key_generation=key_generation)
        return self._writer.complete(r, views, crcs=crcs)

    def reserve(self, tenant: str, session: str, key: bytes, frame_lengths: Sequence[int], *,
                ttl_s: float | None = None, expiry_s: float | None = None,
                key_generation: int = 0) -> PutReservation:
        """The first half of a put: place the record and take its LSN (its order among
        puts, deletes and purges of the key), without writing it.  `complete` must follow
        (it writes and commits; the reservation is released however it ends).  A caller
        that orders its puts under a lock of its own reserves under that lock and copies
        the payload outside it."""
        r = self._writer.reserve(tenant, session, key, frame_lengths, ttl_s=ttl_s,
                                 expiry_s=expiry_s, key_generation=key_generation)
        assert r is not None  # it waits
        return r

    def try_reserve(self, tenant: str, session: str, key: bytes,
                    frame_lengths: Sequence[int], *, ttl_s: float | None = None
                    ) -> PutReservation | None:
        """`reserve` if it needs no waiting: the lock is free and the segment open for
        the record has room, or (a memory device) a free segment can be opened without
        cleaning, evicting or checkpointing; None otherwise.  For the event loop (a DRAM
        tier's RESERVE)."""
        return self._writer.reserve(tenant, session, key, frame_lengths, ttl_s=ttl_s,
                                    wait=False)

    def complete(self, r: PutReservation, frames: Sequence[Buffer], *,
                 crcs: Sequence[int] | None = None) -> PutResult:
        """Write a reserved record's frames and commit it (unless a later put, a delete or
        a purge of its key came first: then it is written and stays dead).  `crcs` as
        for `put`."""
        return self._writer.complete(r, frames, crcs=crcs)

    def payload_views(self, r: PutReservation) -> list[memoryview]:
        """A reservation's frames in the pool's memory (memory-backed pools: the DRAM
        tier), for the caller to fill before `complete_in_place`."""
        return self._writer.payload_views(r)

    def payload_offset(self, r: PutReservation) -> int:
        """Byte offset of a reservation's first frame on the device."""
        return self._writer.payload_offset(r)

    def complete_in_place(self, r: PutReservation, crcs: Sequence[int] | None = None
                          ) -> tuple[PutResult, list[int]]:
        """Commit a reservation whose frames were written in place (`payload_views`):
        with the writer's `crcs`, or CRCs read from there (no copy).  Returns the result
        and the frames' CRCs."""
        return self._writer.complete_in_place(r, crcs)

    def try_complete_in_place(self, r: PutReservation, crcs: Sequence[int], *,
                              pin: bool = False) -> tuple[PutResult, bool] | None:
        """`complete_in_place` with the writer's `crcs` if it needs no waiting (a memory
        device, the lock free, no checkpoint due); None, having done nothing, otherwise.
        With the result: whether `clean_ahead` is due (the caller runs it in a worker).
        `pin`: a live record's segment is pinned as by `pin_offset`, in the same step."""
        return self._writer.try_complete_in_place(r, crcs, pin=pin)

    def abort(self, r: PutReservation) -> None:
        """Give up a reservation without writing it (its space is dead)."""
        self._writer.abort(r)

    def delete(self, tenant: str, key: bytes) -> bool:
        """Delete one key durably; False if it was not there."""
        return self._writer.delete(tenant, key)

    def purge_session(self, tenant: str, session: str) -> int:
        """Delete every value of a session durably; returns how many."""
        return self._writer.purge_session(tenant, session)

    def purge_tenant(self, tenant: str) -> int:
        """Delete every value of a tenant durably; returns how many."""
        return self._writer.purge_tenant(tenant)

    # -- lookups --------------------------------------------------------------------------

    def contains(self, tenant: str, key: bytes) -> bool:
        with self._ctx.lock:
            return self._catalog.live_row(tenant, key) >= 0

    def lookup_many(self, tenant: str, keys: Sequence[bytes]) -> npt.NDArray[np.bool_]:
        """Presence (stored and not expired) of each key."""
        cat = self._catalog
        t = cat.tenant_id(tenant, False)
        if t < 0 or not keys:
            return np.zeros(len(keys), dtype=bool)
        for k in keys:
            if len(k) not in record.KEY_LENGTHS:
                raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(k)}")
        k0, k1 = split_keys(list(keys))
        with self._ctx.lock:
            rows = cat.index.lookup_many(t, k0, k1)
            return cat.index.live_mask(rows, int(self._ctx.clock()))

    def lookup_prefix(self, tenant: str, keys: Sequence[bytes]) -> int:
        """How many leading keys of a chained key list are present."""
        present = self.lookup_many(tenant, keys)
        missing = np.flatnonzero(~present)
        return int(missing[0]) if len(missing) else len(keys)

    def stat(self, tenant: str, key: bytes) -> EntryInfo:
        with self._ctx.lock:
            row = self._catalog.live_row(tenant, key)
            if row < 0:
                raise NotFound(f"{tenant}/{key.hex()}: not found")
            return self._catalog.entry_info(row, key)

    # -- reads ----------------------------------------------------------------------------

    def get_into(self, tenant: str, key: bytes, dest: Buffer, *,
                 frames: tuple[int, int] | None = None) -> GetResult:
        """Read the value (or frames [a, b) of it) into `dest`; returns what was read.

        Raises NotFound for a key that is absent, deleted, purged or expired, and
        CorruptionError (never data) when checksums disagree.  When `dest` reaches past
        the value's last device block, bytes of `dest` beyond the value up to that block
        boundary may be overwritten: that lets a whole-value read go straight from the
        device into `dest` with no bounce copy.
        """
        return self._reader.get_into(tenant, key, dest, frames=frames)

    def borrow(self, tenant: str, key: bytes
               ) -> AbstractContextManager[tuple[RecordHeader, list[memoryview]]]:
        """Views of a value's frames in device memory, without copying (memfd pools).

        The segment stays pinned (not cleaned, evicted or reused) until the block exits.
        """
        return self._reader.borrow(tenant, key)

    def map_value(self, tenant: str, key: bytes,
                  frames: tuple[int, int] | None = None) -> tuple[int, int, list[int]]:
        """Pin a value held in a memory-backed pool and say where its payload (or frames
        [a, b)) lies in device memory: (byte offset, length, frame lengths).

        The segment stays pinned until `unpin_offset(offset)`; until then the bytes there
        are exactly the value's (a mapping of the device can be read, e.g. by DMA).
        """
        return self._reader.map_value(tenant, key, frames)

    def read_raw(self, tenant: str, key: bytes, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of a value's record exactly as stored on the
        device (header, frames, padding: what an admin may see, never decoded)."""
        return self._reader.read_raw(tenant, key, offset, size)

    def pin_offset(self, offset: int) -> None:
        """Keep the segment holding byte `offset` from being cleaned, evicted or reused."""
        self._reader.pin_offset(offset)

    def unpin_offset(self, offset: int) -> None:
        self._reader.unpin_offset(offset)

    def scrub(self) -> list[str]:
        """Read every live record and verify all its checksums; returns the problems.

        Records are read one at a time with their segment pinned, so the pool stays
        usable meanwhile.
        """
        return self._reader.scrub()

    # -- space ----------------------------------------------------------------------------

    def segment_live_blocks(self) -> npt.NDArray[np.int64]:
        """Live blocks per segment, from the index (the source of truth)."""
        return self._catalog.live_blocks()

    def segment_table(self) -> list[dict[str, Any]]:
        """Every segment that is not free: state, live and dead bytes, expiry bucket, age."""
        with self._ctx.lock:
            return self._table.describe(self._catalog.live_blocks())

    def sweep(self) -> int:
        """Drop expired entries; segments left without live data become free.

        Returns the number of entries that expired.  (Expired entries are never served
        even before a sweep; this reclaims their space.)
        """
        return self._cleaner.sweep()

    def clean(self, max_segments: int = 1) -> int:
        """Run the cleaner on up to `max_segments` segments; returns how many it cleaned."""
        return self._cleaner.clean(max_segments)

    def clean_segment(self, seg: int) -> None:
        """Copy the live records of `seg` forward, then retire it (lock held by the
        caller)."""
        self._cleaner.clean_segment(seg)

    def clean_ahead(self) -> int:
        """Clean one segment, with its reads and writes outside the metadata lock, when
        free segments run low (at most `clean_ahead` above what puts must leave free);
        returns the segments cleaned (0 or 1).  Called by puts once they completed.

        Otherwise the put that finds no free segment cleans under the lock, and every
        reader of the pool waits for that segment's records to be read and rewritten.
        One thread cleans ahead at a time; others go on."""
        return self._cleaner.clean_ahead()

    def checkpoint(self) -> None:
        """Write the index and segment table, then point the superblocks at them.

        Afterwards PENDING_FREE segments are free, and META segments whose tombstones the
        checkpoint covers are released.  The metadata lock is held throughout; see
        `checkpoint_concurrently` for the version that writes without it.
        """
        self._checkpointer.checkpoint()

    def checkpoint_concurrently(self) -> bool:
        """A checkpoint whose writes and flushes run without the metadata lock: the state
        is taken (and its segments reserved) under the lock, written, and only then are
        the segments that were PENDING_FREE at that moment freed.  Reads, puts and cleaning
        go on meanwhile.  False (nothing done) if another checkpoint is running."""
        return self._checkpointer.checkpoint_concurrently()

    # -- introspection and shutdown --------------------------------------------------------

    def entries(self, tenant: str | None = None, session: str | None = None) -> list[EntryInfo]:
        """Live entries (optionally of one tenant / session), for listings."""
        with self._ctx.lock:
            return self._catalog.entries(tenant, session)

    def tenant_bytes(self) -> dict[str, int]:
        """Pool space (record bytes) held by each tenant: one vectorised pass over the
        index, for quotas."""
        with self._ctx.lock:
            return self._catalog.tenant_bytes()

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Entries and record bytes of one tenant: one vectorised pass over the index."""
        with self._ctx.lock:
            return self._catalog.tenant_usage(tenant)

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
        lock = self._ctx.lock
        if not lock.acquire(timeout=STATS_LOCK_WAIT_S):
            return self._stats(int(self._table.live.sum()), lock_busy=True)
        try:
            return self._stats(int(self._catalog.live_blocks().sum()), lock_busy=False)
        finally:
            lock.release()

    def _stats(self, live_blocks: int, *, lock_busy: bool) -> dict[str, Any]:
        c = self.counters
        index = self._catalog.index
        return {
            "device": self.dev.name,
            "capacity_bytes": self.capacity_bytes,
            "segment_size": self.sb.segment_size,
            "segments": self._table.state_counts(),
            "entries": index.count,
            "live_bytes": live_blocks * self.B,
            "index_bytes": index.nbytes,
            "write_amplification": round(c.write_amplification, 4),
            "counters": {k: getattr(c, k) for k in c.__dataclass_fields__},
            "recovery_seconds": round(self.recovery.seconds, 6),
            "lock_busy": lock_busy,
        }

    def close(self, *, checkpoint: bool = True) -> None:
        ctx = self._ctx
        with ctx.lock:
            if ctx.closed:
                return
            if checkpoint:
                self.checkpoint()
            ctx.closed = True
            ctx.dev.close()


def _new_superblock(dev: BlockDevice, segment_size: int, clock: Clock) -> Superblock:
    """The superblock of a new pool on `dev` (InvalidArgument if the geometry is wrong)."""
    B = dev.caps.pool_block_size
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
    return Superblock(block_size=B, device_size=dev.size, segment_size=segment_size,
                      segment_count=count, data_offset=HEADER_ZONE,
                      uuid=uuidlib.uuid4().bytes, created_us=now_us(clock))
