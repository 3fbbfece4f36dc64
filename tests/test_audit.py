"""The audit log: hash chain, tamper detection, crash tail, and what the daemon records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import TOKENS, Daemon

from kvtier.client.admin import AdminClient
from kvtier.client.client import Client
from kvtier.client.errors import HandshakeError, NotFoundError
from kvtier.daemon.audit import AuditLog, verify

KVTIER = str(Path(sys.executable).parent / "kvtier")


def _log(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "audit.log"
    a = AuditLog(str(path))
    for i in range(n):
        a.record("event", i=i, who="x" * i)
    a.close()
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    path = _log(tmp_path)
    r = verify(str(path))
    assert r.ok and r.lines == 6
    out = subprocess.run([KVTIER, "audit", "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "6 records, chain intact" in out.stdout


def test_each_kind_of_tampering_is_pinpointed(tmp_path: Path) -> None:
    path = _log(tmp_path)
    good = _lines(path)

    def check(lines: list[bytes], want: str) -> None:
        path.write_bytes(b"".join(lines))
        r = verify(str(path))
        assert not r.ok and r.problem is not None and r.problem.startswith(want), r.problem
        out = subprocess.run([KVTIER, "audit", "verify", str(path)], capture_output=True,
                             text=True)
        assert out.returncode == 1 and want in out.stderr

    edited = list(good)
    obj = json.loads(edited[2])
    obj["who"] = "someone else"
    edited[2] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    check(edited, "line 3: contents edited")
    check(good[:1] + good[2:], "line 2: chain broken (seq 3 after 1): a line before it was "
                               "deleted")
    check([good[0], good[2], good[1], *good[3:]], "line 2: chain broken")
    # (Lines cut off the end leave a shorter chain that verifies: a hash chain cannot see
    # that; the daemon's `stop` record as the last line is the operator's anchor.)
    check([*good[:4], good[4][:20]], "line 5: torn")
    check([*good[:2], b"garbage\n", *good[3:]], "line 3: not an audit record")


def test_a_torn_tail_is_cut_off_at_the_next_open(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    with open(path, "ab") as f:
        f.write(b'{"seq":4,"ev')  # a crash in the middle of a write
    a = AuditLog(str(path))
    a.record("after")
    a.close()
    r = verify(str(path))
    assert r.ok and r.lines == 5
    events = [json.loads(x)["event"] for x in _lines(path)]
    assert events[-2:] == ["audit_tail_truncated", "after"]


def test_the_daemon_audits_access_and_purges(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {}, "bob": {"allowed_uids": [os.geteuid() + 1]}})
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            c.put("s1", b"k" * 16, [b"v" * 100])
            c.purge_session("s1")
        with pytest.raises(HandshakeError):
            Client.connect(d.socket, "alice", "wrong")
        with pytest.raises(HandshakeError):
            Client.connect(d.socket, "bob", TOKENS["bob"])  # uid not allowed
        with AdminClient(d.socket) as a:
            a.call("purge", tenant="alice")
    finally:
        d.stop()
    d.start()  # the chain goes on across restarts, and across a crash
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.proc = None
    d.start()
    d.stop()
    path = tmp_path / "audit.log"
    r = verify(str(path))
    assert r.ok, r.problem
    recs = [json.loads(x) for x in _lines(path)]
    kinds = [x["event"] for x in recs]
    for kind in ("start", "connect", "purge_session", "auth_failure", "admin_purge", "stop"):
        assert kind in kinds
    fails = [x for x in recs if x["event"] == "auth_failure"]
    assert {f["reason"] for f in fails} == {"unknown tenant or wrong token", "uid not allowed"}
    assert all(f["uid"] == os.geteuid() for f in fails)
    assert [x["uid"] for x in recs if x["event"] == "admin_purge"] == [os.geteuid()]
    assert kinds.count("start") == 3 and kinds.count("stop") == 2  # one start was killed
    assert (path.stat().st_mode & 0o777) == 0o600


def _wait_until_gone(c: Client, key: bytes, timeout: float = 20.0) -> None:
    """Poll until the daemon's retention has removed `key`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.get(key)
        except NotFoundError:
            return
        assert time.monotonic() < deadline, "retention never applied"
        time.sleep(0.1)


def test_retention_deletes_old_values_on_its_own(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {"retention": "2s"}, "bob": {}},
               extra="[limits]\nsweep_interval_s = 0.5\n")
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            a.put("s", b"a" * 16, [b"x" * 1000])
            b.put("s", b"b" * 16, [b"y" * 1000])
            _wait_until_gone(a, b"a" * 16)
            assert b.get(b"b" * 16) == b"y" * 1000  # no retention for bob
    finally:
        d.stop()
    d.start()  # and it stays deleted
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                pytest.raises(NotFoundError):
            a.get(b"a" * 16)
    finally:
        d.stop()
    recs = [json.loads(x) for x in _lines(tmp_path / "audit.log")]
    assert any(x["event"] == "retention_purge" and x["tenant"] == "alice" for x in recs)


def test_retention_never_strands_encrypted_data_without_its_key(tmp_path: Path) -> None:
    """A tenant-scope data key is older than everything it encrypts: retention purges idle
    sessions, never the key while younger data needs it."""
    from kvtier.client.crypto import FrameCipher, Keyring

    d = Daemon(tmp_path, tenants={"alice": {"retention": "3s", "encryption": "on"},
                                  "bob": {}},
               extra="[limits]\nsweep_interval_s = 0.25\n")
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a:
            cipher = FrameCipher(a, Keyring(str(tmp_path / "kr.json")), "alice")
            cipher.put("old", b"o" * 16, [b"old" * 100])  # creates the data key now
            time.sleep(2.0)
            cipher.put("new", b"n" * 16, [b"new" * 100])
            _wait_until_gone(a, b"o" * 16)
            cipher.forget()  # read the data key back from kvtierd
            assert cipher.get("new", b"n" * 16) == [b"new" * 100]
            cipher.close()
    finally:
        d.stop()
