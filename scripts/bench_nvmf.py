#!/usr/bin/env python3
"""NVMe-oF/TCP benchmark: kvtier's host reading and writing a namespace over loopback.

    scripts/bench_nvmf.py [--quick] [--json] [--dir DIR] [--digests] [--tls]

For 128 KiB and 1 MiB I/O at queue depth 1, 8 and 32 (random aligned offsets): read and
write throughput through `NvmfDevice` against a namespace, as a ratio to the
same backing file read and written directly (O_DIRECT, the same number of requests in
flight) in the same run.  `--queues` sets the host's I/O queues (default 4).

The target is SPDK's when `KVTIER_SPDK_BIN` names nvmf_tgt/spdk_tgt (an aio bdev over the
same backing file, provisioned through daemon/spdk.py; with `KVTIER_SPDK_PERF` naming
`spdk_nvme_perf`, its own throughput against the same target is measured too and the
`*_ratio_to_spdk_perf` figures filled; `--spdk-max-io` sets the transport's max_io_size,
1M by default as kvtier provisions it, 128K to see SPDK's default); otherwise the test
target of tests/nvmf_target.py, a Python program, which bounds what the host can show
here.  `target` says which.

`--tls` also measures every point over TLS 1.3 (a PSK, TLS_AES_128_GCM_SHA256): a second
subsystem on a secure listener serves the same backing file (a second test target, or a
second aio bdev and subsystem on the same SPDK, provisioned with the key through
daemon/spdk.py), and the `nvmf_tls_*_ratio_to_plain` figures compare it with the plain
NVMe/TCP run of the same point.

`host_cpu_s_per_gib` and `target_cpu_s_per_gib` (CPU seconds of this process and of
the target process per GiB moved over all NVMe/TCP runs) say which side bounds the figures.

`--json` prints every figure as one JSON object on the last line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_report import bench_arguments, report
from rich.console import Console
from rich.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from kvtier.daemon.blockdev import FileDevice, aligned_buffer  # noqa: E402
from kvtier.daemon.nvmf.device import NvmfDevice  # noqa: E402
from kvtier.daemon.nvmf.host import NvmfTargetConfig  # noqa: E402
from kvtier.daemon.sizes import parse_size  # noqa: E402

MiB = 1 << 20
HOSTNQN = "nqn.2014-08.io.kvtier:bench"
SIZES = {"128k": 128 * 1024, "1m": MiB}
DEPTHS = (1, 8, 32)

Io = Callable[[int, memoryview], None]


def op_of(device: FileDevice | NvmfDevice, write: bool) -> Io:
    """One request of a load on `device`: write `buf` at `off`, or read it there."""
    if write:
        return lambda off, buf: device.writev(off, [buf])
    return lambda off, buf: device.readv_into(off, [buf])


def run_load(io: Io, dev_size: int, size: int, depth: int, seconds: float) -> float:
    """Bytes per second with `depth` threads each keeping one request in flight."""
    slots = dev_size // size
    done = [0] * depth
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        buf = aligned_buffer(size)
        buf[:] = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
        rng = np.random.default_rng(1000 + i)
        try:
            while not stop.is_set():
                io(int(rng.integers(0, slots)) * size, buf)
                done[i] += size
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) / dt


class TestTarget:
    def __init__(self, path: str, size: int, psk_file: str = "") -> None:
        tls = ["--host", HOSTNQN, "--psk-file", psk_file] if psk_file else []
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "nvmf_target.py"), "--file", path,
             "--size", str(size), "--nqn", "nqn.2016-06.io.kvtier:bench", *tls],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"test target did not start: {line!r}")
        self.port = int(line.split()[1])
        self.nqn = "nqn.2016-06.io.kvtier:bench"
        self.name = "kvtier test target (Python, tests/nvmf_target.py)"

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.proc.pid)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SpdkTarget:
    def __init__(self, workdir: str, backing: str, max_io_size: int) -> None:
        from kvtier.daemon.config import NvmfPoolConfig, PoolConfig
        from kvtier.daemon.spdk import provision_pool

        self.rpc = os.path.join(workdir, "spdk.sock")
        self.proc = subprocess.Popen([os.environ["KVTIER_SPDK_BIN"], "--no-huge", "-s", "1024",
                                      "-u", "-m", "0x1", "-r", self.rpc],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.rpc):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SPDK target did not start")
            time.sleep(0.1)
        self.port = 4420
        self.nqn = "nqn.2016-06.io.spdk:kvtier-bench"
        self.name = f"SPDK {os.path.basename(os.environ['KVTIER_SPDK_BIN'])}"
        prov = {"rpc": self.rpc, "serial_number": "KVTIERBENCH", "allow_hosts": [HOSTNQN],
                "timeout_s": 60.0, "max_io_size": max_io_size,
                "bdev": {"kind": "aio", "name": "Aio0", "filename": backing,
                         "block_size": 4096}}
        provision_pool(PoolConfig("bench", "nvmf", "", 0, 0, nvmf=NvmfPoolConfig(
            "127.0.0.1", self.port, self.nqn, HOSTNQN, provision=prov)))
        self.backing, self.max_io_size = backing, max_io_size

    def secure_subsystem(self, psk_file: str, key: Any) -> tuple[int, str]:
        """A second subsystem over the same file (its own aio bdev) on a TLS listener:
        (port, NQN)."""
        from kvtier.daemon.config import NvmfPoolConfig, PoolConfig
        from kvtier.daemon.spdk import provision_pool

        port, nqn = self.port + 1, self.nqn + "-tls"
        prov = {"rpc": self.rpc, "serial_number": "KVTIERBENCHTLS", "allow_hosts": [HOSTNQN],
                "timeout_s": 60.0, "max_io_size": self.max_io_size, "psk_name": "",
                "psk_path": "", "bdev": {"kind": "aio", "name": "Aio1",
                                         "filename": self.backing, "block_size": 4096}}
        provision_pool(PoolConfig("bench-tls", "nvmf", "", 0, 0, nvmf=NvmfPoolConfig(
            "127.0.0.1", port, nqn, HOSTNQN, provision=prov, psk=key, psk_file=psk_file)))
        return port, nqn

    def perf(self, size: int, depth: int, write: bool, seconds: float) -> float | None:
        perf = os.environ.get("KVTIER_SPDK_PERF")
        if not perf:
            return None
        r = subprocess.run([perf, "--no-huge", "-s", "512", "-c", "0x2", "-q", str(depth),
                            "-o", str(size),
                            "-w", "randwrite" if write else "randread", "-t",
                            str(max(int(seconds), 1)), "-r",
                            f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{self.port} "
                            f"subnqn:{self.nqn} hostnqn:{HOSTNQN}"],
                           capture_output=True, text=True, timeout=120)
        m = re.search(r"Total\s*:\s*([\d.]+)\s+([\d.]+)", r.stdout)
        return float(m.group(2)) * MiB if m else None

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.proc.pid)  # SPDK's reactor polls: one core, always busy

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def main() -> int:
    ap = bench_arguments(__doc__)
    ap.add_argument("--digests", action="store_true", help="header and data digests on")
    ap.add_argument("--queues", type=int, default=4, help="I/O queues (TCP connections)")
    ap.add_argument("--tls", action="store_true",
                    help="also every point over TLS 1.3 with a PSK (test target only)")
    ap.add_argument("--spdk-max-io", default="1M",
                    help="the SPDK transport's max_io_size (SPDK's own default: 128K)")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    seconds = 0.6 if args.quick else 3.0
    dev_size = (64 if args.quick else 512) * MiB
    workdir = tempfile.mkdtemp(prefix="kvtier-bench-nvmf-", dir=args.dir)
    fig: dict[str, object] = {}
    target: TestTarget | SpdkTarget | None = None
    dev: NvmfDevice | None = None
    tls_target: TestTarget | None = None
    tls_dev: NvmfDevice | None = None
    try:
        backing = os.path.join(workdir, "ns.img")
        with open(backing, "wb") as f:
            f.truncate(dev_size)
        fd = os.open(backing, os.O_RDWR)
        os.posix_fallocate(fd, 0, dev_size)
        os.close(fd)
        if os.environ.get("KVTIER_SPDK_BIN"):
            target = SpdkTarget(workdir, backing, parse_size(args.spdk_max_io))
        else:
            target = TestTarget(backing, dev_size)
        fig["target"] = target.name
        fig["digests"] = args.digests
        fig["queues"] = args.queues
        dev = NvmfDevice(NvmfTargetConfig("127.0.0.1", target.port, target.nqn, HOSTNQN,
                                          queues=args.queues, queue_depth=32,
                                          header_digest=args.digests,
                                          data_digest=args.digests))
        fig["max_io_bytes"] = dev.health()["max_io"]
        if args.tls:
            from kvtier.daemon.nvmf import psk

            key = psk.generate()
            keyfile = os.path.join(workdir, "bench.psk")
            with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as kf:
                kf.write(key.interchange())
            if isinstance(target, SpdkTarget):
                tls_port, tls_nqn = target.secure_subsystem(keyfile, key)
            else:
                tls_target = TestTarget(backing, dev_size, keyfile)
                tls_port, tls_nqn = tls_target.port, tls_target.nqn
            tls_dev = NvmfDevice(NvmfTargetConfig("127.0.0.1", tls_port,
                                                  tls_nqn, HOSTNQN, queues=args.queues,
                                                  queue_depth=32, header_digest=args.digests,
                                                  data_digest=args.digests, psk=key))
            fig["tls"] = tls_dev.health()["tls"]
        # fill the namespace once so reads read written blocks
        chunk = aligned_buffer(4 * MiB)
        for off in range(0, dev_size, 4 * MiB):
            dev.writev(off, [chunk])
        direct = FileDevice(backing, direct="auto")
        fig["baseline"] = "the backing file, " + ("O_DIRECT" if direct.direct else "buffered")

        points = [(s, q, w) for s in SIZES for q in DEPTHS for w in (False, True)]
        host_cpu = target_cpu = moved = 0.0
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("nvmf vs file", total=len(points))
            for sname, qd, write in points:
                size = SIZES[sname]
                op = "write" if write else "read"
                c0, t0, w0 = time.process_time(), target.cpu_seconds(), time.perf_counter()
                nv = run_load(op_of(dev, write), dev_size, size, qd, seconds)
                host_cpu += time.process_time() - c0
                target_cpu += target.cpu_seconds() - t0
                moved += nv * (time.perf_counter() - w0)
                fl = run_load(op_of(direct, write), dev_size, size, qd, seconds)
                fig[f"nvmf_{op}_{sname}_qd{qd}_bytes_per_s"] = round(nv)
                fig[f"file_{op}_{sname}_qd{qd}_bytes_per_s"] = round(fl)
                fig[f"nvmf_{op}_{sname}_qd{qd}_ratio_to_file"] = round(nv / fl, 3)
                if tls_dev is not None:
                    tv = run_load(op_of(tls_dev, write), dev_size, size, qd, seconds)
                    fig[f"nvmf_tls_{op}_{sname}_qd{qd}_bytes_per_s"] = round(tv)
                    fig[f"nvmf_tls_{op}_{sname}_qd{qd}_ratio_to_plain"] = round(tv / nv, 3)
                if isinstance(target, SpdkTarget):
                    ref = target.perf(size, qd, write, seconds)
                    fig[f"spdk_perf_{op}_{sname}_qd{qd}_bytes_per_s"] = ref and round(ref)
                    fig[f"nvmf_{op}_{sname}_qd{qd}_ratio_to_spdk_perf"] = (
                        round(nv / ref, 3) if ref else None)
                prog.advance(task)
        direct.close()
        fig["host_cpu_s_per_gib"] = round(host_cpu / (moved / 2**30), 3)
        fig["target_cpu_s_per_gib"] = round(target_cpu / (moved / 2**30), 3)
        h = dev.health()
        fig["commands"] = h["commands"]
        fig["errors"] = h["errors"]
    finally:
        if tls_dev is not None:
            fig["tls_errors"] = tls_dev.health()["errors"]
            tls_dev.close()
        if tls_target is not None:
            tls_target.close()
        if dev is not None:
            dev.close()
        if target is not None:
            target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    report(console, "kvtier NVMe/TCP host" + (" (--quick)" if args.quick else ""), fig,
           args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
