"""kvtier's NVMe/TCP host against the test target: data, errors, faults, the daemon on an
`nvmf` pool, and provisioning through the SPDK JSON-RPC subset."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon
from nvmf_support import HERE, HOSTNQN, TargetProcess, free_port, target_config

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError
from kvtier.client.protocol import Tier
from kvtier.daemon.config import load_config
from kvtier.daemon.errors import DeviceError
from kvtier.daemon.nvmf.device import NvmfDevice
from kvtier.daemon.nvmf.host import NvmfError
from kvtier.daemon.spdk import decommission_pool, provision_pool

MiB = 1 << 20


def rnd(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def target(tmp_path: Path):  # type: ignore[no-untyped-def]
    t = TargetProcess(str(tmp_path / "ns.img"), 64 * MiB)
    yield t
    t.kill()


@pytest.mark.parametrize("digests,c2h_success", [(False, True), (True, True), (True, False)])
def test_reads_and_writes_round_trip(tmp_path: Path, digests: bool, c2h_success: bool) -> None:
    t = TargetProcess(str(tmp_path / "ns.img"), 64 * MiB,
                      *([] if c2h_success else ["--no-c2h-success"]), "--max-c2h", "32768")
    try:
        dev = NvmfDevice(t.config(header_digest=digests, data_digest=digests, queues=3))
        try:
            h = dev.health()
            assert (h["state"], h["lba_size"], h["io_queues"], h["max_io"]) == \
                ("live", 4096, 3, 131072)
            assert dev.size == 64 * MiB
            data = rnd(1, 3 * MiB + 8192)
            # a 3 MiB write is split at MDTS (128 KiB) over three queues
            dev.writev(4096, [memoryview(data[:MiB]), memoryview(data[MiB:])])
            out = np.zeros_like(data)
            dev.readv_into(4096, [memoryview(out)])
            assert np.array_equal(out, data)
            # unaligned reads: edges through small buffers, the middle straight in
            for off, n in ((4096 + 10, 100), (4096 + 4000, 200), (4096 + 1, 3 * 4096 + 7),
                           (4096 + 5000, MiB)):
                part = np.zeros(n, np.uint8)
                dev.readv_into(off, [memoryview(part)])
                assert np.array_equal(part, data[off - 4096:off - 4096 + n])
            dev.flush()
            with pytest.raises(DeviceError, match="not aligned"):
                dev.writev(100, [memoryview(bytearray(4096))])
            with pytest.raises(DeviceError, match="outside device"):
                dev.readv_into(64 * MiB - 4096, [memoryview(bytearray(8192))])
            h = dev.health()
            assert h["errors"] == 0 and h["bytes_written"] == len(data)
        finally:
            dev.close()
        # the target's file holds exactly what was written
        with open(t.path, "rb") as f:
            f.seek(4096)
            assert f.read(len(data)) == data.tobytes()
    finally:
        t.kill()


def test_attach_errors_say_what_is_wrong(target: TargetProcess, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"cannot attach .*Connection refused"):
        NvmfDevice(target_config(1, target.nqn))
    with pytest.raises(DeviceError, match="connect: invalid parameters"):
        NvmfDevice(target_config(target.port, "nqn.2016-06.io.kvtier:nope"))
    with pytest.raises(DeviceError, match="namespace 2 does not exist"):
        NvmfDevice(target.config(nsid=2))
    allow = TargetProcess(str(tmp_path / "b.img"), 8 * MiB, "--host", "nqn.2014-08.io:other")
    try:
        with pytest.raises(DeviceError, match="invalid host"):
            NvmfDevice(allow.config())
    finally:
        allow.kill()


def test_keep_alive_holds_an_idle_association(target: TargetProcess) -> None:
    dev = NvmfDevice(target.config(kato_ms=600))
    try:
        time.sleep(2.0)  # the target drops a controller 0.9 s after its last keep alive
        buf = bytearray(4096)
        dev.readv_into(0, [memoryview(buf)])
        assert dev.health()["reconnects"] == 0
    finally:
        dev.close()


def _writer(dev: NvmfDevice, acked: dict[int, int], errors: list[str],
            stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        slot = i % 256
        data = rnd(i, 64 * 1024)
        try:
            dev.writev(slot * 65536, [memoryview(data)])
            acked[slot] = i
        except DeviceError as e:
            errors.append(str(e))
            time.sleep(0.01)
        i += 1


def _check_acked(dev: NvmfDevice, acked: dict[int, int]) -> None:
    out = np.zeros(64 * 1024, np.uint8)
    for slot, i in acked.items():
        dev.readv_into(slot * 65536, [memoryview(out)])
        assert np.array_equal(out, rnd(i, 64 * 1024)), f"slot {slot} lost write {i}"


@contextmanager
def writing(dev: NvmfDevice, threads: int = 2) -> Iterator[tuple[dict[int, int], list[str]]]:
    """Writers hammering `dev` until the block ends: (slot -> acknowledged write, errors)."""
    acked: dict[int, int] = {}
    errors: list[str] = []
    stop = threading.Event()
    ths = [threading.Thread(target=_writer, args=(dev, acked, errors, stop))
           for _ in range(threads)]
    for th in ths:
        th.start()
    try:
        yield acked, errors
    finally:
        stop.set()
        for th in ths:
            th.join()


def fault_under_writes(target: TargetProcess, dev: NvmfDevice,
                       fault: str) -> tuple[dict[int, int], list[str]]:
    """Writers on `dev` while the target is killed and restarted ("kill") or has its
    connections reset with writes stalled in flight ("reset"); returns (slot ->
    acknowledged write, errors) once the host reconnected and writes flow again."""
    with writing(dev) as (acked, errors):
        wait_for(lambda: len(acked) > 50, what="writes before the fault")
        if fault == "kill":
            target.kill()
            wait_for(lambda: errors, what="a failed request")
            time.sleep(0.3)
            target.restart()
        else:  # stall so that writes are surely in flight, then reset the connections
            target.signal(signal.SIGUSR1)
            time.sleep(0.3)
            target.signal(signal.SIGUSR2)
            wait_for(lambda: errors, what="a failed request")
            target.signal(signal.SIGUSR1)
        wait_for(lambda: dev.health()["reconnects"] >= 1, what="the reconnect")
        n = dev.health()["bytes_written"]
        wait_for(lambda: dev.health()["bytes_written"] > n + 20 * 65536, what="writes after it")
    return acked, errors


@pytest.mark.parametrize("fault", ["kill", "reset"])
def test_target_faults_fail_requests_clearly_and_lose_nothing_acknowledged(
        target: TargetProcess, fault: str) -> None:
    dev = NvmfDevice(target.config(queues=2, io_timeout_s=3.0))
    acked, errors = fault_under_writes(target, dev, fault)
    try:
        assert errors, "the fault failed no request"
        assert all("connection" in e or "not connected" in e for e in errors), errors[:3]
        if fault == "reset":  # writes were stalled in flight: they saw the reset itself
            assert "reset by peer" in " ".join(errors)
        h = dev.health()
        # live again: the outage's error is history, with its time, no longer last_error
        assert h["state"] == "live" and h["last_error"] == "" and h["down_since"] == 0
        assert h["connection_losses"] >= 1 and h["recent_errors"] and h["last_error_at"]
        _check_acked(dev, acked)
    finally:
        dev.close()


def test_a_stalled_target_times_out_and_the_host_recovers(target: TargetProcess) -> None:
    dev = NvmfDevice(target.config(io_timeout_s=1.0))
    try:
        data = rnd(5, 65536)
        dev.writev(0, [memoryview(data)])
        target.signal(signal.SIGUSR1)  # stall: commands are taken, never answered
        time.sleep(0.2)
        out = np.zeros_like(data)
        t0 = time.monotonic()
        with pytest.raises(NvmfError, match="timed out after 1 s"):
            dev.readv_into(0, [memoryview(out)])
        assert time.monotonic() - t0 < 3
        target.signal(signal.SIGUSR1)
        # I/O never waits for a reconnect: wait for it here, then read
        assert dev.wait_live(timeout=10), dev.health()
        dev.readv_into(0, [memoryview(out)])
        assert np.array_equal(out, data)
        h = dev.health()
        assert h["timeouts"] >= 1 and h["reconnects"] >= 1
    finally:
        dev.close()


# -- the daemon on an nvmf pool ---------------------------------------------------------------

def nvmf_pool_toml(port: int, nqn: str, extra: str = "") -> str:
    return "\n".join(["[[pool]]", 'name = "remote0"', 'kind = "nvmf"',
                      'address = "127.0.0.1"', f"port = {port}", f'subnqn = "{nqn}"',
                      f'hostnqn = "{HOSTNQN}"', "queues = 2", "queue_depth = 16",
                      'io_timeout = "3s"', 'segment_size = "4M"', extra, ""])


def k(i: int) -> bytes:
    return hashlib.sha256(f"k{i}".encode()).digest()[:16]


def connect(d: Daemon) -> Client:
    return Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=16 << 20)


def test_daemon_serves_from_an_nvmf_pool_and_survives_a_target_restart(
        tmp_path: Path, target: TargetProcess) -> None:
    d = Daemon(tmp_path / "d", pool=nvmf_pool_toml(target.port, target.nqn))
    d.dir.mkdir()
    d.start()
    try:
        st = d.admin("status")
        md = st["store"]["media_device"] if "store" in st else st["media_device"]
        assert md["kind"] == "nvmf" and md["state"] == "live"
        vals = {i: rnd(i, 50_000 + i) for i in range(40)}
        with connect(d) as c:
            for i, v in vals.items():
                assert c.put("s", k(i), [v]) == Tier.POOL
        d.stop()
        d.start()  # DRAM is gone: reads come from the namespace
        with connect(d) as c:
            for i, v in vals.items():
                assert c.get(k(i)) == v.tobytes()
            target.kill()
            with pytest.raises(KvtierError, match="IO_ERROR"):
                for i in range(100, 140):
                    c.put("s", k(i), [rnd(i, 50_000)])
            # the client hears IO_ERROR; the daemon's log says what happened
            assert "remote0: write of" in d.log.read_text()
            assert "not connected to 127.0.0.1" in d.log.read_text()
            target.restart()
            deadline = time.monotonic() + 15
            while True:
                try:
                    c.put("s", k(200), [rnd(200, 50_000)])
                    break
                except KvtierError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        d.stop()
        d.start()
        with connect(d) as c:
            for i, v in vals.items():
                assert c.get(k(i)) == v.tobytes()
            assert c.get(k(200)) == rnd(200, 50_000).tobytes()
        st = d.admin("status")
        md = st["store"]["media_device"] if "store" in st else st["media_device"]
        assert md["state"] == "live"
    finally:
        if d.proc is not None:
            d.stop()


def test_bad_nvmf_pool_config_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(nvmf_pool_toml(4420, "not-an-nqn"))
    with pytest.raises(Exception, match=r"pool\[0\]\.subnqn: must be an NQN"):
        load_config(str(cfg))
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y").replace("queues = 2",
                                                                       "queues = 0"))
    with pytest.raises(Exception, match=r"pool\[0\]\.queues: must be 1\.\.64"):
        load_config(str(cfg))
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y",
                                  '[pool.provision]\nbdev = { kind = "zfs", name = "x" }'))
    with pytest.raises(Exception, match=r"pool\[0\]\.provision\.bdev\.kind: must be one of"):
        load_config(str(cfg))


# -- provisioning -----------------------------------------------------------------------------

def test_provisioning_is_idempotent_and_reversible(tmp_path: Path) -> None:
    """daemon/spdk.py against the target's SPDK JSON-RPC subset; a real SPDK runs the same
    calls in test_spdk.py."""
    rpc = str(tmp_path / "spdk.sock")
    proc = subprocess.Popen([sys.executable, f"{HERE}/nvmf_target.py", "--rpc-socket", rpc],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("rpc")
        backing = tmp_path / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(32 * MiB)
        port = free_port()
        nqn = "nqn.2016-06.io.kvtier:prov"
        toml = nvmf_pool_toml(port, nqn, "\n".join([
            "[pool.provision]", f'rpc = "{rpc}"', 'serial_number = "KVT0001"',
            f'bdev = {{ kind = "aio", name = "kv0", filename = "{backing}", block_size = 4096 }}']))
        d = Daemon(tmp_path / "d", pool=toml)
        d.dir.mkdir()
        d.start()  # provisions, attaches, formats
        with connect(d) as c:
            c.put("s", k(1), [rnd(1, 10_000)])
        d.stop()
        cfg = load_config(str(d.config))
        assert provision_pool(cfg.pools[0]).made == []  # already there: nothing changes
        d.start()
        with connect(d) as c:
            assert c.get(k(1)) == rnd(1, 10_000).tobytes()
        d.stop()
        # through the admin CLI: `kvtier pool decommission`
        r = subprocess.run([f"{os.path.dirname(sys.executable)}/kvtier", "pool",
                            "decommission", "--config", str(d.config), "--delete-bdev"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"deleted subsystem {nqn}", "deleted aio bdev kv0"]
        assert decommission_pool(cfg.pools[0], delete_bdev=True).made == []
        made = provision_pool(cfg.pools[0]).made
        assert made == ["created aio bdev kv0", f"created subsystem {nqn}",
                        f"allowed host {HOSTNQN} on {nqn}",
                        f"added kv0 as namespace 1 of {nqn}",
                        f"listening for {nqn} on 127.0.0.1:{port}"]
        d.start()  # the data survived: the bdev is the same file
        with connect(d) as c:
            assert c.get(k(1)) == rnd(1, 10_000).tobytes()
        d.stop()
    finally:
        proc.kill()
        proc.wait()


def test_transport_sizes_in_the_provision_section_are_checked(tmp_path: Path) -> None:
    from kvtier.daemon.config import ConfigError
    prov = ['[pool.provision]', 'bdev = { kind = "malloc", name = "m0", size = "64M" }']
    cfg = tmp_path / "kvtier.toml"
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.kvtier:x", "\n".join(prov)))
    p = load_config(str(cfg)).pools[0].nvmf
    assert p is not None and p.provision is not None
    assert (p.provision["max_io_size"], p.provision["io_unit_size"]) == (1 << 20, 128 << 10)
    for extra, want in (('max_io_size = "3M"', "max_io_size: must be 1 to 16 times"),
                        ('io_unit_size = "1000"', "io_unit_size: must be a positive multiple"),
                        ('max_io_size = "4M"\nio_unit_size = "128K"', "1 to 16 times")):
        cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.kvtier:x",
                                      "\n".join([*prov[:1], extra, *prov[1:]])))
        with pytest.raises(ConfigError, match=want):
            load_config(str(cfg))
