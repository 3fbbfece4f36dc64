"""Nothing a client sends can crash kvtierd or reach outside that client's own arena.

A raw client pushes hand-made and random ring entries and control messages at a live
daemon; a well-behaved client of another tenant keeps working throughout.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.client.client import Client
from kvtier.client.errors import DisconnectedError
from kvtier.client.protocol import (
    SQE,
    Completion,
    Msg,
    Op,
    Request,
    Status,
    encode_ctrl,
)

HERE = Path(__file__).parent
ARENA = 4 << 20


def k(i: int) -> bytes:
    return hashlib.sha256(b"abuse%d" % i).digest()[:16]


def raw(c: Client, data: bytes, tag: int, timeout: float = 10) -> Completion:
    """Push a hand-made SQE (its tag field is overwritten with `tag`) and wait for its CQE."""
    data = data[:8] + struct.pack("<Q", tag) + data[16:]
    fut: Future[Completion] = Future()
    assert c._space.acquire(timeout=timeout)
    with c._lock:
        c._futures[tag] = fut
        assert c.sq.try_push(data)
    os.eventfd_write(c._sq_efd, 1)
    return fut.result(timeout=timeout)


def sqe(**kw: object) -> bytes:
    return Request(**{"op": Op.NOP, "tag": 0, **kw}).encode()  # type: ignore[arg-type]


class Good:
    """A well-behaved client of another tenant that checks its own data."""

    def __init__(self, d: Daemon) -> None:
        self.c = Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=ARENA)
        self.n = 0

    def check(self) -> None:
        self.n += 1
        v = np.full(20_000 + self.n, self.n % 256, np.uint8)
        self.c.put("good", k(self.n), [v])
        assert self.c.get(k(self.n)) == v.tobytes()


@pytest.fixture
def live(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path).start()
    good = Good(d)
    yield d, good
    good.check()
    good.c.close()
    assert d.stop() == 0, d.log.read_text()[-3000:]


def test_bad_entries_get_error_completions(live) -> None:  # type: ignore[no-untyped-def]
    d, good = live
    with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA) as c:
        key = k(1)
        cases = [
            (sqe(op=99), Status.BAD_OP),
            (sqe(op=Op.GET, key=key, data_off=ARENA - 10, data_len=100), Status.INVALID),
            (sqe(op=Op.GET, key=key, data_off=2**63, data_len=2**63), Status.INVALID),
            (sqe(op=Op.PUT, key=key, session="s", data_off=0, data_len=ARENA + 1),
             Status.INVALID),
            (sqe(op=Op.PUT, key=key, session="s", data_off=0, data_len=100, count=3,
                 aux_off=ARENA - 8), Status.INVALID),
            (sqe(op=Op.PUT, key=key, session="s", data_off=0, data_len=100, count=2,
                 aux_off=4096), Status.INVALID),  # frame table of zeros: does not add up
            (sqe(op=Op.PUT, key=key[:7], session="s", data_len=10), Status.INVALID),
            (sqe(op=Op.PUT, key=key, session="", data_len=10), Status.INVALID),
            (sqe(op=Op.LOOKUP, flags=1, key=bytes(16), count=10**9), Status.INVALID),
            (sqe(op=Op.LOOKUP, flags=1, key=bytes(16), count=10, data_off=ARENA - 16,
                 aux_off=0), Status.INVALID),
            (sqe(op=Op.STATS, data_off=0, data_len=10), Status.BUFFER_TOO_SMALL),
            (sqe(op=Op.GET, key=key, data_off=0, data_len=100), Status.NOT_FOUND),
            (sqe(op=Op.PURGE_SESSION, session=""), Status.INVALID),
        ]
        bad_session = bytearray(sqe(op=Op.PUT, key=key, session="s", data_len=1))
        bad_session[3] = 41  # session length past the field
        cases.append((bytes(bad_session), Status.INVALID))
        bad_utf8 = bytearray(sqe(op=Op.PUT, key=key, session="ab", data_len=1))
        bad_utf8[88:90] = b"\xff\xfe"
        cases.append((bytes(bad_utf8), Status.INVALID))
        for i, (entry, want) in enumerate(cases):
            comp = raw(c, entry, 1000 + i)
            assert comp.status == want, (i, Status(comp.status), want)
            good.check()
        c.put("s", key, [b"bob is fine"])  # the misbehaving client is still served
        assert c.get(key) == b"bob is fine"


def test_corrupt_ring_counters_drop_only_that_client(live) -> None:  # type: ignore[no-untyped-def]
    d, good = live
    c = Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA)
    c.sq._ctl[32] = (c.sq.head + 100_000) & 0xFFFFFFFF  # tail far past head
    os.eventfd_write(c._sq_efd, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and c._error is None:
        time.sleep(0.02)
    with pytest.raises(DisconnectedError, match=r"ring counters corrupt|closed"):
        c.put("s", k(5), [b"x"])
    c.close()
    good.check()
    assert "dropped" in d.log.read_text()


def test_garbage_control_messages(live) -> None:  # type: ignore[no-untyped-def]
    d, good = live
    for junk in [b"\xff" * 64, struct.pack("<IHH", 10**9, 1, 0), b"\x08\x00\x00\x00\x01\x00"
                 b"\x00\x00{not", encode_ctrl(Msg.HELLO_OK, {}), encode_ctrl(Msg.HELLO, {})]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(d.socket)
        s.sendall(junk)
        try:
            s.recv(4096)  # an ERROR or EOF; never a hang past HELLO_TIMEOUT
        except (ConnectionError, TimeoutError):
            pass
        s.close()
        good.check()


def test_client_killed_mid_operation(live) -> None:  # type: ignore[no-untyped-def]
    d, good = live
    code = (
        "import sys, numpy as np; from kvtier.client.client import Client\n"
        "from kvtier.client.protocol import Request, Op\n"
        f"c = Client.connect({d.socket!r}, 'bob', {TOKENS['bob']!r}, arena_size=32 << 20)\n"
        "s = c.allocator.alloc(16 << 20)\n"
        "for i in range(200):\n"
        "    c.submit(c.put_request('s', bytes([i]) * 16, s, [16 << 20]))\n"
        "print('submitted', flush=True)\n"
        "import time; time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "submitted"
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(5):
        good.check()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.admin("status")["daemon"]["clients"].__len__() > 1:
        time.sleep(0.05)
    assert len(d.admin("status")["daemon"]["clients"]) == 1  # only the good client remains


entries = st.one_of(
    st.binary(min_size=128, max_size=128),
    st.builds(lambda op, fl, klen, slen, cnt, doff, dlen, aux, fa, fb, ttl, key, sess:
              SQE.pack(op, fl, klen, slen, cnt, 0, doff, dlen, aux, fa, fb, ttl, 0, key, sess),
              st.integers(0, 9), st.integers(0, 255), st.sampled_from([0, 7, 16, 32, 33]),
              st.integers(0, 45), st.sampled_from([0, 1, 2, 5, 100, 2**32 - 1]),
              st.sampled_from([0, 4096, ARENA - 1, ARENA, 2**64 - 1]),
              st.sampled_from([0, 1, 4096, ARENA, 2**64 - 1]),
              st.sampled_from([0, 8, ARENA - 8, 2**64 - 1]), st.integers(0, 2**32 - 1),
              st.sampled_from([0, 1, 2, 2**32 - 1]), st.integers(0, 2**32 - 1),
              st.binary(min_size=32, max_size=32), st.binary(min_size=40, max_size=40)))


def test_fuzz_ring_entries_against_a_live_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    good = Good(d)
    state = {"c": Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA), "tag": 1}
    try:
        @settings(max_examples=300, deadline=None)
        @given(entry=entries)
        def one(entry: bytes) -> None:
            state["tag"] += 1  # type: ignore[operator]
            try:
                comp = raw(state["c"], entry, state["tag"])  # type: ignore[arg-type]
                assert comp.status in {s.value for s in Status}
            except DisconnectedError:
                state["c"] = Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA)
            if state["tag"] % 10 == 0:  # type: ignore[operator]
                good.check()

        one()
        good.check()
        assert d.proc is not None and d.proc.poll() is None
    finally:
        state["c"].close()  # type: ignore[attr-defined]
        good.c.close()
        assert d.stop() == 0


def test_a_flood_of_submissions_is_absorbed(live) -> None:  # type: ignore[no-untyped-def]
    d, good = live
    with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA,
                        ring_entries=64) as c:
        futs = [c.submit(Request(Op.NOP, 0)) for _ in range(5000)]  # as fast as it can
        assert all(c._wait(f).status == Status.OK for f in futs)
        good.check()


def test_a_client_that_stops_draining_completions_is_dropped(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra="[limits]\nstalled_client_timeout_s = 1.0\n").start()
    good = Good(d)
    try:
        c = Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=ARENA, ring_entries=16)
        c._closed = True  # stop the reaper: nobody drains the completion ring any more
        time.sleep(0.7)
        for i in range(16):  # fill the submission ring; the completion ring fills behind it
            assert c.sq.try_push(Request(Op.NOP, i + 1).encode())
        os.eventfd_write(c._sq_efd, 1)
        time.sleep(0.3)
        for i in range(16):  # more work that can never complete
            while not c.sq.try_push(Request(Op.NOP, 100 + i).encode()):
                time.sleep(0.01)
                good.check()
                if "completion ring full" in d.log.read_text():
                    break
            os.eventfd_write(c._sq_efd, 1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "completion ring full" not in d.log.read_text():
            good.check()
            time.sleep(0.1)
        assert "completion ring full: the client stopped draining it" in d.log.read_text()
        good.check()
        c._sock.close()
    finally:
        good.c.close()
        assert d.stop() == 0
