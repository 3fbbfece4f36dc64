"""The daemon probed as a hostile tenant and a careless operator would (issue #22), through
a real kvtierd: every op passes QoS whatever path serves it, HELLO costs the same for
unknown tenants and wrong tokens, a HELLO flood from another uid costs a legitimate client
little, connections that never finish a control message are closed, one tenant cannot
take every client slot, and a full state dir is a state the daemon leaves by itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError
from kvtier.client.protocol import PROTOCOL_VERSION, CtrlParser, Msg, encode_ctrl

KiB, MiB = 1 << 10, 1 << 20


def k(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}{i}".encode()).digest()[:16]


def connect(d: Daemon, tenant: str, **kw: object) -> Client:
    return Client.connect(d.socket, tenant, TOKENS[tenant], arena_size=16 << 20,
                          **kw)  # type: ignore[arg-type]


def _ops_in(seconds: float, fn: object) -> int:
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        fn()  # type: ignore[operator]
        n += 1
    return n


# -- 1. QoS: the inline paths (DRAM-hit GET, MAP) pass the same admission -------------------------


def test_iops_limit_holds_for_small_dram_hits_served_inline(tmp_path: Path) -> None:
    """`iops = 100`: small DRAM-hit GETs (served on the event loop) and MAPs ran at
    2,000-3,700/s before; now at the limit plus the bucket's burst."""
    d = Daemon(tmp_path, ack="memory", tenants={"alice": {"iops": 100}, "bob": {}}).start()
    try:
        with connect(d, "alice") as a, connect(d, "bob") as b:
            a.put("s", k("a", 0), [b"x" * 4096])
            b.put("s", k("b", 0), [b"x" * 4096])
            m0 = a.map([k("a", 0)])[0]
            assert m0 is not None  # in DRAM
            a.unmap([m0[0]])
            free = _ops_in(1.0, lambda: b.get(k("b", 0), size=4096))  # no limit: the pace
            limited = _ops_in(3.0, lambda: a.get(k("a", 0), size=4096))
            maps = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                m = a.map([k("a", 0)])
                assert m[0] is not None
                a.unmap([m[0][0]])
                maps += 1
        # 100/s for 3 s, plus at most one second's burst; the unlimited tenant is much faster
        assert limited <= 100 * 3 + 100 + 5, limited
        assert limited >= 100 * 3 * 0.8, limited
        assert maps <= 100 * 2 + 100 + 5, maps
        assert free > 3 * limited / 3, (free, limited)
    finally:
        d.stop()


def test_bandwidth_limit_holds_for_inline_gets_and_maps(tmp_path: Path) -> None:
    """`bandwidth = "1M"`: 256 KiB DRAM GETs moved 330-660 MB/s and MAPs 180-410 MB/s past
    the limit; now both are held to it (bytes mapped count as bytes read)."""
    d = Daemon(tmp_path, ack="memory", tenants={"alice": {"bandwidth": "1M"}, "bob": {}}).start()
    try:
        with connect(d, "alice") as a:
            a.put("s", k("a", 1), [np.ones(256 * KiB, np.uint8)])
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 3.0:
                n += len(a.get(k("a", 1), size=256 * KiB))
            get_rate = n / (time.monotonic() - t0)
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 3.0:
                m = a.map([k("a", 1)])
                assert m[0] is not None
                n += m[0][1]
                a.unmap([m[0][0]])
            map_rate = n / (time.monotonic() - t0)
        # the bucket's burst (one second's worth) on top of 3 s at 1 MiB/s
        assert get_rate <= (3 * MiB + MiB + 256 * KiB) / 3, get_rate / MiB
        assert map_rate <= (3 * MiB + MiB + 256 * KiB) / 3, map_rate / MiB
    finally:
        d.stop()


# -- 3. HELLO: an unknown tenant costs what a wrong token costs -----------------------------------


def _hello(sock_path: str, tenant: str, token: str) -> tuple[float, dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        t0 = time.perf_counter()
        s.sendall(encode_ctrl(Msg.HELLO, {"version": PROTOCOL_VERSION, "tenant": tenant,
                                          "token": token}))
        p = CtrlParser()
        while (m := p.next_message()) is None:
            data = s.recv(65536)
            if not data:
                raise EOFError
            p.feed(data)
        return time.perf_counter() - t0, m[1]


def test_hello_costs_the_same_for_an_unknown_tenant_and_a_wrong_token(tmp_path: Path) -> None:
    """62.5 ms (wrong token) vs 0.6 ms (unknown tenant) told tenant names apart; medians of
    interleaved rounds, one run, now within 1.2x either way.  (The uid lockout after
    repeated failures is set out of the way: it treats both alike, and would only make
    both fast refusals.)"""
    d = Daemon(tmp_path, extra="[limits]\nauth_failures_before_lockout = 1000\n").start()
    try:
        times: dict[str, list[float]] = {"unknown": [], "wrong": []}
        for i in range(16):
            for name in (("unknown", "wrong") if i % 2 else ("wrong", "unknown")):
                tenant = "alice" if name == "wrong" else f"nobody-{i}"
                dt, body = _hello(d.socket, tenant, "not-the-token")
                assert body["code"] == "auth" and body["message"] == \
                    "unknown tenant or wrong token"
                times[name].append(dt)
        med = {n: statistics.median(v) for n, v in times.items()}
        assert med["unknown"] / med["wrong"] < 1.2, med
        assert med["wrong"] / med["unknown"] < 1.2, med
    finally:
        d.stop()


# -- 4. the control socket under a flood -----------------------------------------------------------

_FLOOD = textwrap.dedent("""
    # 300 HELLOs with a wrong token at all times, and idle connections, from uid 65534:
    # one thread (asyncio), so the flood is the daemon's load, not 300 runnable threads
    # that take the test's cores from the kernel scheduler whatever the daemon does.
    import asyncio, os, socket, sys, time
    from kvtier.client.protocol import PROTOCOL_VERSION, Msg, encode_ctrl
    path, n, idle, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    uid = int(sys.argv[5])
    os.setgid(uid); os.setuid(uid)
    # At the lowest CPU priority: the test measures what the daemon's work for the flood
    # costs its clients, not the kernel sharing 2 cores with the flooder's own CPU use
    # (which no daemon can prevent; cgroups do).
    os.nice(19)
    HELLO = encode_ctrl(Msg.HELLO, {"version": PROTOCOL_VERSION, "tenant": "alice",
                                    "token": "wrong"})
    async def hammer(stop):
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_unix_connection(path)
                w.write(HELLO)
                await r.read(4096)
                w.close()
            except OSError:
                await asyncio.sleep(0.01)  # the backlog is full: try again soon
    async def main():
        held = []
        for _ in range(idle):  # connections that never send a thing
            try:
                held.append(await asyncio.open_unix_connection(path))
            except OSError:
                pass
        print("ready", flush=True)
        stop = time.monotonic() + secs
        await asyncio.gather(*(hammer(stop) for _ in range(n)))
    asyncio.run(main())
""")



_HOG = "import os, time\nos.nice(19)\nt = time.time()\nwhile time.time() - t < 30: pass\n"


def _served_again(d: Daemon, tenant: str, why: str, within_s: float = 10.0) -> None:
    """Connect and put until the daemon takes the tenant's client again (polling: what
    brings it back happens in the daemon, with no event a test can wait on)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with connect(d, tenant) as c:
                c.put("s", k(tenant, 0), [b"back"])
            return
        except KvtierError:
            assert time.monotonic() < deadline, why
            time.sleep(0.05)


def _op_times(c: Client, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        c.put("s", k("f", i % 8), [b"y" * 4096])
        c.get(k("f", i % 8), size=4096)
        out.append(time.perf_counter() - t0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="the flood runs as another uid (needs root)")
def test_a_hello_flood_from_another_uid_costs_a_legitimate_client_little(
        tmp_path: Path) -> None:
    """300 concurrent wrong-token HELLOs (and idle connections) from uid 65534: a
    legitimate connect took 9-15 s and a connected client's put+get went from ~5 ms to an
    830 ms median.  Now: connect < 1 s, op p99 within 3x of idle (same run), RSS bounded."""
    # a state dir other uids can reach (pytest's tmp dirs are the owner's only)
    state = Path(tempfile.mkdtemp(prefix="kvtier-flood-", dir="/tmp"))
    state.chmod(0o755)
    d = Daemon(state).start()
    try:
        with connect(d, "bob") as c:
            _op_times(c, 50)  # warm
            quiet = sorted(_op_times(c, 600))
            # The baseline: the same ops while two processes at nice 19 burn CPU, as the
            # flooders' own loops do -- so the ratio is what the daemon's work for the flood
            # costs, not what the kernel's sharing of 2 cores with any busy process costs.
            hogs = [subprocess.Popen([sys.executable, "-c", _HOG]) for _ in range(2)]
            try:
                idle = sorted(_op_times(c, 600))
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            rss0 = d.rss_kib()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            # idle connections from one uid, wrong-token HELLOs from another
            floods = [subprocess.Popen([sys.executable, "-c", _FLOOD, d.socket, n, idle, "12",
                                        uid], stdout=subprocess.PIPE, env=env)
                      for n, idle, uid in (("0", "200", "65533"), ("300", "0", "65534"))]
            try:
                for flood in floods:
                    assert flood.stdout is not None
                    assert flood.stdout.readline().strip() == b"ready"
                time.sleep(0.5)  # the flood is going (not a synchronisation: a ramp)
                t0 = time.perf_counter()
                with connect(d, "alice") as a:
                    connect_s = time.perf_counter() - t0
                    a.put("s", k("a", 0), [b"z"])
                busy = sorted(_op_times(c, 600))
                rss1 = d.rss_kib()
                st = d.admin("status")
            finally:
                for flood in floods:
                    flood.kill()
                    flood.wait()
        p99_idle, p99_busy = idle[int(len(idle) * 0.99)], busy[int(len(busy) * 0.99)]
        assert connect_s < 1.0, connect_s
        assert p99_busy <= 3 * max(p99_idle, 0.002), (p99_idle, p99_busy)
        assert rss1 - rss0 < 150 * 1024, (rss0, rss1)  # was +526 MB
        assert st["daemon"]["clients"] and len(st["daemon"]["clients"]) == 1
    finally:
        d.stop()
    recs = [json.loads(x) for x in (d.dir / "audit.log").read_text().splitlines()]
    failures = sum(r["event"] == "auth_failure" and r["uid"] == 65534 for r in recs)
    p99_quiet = quiet[int(len(quiet) * 0.99)]
    print(f"flood: {failures} token checks failed; connect {connect_s * 1e3:.1f} ms; "
          f"put+get p99 {p99_quiet * 1e3:.2f} ms quiet, {p99_idle * 1e3:.2f} ms beside two "
          f"nice-19 CPU hogs, {p99_busy * 1e3:.2f} ms flooded")
    assert failures >= 5  # the flood did reach the token checks
    shutil.rmtree(state, ignore_errors=True)


def test_unauthenticated_connections_are_capped(tmp_path: Path) -> None:
    """5,000 idle connections were accepted; now past `max_unauthenticated_per_uid` (and
    `max_unauthenticated`) a connection gets ERROR busy at once, and the slots come back
    when the idle ones go."""
    d = Daemon(tmp_path, extra="[limits]\nmax_unauthenticated = 6\n"
                               "max_unauthenticated_per_uid = 4\n").start()
    try:
        idle = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            idle.append(s)
        # the daemon accepts in order and counts each at accept: no wait needed here
        with pytest.raises(KvtierError, match="too many connections waiting for HELLO"):
            connect(d, "alice")
        for s in idle:
            s.close()
        _served_again(d, "alice", "the slots did not come back")
    finally:
        d.stop()


@pytest.mark.parametrize("when", ["before_hello", "after_hello"])
def test_a_half_sent_control_message_is_closed_after_the_timeout(tmp_path: Path,
                                                                 when: str) -> None:
    d = Daemon(tmp_path, extra="[limits]\ncontrol_timeout_s = 1\n").start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket)
            if when == "after_hello":
                s.sendall(encode_ctrl(Msg.HELLO, {"version": PROTOCOL_VERSION,
                                                  "tenant": "alice",
                                                  "token": TOKENS["alice"]}))
                p = CtrlParser()
                while p.next_message() is None:
                    p.feed(s.recv(65536))
                assert len(d.admin("status")["daemon"]["clients"]) == 1
            s.sendall(struct.pack("<I", 200) + b"\x06")  # 5 bytes of a 204-byte message
            t0 = time.monotonic()
            s.settimeout(10)
            while s.recv(65536):
                pass  # the daemon closes it (EOF) after the timeout
            took = time.monotonic() - t0
        assert 0.9 <= took < 5, took
        assert d.admin("status")["daemon"]["clients"] == []
    finally:
        d.stop()


# -- 7. per-tenant client limits -------------------------------------------------------------------


def test_one_tenant_cannot_take_every_client_slot(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra="[limits]\nmax_clients = 6\nmax_clients_per_tenant = 3\n")
    d.start()
    try:
        held = [connect(d, "alice") for _ in range(3)]
        with pytest.raises(KvtierError, match="alice has 3 clients connected"):
            connect(d, "alice")
        others = [connect(d, "bob") for _ in range(3)]  # bob still gets his
        for c in held + others:
            c.close()
    finally:
        d.stop()


# -- 5. a full state dir ---------------------------------------------------------------------------


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
def test_a_full_state_dir_is_a_state_and_the_service_comes_back(tmp_path: Path) -> None:
    """audit.log on a 2 MiB tmpfs: filled up, connects and admin changes are refused with
    a clear error, connected clients keep working, nothing leaks; space freed, the service
    is fully back without a restart, the gap is on the record and the chain verifies;
    SIGTERM exits 0 even while full."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        d = Daemon(state, pool=f'[[pool]]\nname = "p0"\npath = "{tmp_path}/pool0.img"\n'
                                f'size = "64M"\nsegment_size = "4M"\n',
                   extra="[limits]\nmax_clients = 4\n")
        d.start()
        try:
            connected = connect(d, "alice")
            connected.put("s", k("a", 0), [b"v" * 100])
            filler = state / "filler"
            _fill(filler)  # the tmpfs, to the last byte
            fds0 = len(os.listdir(f"/proc/{d.proc.pid}/fd"))  # type: ignore[union-attr]
            for _ in range(200):  # the log's last page may take a few records more
                try:
                    connect(d, "bob").close()
                except KvtierError as e:
                    assert "audit log cannot be written" in str(e), e
                    break
            else:
                raise AssertionError("connects were still audited on a full disk")
            for _ in range(20):  # more than max_clients: no slot may leak
                with pytest.raises(KvtierError, match="audit log cannot be written"):
                    connect(d, "bob")
            st = d.admin("status")
            assert st["audit"]["degraded"] and st["audit"]["lost"].get("connect", 0) >= 1
            assert st["daemon"]["clients"] and len(st["daemon"]["clients"]) == 1
            with pytest.raises(Exception, match="audit log cannot be written"):
                d.admin("purge", tenant="bob")
            # a connected client keeps being served, PURGE_SESSION answered (not dropped)
            assert connected.get(k("a", 0)) == b"v" * 100
            connected.put("t", k("a", 1), [b"w"])
            assert connected.purge_session("t") == 1
            assert abs(len(os.listdir(f"/proc/{d.proc.pid}/fd")) - fds0) <= 2  # type: ignore[union-attr]
            filler.unlink()  # space comes back: so does the service, without a restart
            _served_again(d, "bob", "the service did not come back")
            assert not d.admin("status")["audit"]["degraded"]
            assert d.admin("purge", tenant="bob")["purged"] == 1
            _fill(filler)  # full again: SIGTERM still exits 0
            connected.close()
        finally:
            rc = d.stop()
        assert rc == 0, d.log.read_text()[-2000:]
        (state / "filler").unlink()
        recs = [json.loads(x) for x in (state / "audit.log").read_text().splitlines()]
        gaps = [r for r in recs if r["event"] == "audit_gap"]
        assert gaps and gaps[0]["lost"].get("connect", 0) >= 20, gaps
        out = subprocess.run([str(Path(sys.executable).parent / "kvtier"), "audit", "verify",
                              str(state / "audit.log")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_uid_that_keeps_failing_hello_is_locked_out_and_a_success_resets_it(
        tmp_path: Path) -> None:
    """Past `auth_failures_before_lockout` failures in a row a uid gets ERROR busy (no token
    check) until its lockout ends; the right token then gets in and resets the count."""
    d = Daemon(tmp_path, extra="[limits]\nauth_failures_before_lockout = 3\n").start()
    try:
        for _ in range(3):
            assert _hello(d.socket, "alice", "wrong")[1]["code"] == "auth"
        assert _hello(d.socket, "alice", "wrong")[1]["code"] == "auth"  # the 4th: locks
        dt, body = _hello(d.socket, "alice", TOKENS["alice"])  # locked out: even the right one
        assert body["code"] == "busy" and "failed HELLOs" in str(body["message"])
        assert dt >= 0.3  # answered when the lockout ends, not at once
        with connect(d, "alice") as a:  # the lockout is over: in, and the count reset
            a.put("s", k("a", 0), [b"ok"])
        for _ in range(3):
            assert _hello(d.socket, "alice", "wrong")[1]["code"] == "auth"
    finally:
        d.stop()
