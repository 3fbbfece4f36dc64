#!/usr/bin/env python3
"""Client benchmark: GETs through kvtierd's ring, against baselines from the same run.

    scripts/bench_client.py [--quick] [--json] [--dir DIR]

* GET throughput of 2 MiB and 16 MiB values from the DRAM tier through the ring (values
  land in the client's arena, zero copies in the client), as a ratio to a single-threaded
  numpy memcpy of the same size over the same working set (96 MiB of distinct values);
* GET throughput from the file pool (DRAM empty after a restart; O_DIRECT, no page
  cache) as a ratio to the engine's own direct read of the same keys (`Pool.get_into`,
  in-process, same file);
* round-trip latency of a 4 KiB GET from the DRAM tier, p50 and p99;
* the same GET workload against Redis (Debian's redis-server on 127.0.0.1 with redis-py,
  the remote backend LMCache uses, one request at a time): throughput ratio kvtier (one
  request at a time) / Redis.

DRAM GETs are measured with 1 and with 4 requests in flight (qd1, qd4).

`--quick` runs in under a minute on 2 cores; `--json` prints every figure as one JSON
object on the last line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from bench_daemon import TOKEN, BenchDaemon
from bench_report import bench_arguments, report
from rich.console import Console
from rich.progress import Progress

from kvtier.client.client import Client
from kvtier.daemon.blockdev import FileDevice, aligned_buffer
from kvtier.daemon.pool import Pool

MiB = 1 << 20


def key(i: int) -> bytes:
    return hashlib.blake2b(b"%d" % i, digest_size=16).digest()


def memcpy_rate(size: int, footprint: int, seconds: float) -> float:
    """Single-threaded numpy memcpy of `size` blocks, rotating over `footprint` bytes of
    sources: the same working set the ring GETs read, so both miss the CPU caches alike."""
    srcs = [np.frombuffer(aligned_buffer(size), np.uint8) for _ in range(footprint // size)]
    for s_ in srcs:
        s_[:] = 1
    dst = np.frombuffer(aligned_buffer(size), np.uint8)
    dst[:] = 0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, srcs[n % len(srcs)])
        n += 1
    return n * size / (time.perf_counter() - t0)


def ring_get_rate(c: Client, keys: list[bytes], size: int, seconds: float | None,
                  once: bool = False, qd: int = 1) -> float:
    """GETs into arena slots (values stay in the arena: no client-side copy), with `qd`
    requests in flight."""
    slots = [c.allocator.alloc(size + 8 * 64) for _ in range(qd)]
    try:
        inflight: list[Any] = []
        n, i, t0 = 0, 0, time.perf_counter()
        while True:
            more = i < len(keys) if once else time.perf_counter() - t0 < (seconds or 0)
            if more and len(inflight) < qd:
                slot = slots[i % qd]
                inflight.append(c.submit(c.get_request(keys[i % len(keys)], slot, size, None,
                                                       64)))
                i += 1
                continue
            if not inflight:
                break
            comp = c._wait(inflight.pop(0))
            assert comp.status == 0 and comp.result == size, comp
            n += 1
        return n * size / (time.perf_counter() - t0)
    finally:
        for slot in slots:
            c.allocator.free(slot)


def latency_4k(c: Client, n: int) -> tuple[float, float]:
    k = key(999_999)
    c.put("lat", k, [bytes(4096)])
    slot = c.allocator.alloc(4096 + 8 * 64)
    lat = np.empty(n)
    try:
        req = c.get_request(k, slot, 4096, None, 1)
        for _ in range(200):
            c._call(req, "get")
        for i in range(n):
            t0 = time.perf_counter()
            c._call(req, "get")
            lat[i] = time.perf_counter() - t0
    finally:
        c.allocator.free(slot)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


class Redis:
    def __init__(self, work: str) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise SystemExit("bench_client: redis-server not found (scripts/test installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", work,
                                      "--protected-mode", "yes", "--maxmemory", "0",
                                      "--proto-max-bulk-len", "1gb"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.r = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(200):
            try:
                self.r.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def get_rate(self, size: int, nkeys: int, seconds: float) -> float:
        val = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        for i in range(nkeys):
            self.r.set(b"k%d" % i, val)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            v = self.r.get(b"k%d" % (n % nkeys))
            assert v is not None and len(v) == size
            n += 1
        rate = n * size / (time.perf_counter() - t0)
        self.r.flushall()
        return rate

    def latency_4k(self, n: int) -> tuple[float, float]:
        self.r.set(b"lat", bytes(4096))
        lat = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            self.r.get(b"lat")
            lat[i] = time.perf_counter() - t0
        return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> int:
    ap = bench_arguments(__doc__)
    args = ap.parse_args()
    console = Console(stderr=args.json)
    work = tempfile.mkdtemp(prefix="kvtier-bench-client-", dir=args.dir or os.getcwd())
    secs = 1.5 if args.quick else 5.0
    pool_vals = 12 if args.quick else 64  # values per size for the file-pool pass
    fig: dict[str, Any] = {"quick": args.quick}
    d = BenchDaemon(work, dram=(768 if args.quick else 1536) * MiB,
                    pool=(768 if args.quick else 4096) * MiB)
    redis_srv: Redis | None = None
    try:
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("kvtier client benchmark", total=6)
            d.start()
            sizes = (2 * MiB, 16 * MiB)
            with Client.connect(d.sock, "bench", TOKEN, arena_size=256 * MiB) as c:
                for size in sizes:
                    tag = f"{size // MiB}mib"
                    nk = max(4, (96 * MiB) // size)  # fits the DRAM tier
                    base = size * 1000
                    frames = np.random.default_rng(size).integers(0, 256, size, np.uint8)
                    keys = [key(base + i) for i in range(nk)]
                    for k in keys:
                        c.put("dram", k, np.array_split(frames, 8))
                    fig[f"memcpy_{tag}_bytes_per_s"] = round(memcpy_rate(size, nk * size, secs))
                    for qd in (1, 4):
                        rate = ring_get_rate(c, keys, size, secs, qd=qd)
                        fig[f"dram_get_{tag}_qd{qd}_bytes_per_s"] = round(rate)
                        fig[f"dram_get_{tag}_qd{qd}_ratio_to_memcpy"] = round(
                            rate / fig[f"memcpy_{tag}_bytes_per_s"], 3)
                    pkeys = [key(base + 500 + i) for i in range(pool_vals)]
                    for k in pkeys:
                        c.put("pool", k, np.array_split(frames, 8))
                    prog.advance(task)
                p50, p99 = latency_4k(c, 2000 if args.quick else 20000)
                fig["dram_get_4k_p50_us"] = round(p50 * 1e6, 1)
                fig["dram_get_4k_p99_us"] = round(p99 * 1e6, 1)
                prog.advance(task)
            # File pool: a restart empties DRAM; each key is read once (promotion would
            # serve a second read from DRAM).
            d.stop()
            d.start()
            with Client.connect(d.sock, "bench", TOKEN, arena_size=256 * MiB) as c:
                for size in sizes:
                    tag = f"{size // MiB}mib"
                    pkeys = [key(size * 1000 + 500 + i) for i in range(pool_vals)]
                    fig[f"pool_get_{tag}_bytes_per_s"] = round(ring_get_rate(
                        c, pkeys, size, None, once=True, qd=1))
            d.stop()
            prog.advance(task)
            pool = Pool.open(FileDevice(os.path.join(work, "pool0.img")))
            for size in sizes:
                tag = f"{size // MiB}mib"
                buf = aligned_buffer(size)
                pkeys = [key(size * 1000 + 500 + i) for i in range(pool_vals)]
                t0 = time.perf_counter()
                for k in pkeys:
                    pool.get_into("bench", k, buf)
                direct = len(pkeys) * size / (time.perf_counter() - t0)
                fig[f"engine_get_{tag}_bytes_per_s"] = round(direct)
                fig[f"pool_get_{tag}_ratio_to_engine"] = round(
                    fig[f"pool_get_{tag}_bytes_per_s"] / direct, 3)
            pool.close(checkpoint=False)
            prog.advance(task)
            redis_srv = Redis(work)
            for size in sizes:
                tag = f"{size // MiB}mib"
                fig[f"redis_get_{tag}_bytes_per_s"] = round(redis_srv.get_rate(
                    size, max(4, (96 * MiB) // size), secs))
                fig[f"dram_get_{tag}_ratio_to_redis"] = round(
                    fig[f"dram_get_{tag}_qd1_bytes_per_s"] / fig[f"redis_get_{tag}_bytes_per_s"],
                    2)
            rp50, rp99 = redis_srv.latency_4k(2000 if args.quick else 20000)
            fig["redis_get_4k_p50_us"] = round(rp50 * 1e6, 1)
            fig["redis_get_4k_p99_us"] = round(rp99 * 1e6, 1)
            prog.advance(task)
    finally:
        if redis_srv is not None:
            redis_srv.stop()
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(console, "kvtier client" + (" (--quick)" if args.quick else ""), fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
