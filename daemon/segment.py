"""Segment headers: the first block of every segment in use.

A segment is opened by writing this header; its `epoch` is the LSN at opening, unique
and increasing, so that records left in the segment by an earlier life (before it was
freed and reopened) are recognised as stale: each record names the epoch it was written
under.  Layout: docs/FORMAT.md ("Segment header").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import crc32c

from kvtier.daemon.errors import CorruptionError, VersionError

SEGMENT_MAGIC = b"KVSG"
SEGMENT_VERSION = 1
# magic, version, kind, reserved, pool uuid, epoch, opened_us, bucket_end_s, index, crc
_SEG = struct.Struct("<4sHBB16sQQQII")


class SegKind(enum.IntEnum):
    DATA = 1  # values, placed by expiry bucket
    META = 2  # tombstones and purges
    CHECKPOINT = 3  # an index checkpoint (see checkpoint.py)


@dataclass(slots=True)
class SegmentHeader:
    kind: SegKind
    pool_uuid: bytes
    epoch: int
    opened_us: int
    bucket_end_s: int
    index: int

    def encode_into(self, out: memoryview) -> None:
        out[:_SEG.size] = bytes(_SEG.size)
        _SEG.pack_into(out, 0, SEGMENT_MAGIC, SEGMENT_VERSION, int(self.kind), 0,
                       self.pool_uuid, self.epoch, self.opened_us, self.bucket_end_s,
                       self.index, 0)
        crc = crc32c.crc32c(out[:_SEG.size - 4])
        struct.pack_into("<I", out, _SEG.size - 4, crc)


def decode_segment_header(buf: memoryview, *, where: str) -> SegmentHeader | None:
    """The header in `buf`, or None if the block holds no segment header at all.

    A block with the magic but a bad checksum or an unknown kind raises CorruptionError.
    """
    if bytes(buf[:4]) != SEGMENT_MAGIC:
        return None
    _m, version, kind, _r, uuid, epoch, opened, bucket, index, crc = _SEG.unpack_from(buf)
    if version != SEGMENT_VERSION:
        raise VersionError(f"{where}: segment format version {version}, this build reads "
                           f"{SEGMENT_VERSION}")
    if crc32c.crc32c(buf[:_SEG.size - 4]) != crc:
        raise CorruptionError(f"{where}: segment header checksum mismatch")
    try:
        k = SegKind(kind)
    except ValueError:
        raise CorruptionError(f"{where}: unknown segment kind {kind}") from None
    return SegmentHeader(k, uuid, epoch, opened, bucket, index)
