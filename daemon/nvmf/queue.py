"""The host side of one NVMe/TCP queue, as a state machine without sockets.

    q = HostQueue(qid=1, depth=32)
    send(q.start())                       # ICReq
    loop: n = recv_into(q.buffer()); for ev in q.received(n): ...
    cid, out = q.submit(read_cmd(...), data_in=[view]); send(out)

`received` returns events: `Connected` (the ICResp arrived: digests and MAXH2CDATA are
settled), `Send` (H2CData PDUs answering an R2T: the caller's write buffers, not copies),
`Completed` (a CapsuleResp, or a read's last C2HData with the SUCCESS flag) and
`Terminated` (a fatal transport error: send the H2CTermReq it carries, if any, and close).
C2HData payload is received straight into the read's destination buffers: `buffer()`
returns slices of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from kvtier.daemon.nvmf import nvme
from kvtier.daemon.nvmf.pdu import (
    DGST_DATA,
    DGST_HEADER,
    FLAG_LAST_PDU,
    FLAG_SUCCESS,
    HOST_RECEIVES,
    R2T,
    C2HData,
    CapsuleCmd,
    CapsuleResp,
    Fes,
    H2CData,
    ICReq,
    ICResp,
    Pdu,
    PduReader,
    ProtocolError,
    TermReq,
    encode,
    encode_pdu,
)

Segment = bytes | memoryview
ADMIN_IN_CAPSULE = 8192 - nvme.SQE_LEN  # the admin queue's command capsule is 8 KiB


class QueueState(Enum):
    NEW = "new"
    AWAIT_IC_RESP = "awaiting ICResp"
    READY = "ready"
    TERMINATED = "terminated"


class QueueError(Exception):
    """A call the queue's state does not allow (not connected, full, bad buffers)."""


@dataclass
class Send:
    segments: list[Segment]


@dataclass
class Connected:
    maxh2cdata: int
    cpda: int
    hdgst: bool
    ddgst: bool


@dataclass
class Completed:
    cid: int
    cqe: nvme.Cqe
    error: str | None = None  # a transport-level failure of this command (data digest)


@dataclass
class Terminated:
    reason: str
    send: Send | None = None  # the H2CTermReq to send before closing


Event = Send | Connected | Completed | Terminated


@dataclass
class _Command:
    cid: int
    data_in: list[memoryview] = field(default_factory=list)
    in_len: int = 0
    in_got: int = 0
    data_out: list[memoryview] = field(default_factory=list)
    out_len: int = 0
    out_asked: int = 0
    error: str | None = None


def slice_views(views: Sequence[memoryview], offset: int, length: int) -> list[memoryview]:
    """Bytes [offset, offset + length) of the concatenation of `views`, as views."""
    out: list[memoryview] = []
    for v in views:
        n = v.nbytes
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        out.append(v[offset:offset + take])
        length -= take
        offset = 0
        if not length:
            break
    if length:
        raise ValueError("range beyond the end of the buffers")
    return out


class HostQueue:
    def __init__(self, qid: int, depth: int, *, header_digest: bool = False,
                 data_digest: bool = False, in_capsule: int | None = None,
                 max_data: int = 1 << 20) -> None:
        if not 1 <= depth <= 65535:
            raise ValueError(f"queue depth {depth} out of range 1..65535")
        self.qid = qid
        self.depth = depth
        self.state = QueueState.NEW
        self.want_hdgst = header_digest
        self.want_ddgst = data_digest
        self.hdgst = self.ddgst = False
        self.cpda = 0
        self.maxh2cdata = 0
        self.in_capsule = ADMIN_IN_CAPSULE if in_capsule is None else in_capsule
        self._reader = PduReader(HOST_RECEIVES, sink=self._sink, max_data=max_data)
        self._cmds: dict[int, _Command] = {}
        self._free = list(range(depth - 1, -1, -1))

    # -- connection -------------------------------------------------------------------------

    def start(self) -> Send:
        if self.state is not QueueState.NEW:
            raise QueueError(f"queue {self.qid}: start() in state {self.state.value}")
        self.state = QueueState.AWAIT_IC_RESP
        dgst = (DGST_HEADER if self.want_hdgst else 0) | (DGST_DATA if self.want_ddgst else 0)
        return Send(encode_pdu(ICReq(pfv=0, hpda=0, dgst=dgst, maxr2t=0)))

    @property
    def outstanding(self) -> int:
        return len(self._cmds)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- submission -------------------------------------------------------------------------

    def submit(self, sqe: bytearray, *, data_out: Sequence[memoryview] = (),
               data_in: Sequence[memoryview] = ()) -> tuple[int, Send]:
        """Queue one command; returns its CID and the CapsuleCmd to send.

        `data_out` (a write's payload) goes in the capsule when it fits, otherwise it
        waits for the controller's R2T; `data_in` receives a read's C2HData.
        """
        if self.state is not QueueState.READY:
            raise QueueError(f"queue {self.qid}: cannot submit in state {self.state.value}")
        if data_out and data_in:
            raise QueueError("a command moves data in one direction")
        if not self._free:
            raise QueueError(f"queue {self.qid}: all {self.depth} command slots are in use")
        cid = self._free.pop()
        cmd = _Command(cid)
        out_len = sum(v.nbytes for v in data_out)
        in_len = sum(v.nbytes for v in data_in)
        nvme.set_cid(sqe, cid)
        capsule_data: list[memoryview] = []
        if out_len and out_len <= self.in_capsule:
            nvme.set_sgl(sqe, out_len, in_capsule=True)
            capsule_data = [v for v in data_out if v.nbytes]
        elif out_len:
            nvme.set_sgl(sqe, out_len, in_capsule=False)
            cmd.data_out = [v for v in data_out if v.nbytes]
            cmd.out_len = out_len
        else:
            nvme.set_sgl(sqe, in_len, in_capsule=False)
            cmd.data_in = [v for v in data_in if v.nbytes]
            cmd.in_len = in_len
        self._cmds[cid] = cmd
        return cid, Send(encode_pdu(CapsuleCmd(bytes(sqe)), hdgst=self.hdgst,
                                    ddgst=self.ddgst, data=capsule_data, pda=self.cpda))

    # -- receiving --------------------------------------------------------------------------

    def buffer(self) -> memoryview:
        """Where the next received bytes must be written."""
        return self._reader.buffer()

    @property
    def between_pdus(self) -> bool:
        return self._reader.idle

    def received(self, n: int) -> list[Event]:
        if self.state in (QueueState.NEW, QueueState.TERMINATED):
            raise QueueError(f"queue {self.qid}: data received in state {self.state.value}")
        try:
            got = self._reader.feed(n)
            if got is None:
                return []
            return self._handle(got.pdu, got.flags, got.data_ok)
        except ProtocolError as e:
            self.state = QueueState.TERMINATED
            term = TermReq(int(e.fes), e.fei, from_host=True)
            head, _ = encode(term)
            return [Terminated(f"queue {self.qid}: protocol error: {e}", Send([head]))]

    def terminate(self) -> list[int]:
        """The connection is gone: forget every command; returns their CIDs."""
        self.state = QueueState.TERMINATED
        cids = list(self._cmds)
        self._cmds.clear()
        return cids

    def _sink(self, pdu: Pdu, length: int) -> Sequence[memoryview]:
        if not isinstance(pdu, C2HData):
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0, f"unexpected data on {pdu.type.name}")
        if self.state is not QueueState.READY:
            raise ProtocolError(Fes.SEQUENCE_ERROR, 0, "C2HData before the connection is up")
        cmd = self._cmds.get(pdu.cccid)
        if cmd is None or not cmd.in_len:
            raise ProtocolError(Fes.INVALID_HEADER_FIELD, 8,
                                f"C2HData for CID {pdu.cccid}, which has no read outstanding")
        if pdu.datao != cmd.in_got or pdu.datao + length > cmd.in_len:
            raise ProtocolError(Fes.DATA_OUT_OF_RANGE, 12,
                                f"C2HData for CID {pdu.cccid}: bytes [{pdu.datao}, "
                                f"{pdu.datao + length}) but {cmd.in_got} of {cmd.in_len} "
                                f"received so far")
        return slice_views(cmd.data_in, pdu.datao, length)

    def _handle(self, pdu: Pdu, flags: int, data_ok: bool) -> list[Event]:
        if isinstance(pdu, TermReq):
            self.state = QueueState.TERMINATED
            return [Terminated(f"queue {self.qid}: controller terminated the connection: "
                               f"{pdu.describe()}")]
        if isinstance(pdu, ICResp):
            if self.state is not QueueState.AWAIT_IC_RESP:
                raise ProtocolError(Fes.SEQUENCE_ERROR, 0, "ICResp on a connected queue")
            if pdu.pfv != 0:
                raise ProtocolError(Fes.UNSUPPORTED_PARAMETER, 8,
                                    f"controller speaks PDU format version {pdu.pfv}")
            asked = (DGST_HEADER if self.want_hdgst else 0) | (DGST_DATA if self.want_ddgst else 0)
            if pdu.dgst & ~asked:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 11,
                                    f"controller enabled digests {pdu.dgst:#x} not asked for")
            if pdu.maxh2cdata < 4096 or pdu.maxh2cdata % 4:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 12,
                                    f"MAXH2CDATA {pdu.maxh2cdata} below 4096 or unaligned")
            if pdu.cpda > 31:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 10, f"CPDA {pdu.cpda} > 31")
            self.hdgst = bool(pdu.dgst & DGST_HEADER)
            self.ddgst = bool(pdu.dgst & DGST_DATA)
            self.cpda = pdu.cpda
            self.maxh2cdata = pdu.maxh2cdata
            self._reader.set_digests(self.hdgst, self.ddgst)
            self.state = QueueState.READY
            return [Connected(pdu.maxh2cdata, pdu.cpda, self.hdgst, self.ddgst)]
        if self.state is not QueueState.READY:
            raise ProtocolError(Fes.SEQUENCE_ERROR, 0, f"{pdu.type.name} before ICResp")
        if isinstance(pdu, CapsuleResp):
            cqe = nvme.Cqe.parse(pdu.cqe)
            cmd = self._cmds.pop(cqe.cid, None)
            if cmd is None:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 8 + 12,
                                    f"CapsuleResp for CID {cqe.cid}, which is not outstanding")
            self._free.append(cqe.cid)
            err = cmd.error
            if err is None and cqe.ok and cmd.in_got != cmd.in_len:
                err = f"read completed after {cmd.in_got} of {cmd.in_len} bytes"
            return [Completed(cqe.cid, cqe, err)]
        if isinstance(pdu, C2HData):
            cmd = self._cmds[pdu.cccid]
            cmd.in_got += pdu.datal
            if not data_ok:
                cmd.error = "data digest mismatch on received data"
            if flags & FLAG_SUCCESS:
                if not flags & FLAG_LAST_PDU or cmd.in_got != cmd.in_len:
                    raise ProtocolError(Fes.INVALID_HEADER_FIELD, 1,
                                        "C2HData SUCCESS flag before the last data")
                del self._cmds[pdu.cccid]
                self._free.append(pdu.cccid)
                cqe = nvme.Cqe(0, 0, 0, self.qid, pdu.cccid, 0)
                return [Completed(pdu.cccid, cqe, cmd.error)]
            return []
        if isinstance(pdu, R2T):
            cmd = self._cmds.get(pdu.cccid)
            if cmd is None or not cmd.out_len:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 8,
                                    f"R2T for CID {pdu.cccid}, which has no write waiting")
            if pdu.r2tl == 0 or pdu.r2to != cmd.out_asked or pdu.r2to + pdu.r2tl > cmd.out_len:
                raise ProtocolError(Fes.DATA_OUT_OF_RANGE, 12,
                                    f"R2T for CID {pdu.cccid}: [{pdu.r2to}, "
                                    f"{pdu.r2to + pdu.r2tl}) of a {cmd.out_len}-byte write "
                                    f"({cmd.out_asked} sent)")
            cmd.out_asked += pdu.r2tl
            return [self._h2c_data(cmd, pdu)]
        raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0, f"unexpected {pdu.type.name}")

    def _h2c_data(self, cmd: _Command, r2t: R2T) -> Send:
        segs: list[Segment] = []
        off, end = r2t.r2to, r2t.r2to + r2t.r2tl
        while off < end:
            n = min(self.maxh2cdata, end - off)
            data = slice_views(cmd.data_out, off, n)
            last = FLAG_LAST_PDU if off + n == end else 0
            segs.extend(encode_pdu(H2CData(cmd.cid, r2t.ttag, off, n), flags=last,
                                   hdgst=self.hdgst, ddgst=self.ddgst, data=data,
                                   pda=self.cpda))
            off += n
        return Send(segs)
