"""The kvtier wire protocol, sans I/O: control messages, ring layout, ring entries.

Specified byte by byte in docs/PROTOCOL.md.  Nothing here touches a socket or an
eventfd: the daemon (trio) and the client (threads) drive these objects with their own
I/O.  Both sides import this module; it is the single source of truth for the format.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 2

# -- control messages on the Unix stream socket ------------------------------------------------
#   u32 length of what follows | u16 type | u16 reserved (0) | JSON body (UTF-8)

CTRL_HEADER = struct.Struct("<IHH")
MAX_CTRL_BODY = 64 * 1024


class Msg(enum.IntEnum):
    HELLO = 1  # client -> daemon: {"version", "tenant", "token", "arena_size", "ring_entries"}
    HELLO_OK = 2  # daemon -> client (+ SCM_RIGHTS fds, see FD_ORDER)
    ERROR = 3  # daemon -> client: {"code", "message"}; the daemon then closes
    ADMIN = 4  # admin tool -> daemon: {"cmd", ...}
    ADMIN_OK = 5  # daemon -> admin tool: {"result": ...}
    BYE = 6  # either side: orderly close


# File descriptors passed with HELLO_OK, in this order.
FD_ORDER = ("sq", "cq", "arena", "sq_eventfd", "cq_eventfd", "dram")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


MAX_ADMIN_REPLY = 64 << 20  # ADMIN_OK bodies (listings of large sessions); admin tools only


def encode_ctrl(msg: Msg, body: dict[str, Any], limit: int = MAX_CTRL_BODY) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {limit}")
    return CTRL_HEADER.pack(len(data) + 4, int(msg), 0) + data


class CtrlParser:
    """Reassembles control messages from a byte stream (`feed`, then `next_message`).

    `limit`: the largest body accepted (the daemon parses with the default; an admin tool
    reading the daemon's replies allows MAX_ADMIN_REPLY)."""

    def __init__(self, limit: int = MAX_CTRL_BODY) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._limit + CTRL_HEADER.size + 4096:
            raise ProtocolError("control stream overflow")

    def pending(self) -> int:
        """Bytes of a message not yet complete (0: between messages)."""
        return len(self._buf)

    def next_message(self) -> tuple[Msg, dict[str, Any]] | None:
        if len(self._buf) < 4:
            return None
        (length,) = struct.unpack_from("<I", self._buf, 0)
        if length < 4 or length > self._limit + 4:
            raise ProtocolError(f"control message length {length} out of range")
        if len(self._buf) < 4 + length:
            return None
        _, mtype, reserved = CTRL_HEADER.unpack_from(self._buf, 0)
        body = bytes(self._buf[CTRL_HEADER.size:4 + length])
        del self._buf[:4 + length]
        try:
            msg = Msg(mtype)
        except ValueError:
            raise ProtocolError(f"unknown control message type {mtype}") from None
        if reserved:
            raise ProtocolError("reserved field of a control message is not zero")
        try:
            obj = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("control message body is not JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError("control message body is not a JSON object")
        return msg, obj


# -- rings ---------------------------------------------------------------------------------------
#   A ring is one memfd: a 4096-byte control page, then `entries` fixed-size entries.
#     0    u32 magic "KVRG"  | u16 version | u16 entry size | u32 entries | u32 reserved
#     64   u32 head  (written only by the consumer; free-running)
#     128  u32 tail  (written only by the producer; free-running)
#     4096 entry[0], entry[1], ...   slot of index i is i % entries

RING_MAGIC = 0x4752564B  # b"KVRG" little-endian
RING_HEADER = 4096
_HEAD, _TAIL = 64 // 4, 128 // 4


def ring_bytes(entries: int, entry_size: int) -> int:
    return RING_HEADER + entries * entry_size


def init_ring(buf: memoryview, entries: int, entry_size: int) -> None:
    if entries <= 0 or entries & (entries - 1):
        raise ValueError(f"ring entries must be a power of two, got {entries}")
    ctl = np.frombuffer(buf, dtype=np.uint32, count=RING_HEADER // 4)
    ctl[:] = 0
    ctl[0] = RING_MAGIC
    ctl[1] = PROTOCOL_VERSION | (entry_size << 16)
    ctl[2] = entries


class Ring:
    """One side of a single-producer single-consumer ring in shared memory.

    The producer writes an entry, then advances `tail`; the consumer reads an entry, then
    advances `head`.  Counters are aligned 32-bit stores (numpy), free-running modulo 2**32.
    Publishing is followed by an eventfd write (done by the caller), which is the memory
    barrier; nothing here relies on the processor's store ordering alone.
    """

    def __init__(self, buf: memoryview, entry_size: int) -> None:
        self.buf = buf
        ctl = np.frombuffer(buf, dtype=np.uint32, count=RING_HEADER // 4)
        if int(ctl[0]) != RING_MAGIC:
            raise ProtocolError("not a kvtier ring (bad magic)")
        if int(ctl[1]) & 0xFFFF != PROTOCOL_VERSION or int(ctl[1]) >> 16 != entry_size:
            raise ProtocolError("ring version or entry size mismatch")
        self.entries = int(ctl[2])
        if self.entries <= 0 or self.entries & (self.entries - 1) or \
                buf.nbytes < ring_bytes(self.entries, entry_size):
            raise ProtocolError("ring geometry invalid")
        self.entry_size = entry_size
        self._ctl = ctl
        self._mask = self.entries - 1

    def detach(self) -> None:
        """Let go of the shared counters (the client closes and unmaps the ring): from now
        on the ring reads as empty, and a push fails on the released buffer."""
        self._ctl = np.zeros_like(self._ctl)

    @property
    def head(self) -> int:
        return int(self._ctl[_HEAD])

    @property
    def tail(self) -> int:
        return int(self._ctl[_TAIL])

    def used(self) -> int:
        """Entries published and not yet consumed; ProtocolError if the peer lied.

        For the producer or the consumer only.  `head` is read before `tail`: the peer can
        only advance its counter meanwhile, which over-counts (producer's view) or is
        exact (consumer's view), never wraps.
        """
        h = self.head
        n = (self.tail - h) & 0xFFFFFFFF
        if n > self.entries:
            raise ProtocolError(f"ring counters corrupt (head {self.head}, tail {self.tail})")
        return n

    def nonempty_hint(self) -> bool:
        """Whether entries seem pending; for threads that only look (never raises)."""
        return self.tail != self.head

    def _slot(self, i: int) -> memoryview:
        off = RING_HEADER + (i & self._mask) * self.entry_size
        return self.buf[off:off + self.entry_size]

    # producer side
    def try_push(self, entry: bytes | memoryview) -> bool:
        if self.used() == self.entries:
            return False
        t = self.tail
        self._slot(t)[:] = entry
        self._ctl[_TAIL] = (t + 1) & 0xFFFFFFFF
        return True

    # consumer side
    def try_pop(self) -> bytes | None:
        """Copy the oldest entry out (so the peer cannot change it under us) and free it."""
        if self.used() == 0:
            return None
        h = self.head
        data = bytes(self._slot(h))
        self._ctl[_HEAD] = (h + 1) & 0xFFFFFFFF
        return data


# -- ring entries --------------------------------------------------------------------------------


class Op(enum.IntEnum):
    NOP = 0
    PUT = 1  # store frames from the arena under key
    GET = 2  # read a value (or frames [a, b)) into the arena
    LOOKUP = 3  # key list in the arena -> longest present prefix; tiers written back
    DELETE = 4
    PURGE_SESSION = 5
    PREFETCH = 6  # key list or session -> promote to DRAM before the deadline
    STATS = 7  # JSON statistics written into the arena
    MAP = 8  # key list -> pin values held in the tenant's DRAM tier, (offset, length) each
    UNMAP = 9  # offsets from MAP (u64 list in the arena) -> unpin
    RESERVE = 10  # place a value in the tenant's DRAM tier -> where to write its frames
    COMMIT = 11  # a reserved value's frames are written: store it (ABORT: give it up)


class Flag(enum.IntFlag):
    NONE = 0
    KEYLIST = 1  # the keys are a list in the arena at data_off (count keys of key_len)
    SESSION = 2  # PREFETCH: the whole session (session field) rather than keys
    ABORT = 4  # COMMIT: give the reservation up instead
    CRCS = 8  # COMMIT: the frames' CRC32Cs are in the arena at aux_off (count u32)


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = -1
    INVALID = -2  # malformed entry or arguments
    TOO_LARGE = -3  # value cannot be stored (larger than a segment)
    NO_SPACE = -4  # the store is full
    CORRUPT = -5  # stored bytes failed their checksum; nothing returned
    IO_ERROR = -6
    DENIED = -7
    BAD_OP = -8
    BUFFER_TOO_SMALL = -9
    SHUTTING_DOWN = -10
    DEADLINE = -11
    INTERNAL = -12


class Tier(enum.IntEnum):
    NONE = 0
    DRAM = 1
    POOL = 2


#   SQE, 128 bytes:
#   0 u8 op | 1 u8 flags | 2 u8 key_len | 3 u8 session_len | 4 u32 count | 8 u64 tag
#   16 u64 data_off | 24 u64 data_len | 32 u64 aux_off | 40 u32 frame_a | 44 u32 frame_b
#   48 u32 ttl_s (PUT) or deadline_ms (PREFETCH) | 52 u32 reserved | 56 key[32]
#   88 session[40]
SQE = struct.Struct("<BBBBIQQQQIII I32s40s")
SQE_SIZE = SQE.size
assert SQE_SIZE == 128
#   CQE, 32 bytes: 0 u64 tag | 8 i32 status | 12 u32 flags (tier) | 16 u64 result | 24 u64 aux
CQE = struct.Struct("<QiIQQ")
CQE_SIZE = CQE.size
assert CQE_SIZE == 32
ALL_FRAMES = 0xFFFFFFFF
KEYS_SESSION = "~keys"  # the session holding a tenant's wrapped tenant-scope data keys
NOT_MAPPED = 0xFFFFFFFFFFFFFFFF  # MAP table offset of a key that is not in DRAM
MAP_ENTRY = struct.Struct("<QQ")  # MAP output per key: u64 offset in the DRAM fd, u64 length
MAX_SESSION = 40


@dataclass(slots=True)
class Request:
    op: int
    tag: int
    flags: int = 0
    key: bytes = b""
    session: str = ""
    count: int = 0
    data_off: int = 0
    data_len: int = 0
    aux_off: int = 0
    frame_a: int = 0
    frame_b: int = ALL_FRAMES
    ttl: int = 0

    def encode(self) -> bytes:
        sb = self.session.encode()
        if len(sb) > MAX_SESSION:
            raise ValueError(f"session name longer than {MAX_SESSION} bytes")
        if len(self.key) > 32:
            raise ValueError("key longer than 32 bytes")
        return SQE.pack(self.op, self.flags, len(self.key), len(sb), self.count, self.tag,
                        self.data_off, self.data_len, self.aux_off, self.frame_a, self.frame_b,
                        self.ttl, 0, self.key, sb)


def decode_request(data: bytes) -> Request:
    """Parse an SQE.  Raises ProtocolError for fields no valid client sends."""
    if len(data) != SQE_SIZE:
        raise ProtocolError("submission entry of wrong size")
    (op, flags, klen, slen, count, tag, doff, dlen, aux, fa, fb, ttl, _r, key,
     sess) = SQE.unpack(data)
    if klen > 32 or slen > MAX_SESSION:
        raise ProtocolError("key or session length out of range")
    try:
        session = sess[:slen].decode()
    except UnicodeDecodeError:
        raise ProtocolError("session name is not UTF-8") from None
    return Request(op, tag, flags, key[:klen], session, count, doff, dlen, aux, fa, fb, ttl)


@dataclass(slots=True)
class Completion:
    tag: int
    status: int
    flags: int = 0
    result: int = 0
    aux: int = 0

    def encode(self) -> bytes:
        return CQE.pack(self.tag, self.status, self.flags, self.result, self.aux)


def decode_completion(data: bytes) -> Completion:
    tag, status, flags, result, aux = CQE.unpack(data)
    return Completion(tag, status, flags, result, aux)
