"""Index checkpoints: the whole in-memory state of a pool as one byte string.

Layout (docs/FORMAT.md, "Checkpoint"): an 16-byte preamble (magic, version, JSON
length), a JSON document with the scalar state and the name tables, zero padding to a
multiple of 8, then the live index rows (`index.ROW`, packed) and the segment table
(`SEG_TABLE`, packed).  The superblock holds its length and CRC32C.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kvtier.daemon.errors import CorruptionError, VersionError
from kvtier.daemon.index import ROW

CKPT_MAGIC = b"KVCK"
CKPT_VERSION = 1
_PRE = struct.Struct("<4sIQ")

SEG_TABLE = np.dtype([
    ("state", "u1"), ("kind", "u1"),
    ("epoch", "<u8"),  # LSN at opening (0 = never opened)
    ("used", "<u4"),  # write pointer, in blocks from the segment start
    ("opened", "<u4"), ("last_write", "<u4"),  # unix seconds
    ("bucket_end", "<u4"),  # expiry bucket end (unix s), 0xFFFFFFFF = never expires
    ("max_lsn", "<u8"),  # highest LSN written into the segment
], align=False)


@dataclass
class CheckpointState:
    next_lsn: int
    salt: int
    tenants: list[str]
    sessions: list[str]
    rows: npt.NDArray[np.void]
    segments: npt.NDArray[np.void]
    extra: dict[str, Any]


def encode(state: CheckpointState) -> bytes:
    doc = {
        "next_lsn": state.next_lsn, "salt": state.salt, "tenants": state.tenants,
        "sessions": state.sessions, "n_rows": len(state.rows),
        "n_segments": len(state.segments), "row_size": ROW.itemsize,
        "seg_size": SEG_TABLE.itemsize, "extra": state.extra,
    }
    js = json.dumps(doc, separators=(",", ":")).encode()
    head = _PRE.pack(CKPT_MAGIC, CKPT_VERSION, len(js)) + js
    head += bytes(-len(head) % 8)
    return head + state.rows.tobytes() + state.segments.tobytes()


def decode(buf: memoryview, *, where: str) -> CheckpointState:
    if buf.nbytes < _PRE.size:
        raise CorruptionError(f"{where}: truncated checkpoint")
    magic, version, jlen = _PRE.unpack_from(buf, 0)
    if magic != CKPT_MAGIC:
        raise CorruptionError(f"{where}: bad checkpoint magic {magic!r}")
    if version != CKPT_VERSION:
        raise VersionError(f"{where}: checkpoint version {version}, this build reads "
                           f"{CKPT_VERSION}")
    try:
        doc = json.loads(bytes(buf[_PRE.size:_PRE.size + jlen]))
    except ValueError as e:
        raise CorruptionError(f"{where}: checkpoint metadata unreadable: {e}") from e
    if doc["row_size"] != ROW.itemsize or doc["seg_size"] != SEG_TABLE.itemsize:
        raise VersionError(f"{where}: checkpoint row layout differs from this build")
    pos = _PRE.size + jlen
    pos += -pos % 8
    n_rows, n_segs = doc["n_rows"], doc["n_segments"]
    end = pos + n_rows * ROW.itemsize + n_segs * SEG_TABLE.itemsize
    if end > buf.nbytes:
        raise CorruptionError(f"{where}: checkpoint shorter than its tables")
    rows = np.frombuffer(buf, dtype=ROW, count=n_rows, offset=pos).copy()
    pos += n_rows * ROW.itemsize
    segs = np.frombuffer(buf, dtype=SEG_TABLE, count=n_segs, offset=pos).copy()
    return CheckpointState(doc["next_lsn"], doc["salt"], doc["tenants"], doc["sessions"],
                           rows, segs, doc.get("extra", {}))
