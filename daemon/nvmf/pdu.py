"""NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0), without sockets.

Every PDU starts with an 8-byte common header (type, flags, HLEN, PDO, PLEN), then the
rest of its fixed-size header, an optional header digest, padding up to PDO, data, and
an optional data digest.  Digests are CRC32C, stored little-endian.

`encode` builds the bytes *around* a PDU's data (header, digest, padding before; data
digest after); the data itself is never copied: a sender passes the caller's buffers to
`sendmsg` between the two.

`PduReader` decodes incrementally and tells its I/O layer *where* the next bytes must go
(`buffer()`), one section at a time: the header into a small scratch buffer, a data PDU's
payload straight into the buffers a `sink` names (a read's destination), so `recv_into`
lands payload in caller memory with no intermediate copy.  Every header field is checked;
a violation raises `ProtocolError` carrying the fatal error status (FES) and the byte
offset of the offending field (FEI) for the TermReq the caller then sends.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import crc32c as _crc32c

CH = struct.Struct("<BBBBI")  # type, flags, hlen, pdo, plen
CH_LEN = 8
PREFIX_LEN = 24  # every PDU's header is at least this long: read it in one go
DIGEST_LEN = 4
MAX_HLEN = 128
MAX_TERM_DATA = 128  # error data carried by a TermReq (PLEN <= 152)


class PduType(IntEnum):
    IC_REQ = 0x00
    IC_RESP = 0x01
    H2C_TERM_REQ = 0x02
    C2H_TERM_REQ = 0x03
    CAPSULE_CMD = 0x04
    CAPSULE_RESP = 0x05
    H2C_DATA = 0x06
    C2H_DATA = 0x07
    R2T = 0x09


HLEN = {
    PduType.IC_REQ: 128, PduType.IC_RESP: 128,
    PduType.H2C_TERM_REQ: 24, PduType.C2H_TERM_REQ: 24,
    PduType.CAPSULE_CMD: 72, PduType.CAPSULE_RESP: 24,
    PduType.H2C_DATA: 24, PduType.C2H_DATA: 24, PduType.R2T: 24,
}

# Which PDUs each side may receive.
HOST_RECEIVES = frozenset({PduType.IC_RESP, PduType.C2H_TERM_REQ, PduType.CAPSULE_RESP,
                           PduType.C2H_DATA, PduType.R2T})
CONTROLLER_RECEIVES = frozenset({PduType.IC_REQ, PduType.H2C_TERM_REQ, PduType.CAPSULE_CMD,
                                 PduType.H2C_DATA})
_NO_DIGESTS = frozenset({PduType.IC_REQ, PduType.IC_RESP, PduType.H2C_TERM_REQ,
                         PduType.C2H_TERM_REQ})
_NO_DATA = frozenset({PduType.IC_REQ, PduType.IC_RESP, PduType.CAPSULE_RESP, PduType.R2T})

FLAG_HDGST = 0x01
FLAG_DDGST = 0x02
FLAG_LAST_PDU = 0x04
FLAG_SUCCESS = 0x08
_ALLOWED_FLAGS = {
    PduType.C2H_DATA: FLAG_HDGST | FLAG_DDGST | FLAG_LAST_PDU | FLAG_SUCCESS,
    PduType.H2C_DATA: FLAG_HDGST | FLAG_DDGST | FLAG_LAST_PDU,
    PduType.CAPSULE_CMD: FLAG_HDGST | FLAG_DDGST,
    PduType.CAPSULE_RESP: FLAG_HDGST,
    PduType.R2T: FLAG_HDGST,
}

# ICReq/ICResp DGST field
DGST_HEADER = 0x01
DGST_DATA = 0x02


class Fes(IntEnum):
    """Fatal error status of a TermReq."""

    INVALID_HEADER_FIELD = 0x01
    SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03
    DATA_OUT_OF_RANGE = 0x04
    DATA_LIMIT_EXCEEDED = 0x05  # R2T limit exceeded, for H2CTermReq
    UNSUPPORTED_PARAMETER = 0x06


class ProtocolError(Exception):
    """A fatal NVMe/TCP transport error: the connection must be terminated."""

    def __init__(self, fes: Fes, fei: int, message: str) -> None:
        super().__init__(message)
        self.fes = fes
        self.fei = fei


# -- PDU-specific headers ------------------------------------------------------------------

@dataclass(frozen=True)
class ICReq:
    pfv: int = 0
    hpda: int = 0
    dgst: int = 0
    maxr2t: int = 0
    type = PduType.IC_REQ
    _S = struct.Struct("<HBBI")

    def pack(self) -> bytes:
        return self._S.pack(self.pfv, self.hpda, self.dgst, self.maxr2t)

    @classmethod
    def unpack(cls, b: memoryview) -> ICReq:
        return cls(*cls._S.unpack_from(b))


@dataclass(frozen=True)
class ICResp:
    pfv: int = 0
    cpda: int = 0
    dgst: int = 0
    maxh2cdata: int = 131072
    type = PduType.IC_RESP
    _S = struct.Struct("<HBBI")

    def pack(self) -> bytes:
        return self._S.pack(self.pfv, self.cpda, self.dgst, self.maxh2cdata)

    @classmethod
    def unpack(cls, b: memoryview) -> ICResp:
        return cls(*cls._S.unpack_from(b))


@dataclass(frozen=True)
class CapsuleCmd:
    sqe: bytes  # 64 bytes
    type = PduType.CAPSULE_CMD

    def pack(self) -> bytes:
        if len(self.sqe) != 64:
            raise ValueError(f"an SQE is 64 bytes, got {len(self.sqe)}")
        return bytes(self.sqe)

    @classmethod
    def unpack(cls, b: memoryview) -> CapsuleCmd:
        return cls(bytes(b[:64]))

    @property
    def cid(self) -> int:
        return int.from_bytes(self.sqe[2:4], "little")


@dataclass(frozen=True)
class CapsuleResp:
    cqe: bytes  # 16 bytes
    type = PduType.CAPSULE_RESP

    def pack(self) -> bytes:
        if len(self.cqe) != 16:
            raise ValueError(f"a CQE is 16 bytes, got {len(self.cqe)}")
        return bytes(self.cqe)

    @classmethod
    def unpack(cls, b: memoryview) -> CapsuleResp:
        return cls(bytes(b[:16]))


@dataclass(frozen=True)
class H2CData:
    cccid: int
    ttag: int
    datao: int
    datal: int
    type = PduType.H2C_DATA
    _S = struct.Struct("<HHII4x")

    def pack(self) -> bytes:
        return self._S.pack(self.cccid, self.ttag, self.datao, self.datal)

    @classmethod
    def unpack(cls, b: memoryview) -> H2CData:
        return cls(*cls._S.unpack_from(b))


@dataclass(frozen=True)
class C2HData:
    cccid: int
    datao: int
    datal: int
    type = PduType.C2H_DATA
    _S = struct.Struct("<H2xII4x")

    def pack(self) -> bytes:
        return self._S.pack(self.cccid, self.datao, self.datal)

    @classmethod
    def unpack(cls, b: memoryview) -> C2HData:
        return cls(*cls._S.unpack_from(b))


@dataclass(frozen=True)
class R2T:
    cccid: int
    ttag: int
    r2to: int
    r2tl: int
    type = PduType.R2T
    _S = struct.Struct("<HHII4x")

    def pack(self) -> bytes:
        return self._S.pack(self.cccid, self.ttag, self.r2to, self.r2tl)

    @classmethod
    def unpack(cls, b: memoryview) -> R2T:
        return cls(*cls._S.unpack_from(b))


@dataclass(frozen=True)
class TermReq:
    """H2CTermReq (from_host) or C2HTermReq; `data` is the offending PDU header."""

    fes: int
    fei: int
    from_host: bool
    data: bytes = b""
    _S = struct.Struct("<HI10x")

    @property
    def type(self) -> PduType:
        return PduType.H2C_TERM_REQ if self.from_host else PduType.C2H_TERM_REQ

    def pack(self) -> bytes:
        return self._S.pack(self.fes, self.fei)

    def describe(self) -> str:
        try:
            what = Fes(self.fes).name.lower().replace("_", " ")
        except ValueError:
            what = f"fatal error status {self.fes:#x}"
        return f"{what} (field at byte {self.fei})"


Pdu = ICReq | ICResp | CapsuleCmd | CapsuleResp | H2CData | C2HData | R2T | TermReq

_UNPACK: dict[PduType, Callable[[memoryview], Pdu]] = {
    PduType.IC_REQ: ICReq.unpack, PduType.IC_RESP: ICResp.unpack,
    PduType.CAPSULE_CMD: CapsuleCmd.unpack, PduType.CAPSULE_RESP: CapsuleResp.unpack,
    PduType.H2C_DATA: H2CData.unpack, PduType.C2H_DATA: C2HData.unpack,
    PduType.R2T: R2T.unpack,
}


def crc32c(views: Sequence[memoryview | bytes], value: int = 0) -> int:
    for v in views:
        value = _crc32c.crc32c(v, value)
    return value


def data_alignment(pda: int) -> int:
    """HPDA/CPDA are 0-based multiples of 4 bytes; 0 means no alignment."""
    return (pda + 1) * 4 if pda else 1


def encode(pdu: Pdu, *, flags: int = 0, hdgst: bool = False, ddgst: bool = False,
           data: Sequence[memoryview | bytes] = (), pda: int = 0) -> tuple[bytes, bytes]:
    """The bytes before and after `data` for one PDU: (header [+ digest] [+ pad], [ddgst]).

    `flags` adds LAST_PDU / SUCCESS; the digest flags follow `hdgst`/`ddgst` (ignored for
    IC and TermReq PDUs, which never carry digests).  `pda` is the receiver's PDU data
    alignment (its HPDA or CPDA).
    """
    t = pdu.type
    hlen = HLEN[t]
    body = pdu.pack()
    if len(body) > hlen - CH_LEN:
        raise ValueError(f"{t.name}: header of {len(body)} bytes exceeds HLEN {hlen}")
    datalen = sum(len(d) if isinstance(d, bytes) else d.nbytes for d in data)
    if t in _NO_DIGESTS:
        hdgst = ddgst = False
    if t in _NO_DATA and datalen:
        raise ValueError(f"{t.name} carries no data")
    hd = DIGEST_LEN if hdgst else 0
    ddg = DIGEST_LEN if (ddgst and datalen) else 0
    flags |= (FLAG_HDGST if hd else 0) | (FLAG_DDGST if ddg else 0)
    if datalen:
        a = data_alignment(pda) if t not in _NO_DIGESTS else 1
        pdo = -(-(hlen + hd) // a) * a
        plen = pdo + datalen + ddg
    else:
        pdo = 0
        plen = hlen + hd
    header = CH.pack(t, flags, hlen, pdo, plen) + body + bytes(hlen - CH_LEN - len(body))
    head = header
    if hd:
        head += _crc32c.crc32c(header).to_bytes(4, "little")
    if datalen:
        head += bytes(pdo - hlen - hd)
    tail = crc32c(data).to_bytes(4, "little") if ddg else b""
    return head, tail


def encode_pdu(pdu: Pdu, **kw: object) -> list[memoryview | bytes]:
    """Whole-PDU segments (head, data..., tail) ready for `sendmsg`."""
    data: Sequence[memoryview | bytes] = kw.pop("data", ())  # type: ignore[assignment]
    head, tail = encode(pdu, data=data, **kw)  # type: ignore[arg-type]
    out: list[memoryview | bytes] = [head, *data]
    if tail:
        out.append(tail)
    return out


# -- decoding -----------------------------------------------------------------------------

@dataclass
class Received:
    """One whole PDU: its header, flags, and whether its data digest matched."""

    pdu: Pdu
    flags: int
    data_len: int
    data_ok: bool = True
    data: memoryview | None = None  # TermReq error data / data read into the reader's own buffer


Sink = Callable[[Pdu, int], Sequence[memoryview]]


class _Section(IntEnum):
    PREFIX = 0
    HEADER = 1
    PAD = 2
    DATA = 3
    DDGST = 4


class PduReader:
    """Incremental decoder for one direction of one connection.

    The I/O layer loops: `buf = reader.buffer()`; `n = recv_into(buf)`; `got =
    reader.feed(n)`; a completed PDU comes back from `feed` (never more than one, since
    `buffer()` never spans two sections).  `sink(pdu, data_len)` names the buffers a
    data-carrying PDU's payload goes into (their total must be `data_len`); without a sink
    the payload lands in a buffer of the reader's own (`Received.data`).
    """

    def __init__(self, accepts: frozenset[PduType], *, sink: Sink | None = None,
                 max_data: int = 1 << 20) -> None:
        self.accepts = accepts
        self.sink = sink
        self.max_data = max_data
        self.hdgst = False
        self.ddgst = False
        self._scratch = memoryview(bytearray(MAX_HLEN + DIGEST_LEN + 256))
        self._reset()

    def set_digests(self, hdgst: bool, ddgst: bool) -> None:
        """After the ICReq/ICResp exchange: which digests the connection carries."""
        self.hdgst = hdgst
        self.ddgst = ddgst

    def _reset(self) -> None:
        self._section = _Section.PREFIX
        self._want = PREFIX_LEN
        self._got = 0
        self._type = PduType.IC_REQ
        self._flags = self._hlen = self._pdo = self._plen = 0
        self._pdu: Pdu | None = None
        self._dest: list[memoryview] = []
        self._dest_i = 0
        self._data_len = 0
        self._crc = 0
        self._own: memoryview | None = None

    @property
    def idle(self) -> bool:
        """True between PDUs (a clean place for the connection to end)."""
        return self._section == _Section.PREFIX and self._got == 0

    def buffer(self) -> memoryview:
        if self._section == _Section.DATA:
            v = self._dest[self._dest_i]
            return v[self._got:]
        if self._section == _Section.PREFIX:
            return self._scratch[self._got:PREFIX_LEN]
        base = PREFIX_LEN if self._section == _Section.HEADER else 0
        return self._scratch[base + self._got:base + self._want]

    def feed(self, n: int) -> Received | None:
        """`n` bytes were written into the last `buffer()`."""
        if n <= 0:
            raise ValueError("feed() needs the number of bytes received (> 0)")
        if self._section == _Section.DATA:
            v = self._dest[self._dest_i]
            if self.ddgst and self._flags & FLAG_DDGST:
                self._crc = _crc32c.crc32c(v[self._got:self._got + n], self._crc)
            self._got += n
            if self._got == v.nbytes:
                self._dest_i += 1
                self._got = 0
                while self._dest_i < len(self._dest) and self._dest[self._dest_i].nbytes == 0:
                    self._dest_i += 1
                if self._dest_i == len(self._dest):
                    return self._after_data()
            return None
        self._got += n
        if self._got < self._want:
            return None
        self._got = 0
        if self._section == _Section.PREFIX:
            return self._after_prefix()
        if self._section == _Section.HEADER:
            return self._after_header()
        if self._section == _Section.PAD:
            return self._start_data()
        return self._after_ddgst()

    # -- sections ---------------------------------------------------------------------------

    def _after_prefix(self) -> Received | None:
        t, flags, hlen, pdo, plen = CH.unpack_from(self._scratch)
        try:
            pt = PduType(t)
        except ValueError:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0, f"unknown PDU type {t:#x}") from None
        if pt not in self.accepts:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0,
                                f"{pt.name} PDU is not valid in this direction")
        if hlen != HLEN[pt]:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 2,
                                f"{pt.name}: HLEN {hlen}, expected {HLEN[pt]}")
        allowed = _ALLOWED_FLAGS.get(pt, 0)
        if flags & ~allowed:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 1,
                                f"{pt.name}: flags {flags:#x} not allowed")
        if pt not in _NO_DIGESTS and bool(flags & FLAG_HDGST) != self.hdgst:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 1,
                                f"{pt.name}: header digest flag disagrees with the "
                                f"negotiated digests")
        if flags & FLAG_DDGST and not self.ddgst:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 1,
                                f"{pt.name}: data digest present but not negotiated")
        hd = DIGEST_LEN if flags & FLAG_HDGST else 0
        if pt in (PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ):
            if not hlen <= plen <= hlen + MAX_TERM_DATA:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 4,
                                    f"{pt.name}: PLEN {plen} out of range")
            pdo = hlen if plen > hlen else 0
        elif pt in _NO_DATA or pdo == 0:
            if pdo != 0 or plen != hlen + hd:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 4 if pdo == 0 else 3,
                                    f"{pt.name}: PLEN {plen}/PDO {pdo} for a PDU without data "
                                    f"(expected PLEN {hlen + hd}, PDO 0)")
            if flags & FLAG_DDGST:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 1,
                                    f"{pt.name}: data digest flag without data")
        else:
            dd = DIGEST_LEN if flags & FLAG_DDGST else 0
            if pdo < hlen + hd:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 3,
                                    f"{pt.name}: PDO {pdo} inside the header")
            if plen <= pdo + dd:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 4,
                                    f"{pt.name}: PLEN {plen} leaves no data after PDO {pdo}")
            if plen - pdo - dd > self.max_data:
                raise ProtocolError(Fes.DATA_LIMIT_EXCEEDED, 4,
                                    f"{pt.name}: {plen - pdo - dd} bytes of data exceed the "
                                    f"limit of {self.max_data}")
        self._type, self._flags, self._hlen, self._pdo, self._plen = pt, flags, hlen, pdo, plen
        self._section = _Section.HEADER
        self._want = hlen - PREFIX_LEN + hd
        if self._want == 0:
            return self._after_header()
        return None

    def _after_header(self) -> Received | None:
        pt, hlen = self._type, self._hlen
        header = self._scratch[:hlen]
        if self._flags & FLAG_HDGST:
            want = int.from_bytes(self._scratch[hlen:hlen + 4], "little")
            if _crc32c.crc32c(header) != want:
                raise ProtocolError(Fes.HEADER_DIGEST_ERROR, 0,
                                    f"{pt.name}: header digest mismatch")
        body = header[CH_LEN:]
        if pt in (PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ):
            fes, fei = struct.unpack_from("<HI", body)
            self._pdu = TermReq(fes, fei, pt == PduType.H2C_TERM_REQ)
        else:
            self._pdu = _UNPACK[pt](body)
        hd = DIGEST_LEN if self._flags & FLAG_HDGST else 0
        if self._pdo == 0:
            return self._finish(0)
        self._data_len = self._plen - self._pdo - (DIGEST_LEN if self._flags & FLAG_DDGST else 0)
        if isinstance(self._pdu, (H2CData, C2HData)) and self._pdu.datal != self._data_len:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 16,
                                f"{pt.name}: DATAL {self._pdu.datal} but the PDU carries "
                                f"{self._data_len} bytes")
        pad = self._pdo - hlen - hd
        if pad > len(self._scratch):
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 3,
                                f"{pt.name}: PDO {self._pdo} too large")
        if pad:
            self._section = _Section.PAD
            self._want = pad
            return None
        return self._start_data()

    def _start_data(self) -> Received | None:
        pdu = self._pdu
        assert pdu is not None
        if self.sink is not None and not isinstance(pdu, TermReq):
            dest = [v for v in self.sink(pdu, self._data_len)]
            if sum(v.nbytes for v in dest) != self._data_len:
                raise ValueError("sink returned buffers of the wrong total length")
        else:
            self._own = memoryview(bytearray(self._data_len))
            dest = [self._own]
        self._dest = dest
        self._dest_i = 0
        while self._dest_i < len(dest) and dest[self._dest_i].nbytes == 0:
            self._dest_i += 1
        self._crc = 0
        self._section = _Section.DATA
        self._got = 0
        if self._dest_i == len(dest):
            return self._after_data()
        return None

    def _after_data(self) -> Received | None:
        if self._flags & FLAG_DDGST:
            self._section = _Section.DDGST
            self._want = DIGEST_LEN
            self._got = 0
            return None
        return self._finish(self._data_len)

    def _after_ddgst(self) -> Received | None:
        want = int.from_bytes(self._scratch[:4], "little")
        return self._finish(self._data_len, data_ok=(want == self._crc))

    def _finish(self, data_len: int, data_ok: bool = True) -> Received:
        pdu = self._pdu
        assert pdu is not None
        if isinstance(pdu, TermReq) and self._own is not None:
            pdu = TermReq(pdu.fes, pdu.fei, pdu.from_host, bytes(self._own))
        got = Received(pdu, self._flags, data_len, data_ok, self._own)
        self._reset()
        return got
