"""The pool's value types: its options, what its operations return, its counters and its
recovery report.

They live apart from `pool.py` so that the parts of a pool (segment table, catalog,
writer, reader, cleaner, checkpointer, recovery) can name them without importing the
`Pool` facade that is built from those parts; `kvtier.daemon.pool` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.daemon.errors import InvalidArgument

Clock = Callable[[], float]
Buffer = Any  # anything exposing the buffer protocol (bytes, memoryview, numpy array, mmap)


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
    # the key's value now; False: a later put, delete or purge of it came first and this
    # record stays dead (it was still written)
    live: bool = True


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
class GetResult:
    nbytes: int  # bytes written into the caller's buffer
    frame_lengths: list[int]  # lengths of the frames returned
    key_generation: int
    bounced: int
    # The CRC32C of each frame returned, from the record's frame table (checked against
    # the bytes read unless the pool's `verify_reads` is off): a copy of these frames to
    # another pool hands them on as `crcs=` instead of computing them again.
    frame_crcs: Sequence[int] = ()


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


def now_us(clock: Clock) -> int:
    return int(clock() * 1_000_000)


def deadline(now: float, ttl_s: float | None, expiry_s: float | None) -> int:
    """A put's deadline (unix s, 0 = never) from a TTL or an absolute expiry."""
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
