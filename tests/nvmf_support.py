"""Namespaces for tests: the test NVMe/TCP target in this process or as its own process.

`InProcessTarget` serves many small namespaces from one listener (cheap enough for one per
test); `TargetProcess` runs tests/nvmf_target.py as a separate process, so that it can be
SIGKILLed, stalled (SIGUSR1) or have its connections reset (SIGUSR2) under a live host.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

from nvmf_target import Target

from kvtier.daemon.nvmf.device import NvmfDevice
from kvtier.daemon.nvmf.host import NvmfTargetConfig

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTNQN = "nqn.2014-08.io.kvtier:test-host"
_ids = itertools.count()


def target_config(port: int, subnqn: str, **kw: object) -> NvmfTargetConfig:
    kw.setdefault("io_timeout_s", 5.0)
    kw.setdefault("connect_timeout_s", 3.0)
    return NvmfTargetConfig("127.0.0.1", port, subnqn, HOSTNQN, **kw)  # type: ignore[arg-type]


class InProcessTarget:
    def __init__(self, **kw: object) -> None:
        self.target = Target(**kw)  # type: ignore[arg-type]
        self.port = self.target.listen("127.0.0.1", 0)

    def namespace(self, path: str, size: int, lba_size: int = 4096) -> str:
        """Serve file `path` (created with `size` bytes) as namespace 1 of a new subsystem;
        returns the subsystem's NQN."""
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(size)
        n = next(_ids)
        ns = self.target.add_bdev(f"bdev{n}", path, lba_size)
        nqn = f"nqn.2016-06.io.kvtier:test{n}"
        sub = self.target.add_subsystem(nqn)
        sub.namespaces[1] = ns
        return nqn

    def device(self, path: str, size: int, **kw: object) -> NvmfDevice:
        return NvmfDevice(target_config(self.port, self.namespace(path, size), **kw))


SPDK_BIN = os.environ.get("KVTIER_SPDK_BIN") or shutil.which("nvmf_tgt") or \
    shutil.which("spdk_tgt")
NO_SPDK = ("no SPDK target here: set KVTIER_SPDK_BIN to nvmf_tgt or spdk_tgt to run the "
           "NVMe/TCP tests against a real SPDK")


class SpdkProcess:
    """SPDK's nvmf_tgt without hugepages on one core, provisioned per namespace through
    kvtier.daemon.spdk (an aio bdev over a file, a subsystem, a listener)."""

    def __init__(self, workdir: str, port: int | None = None) -> None:
        assert SPDK_BIN, NO_SPDK
        self.rpc = os.path.join(workdir, "spdk.sock")
        self.log = open(os.path.join(workdir, "spdk.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([SPDK_BIN, "--no-huge", "-s", "1024", "-u", "-m", "0x1",
                                      "-r", self.rpc], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.rpc):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SPDK did not start; see " + self.log.name)
            time.sleep(0.1)
        from kvtier.daemon.spdk import Changes, SpdkTarget

        self.port = port or free_port()
        with SpdkTarget(self.rpc) as t:
            t.ensure_transport(Changes())

    def serve(self, path: str, size: int, nqn: str | None = None) -> str:
        """Serve file `path` (created with `size` bytes if missing) as namespace 1 of
        subsystem `nqn` (a new one by default); returns the NQN."""
        from kvtier.daemon.spdk import Changes, SpdkTarget

        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(size)
        n = next(_ids)
        nqn = nqn or f"nqn.2016-06.io.spdk:kvtier{n}"
        ch = Changes()
        with SpdkTarget(self.rpc) as t:
            bdev = t.ensure_bdev(ch, {"kind": "aio", "name": f"aio{n}", "filename": str(path),
                                      "block_size": 4096})
            t.ensure_subsystem(ch, nqn, serial=f"KVT{n:06d}", hosts=[HOSTNQN])
            t.ensure_namespace(ch, nqn, bdev, 1)
            t.ensure_listener(ch, nqn, "127.0.0.1", self.port)
        return nqn

    def device(self, path: str, size: int, **kw: object) -> NvmfDevice:
        return NvmfDevice(target_config(self.port, self.serve(path, size), **kw))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class NvmfPath(str):
    """A pool path the pool tests open as an NVMe/TCP namespace instead of a file."""

    target: InProcessTarget | SpdkProcess


class TargetProcess:
    def __init__(self, path: str, size: int, *args: str, port: int = 0) -> None:
        self.path, self.size, self.args = path, size, args
        self.nqn = "nqn.2016-06.io.kvtier:test"
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "nvmf_target.py"), "--file", self.path,
             "--size", str(self.size), "--port", str(self.port), "--nqn", self.nqn,
             *self.args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"test target did not start: {line!r}")
        self.port = int(line.split()[1])

    def config(self, **kw: object) -> NvmfTargetConfig:
        return target_config(self.port, self.nqn, **kw)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """Start again on the same port (the host reconnects to it)."""
        self.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
