"""Record headers: what precedes every value (and every tombstone) in a segment.

The byte layout is specified in docs/FORMAT.md ("Record").  A record is a header of
`header_blocks` blocks followed by the payload (the value's frames back to back), padded
to the block size.  The header carries a CRC32C of itself and one CRC32C per frame, so a
reader of frames [a, b) verifies exactly the bytes it reads.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from kvtier.daemon.errors import CorruptionError, InvalidArgument, VersionError

RECORD_MAGIC = b"KVRC"
RECORD_VERSION = 1
# magic, version, kind, key_len, header_len, header_crc, lsn, epoch, created_us,
# expiry_us, payload_len, key_generation, nframes, key, tenant_len, session_len, flags
_FIXED = struct.Struct("<4sHBBII QQQQQ II 32s BBH")
FIXED_SIZE = _FIXED.size  # 100
_CRC_AT = 12
FRAME_ENTRY = np.dtype([("length", "<u8"), ("crc", "<u4")])  # 12 bytes, packed
MAX_FRAMES = 65535
MAX_NAME = 255
KEY_LENGTHS = (16, 32)


class Kind(enum.IntEnum):
    PUT = 1
    DELETE = 2
    PURGE_SESSION = 3
    PURGE_TENANT = 4


@dataclass(slots=True)
class RecordHeader:
    kind: Kind
    lsn: int
    epoch: int
    created_us: int
    expiry_us: int
    key: bytes
    tenant: str
    session: str
    key_generation: int = 0
    frame_lengths: Sequence[int] = ()
    frame_crcs: Sequence[int] = ()

    @property
    def payload_len(self) -> int:
        return int(sum(self.frame_lengths))

    @property
    def nframes(self) -> int:
        return len(self.frame_lengths)

    def frame_offsets(self) -> list[int]:
        """Payload offset of each frame, plus the payload length at the end."""
        out = [0]
        for n in self.frame_lengths:
            out.append(out[-1] + int(n))
        return out


def header_len(nframes: int, tenant: str, session: str) -> int:
    names = len(tenant.encode()) + len(session.encode())
    return _align8(FIXED_SIZE + names) + nframes * FRAME_ENTRY.itemsize


def header_blocks(nframes: int, tenant: str, session: str, block_size: int) -> int:
    return -(-header_len(nframes, tenant, session) // block_size)


def _align8(n: int) -> int:
    return (n + 7) & ~7


def validate_names(tenant: str, session: str) -> None:
    for what, s in (("tenant", tenant), ("session", session)):
        b = s.encode()
        if not b or len(b) > MAX_NAME:
            raise InvalidArgument(f"{what} name must be 1..{MAX_NAME} bytes of UTF-8, got {s!r}")


def encode_into(h: RecordHeader, out: memoryview) -> int:
    """Serialise `h` (CRC included) into `out`; returns the header length in bytes."""
    if h.key and len(h.key) not in KEY_LENGTHS:
        raise InvalidArgument(f"key must be 16 or 32 bytes, got {len(h.key)}")
    if len(h.frame_lengths) > MAX_FRAMES:
        raise InvalidArgument(f"a value has at most {MAX_FRAMES} frames")
    tb, sb = h.tenant.encode(), h.session.encode()
    n = header_len(len(h.frame_lengths), h.tenant, h.session)
    if out.nbytes < n:
        raise InvalidArgument("header buffer too small")
    _FIXED.pack_into(out, 0, RECORD_MAGIC, RECORD_VERSION, int(h.kind), len(h.key), n, 0,
                     h.lsn, h.epoch, h.created_us, h.expiry_us, h.payload_len,
                     h.key_generation, len(h.frame_lengths), h.key, len(tb), len(sb), 0)
    pos = FIXED_SIZE
    out[pos:pos + len(tb)] = tb
    pos += len(tb)
    out[pos:pos + len(sb)] = sb
    pos += len(sb)
    ft = _align8(pos)
    out[pos:ft] = bytes(ft - pos)
    if h.frame_lengths:
        table = np.frombuffer(out, dtype=FRAME_ENTRY, count=len(h.frame_lengths), offset=ft)
        table["length"] = np.asarray(h.frame_lengths, dtype=np.uint64)
        table["crc"] = np.asarray(h.frame_crcs, dtype=np.uint32)
    crc = crc32c.crc32c(out[:n])
    struct.pack_into("<I", out, _CRC_AT, crc)
    return n


def peek_is_header(buf: memoryview) -> bool:
    return buf.nbytes >= FIXED_SIZE and bytes(buf[:4]) == RECORD_MAGIC


def decode(buf: memoryview, *, where: str = "record") -> RecordHeader:
    """Parse and verify a header at the start of `buf` (which holds whole header blocks)."""
    if buf.nbytes < FIXED_SIZE:
        raise CorruptionError(f"{where}: truncated header")
    (magic, version, kind, key_len, n, crc, lsn, epoch, created, expiry, payload_len,
     keygen, nframes, key, tlen, slen, _flags) = _FIXED.unpack_from(buf, 0)
    if magic != RECORD_MAGIC:
        raise CorruptionError(f"{where}: bad record magic {magic!r}")
    if version != RECORD_VERSION:
        raise VersionError(f"{where}: record format version {version}, this build reads "
                           f"{RECORD_VERSION}")
    if n > buf.nbytes or n < FIXED_SIZE:
        raise CorruptionError(f"{where}: header length {n} out of range")
    c = crc32c.crc32c(buf[:_CRC_AT])
    c = crc32c.crc32c(b"\0\0\0\0", c)
    c = crc32c.crc32c(buf[_CRC_AT + 4:n], c)
    if c != crc:
        raise CorruptionError(f"{where}: header checksum mismatch")
    try:
        k = Kind(kind)
    except ValueError:
        raise CorruptionError(f"{where}: unknown record kind {kind}") from None
    pos = FIXED_SIZE
    tenant = bytes(buf[pos:pos + tlen]).decode()
    pos += tlen
    session = bytes(buf[pos:pos + slen]).decode()
    pos += slen
    ft = _align8(pos)
    if ft + nframes * FRAME_ENTRY.itemsize != n or key_len not in (0, *KEY_LENGTHS):
        raise CorruptionError(f"{where}: inconsistent header sizes")
    table = np.frombuffer(buf, dtype=FRAME_ENTRY, count=nframes, offset=ft)
    lengths = table["length"].tolist()
    if sum(lengths) != payload_len:
        raise CorruptionError(f"{where}: frame table does not add up to the payload length")
    return RecordHeader(kind=k, lsn=lsn, epoch=epoch, created_us=created, expiry_us=expiry,
                        key=bytes(key[:key_len]), tenant=tenant, session=session,
                        key_generation=keygen, frame_lengths=lengths,
                        frame_crcs=table["crc"].tolist())


def frame_crcs(frames: Sequence[memoryview]) -> list[int]:
    return [crc32c.crc32c(f) for f in frames]


def verify_frames(h: RecordHeader, first: int, views: Sequence[memoryview], *,
                  where: str) -> None:
    """Check frames first, first+1, ... (as read into `views`) against the frame table."""
    for i, v in enumerate(views):
        if crc32c.crc32c(v) != h.frame_crcs[first + i]:
            raise CorruptionError(f"{where}: checksum mismatch in frame {first + i}")
