"""The pool superblock, stored twice.

Copy A lives in block 0, copy B at `SB_B_OFFSET`.  Both are rewritten on every
checkpoint with an increasing `generation`, B only after A has reached the media; on
open the valid copy with the higher generation wins, so a torn or corrupted copy costs
nothing but a warning.  Layout: docs/FORMAT.md ("Superblock").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c

from kvtier.daemon.blockdev import BlockDevice, aligned_buffer
from kvtier.daemon.errors import CorruptionError, FormatError, VersionError

SB_MAGIC = b"KVTIERPL"
SB_VERSION = 1
SB_SIZE = 4096
SB_B_OFFSET = 512 * 1024
HEADER_ZONE = 1024 * 1024  # segments start here (1 MiB aligned)
MAX_CKPT_SEGMENTS = 64
# magic, version, reserved, block_size, device_size, segment_size, segment_count,
# reserved, data_offset, uuid, generation, created_us, ckpt_lsn, ckpt_nsegs, reserved,
# ckpt_len, ckpt_crc, reserved
_SB = struct.Struct("<8sHHI QQII Q16s QQQ II QII")
_CKPT_SEGS_AT = _SB.size
_CRC_AT = SB_SIZE - 4


@dataclass(slots=True)
class Superblock:
    block_size: int
    device_size: int
    segment_size: int
    segment_count: int
    data_offset: int
    uuid: bytes
    created_us: int
    generation: int = 0
    ckpt_lsn: int = 0
    ckpt_len: int = 0
    ckpt_crc: int = 0
    ckpt_segments: list[int] = field(default_factory=list)

    def encode_into(self, out: memoryview) -> None:
        if len(self.ckpt_segments) > MAX_CKPT_SEGMENTS:
            raise FormatError("checkpoint spans too many segments")
        out[:SB_SIZE] = bytes(SB_SIZE)
        _SB.pack_into(out, 0, SB_MAGIC, SB_VERSION, 0, self.block_size, self.device_size,
                      self.segment_size, self.segment_count, 0, self.data_offset, self.uuid,
                      self.generation, self.created_us, self.ckpt_lsn,
                      len(self.ckpt_segments), 0, self.ckpt_len, self.ckpt_crc, 0)
        struct.pack_into(f"<{len(self.ckpt_segments)}I", out, _CKPT_SEGS_AT,
                         *self.ckpt_segments)
        struct.pack_into("<I", out, _CRC_AT, crc32c.crc32c(out[:_CRC_AT]))


def decode_superblock(buf: memoryview, *, where: str) -> Superblock:
    if bytes(buf[:8]) != SB_MAGIC:
        raise FormatError(f"{where}: no kvtier superblock (magic {bytes(buf[:8])!r})")
    version = struct.unpack_from("<H", buf, 8)[0]
    if version != SB_VERSION:
        raise VersionError(f"{where}: pool format version {version}; this build reads "
                           f"version {SB_VERSION}")
    (crc,) = struct.unpack_from("<I", buf, _CRC_AT)
    if crc32c.crc32c(buf[:_CRC_AT]) != crc:
        raise CorruptionError(f"{where}: superblock checksum mismatch")
    (_m, _v, _r, bs, dev_size, seg_size, seg_count, _r2, data_off, uuid, gen, created,
     ckpt_lsn, nsegs, _r3, ckpt_len, ckpt_crc, _r4) = _SB.unpack_from(buf, 0)
    if nsegs > MAX_CKPT_SEGMENTS:
        raise CorruptionError(f"{where}: checkpoint segment count {nsegs} out of range")
    segs = list(struct.unpack_from(f"<{nsegs}I", buf, _CKPT_SEGS_AT))
    return Superblock(bs, dev_size, seg_size, seg_count, data_off, uuid, created, gen,
                      ckpt_lsn, ckpt_len, ckpt_crc, segs)


def superblock_present(dev: BlockDevice) -> bool:
    """Whether either superblock copy carries the pool magic (a blank namespace: no).

    A device that has the magic but does not decode is *not* blank: opening it reports
    the damage instead of formatting over a pool."""
    buf = aligned_buffer(SB_SIZE)
    for off in (0, SB_B_OFFSET):
        if off + SB_SIZE > dev.size:
            continue
        dev.readv_into(off, [buf])
        if bytes(buf[:len(SB_MAGIC)]) == SB_MAGIC:
            return True
    return False


def newest_superblock(dev: BlockDevice) -> Superblock | None:
    """The valid copy with the higher generation, or None if neither decodes (opening the
    pool then says why).  A look at the geometry before the pool is opened."""
    best: Superblock | None = None
    buf = aligned_buffer(SB_SIZE)
    for name, off in (("A", 0), ("B", SB_B_OFFSET)):
        if off + SB_SIZE > dev.size:
            continue
        dev.readv_into(off, [buf])
        try:
            sb = decode_superblock(buf, where=f"{dev.name}: superblock {name}")
        except (FormatError, CorruptionError):  # VersionError is a FormatError
            continue
        if best is None or sb.generation > best.generation:
            best = sb
    return best
