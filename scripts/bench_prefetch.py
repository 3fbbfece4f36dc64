#!/usr/bin/env python3
"""Prefetch benchmark: how fast a PREFETCH hint moves a session from the pool into DRAM.

    scripts/bench_prefetch.py [--quick] [--json] [--dir DIR]

A session of 4 MiB values is written through kvtierd; the daemon is restarted (DRAM
empty, everything on the file pool); then one PREFETCH of the whole session is timed,
with 1 promotion worker and with 4 (`[limits] prefetch_threads`).  The baseline, in the
same run, is the pool file read directly with O_DIRECT in 4 MiB requests from 4 threads:
what the media gives.  `--json` prints every figure as one JSON object on the last line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from bench_daemon import TOKEN, BenchDaemon
from bench_report import bench_arguments, report
from rich.console import Console
from rich.progress import Progress

from kvtier.client.client import Client
from kvtier.daemon.blockdev import FileDevice, aligned_buffer

MiB = 1 << 20
VALUE = 4 * MiB


def file_read_rate(path: str, nbytes: int, threads: int = 4) -> float:
    dev = FileDevice(path, direct=True)
    try:
        n = min(nbytes, dev.size) // VALUE

        def one(i: int) -> None:
            buf = aligned_buffer(VALUE)
            for j in range(i, n, threads):
                dev.readv_into(j * VALUE, [buf])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(threads)))
        return n * VALUE / (time.perf_counter() - t0)
    finally:
        dev.close()


def main() -> int:
    args = bench_arguments(__doc__).parse_args()
    console = Console(stderr=args.json)
    total = (128 if args.quick else 1024) * MiB
    nvals = total // VALUE
    work = tempfile.mkdtemp(prefix="kvtier-pf-", dir=args.dir)  # short: socket paths
    fig: dict[str, object] = {"values": nvals, "value_bytes": VALUE, "session_bytes": total}
    try:
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("prefetch", total=3)
            for workers in (1, 4):
                sub = os.path.join(work, str(workers))
                os.makedirs(sub)
                d = BenchDaemon(sub, dram=2 * total + 64 * MiB, pool=3 * total,
                                segment=16 * MiB, extra=f"prefetch_threads = {workers}\n")
                d.start()
                try:
                    with Client.connect(d.sock, "bench", TOKEN, arena_size=64 * MiB) as c:
                        for i in range(nvals):
                            c.put("s", i.to_bytes(16, "little"),
                                  [np.full(VALUE, i % 251, np.uint8)])
                    d.stop()
                    d.start()  # DRAM is empty: the session is on the pool only
                    with Client.connect(d.sock, "bench", TOKEN, arena_size=64 * MiB) as c:
                        t0 = time.perf_counter()
                        n, met = c.prefetch(session="s", deadline_ms=600_000)
                        dt = time.perf_counter() - t0
                        keys = [i.to_bytes(16, "little") for i in range(nvals)]
                        in_dram = sum(1 for t in c.lookup(keys)[1] if t == 1)
                    fig[f"prefetch_{workers}w_seconds"] = round(dt, 3)
                    fig[f"prefetch_{workers}w_bytes_per_s"] = round(n * VALUE / dt)
                    fig[f"prefetch_{workers}w_values_in_dram"] = in_dram
                    fig[f"prefetch_{workers}w_met"] = met
                    if workers == 4:
                        fig["pool_file_read_bytes_per_s"] = round(
                            file_read_rate(d.pool_path, total))
                finally:
                    d.stop()
                prog.advance(task)
        rate = fig["pool_file_read_bytes_per_s"]
        assert isinstance(rate, int)
        for w in (1, 4):
            r = fig[f"prefetch_{w}w_bytes_per_s"]
            assert isinstance(r, int)
            fig[f"prefetch_{w}w_ratio_to_file"] = round(r / rate, 3)
        fig["speedup_4w_over_1w"] = round(
            fig["prefetch_4w_bytes_per_s"] / fig["prefetch_1w_bytes_per_s"], 2)  # type: ignore[operator]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(console, "kvtier prefetch" + (" (--quick)" if args.quick else ""), fig, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
