"""kvtierd as a process: handshake, every op through the ring, tiers, admin, shutdown."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
import urllib.request

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.admin import AdminClient
from kvtier.client.client import Client
from kvtier.client.errors import (
    BufferTooSmallError,
    HandshakeError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ValueTooLargeError,
)
from kvtier.client.protocol import CtrlParser, Msg, Status, Tier, encode_ctrl


def k(i: int, n: int = 16) -> bytes:
    return hashlib.sha256(b"%d" % i).digest()[:n]


def connect(d: Daemon, tenant: str = "alice", **kw: object) -> Client:
    return Client.connect(d.socket, tenant, TOKENS[tenant], arena_size=16 << 20,
                          **kw)  # type: ignore[arg-type]


def test_round_trip_of_every_op(daemon: Daemon) -> None:
    daemon.start()
    with connect(daemon) as c:
        frames = [np.full(100_000, i, np.uint8) for i in range(3)]
        assert c.put("s1", k(1), frames) == Tier.POOL  # ack=media
        with c.get_slot(k(1)) as (view, fl):
            assert fl == [100_000] * 3
            assert bytes(view) == b"".join(f.tobytes() for f in frames)
        assert c.get(k(1), frames=(1, 2)) == frames[1].tobytes()
        out = bytearray(300_000)
        assert c.get_into(k(1), out) == 300_000
        chain = [k(i) for i in range(10)]
        for key in chain[:6]:
            c.put("s1", key, [b"x" * 5000])
        n, tiers = c.lookup(chain)
        assert n == 6 and tiers[:6] == [Tier.DRAM] * 6 and tiers[6:] == [Tier.NONE] * 4
        assert c.delete(chain[3]) and not c.delete(chain[3])
        assert c.lookup(chain)[0] == 3
        with pytest.raises(NotFoundError):
            c.get(chain[3])
        c.put("s2", k(100), [b"y" * 10])
        c.put("s2", k(101), [b"y" * 10])
        assert c.purge_session("s2") == 2
        assert c.lookup([k(100)])[0] == 0
        st = c.stats()
        assert st["media"]["entries"] == 5 and st["daemon"]["clients"]
        n, met = c.prefetch([k(1)], deadline_ms=2000)
        assert n == 1 and met


def test_tenants_are_isolated_and_attempts_are_audited(daemon: Daemon) -> None:
    daemon.start()
    with connect(daemon, "alice") as a, connect(daemon, "bob") as b:
        a.put("s", k(7), [b"alice's"])
        with pytest.raises(NotFoundError):
            b.get(k(7))
        assert b.lookup([k(7)])[0] == 0
        assert not b.delete(k(7))
        assert b.prefetch([k(7)]) == (0, True)
        assert b.map([k(7)]) == [None]
        assert b.purge_session("s") == 0
        # bob's answers for alice's key are those for a key nobody holds
        with pytest.raises(NotFoundError):
            b.get(k(8))
        assert b.lookup([k(8)])[0] == 0
        assert a.get(k(7)) == b"alice's"
    daemon.stop()
    recs = [json.loads(x) for x in (daemon.dir / "audit.log").read_text().splitlines()]
    tries = [r for r in recs if r["event"] == "cross_tenant_attempt"]
    assert sorted(r["op"] for r in tries) == ["delete", "get", "lookup", "map", "prefetch"]
    assert all((r["tenant"], r["owner"], r["keys"]) == ("bob", "alice", [k(7).hex()])
               for r in tries)
    assert all(r["uid"] == os.geteuid() for r in tries)


def test_media_miss_is_promoted_to_dram(daemon: Daemon) -> None:
    daemon.start()
    with connect(daemon) as c:
        c.put("s", k(1), [b"z" * 50_000])
    daemon.stop()
    daemon.start()  # DRAM is empty after a restart; the media pool recovered
    with connect(daemon) as c:
        assert c.lookup([k(1)])[1] == [Tier.POOL]
        assert c.get(k(1)) == b"z" * 50_000
        assert c.lookup([k(1)])[1] == [Tier.DRAM]


def test_ack_memory_writes_behind_and_survives_sigterm(tmp_path) -> None:
    d = Daemon(tmp_path, ack="memory").start()
    try:
        with connect(d) as c:
            for i in range(40):
                assert c.put("s", k(i), [np.full(60_000, i % 251, np.uint8)]) == Tier.DRAM
        assert d.stop(signal.SIGTERM) == 0  # drains write-behind, checkpoints
        d.start()
        with connect(d) as c:
            for i in range(40):
                assert c.lookup([k(i)])[1] == [Tier.POOL]
                assert c.get(k(i)) == bytes([i % 251]) * 60_000
    finally:
        d.stop()


def test_bad_tokens_uids_versions_and_limits_are_refused(tmp_path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {}, "carol": {"allowed_uids": [424242]}}).start()
    try:
        with pytest.raises(HandshakeError, match="wrong token"):
            Client.connect(d.socket, "alice", "nope")
        with pytest.raises(HandshakeError, match="wrong token"):
            Client.connect(d.socket, "mallory", "x")
        with pytest.raises(HandshakeError, match=f"uid {os.geteuid()} is not allowed"):
            Client.connect(d.socket, "carol", "carol-secret")
        with pytest.raises(HandshakeError, match="arena_size"):
            Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=1 << 40)
        with pytest.raises(HandshakeError, match="ring_entries"):
            Client.connect(d.socket, "alice", TOKENS["alice"], ring_entries=3)
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket)
        s.sendall(encode_ctrl(Msg.HELLO, {"version": 99, "tenant": "alice",
                                          "token": TOKENS["alice"]}))
        p = CtrlParser()
        while (m := p.next_message()) is None:
            p.feed(s.recv(4096))
        assert m[0] == Msg.ERROR and "version 99" in m[1]["message"]
        s.close()
        with connect(d) as c:  # and the daemon still serves
            c.put("s", k(1), [b"ok"])
        assert "auth failure" in d.log.read_text()
    finally:
        d.stop()


def test_admin_needs_an_admin_uid(tmp_path) -> None:
    d = Daemon(tmp_path, admin_uids=[4242]).start()
    try:
        with pytest.raises(PermissionDeniedError, match=f"uid {os.geteuid()} is not an admin"):
            d.admin("status")
        with connect(d) as c:  # tenants are unaffected
            c.put("s", k(1), [b"x"])
    finally:
        d.stop()


def test_admin_commands(daemon: Daemon) -> None:
    daemon.start()
    with connect(daemon) as c:
        c.put("sess-a", k(1), [b"1" * 1000])
        c.put("sess-b", k(2), [b"2" * 1000])
    assert daemon.admin("ls")["alice"]["entries"] == 2
    assert set(daemon.admin("ls", tenant="alice")) == {"sess-a", "sess-b"}
    keys = daemon.admin("ls", tenant="alice", session="sess-a")
    assert [e["key"] for e in keys] == [k(1).hex()]
    assert daemon.admin("stat", tenant="alice", key=k(2).hex())["session"] == "sess-b"
    assert daemon.admin("purge", tenant="alice", session="sess-a") == {"purged": 1}
    assert daemon.admin("ls")["alice"]["entries"] == 1


def test_errors_come_back_as_exceptions(daemon: Daemon) -> None:
    daemon.extra = ""
    daemon.segment_size = "8M"
    daemon.start()
    with connect(daemon) as c:
        with pytest.raises(ValueTooLargeError):
            c.put("s", k(1), [bytes(9 << 20)])
        with pytest.raises(InvalidRequestError):
            c.put("s", b"short", [b"x"])
        c.put("s", k(2), [bytes(100_000)])
        with pytest.raises(BufferTooSmallError), c.get_slot(k(2), size=1000):
            pass
        c.put("s", k(3), [b"still fine"])
        assert c.get(k(3)) == b"still fine"


def test_metrics_endpoint(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(tmp_path, extra=f"[metrics]\nport = {port}\n").start()
    try:
        with connect(d) as c:
            c.put("s", k(1), [b"m" * 4096])
            c.get(k(1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        body = text.decode()
        assert 'kvtier_ops_total{op="put",status="ok"} 1.0' in body
        assert 'kvtier_op_latency_seconds_bucket{le=' in body
        assert 'kvtier_tier_live_bytes{tier="dram"}' in body
        assert "kvtier_writebehind_backlog" in body
    finally:
        d.stop()


_HASH = "scrypt$16384$8$1$00$" + "00" * 32  # well-formed; no token matches it
TENANT_A = f'[[tenant]]\nid = "a"\ntoken_hash = "{_HASH}"\n'
TENANT_B = f'[[tenant]]\nid = "b"\ntoken_hash = "{_HASH}"\n'


def test_config_errors_name_the_key(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path
    cfg = tmp_path / "bad.toml"
    kvtierd = str(Path(sys.executable).parent / "kvtierd")
    cases = {
        'ack = "sometimes"\n': "ack: must be",
        '[[pool]]\npath = "x"\nsize = "lots"\n': "pool[0].size: not a size",
        '[[tenant]]\nid = "a"\n': "tenant[0].token_hash: is required",
        '[limits]\nring_entries = 1000\n': "limits.ring_entries: must be a power of two",
        '[limits]\nstalled_client_timeout_s = -1\n': "stalled_client_timeout_s: must be a "
                                                   "positive number",
        '[limits]\nlow_class_nice = 20\n': "limits.low_class_nice: must be in 0..19",
        'colour = "blue"\n': "colour: unknown key",
        '[dram]\nsize = "1M"\n': "dram.size: must hold at least 8 segments",
        '[dram]\nsize = "64M"\nsegment_size = "4M"\n' + TENANT_A + 'dram = "5M"\n':
            "tenant[0].dram: must be a multiple of dram.segment_size",
        '[dram]\nsize = "64M"\nsegment_size = "4M"\n' + TENANT_A + 'dram = "68M"\n':
            "dram sizes add up to more than dram.size",
        '[dram]\nsize = "64M"\nsegment_size = "4M"\n' + TENANT_A + 'dram = "52M"\n'
        + TENANT_B: "dram.size: tenant 'b': its DRAM tier of 12582912 bytes is smaller than",
        "not toml = = =\n": "not valid TOML",
    }
    for text, want in cases.items():
        cfg.write_text(text)
        r = subprocess.run([kvtierd, "check-config", "--config", str(cfg)], capture_output=True,
                           text=True)
        assert r.returncode == 1 and want in r.stderr, (text, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run([kvtierd, "run", "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr


def test_admin_listing_of_a_large_session(tmp_path) -> None:
    """A session's listing bigger than a client control message (64 KiB) still comes back:
    ADMIN_OK replies may be up to 64 MiB."""
    d = Daemon(tmp_path, ack="memory").start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            slot = c.allocator.alloc(4096)
            futs = [c.submit(c.put_request("big", i.to_bytes(16, "little"), slot, [4096]))
                    for i in range(800)]
            assert all(c._wait(f).status == 0 for f in futs)
        with AdminClient(d.socket) as a:
            deadline = time.monotonic() + 60
            while a.call("status")["tiers"]["writebehind_backlog"]:  # listings read media
                assert time.monotonic() < deadline
                time.sleep(0.05)
            rows = a.call("ls", tenant="alice", session="big")
        assert len(rows) == 800 and len(json.dumps(rows)) > 64 * 1024
        assert {r["key"] for r in rows} == {i.to_bytes(16, "little").hex() for i in range(800)}
    finally:
        d.stop()


def test_stats_tells_a_tenant_about_itself_only(daemon: Daemon) -> None:
    """A client's STATS: its own tenant's entries, bytes and clients; nothing that shows
    another tenant exists, let alone what it stores or who its clients are."""
    daemon.start()
    with connect(daemon, "alice") as a, connect(daemon, "bob") as b:
        before = b.stats()
        for i in range(5):
            a.put("s", k(500 + i), [b"a" * 4096])
        b.put("s", k(600), [b"b" * 100])
        st = b.stats()
        assert st["tenant"] == "bob" and st["media"]["entries"] == 1
        assert st["media"]["live_bytes"] > 0 and len(st["daemon"]["clients"]) == 1
        blob = json.dumps(st)
        assert "alice" not in blob
        assert before["media"]["entries"] == 0  # alice's five puts changed nothing here
        assert a.stats()["media"]["entries"] == 5
        assert {"qos", "policy", "io", "prefetch"}.isdisjoint(st)
        # The daemon-wide view is still there, for the admin.
        assert "alice" in json.dumps(daemon.admin("status"))


def test_a_frame_table_that_adds_up_only_modulo_2_64_is_refused(daemon: Daemon) -> None:
    daemon.start()
    with connect(daemon, "alice") as c:
        slot = c.allocator.alloc(100 + 8 * 4)
        try:
            slot.view[:100] = b"x" * 100
            # 100 + 3 * 2^62 + 2^62 = 100 + 2^64: wraps to 100 in u64 (and in i64) sums.
            req = c.put_request("s", k(700), slot, [100, 0, 0, 0])
            np.frombuffer(slot.view[100:132], dtype="<u8")[:] = [100 + 2**62, 2**62, 2**62,
                                                                  2**62]
            comp = c.submit(req).result(timeout=10)
            assert comp.status == Status.INVALID
        finally:
            c.allocator.free(slot)
        with pytest.raises(NotFoundError):
            c.get(k(700))


def test_other_tenants_keys_cost_a_lookup_what_absent_keys_cost(daemon: Daemon) -> None:
    """The cross-tenant check runs after the answer: bob's LOOKUP of 64 keys alice holds
    takes what a LOOKUP of 64 keys nobody holds takes (medians of interleaved rounds, one
    run), and the attempts are still audited."""
    daemon.start()
    held = [k(1000 + i) for i in range(64)]
    absent = [k(5000 + i) for i in range(64)]
    with connect(daemon, "alice") as a, connect(daemon, "bob") as b:
        for key in held:
            a.put("s", key, [b"v" * 64])
        times: dict[str, list[float]] = {"held": [], "absent": []}
        for _ in range(3):  # warm both paths
            b.lookup(held), b.lookup(absent)
        for i in range(400):
            for name in (("held", "absent") if i % 2 else ("absent", "held")):
                t0 = time.perf_counter()
                assert b.lookup(held if name == "held" else absent)[0] == 0
                times[name].append(time.perf_counter() - t0)
        med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
        assert med["held"] / med["absent"] < 1.2, med
        assert med["absent"] / med["held"] < 1.2, med
    daemon.stop()
    recs = [json.loads(x) for x in (daemon.dir / "audit.log").read_text().splitlines()]
    tries = [r for r in recs if r["event"] == "cross_tenant_attempt"]
    skipped = sum(r["keys"] for r in recs if r["event"] == "cross_tenant_checks_skipped")
    summed = [s for r in recs if r["event"] == "cross_tenant_attempts"
              for s in r["by_owner"]]
    assert tries and all(r["owner"] == "alice" for r in tries)
    assert all(s["owner"] == "alice" and s["op"] == "lookup" for s in summed)
    # Every attempt is on record: checked (by key, or summed past the per-second line
    # limit) or, past the queue, counted.
    assert sum(len(r["keys"]) for r in tries) + sum(s["keys"] for s in summed) + \
        skipped >= 403 * 64
    # ... and the log grew by at most 20 full lines a second of bob's attempts.
    assert len(tries) <= 20 * (int(recs[-1]["time"] - recs[0]["time"]) + 2)
