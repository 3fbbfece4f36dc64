"""The NVMe/TCP protocol core without sockets: PDUs, digests, the host queue machine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.daemon.nvmf import nvme
from kvtier.daemon.nvmf.pdu import (
    CONTROLLER_RECEIVES,
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
    PduReader,
    PduType,
    ProtocolError,
    Received,
    TermReq,
    encode_pdu,
)
from kvtier.daemon.nvmf.queue import (
    Completed,
    Connected,
    HostQueue,
    QueueError,
    QueueState,
    Send,
    Terminated,
)


def stream(segs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(s) for s in segs)


def feed_reader(r: PduReader, data: bytes, chunk: int = 1 << 30) -> list[Received]:
    out: list[Received] = []
    pos = 0
    while pos < len(data):
        buf = r.buffer()
        n = min(buf.nbytes, chunk, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        got = r.feed(n)
        if got is not None:
            out.append(got)
    return out


def feed_queue(q: HostQueue, data: bytes, chunk: int = 1 << 30) -> list[object]:
    events: list[object] = []
    pos = 0
    while pos < len(data):
        buf = q.buffer()
        n = min(buf.nbytes, chunk, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        events.extend(q.received(n))
        if any(isinstance(e, Terminated) for e in events):
            break  # the I/O layer closes the connection here
    return events


# -- PDUs -------------------------------------------------------------------------------------

host_pdus = st.one_of(
    st.builds(ICReq, st.just(0), st.integers(0, 31), st.integers(0, 3), st.integers(0, 7)),
    st.builds(CapsuleCmd, st.binary(min_size=64, max_size=64)),
    st.builds(H2CData, st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 1 << 20),
              st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(pdu=host_pdus, data=st.binary(min_size=0, max_size=5000), hdgst=st.booleans(),
       ddgst=st.booleans(), pda=st.integers(0, 7), chunk=st.integers(1, 300))
def test_every_pdu_round_trips_in_any_chunking(pdu: object, data: bytes, hdgst: bool,
                                              ddgst: bool, pda: int, chunk: int) -> None:
    if isinstance(pdu, ICReq):
        data = b""
    if isinstance(pdu, H2CData):
        if not data:
            data = b"x"
        pdu = H2CData(pdu.cccid, pdu.ttag, pdu.datao, len(data))
    segs = encode_pdu(pdu, hdgst=hdgst, ddgst=ddgst, data=[data] if data else [], pda=pda)
    r = PduReader(CONTROLLER_RECEIVES)
    if not isinstance(pdu, ICReq):
        r.set_digests(hdgst, ddgst)
    got = feed_reader(r, stream(segs), chunk)
    assert len(got) == 1 and r.idle
    assert got[0].pdu == pdu and got[0].data_ok
    assert bytes(got[0].data or b"") == data


@settings(max_examples=100, deadline=None)
@given(cid=st.integers(0, 65535), datao=st.integers(0, 1 << 30), data=st.binary(min_size=1,
       max_size=3000), flags=st.sampled_from([0, FLAG_LAST_PDU, FLAG_LAST_PDU | FLAG_SUCCESS]),
       digests=st.booleans(), chunk=st.integers(1, 500))
def test_c2h_data_lands_in_the_sink_buffers(cid: int, datao: int, data: bytes, flags: int,
                                            digests: bool, chunk: int) -> None:
    dest = bytearray(len(data) + 7)
    k = min(3, len(data))
    views = [memoryview(dest)[:k], memoryview(dest)[k:k], memoryview(dest)[k:len(data)]]
    r = PduReader(HOST_RECEIVES, sink=lambda p, n: views)
    r.set_digests(digests, digests)
    pdu = C2HData(cid, datao, len(data))
    got = feed_reader(r, stream(encode_pdu(pdu, flags=flags, hdgst=digests, ddgst=digests,
                                           data=[data])), chunk)
    assert got[0].pdu == pdu and got[0].flags & ~3 == flags and got[0].data is None
    assert bytes(dest[:len(data)]) == data


def test_other_pdus_round_trip() -> None:
    for pdu, accepts in ((ICResp(0, 2, 3, 8192), HOST_RECEIVES),
                         (CapsuleResp(bytes(range(16))), HOST_RECEIVES),
                         (R2T(5, 6, 4096, 8192), HOST_RECEIVES)):
        r = PduReader(accepts)
        r.set_digests(True, False)
        got = feed_reader(r, stream(encode_pdu(pdu, hdgst=True)), 5)
        assert got[0].pdu == pdu
    term = TermReq(int(Fes.HEADER_DIGEST_ERROR), 7, from_host=False, data=b"offending")
    r = PduReader(HOST_RECEIVES)
    got = feed_reader(r, stream(encode_pdu(term, data=[term.data])))
    assert got[0].pdu == term and "header digest error" in term.describe()


def _corrupt_cases() -> list[tuple[str, bytes, Fes]]:
    good = stream(encode_pdu(CapsuleResp(bytes(16)), hdgst=True))
    cases = []
    b = bytearray(good)
    b[10] ^= 1
    cases.append(("header digest", bytes(b), Fes.HEADER_DIGEST_ERROR))
    b = bytearray(good)
    b[0] = 0x42
    cases.append(("unknown type", bytes(b), Fes.INVALID_HEADER_FIELD))
    b = bytearray(good)
    b[0] = PduType.CAPSULE_CMD
    cases.append(("wrong direction", bytes(b), Fes.INVALID_HEADER_FIELD))
    b = bytearray(good)
    b[2] = 32
    cases.append(("bad HLEN", bytes(b), Fes.INVALID_HEADER_FIELD))
    b = bytearray(good)
    b[4:8] = (1000).to_bytes(4, "little")
    cases.append(("PLEN on a PDU without data", bytes(b), Fes.INVALID_HEADER_FIELD))
    b = bytearray(good)
    b[1] = 0
    cases.append(("missing header digest flag", bytes(b), Fes.INVALID_HEADER_FIELD))
    b = bytearray(good)
    b[1] |= 0x10
    cases.append(("unknown flag", bytes(b), Fes.INVALID_HEADER_FIELD))
    c2h = bytearray(stream(encode_pdu(C2HData(1, 0, 64), hdgst=True, data=[bytes(64)])))
    c2h[3] = 8  # PDO inside the header
    cases.append(("PDO inside the header", bytes(c2h), Fes.INVALID_HEADER_FIELD))
    big = stream(encode_pdu(C2HData(1, 0, 8192), hdgst=True, data=[bytes(8192)]))
    cases.append(("oversized data", big, Fes.DATA_LIMIT_EXCEEDED))
    c2h = bytearray(stream(encode_pdu(C2HData(1, 0, 64), hdgst=False, data=[bytes(64)])))
    cases.append(("digest flag disagrees", bytes(c2h), Fes.INVALID_HEADER_FIELD))
    return cases


@pytest.mark.parametrize("name,data,fes", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
def test_malformed_pdus_are_fatal_with_the_right_status(name: str, data: bytes, fes: Fes) -> None:
    r = PduReader(HOST_RECEIVES, sink=lambda p, n: [memoryview(bytearray(n))], max_data=4096)
    r.set_digests(True, False)
    with pytest.raises(ProtocolError) as e:
        feed_reader(r, data, 3)
    assert e.value.fes == fes, str(e.value)


def test_data_digest_error_is_reported_not_fatal() -> None:
    r = PduReader(HOST_RECEIVES, sink=lambda p, n: [memoryview(bytearray(n))])
    r.set_digests(False, True)
    b = bytearray(stream(encode_pdu(C2HData(1, 0, 100), ddgst=True, data=[bytes(100)])))
    b[40] ^= 0xFF
    got = feed_reader(r, bytes(b))
    assert len(got) == 1 and not got[0].data_ok and r.idle


def test_truncated_pdu_is_not_delivered() -> None:
    r = PduReader(HOST_RECEIVES)
    data = stream(encode_pdu(CapsuleResp(bytes(16))))
    assert feed_reader(r, data[:20]) == [] and not r.idle


# -- the host queue ---------------------------------------------------------------------------

def connected_queue(depth: int = 4, digests: bool = False, in_capsule: int = 4096,
                    maxh2c: int = 8192) -> HostQueue:
    q = HostQueue(1, depth, header_digest=digests, data_digest=digests, in_capsule=in_capsule)
    icreq = stream(q.start().segments)
    assert icreq[0] == PduType.IC_REQ
    dg = (DGST_HEADER | DGST_DATA) if digests else 0
    ev = feed_queue(q, stream(encode_pdu(ICResp(0, 0, dg, maxh2c))))
    assert ev == [Connected(maxh2c, 0, digests, digests)] and q.state is QueueState.READY
    return q


def cqe(cid: int, status: int = 0) -> bytes:
    return stream(encode_pdu(CapsuleResp(nvme.Cqe(0, 0, 0, 1, cid, status).pack())))


@pytest.mark.parametrize("success_flag", [False, True])
@pytest.mark.parametrize("digests", [False, True])
def test_read_receives_straight_into_the_callers_buffer(success_flag: bool,
                                                       digests: bool) -> None:
    q = connected_queue(digests=digests)
    dest = np.zeros(10000, np.uint8)
    view = memoryview(dest)
    cid, send = q.submit(nvme.read_cmd(1, 0, 3), data_in=[view[:4096], view[4096:10000]])
    sqe = nvme.Sqe.parse(bytes(send.segments[0])[8:72])
    assert sqe.cid == cid and sqe.opcode == nvme.Opcode.READ and sqe.sgl_length == 10000
    src = np.random.default_rng(1).integers(0, 256, 10000, dtype=np.uint8).tobytes()
    wire = b""
    for off in range(0, 10000, 4000):
        n = min(4000, 10000 - off)
        last = off + n == 10000
        flags = (FLAG_LAST_PDU | (FLAG_SUCCESS if success_flag else 0)) if last else 0
        wire += stream(encode_pdu(C2HData(cid, off, n), flags=flags, hdgst=digests,
                                  ddgst=digests, data=[src[off:off + n]]))
    if not success_flag:
        wire += stream(encode_pdu(CapsuleResp(nvme.Cqe(0, 0, 0, 1, cid, 0).pack()),
                                  hdgst=digests))
    pos, events = 0, []
    while pos < len(wire):
        buf = q.buffer()
        if q._reader._section == 3:  # a data section: the buffer is the caller's memory
            assert np.shares_memory(np.frombuffer(buf, np.uint8), dest)
        n = min(buf.nbytes, 777, len(wire) - pos)
        buf[:n] = wire[pos:pos + n]
        pos += n
        events.extend(q.received(n))
    assert len(events) == 1 and isinstance(events[0], Completed) and events[0].error is None
    assert events[0].cqe.ok and dest.tobytes() == src and q.outstanding == 0


def test_write_answers_r2t_with_the_callers_buffers() -> None:
    q = connected_queue(in_capsule=4096, maxh2c=4096)
    payload = np.arange(10000, dtype=np.uint8)
    cid, send = q.submit(nvme.write_cmd(1, 0, 3), data_out=[memoryview(payload)])
    assert len(send.segments) == 1  # too big for the capsule: no data yet
    ev = feed_queue(q, stream(encode_pdu(R2T(cid, 9, 0, 10000))))
    assert len(ev) == 1 and isinstance(ev[0], Send)
    datas = [s for s in ev[0].segments if isinstance(s, memoryview)]
    assert all(np.shares_memory(np.frombuffer(d, np.uint8), payload) for d in datas)
    r = PduReader(CONTROLLER_RECEIVES)
    got = feed_reader(r, stream(ev[0].segments))
    assert [g.pdu.datal for g in got] == [4096, 4096, 1808]  # type: ignore[union-attr]
    assert [bool(g.flags & FLAG_LAST_PDU) for g in got] == [False, False, True]
    assert b"".join(bytes(g.data) for g in got if g.data) == payload.tobytes()
    assert feed_queue(q, cqe(cid))[0] == Completed(cid, nvme.Cqe(0, 0, 0, 1, cid, 0))


def test_small_write_goes_in_the_capsule() -> None:
    q = connected_queue(in_capsule=4096)
    _, send = q.submit(nvme.write_cmd(1, 0, 1), data_out=[memoryview(b"z" * 4096)])
    r = PduReader(CONTROLLER_RECEIVES)
    got = feed_reader(r, stream(send.segments))
    sqe = nvme.Sqe.parse(got[0].pdu.sqe)  # type: ignore[union-attr]
    assert sqe.sgl_type == nvme.SGL_DATA_BLOCK_OFFSET and bytes(got[0].data or b"") == b"z" * 4096


def test_queue_depth_is_enforced_and_cids_are_reused() -> None:
    q = connected_queue(depth=2)
    a, _ = q.submit(nvme.flush_cmd(1))
    b, _ = q.submit(nvme.flush_cmd(1))
    with pytest.raises(QueueError, match="slots"):
        q.submit(nvme.flush_cmd(1))
    feed_queue(q, cqe(a))
    c, _ = q.submit(nvme.flush_cmd(1))
    assert c == a and b != a


def _unexpected(q: HostQueue, kind: str) -> bytes:
    if kind == "icresp":
        return stream(encode_pdu(ICResp(0, 0, 0, 8192)))
    if kind == "resp_unknown_cid":
        return cqe(3)
    if kind == "c2h_no_read":
        return stream(encode_pdu(C2HData(3, 0, 10), data=[bytes(10)]))
    if kind == "r2t_no_write":
        return stream(encode_pdu(R2T(3, 0, 0, 10)))
    if kind == "c2h_out_of_range":
        cid, _ = q.submit(nvme.read_cmd(1, 0, 1), data_in=[memoryview(bytearray(16))])
        return stream(encode_pdu(C2HData(cid, 8, 16), data=[bytes(16)]))
    if kind == "success_not_last":
        cid, _ = q.submit(nvme.read_cmd(1, 0, 1), data_in=[memoryview(bytearray(16))])
        return stream(encode_pdu(C2HData(cid, 0, 8), flags=FLAG_SUCCESS, data=[bytes(8)]))
    if kind == "r2t_beyond_write":
        cid, _ = q.submit(nvme.write_cmd(1, 0, 2), data_out=[memoryview(bytearray(8192))])
        return stream(encode_pdu(R2T(cid, 0, 4096, 8192)))
    raise AssertionError(kind)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["icresp", "resp_unknown_cid", "c2h_no_read", "r2t_no_write",
                             "c2h_out_of_range", "success_not_last", "r2t_beyond_write"]),
       chunk=st.integers(1, 64))
def test_unexpected_pdus_terminate_the_connection(kind: str, chunk: int) -> None:
    q = connected_queue(in_capsule=1024)
    data = _unexpected(q, kind)
    ev = feed_queue(q, data, chunk)
    assert len(ev) == 1 and isinstance(ev[0], Terminated), ev
    assert ev[0].send is not None and bytes(ev[0].send.segments[0])[0] == PduType.H2C_TERM_REQ
    assert q.state is QueueState.TERMINATED


@pytest.mark.parametrize("kind", ["resp", "c2h", "r2t"])
def test_pdus_before_icresp_are_sequence_errors(kind: str) -> None:
    q = HostQueue(1, 4)
    q.start()
    data = {"resp": cqe(0), "c2h": stream(encode_pdu(C2HData(0, 0, 4), data=[bytes(4)])),
            "r2t": stream(encode_pdu(R2T(0, 0, 0, 4)))}[kind]
    ev = feed_queue(q, data)
    assert isinstance(ev[0], Terminated)
    with pytest.raises(QueueError):
        q.submit(nvme.flush_cmd(1))


def test_controller_termination_is_reported() -> None:
    q = connected_queue()
    term = TermReq(int(Fes.DATA_OUT_OF_RANGE), 12, from_host=False)
    ev = feed_queue(q, stream(encode_pdu(term)))
    assert isinstance(ev[0], Terminated) and "data out of range" in ev[0].reason


def test_icresp_with_unasked_digests_or_small_maxh2cdata_is_refused() -> None:
    for resp in (ICResp(0, 0, DGST_DATA, 8192), ICResp(0, 0, 0, 1024), ICResp(1, 0, 0, 8192)):
        q = HostQueue(0, 4)
        q.start()
        assert isinstance(feed_queue(q, stream(encode_pdu(resp)))[0], Terminated)


# -- NVMe structures --------------------------------------------------------------------------

@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
       st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**15 - 1))
def test_cqe_round_trip(dw0: int, dw1: int, sqhd: int, sqid: int, cid: int, status: int) -> None:
    c = nvme.Cqe(dw0, dw1, sqhd, sqid, cid, status)
    assert nvme.Cqe.parse(c.pack()) == c


def test_status_codes_read_as_words() -> None:
    c = nvme.Cqe(0, 0, 0, 1, 0, nvme.status_field(0, 0x80, dnr=True))
    assert not c.ok and c.dnr and c.describe().startswith("LBA out of range")
    assert "invalid host" in nvme.status_message(1, 0x84)
    assert "unrecovered read error" in nvme.status_message(2, 0x81)
    assert "unknown vendor status" in nvme.status_message(7, 0x12)


def test_identify_and_connect_data_round_trip() -> None:
    ic = nvme.IdentifyController.parse(nvme.build_identify_controller(
        serial="S1", model="M", firmware="F", mdts_shift=5, cntlid=7, ioccsz=64 + 4096,
        maxcmd=128, nn=2, subnqn="nqn.x:y"))
    assert (ic.mdts, ic.cntlid, ic.ioccsz, ic.nn, ic.subnqn) == (131072, 7, 4160, 2, "nqn.x:y")
    ns = nvme.IdentifyNamespace.parse(nvme.build_identify_namespace(1000, 4096))
    assert (ns.nsze, ns.lba_size, ns.metadata_size) == (1000, 4096, 0)
    data = nvme.connect_data(b"h" * 16, 0xFFFF, "nqn.sub", "nqn.host")
    assert nvme.parse_connect_data(data) == (b"h" * 16, 0xFFFF, "nqn.sub", "nqn.host")
    with pytest.raises(ValueError):
        nvme.connect_data(b"h" * 16, 1, "x" * 300, "nqn.host")
    sqe = nvme.Sqe.parse(nvme.read_cmd(3, 2**40 + 5, 256))
    assert (sqe.nsid, sqe.slba, sqe.nlb) == (3, 2**40 + 5, 256)
