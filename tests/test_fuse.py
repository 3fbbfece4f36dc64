"""The admin tree through a real FUSE mount of a live daemon (needs root and /dev/fuse)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import TOKENS, Daemon

from kvtier.client.admin import AdminClient
from kvtier.client.client import Client
from kvtier.client.errors import KvtierError, NotFoundError

pytest.importorskip("pyfuse3")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="the FUSE tree tests mount a file system: they need root and /dev/fuse")


def _daemon(tmp_path: Path) -> tuple[Daemon, Path]:
    fs = tmp_path / "fs"
    return Daemon(tmp_path, extra=f'[fuse]\nmountpoint = "{fs}"\n'), fs


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def _soon(cond: Callable[[], bool], within: float) -> bool:
    """Whether `cond` holds within `within` seconds (less than the tree's 1 s entry cache:
    what holds only after the cache expired does not count)."""
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _key(s: str) -> bytes:
    return s.encode().ljust(16, b".")


def test_the_tree_tells_the_daemons_truth(tmp_path: Path) -> None:
    d, fs = _daemon(tmp_path)
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            for i in range(3):
                a.put("s1", _key(f"a1-{i}"), [b"alpha-%d-" % i * 3000])
            b.put("s1", _key("b1"), [b"bravo" * 100])
            time.sleep(1.2)
            ref = tmp_path / "ref"
            ref.write_text("")
            time.sleep(1.2)
            for i in range(2):
                a.put("s2", _key(f"a2-{i}"), [b"charlie" * 1000, b"delta" * 10])
        listing = _sh("ls", "-R", str(fs))
        for name in ("status", "config", "metrics", "pools", "tenants", "alice", "bob",
                     _key("a1-0").hex(), _key("b1").hex()):
            assert name in listing
        assert json.loads((fs / "status").read_text())["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]
        assert "<redacted>" in (fs / "config").read_text()
        assert "kvtier_" in (fs / "metrics").read_text()
        info = json.loads((fs / "tenants" / "alice" / "info").read_text())
        assert info["entries"] == 5 and info["sessions"] == 2
        assert sorted(os.listdir(fs / "tenants" / "alice" / "sessions")) == ["s1", "s2"]
        assert json.loads((fs / "pools" / "p0" / "info").read_text())["entries"] == 6
        segs = os.listdir(fs / "pools" / "p0" / "segments")
        assert segs and "live_bytes" in json.loads((fs / "pools" / "p0" / "segments" /
                                                     segs[0]).read_text())
        # Blocks: size and bytes as stored, times real; du agrees with the daemon.
        with AdminClient(d.socket) as adm:
            st = adm.call("stat", tenant="alice", key=_key("a1-1").hex())
            sessions = adm.call("ls", tenant="alice")
        blk = fs / "tenants" / "alice" / "sessions" / "s1" / "blocks" / _key("a1-1").hex()
        assert blk.stat().st_size == st["bytes"]
        assert abs(blk.stat().st_mtime - st["created"]) <= 1
        raw = blk.read_bytes()
        assert len(raw) == st["bytes"] and b"alpha-1-" * 3000 in raw
        du = int(_sh("du", "-sb", str(blk.parent)).split()[0])
        assert du == sessions["s1"]["bytes"]
        newer = _sh("find", str(fs / "tenants"), "-newer", str(ref), "-path", "*/blocks/*",
                    "-type", "f").split()
        assert sorted(Path(p).name for p in newer) == sorted(_key(f"a2-{i}").hex()
                                                              for i in range(2))
        # Read-only everywhere, with the right errno.
        for attempt, code in ((lambda: (fs / "status").write_text("x"), errno.EROFS),
                              (lambda: (fs / "tenants" / "alice" / "new").write_text("x"),
                               errno.EROFS),
                              (lambda: (fs / "tenants" / "x").mkdir(), errno.EROFS),
                              (lambda: (fs / "status").unlink(), errno.EPERM),
                              (lambda: (fs / "tenants" / "bob").rmdir(), errno.EPERM)):
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == code
        # rm of one block deletes it; rm -r of a session purges it.
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a:
            blk.unlink()
            with pytest.raises(NotFoundError):
                a.get(_key("a1-1"))
            assert a.get(_key("a1-0")) == b"alpha-0-" * 3000
            _sh("rm", "-r", str(fs / "tenants" / "alice" / "sessions" / "s2"))
            for i in range(2):
                with pytest.raises(NotFoundError):
                    a.get(_key(f"a2-{i}"))
        assert os.listdir(fs / "tenants" / "alice" / "sessions") == ["s1"]
        log = d.log.read_text()
        assert f"uid {os.geteuid()} purged session alice/s2" in log
        assert f"uid {os.geteuid()} deleted tenants/alice/sessions/s1/blocks" in log
    finally:
        d.stop()
    assert not os.path.ismount(fs)  # unmounted on a clean stop
    d.start()  # purged stays purged after a restart
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                pytest.raises(NotFoundError):
            a.get(_key("a2-0"))
        assert os.listdir(fs / "tenants" / "alice" / "sessions") == ["s1"]
    finally:
        d.stop()


def test_the_tree_and_the_admin_socket_show_one_view(tmp_path: Path) -> None:
    """Every file the tree renders is what the admin socket answers for the same thing;
    a removal in either leaves the same audit record and is seen by the other at once."""
    d, fs = _daemon(tmp_path)
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            for i in range(3):
                a.put("s1", _key(f"a1-{i}"), [b"alpha-%d-" % i * 3000])
            a.put("s2", _key("a2-0"), [b"charlie" * 1000, b"delta" * 10])
            b.put("t1", _key("b1"), [b"bravo" * 100])
            a.get(_key("a1-0"))  # a read: hits and atime differ from the others'
        tenants = os.listdir(fs / "tenants")
        assert sorted(tenants) == sorted(d.admin("status")["daemon"]["tenants"][i]["id"]
                                         for i in range(len(tenants)))
        for t in tenants:
            assert json.loads((fs / "tenants" / t / "info").read_text()) == \
                d.admin("info", tenant=t)
            sessions = sorted(os.listdir(fs / "tenants" / t / "sessions"))
            assert sessions == sorted(d.admin("ls", tenant=t))
            for s in sessions:
                sd = fs / "tenants" / t / "sessions" / s
                assert json.loads((sd / "info").read_text()) == \
                    d.admin("info", tenant=t, session=s)
                rows = d.admin("ls", tenant=t, session=s)
                assert sorted(os.listdir(sd / "blocks")) == sorted(r["key"] for r in rows)
                for r in rows:
                    st = (sd / "blocks" / r["key"]).stat()
                    info = d.admin("stat", tenant=t, key=r["key"])
                    assert (st.st_size, int(st.st_mtime)) == (r["bytes"], r["created"]) == \
                        (info["bytes"], info["created"])
                    assert info["session"] == s
        # the CLI prints the same
        kv = str(Path(sys.executable).parent / "kvtier")
        assert json.loads(_sh(kv, "--socket", d.socket, "info", "alice", "s1")) == \
            json.loads((fs / "tenants" / "alice" / "sessions" / "s1" / "info").read_text())
        pools = d.admin("pools")
        assert sorted(os.listdir(fs / "pools")) == sorted(pools)
        for name, info in pools.items():
            assert json.loads((fs / "pools" / name / "info").read_text()) == info
            segs = d.admin("segments", pool=name)
            assert sorted(os.listdir(fs / "pools" / name / "segments"), key=int) == \
                [str(x["id"]) for x in segs]
            assert json.loads((fs / "pools" / name / "segments" / str(segs[0]["id"]))
                              .read_text()) == segs[0]
        # Absent things are absent in both, and say so.
        with pytest.raises(FileNotFoundError):
            (fs / "tenants" / "mallory" / "info").read_text()
        with pytest.raises(KvtierError, match="no tenant 'mallory'"):
            d.admin("info", tenant="mallory")
        with pytest.raises(KvtierError, match="no session 'nope'"):
            d.admin("ls", tenant="alice", session="nope")
        with pytest.raises(KvtierError, match="16 or 32 bytes"):
            d.admin("stat", tenant="alice", key="zz")
        # A removal through either is seen by the other at once.
        blk = fs / "tenants" / "alice" / "sessions" / "s1" / "blocks" / _key("a1-1").hex()
        blk.unlink()
        with pytest.raises(KvtierError, match="not found"):
            d.admin("stat", tenant="alice", key=_key("a1-1").hex())
        gone = blk.with_name(_key("a1-2").hex())
        assert gone.exists()  # looked up: in the kernel's dentry cache (entry_timeout 1 s)
        assert d.admin("delete", tenant="alice", key=_key("a1-2").hex()) == {"deleted": 1}
        # the daemon asks the kernel to drop that entry (asynchronously: pyfuse3's queue)
        assert _soon(lambda: not gone.exists(), 0.5)
        assert sorted(os.listdir(blk.parent)) == [_key("a1-0").hex()]
        _sh("rm", "-r", str(fs / "tenants" / "alice" / "sessions" / "s2"))
        assert sorted(d.admin("ls", tenant="alice")) == ["s1"]
        t1 = fs / "tenants" / "bob" / "sessions" / "t1"
        assert (t1 / "info").exists()
        assert d.admin("purge", tenant="bob", session="t1") == {"purged": 1}
        assert _soon(lambda: not t1.exists(), 0.5)
        assert os.listdir(fs / "tenants" / "bob" / "sessions") == []
    finally:
        d.stop()
    recs = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    changes = [{k: r[k] for k in ("event", "via", "tenant", "session")}
               for r in recs if r["event"] in ("admin_delete", "admin_purge")]
    assert changes == [
        {"event": "admin_delete", "via": "fuse", "tenant": "alice", "session": "s1"},
        {"event": "admin_delete", "via": "socket", "tenant": "alice", "session": "s1"},
        {"event": "admin_purge", "via": "fuse", "tenant": "alice", "session": "s2"},
        {"event": "admin_purge", "via": "socket", "tenant": "bob", "session": "t1"}]


def test_a_killed_daemon_leaves_no_hanging_mount(tmp_path: Path) -> None:
    d, fs = _daemon(tmp_path)
    d.start()
    assert os.path.ismount(fs)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.proc = None
    with pytest.raises(OSError) as ei:
        os.listdir(fs)
    assert ei.value.errno == errno.ENOTCONN  # the dead mount the kill left behind
    d.start()
    try:
        assert "tenants" in os.listdir(fs)
    finally:
        d.stop()
    assert not os.path.ismount(fs)


def test_no_local_user_outside_admin_gid_reads_the_tree(tmp_path: Path) -> None:
    """`status`, `config`, `pools/` and the `tenants/` listing name every tenant and its
    clients: they were world-readable; now the whole tree is root:admin_gid, 0750/0440."""
    import shutil
    import sys
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="kvtier-fuse-", dir="/tmp"))
    top.chmod(0o755)  # uid 65534 can reach the mountpoint itself
    fs = top / "fs"
    d = Daemon(tmp_path, extra=f'[fuse]\nmountpoint = "{fs}"\n')
    d.start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a:
            a.put("s1", _key("x"), [b"secret"])
        assert "alice" in _sh("ls", str(fs / "tenants"))  # root reads it
        probe = ("import os, sys\nos.setgid(65534); os.setuid(65534)\nbad = []\n"
                 "for p in sys.argv[1:]:\n"
                 "    try:\n"
                 "        os.listdir(p) if not p.endswith('status') else open(p).read()\n"
                 "        bad.append(p)\n"
                 "    except PermissionError:\n"
                 "        pass\n"
                 "print(bad)\n")
        out = subprocess.run([sys.executable, "-c", probe, str(fs), str(fs / "tenants"),
                              str(fs / "pools"), str(fs / "status")], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]", out.stdout
        for p in (fs, fs / "tenants", fs / "status"):
            st = p.stat()
            assert st.st_mode & 0o007 == 0 and st.st_uid == 0, (p, oct(st.st_mode))
    finally:
        d.stop()
        shutil.rmtree(top, ignore_errors=True)
