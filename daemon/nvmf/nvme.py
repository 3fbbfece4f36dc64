"""NVMe commands, completions and registers as the fabrics host uses them.

Submission queue entries (64 bytes) for the admin commands (Identify, Set Features,
Keep Alive), the NVM I/O commands (Read, Write, Flush) and the fabrics commands (Connect,
Property Get/Set); completion queue entries (16 bytes) with every status code the
specification defines turned into words; Identify data and the CAP register decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

SQE_LEN = 64
CQE_LEN = 16
NQN_LEN = 256
CONNECT_DATA_LEN = 1024
IDENTIFY_LEN = 4096
PSDT_SGL = 0x40  # CDW0 bits 7:6 = 01b: SGLs, metadata pointer contiguous (fabrics)


class Opcode(IntEnum):
    # admin
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    IDENTIFY = 0x06
    KEEP_ALIVE = 0x18
    # NVM command set
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    # fabrics
    FABRICS = 0x7F


class Fctype(IntEnum):
    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    DISCONNECT = 0x08


class Cns(IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01


FEATURE_NUMBER_OF_QUEUES = 0x07

# controller properties (register offsets)
REG_CAP = 0x00
REG_VS = 0x08
REG_CC = 0x14
REG_CSTS = 0x1C
CC_EN = 0x1
CC_IOSQES_IOCQES = (6 << 16) | (4 << 20)  # 64-byte SQEs, 16-byte CQEs
CSTS_RDY = 0x1
CSTS_CFS = 0x2

# SGL descriptor identifiers (byte 15 of the descriptor)
SGL_DATA_BLOCK_OFFSET = 0x01  # data block, offset subtype: in-capsule data
SGL_TRANSPORT_DATA_BLOCK = 0x5A  # transport data block, transport-specific: C2H/R2T data


def _sqe(opcode: int, *, nsid: int = 0, cdw10: int = 0, cdw11: int = 0, cdw12: int = 0,
         cdw13: int = 0, cdw14: int = 0, cdw15: int = 0) -> bytearray:
    b = bytearray(SQE_LEN)
    b[0] = opcode
    struct.pack_into("<I", b, 4, nsid)
    struct.pack_into("<6I", b, 40, cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)
    return b


def set_cid(sqe: bytearray, cid: int) -> None:
    struct.pack_into("<H", sqe, 2, cid)


def set_sgl(sqe: bytearray, length: int, in_capsule: bool) -> None:
    """Data pointer: one SGL descriptor for the command's data (fabrics always use SGLs)."""
    sqe[1] = (sqe[1] & 0x3F) | PSDT_SGL
    struct.pack_into("<QI3xB", sqe, 24, 0, length,
                     SGL_DATA_BLOCK_OFFSET if in_capsule else SGL_TRANSPORT_DATA_BLOCK)


def read_cmd(nsid: int, slba: int, nlb: int) -> bytearray:
    """Read `nlb` (>= 1) logical blocks from `slba`."""
    return _sqe(Opcode.READ, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                cdw12=nlb - 1)


def write_cmd(nsid: int, slba: int, nlb: int, *, fua: bool = False) -> bytearray:
    return _sqe(Opcode.WRITE, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                cdw12=(nlb - 1) | (1 << 30 if fua else 0))


def flush_cmd(nsid: int) -> bytearray:
    return _sqe(Opcode.FLUSH, nsid=nsid)


def identify_cmd(cns: Cns, nsid: int = 0) -> bytearray:
    return _sqe(Opcode.IDENTIFY, nsid=nsid, cdw10=int(cns))


def keep_alive_cmd() -> bytearray:
    return _sqe(Opcode.KEEP_ALIVE)


def set_number_of_queues_cmd(n: int) -> bytearray:
    """Ask for `n` I/O submission and completion queues (0-based in the command)."""
    return _sqe(Opcode.SET_FEATURES, cdw10=FEATURE_NUMBER_OF_QUEUES,
                cdw11=((n - 1) << 16) | (n - 1))


def _fabrics(fctype: Fctype) -> bytearray:
    b = bytearray(SQE_LEN)
    b[0] = Opcode.FABRICS
    b[4] = fctype
    return b


def connect_cmd(qid: int, sqsize: int, kato_ms: int) -> bytearray:
    """Fabrics Connect for queue `qid` with `sqsize` entries (sent 0-based)."""
    b = _fabrics(Fctype.CONNECT)
    struct.pack_into("<HHHBxI", b, 40, 0, qid, sqsize - 1, 0, kato_ms)
    return b


def connect_data(hostid: bytes, cntlid: int, subnqn: str, hostnqn: str) -> bytes:
    if len(hostid) != 16:
        raise ValueError("host identifier must be 16 bytes")
    out = bytearray(CONNECT_DATA_LEN)
    out[0:16] = hostid
    struct.pack_into("<H", out, 16, cntlid)
    for at, nqn in ((256, subnqn), (512, hostnqn)):
        raw = nqn.encode()
        if not raw or len(raw) >= NQN_LEN:
            raise ValueError(f"NQN {nqn!r} must be 1..255 bytes")
        out[at:at + len(raw)] = raw
    return bytes(out)


def parse_connect_data(b: bytes | memoryview) -> tuple[bytes, int, str, str]:
    """(hostid, cntlid, subnqn, hostnqn) from Connect's data (the target side)."""
    mv = bytes(b[:CONNECT_DATA_LEN])
    cntlid = struct.unpack_from("<H", mv, 16)[0]
    return (mv[0:16], cntlid, mv[256:512].split(b"\0", 1)[0].decode(errors="replace"),
            mv[512:768].split(b"\0", 1)[0].decode(errors="replace"))


def property_get_cmd(offset: int, size8: bool) -> bytearray:
    b = _fabrics(Fctype.PROPERTY_GET)
    b[40] = 1 if size8 else 0
    struct.pack_into("<I", b, 44, offset)
    return b


def property_set_cmd(offset: int, value: int, size8: bool = False) -> bytearray:
    b = _fabrics(Fctype.PROPERTY_SET)
    b[40] = 1 if size8 else 0
    struct.pack_into("<IQ", b, 44, offset, value)
    return b


@dataclass(frozen=True)
class Sqe:
    """The fields of a submission entry the target side looks at."""

    opcode: int
    cid: int
    nsid: int
    fctype: int
    sgl_length: int
    sgl_type: int
    cdw: tuple[int, ...]  # cdw10..cdw15

    @classmethod
    def parse(cls, b: bytes | memoryview) -> Sqe:
        op, _, cid, nsid = struct.unpack_from("<BBHI", b, 0)
        _, length, sgl_type = struct.unpack_from("<QI3xB", b, 24)
        return cls(op, cid, nsid, b[4], length, sgl_type, struct.unpack_from("<6I", b, 40))

    @property
    def slba(self) -> int:
        return self.cdw[0] | (self.cdw[1] << 32)

    @property
    def nlb(self) -> int:
        return (self.cdw[2] & 0xFFFF) + 1


# -- completions --------------------------------------------------------------------------

class Sct(IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3
    VENDOR = 7


_STATUS: dict[tuple[int, int], str] = {
    (0, 0x00): "success",
    (0, 0x01): "invalid command opcode",
    (0, 0x02): "invalid field in command",
    (0, 0x03): "command ID conflict",
    (0, 0x04): "data transfer error",
    (0, 0x05): "commands aborted due to power loss notification",
    (0, 0x06): "internal error",
    (0, 0x07): "command abort requested",
    (0, 0x08): "command aborted due to SQ deletion",
    (0, 0x09): "command aborted due to failed fused command",
    (0, 0x0A): "command aborted due to missing fused command",
    (0, 0x0B): "invalid namespace or format",
    (0, 0x0C): "command sequence error",
    (0, 0x0D): "invalid SGL segment descriptor",
    (0, 0x0E): "invalid number of SGL descriptors",
    (0, 0x0F): "data SGL length invalid",
    (0, 0x10): "metadata SGL length invalid",
    (0, 0x11): "SGL descriptor type invalid",
    (0, 0x12): "invalid use of controller memory buffer",
    (0, 0x13): "PRP offset invalid",
    (0, 0x14): "atomic write unit exceeded",
    (0, 0x15): "operation denied",
    (0, 0x16): "SGL offset invalid",
    (0, 0x18): "host identifier inconsistent format",
    (0, 0x19): "keep alive timer expired",
    (0, 0x1A): "keep alive timeout invalid",
    (0, 0x1B): "command aborted due to preempt and abort",
    (0, 0x1C): "sanitize failed",
    (0, 0x1D): "sanitize in progress",
    (0, 0x1E): "SGL data block granularity invalid",
    (0, 0x1F): "command not supported for queue in CMB",
    (0, 0x20): "namespace is write protected",
    (0, 0x21): "command interrupted",
    (0, 0x22): "transient transport error",
    (0, 0x80): "LBA out of range",
    (0, 0x81): "capacity exceeded",
    (0, 0x82): "namespace not ready",
    (0, 0x83): "reservation conflict",
    (0, 0x84): "format in progress",
    (1, 0x00): "completion queue invalid",
    (1, 0x01): "invalid queue identifier",
    (1, 0x02): "invalid queue size",
    (1, 0x03): "abort command limit exceeded",
    (1, 0x05): "asynchronous event request limit exceeded",
    (1, 0x06): "invalid firmware slot",
    (1, 0x07): "invalid firmware image",
    (1, 0x08): "invalid interrupt vector",
    (1, 0x09): "invalid log page",
    (1, 0x0A): "invalid format",
    (1, 0x0D): "feature identifier not saveable",
    (1, 0x0E): "feature not changeable",
    (1, 0x0F): "feature not namespace specific",
    (1, 0x80): "connect: incompatible format / conflicting attributes",
    (1, 0x81): "connect: controller busy / invalid protection information",
    (1, 0x82): "connect: invalid parameters / write to read-only range",
    (1, 0x83): "connect: restart discovery",
    (1, 0x84): "connect: invalid host (not on the subsystem's allow-list)",
    (1, 0x85): "connect: invalid queue type",
    (1, 0x90): "discovery restart",
    (1, 0x91): "authentication required",
    (2, 0x80): "write fault",
    (2, 0x81): "unrecovered read error",
    (2, 0x82): "end-to-end guard check error",
    (2, 0x83): "end-to-end application tag check error",
    (2, 0x84): "end-to-end reference tag check error",
    (2, 0x85): "compare failure",
    (2, 0x86): "access denied",
    (2, 0x87): "deallocated or unwritten logical block",
    (3, 0x00): "internal path error",
    (3, 0x01): "asymmetric access persistent loss",
    (3, 0x02): "asymmetric access inaccessible",
    (3, 0x03): "asymmetric access transition",
    (3, 0x60): "controller pathing error",
    (3, 0x70): "host pathing error",
    (3, 0x71): "command aborted by host",
}


def status_message(sct: int, sc: int) -> str:
    what = _STATUS.get((sct, sc))
    if what is None:
        try:
            kind = Sct(sct).name.lower().replace("_", " ")
        except ValueError:
            kind = f"type {sct}"
        what = f"unknown {kind} status"
    return f"{what} (SCT {sct:#x}, SC {sc:#04x})"


def status_field(sct: int, sc: int, dnr: bool = False) -> int:
    """The 15-bit status field (without the phase bit) as it sits in a CQE >> 1."""
    return (sc & 0xFF) | ((sct & 7) << 8) | (0x4000 if dnr else 0)


_CQE = struct.Struct("<IIHHHH")


@dataclass(frozen=True)
class Cqe:
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # the 15-bit status field (phase bit dropped)

    @classmethod
    def parse(cls, b: bytes | memoryview) -> Cqe:
        dw0, dw1, sqhd, sqid, cid, st = _CQE.unpack_from(b)
        return cls(dw0, dw1, sqhd, sqid, cid, st >> 1)

    def pack(self) -> bytes:
        return _CQE.pack(self.dw0, self.dw1, self.sqhd, self.sqid, self.cid,
                         (self.status << 1) & 0xFFFF)

    @property
    def sc(self) -> int:
        return self.status & 0xFF

    @property
    def sct(self) -> int:
        return (self.status >> 8) & 0x7

    @property
    def dnr(self) -> bool:
        return bool(self.status & 0x4000)

    @property
    def ok(self) -> bool:
        return self.sc == 0 and self.sct == 0

    @property
    def value64(self) -> int:
        """Property Get's 8-byte value."""
        return self.dw0 | (self.dw1 << 32)

    def describe(self) -> str:
        return status_message(self.sct, self.sc) + (", do not retry" if self.dnr else "")


# -- identify data and registers ----------------------------------------------------------

@dataclass(frozen=True)
class Cap:
    mqes: int  # maximum queue entries, 1-based
    timeout_ms: int  # worst case time to become ready
    mpsmin: int  # minimum memory page size in bytes

    @classmethod
    def parse(cls, v: int) -> Cap:
        return cls((v & 0xFFFF) + 1, ((v >> 24) & 0xFF) * 500, 1 << (12 + ((v >> 48) & 0xF)))


@dataclass(frozen=True)
class IdentifyController:
    serial: str
    model: str
    firmware: str
    mdts: int  # maximum data transfer size in bytes; 0: no limit
    cntlid: int
    ioccsz: int  # I/O command capsule size in bytes (SQE + in-capsule data)
    iorcsz: int
    icdoff: int
    maxcmd: int
    nn: int  # number of namespaces
    subnqn: str

    @classmethod
    def parse(cls, b: bytes | memoryview, mpsmin: int = 4096) -> IdentifyController:
        raw = bytes(b[:IDENTIFY_LEN])
        mdts = raw[77]
        return cls(
            serial=raw[4:24].decode(errors="replace").strip(),
            model=raw[24:64].decode(errors="replace").strip(),
            firmware=raw[64:72].decode(errors="replace").strip(),
            mdts=(mpsmin << mdts) if mdts else 0,
            cntlid=struct.unpack_from("<H", raw, 78)[0],
            ioccsz=struct.unpack_from("<I", raw, 1792)[0] * 16,
            iorcsz=struct.unpack_from("<I", raw, 1796)[0] * 16,
            icdoff=struct.unpack_from("<H", raw, 1800)[0],
            maxcmd=struct.unpack_from("<H", raw, 514)[0],
            nn=struct.unpack_from("<I", raw, 516)[0],
            subnqn=raw[768:1024].split(b"\0", 1)[0].decode(errors="replace"),
        )


def build_identify_controller(*, serial: str, model: str, firmware: str, mdts_shift: int,
                              cntlid: int, ioccsz: int, maxcmd: int, nn: int,
                              subnqn: str) -> bytes:
    """Identify Controller data (the target side; also the round-trip tests)."""
    b = bytearray(IDENTIFY_LEN)
    b[4:24] = serial.encode()[:20].ljust(20)
    b[24:64] = model.encode()[:40].ljust(40)
    b[64:72] = firmware.encode()[:8].ljust(8)
    b[77] = mdts_shift
    struct.pack_into("<H", b, 78, cntlid)
    struct.pack_into("<I", b, 80, 0x00010400)  # NVMe 1.4
    b[512] = 0x66  # SQES: 64 bytes
    b[513] = 0x44  # CQES: 16 bytes
    struct.pack_into("<H", b, 514, maxcmd)
    struct.pack_into("<I", b, 516, nn)
    raw = subnqn.encode()[:255]
    b[768:768 + len(raw)] = raw
    struct.pack_into("<I", b, 1792, ioccsz // 16)
    struct.pack_into("<I", b, 1796, 1)
    return bytes(b)


@dataclass(frozen=True)
class IdentifyNamespace:
    nsze: int  # size in logical blocks
    ncap: int
    lba_size: int
    metadata_size: int

    @classmethod
    def parse(cls, b: bytes | memoryview) -> IdentifyNamespace:
        raw = bytes(b[:IDENTIFY_LEN])
        nsze, ncap = struct.unpack_from("<QQ", raw, 0)
        fmt = raw[26] & 0xF
        ms, lbads = struct.unpack_from("<HB", raw, 128 + 4 * fmt)
        return cls(nsze, ncap, 1 << lbads if lbads else 0, ms)


def build_identify_namespace(nsze: int, lba_size: int) -> bytes:
    b = bytearray(IDENTIFY_LEN)
    struct.pack_into("<QQQ", b, 0, nsze, nsze, nsze)
    b[25] = 0  # one LBA format
    b[26] = 0
    struct.pack_into("<HBB", b, 128, 0, lba_size.bit_length() - 1, 0)
    return bytes(b)
