#!/usr/bin/env python3
"""Admin-tree benchmark: the FUSE view of kvtierd against the client library, same run.

    scripts/bench_fuse.py [--quick] [--json] [--dir DIR]

* `cat` throughput of a 64 MiB block file through the mounted tree (the record as stored,
  read from the media pool with O_DIRECT), as a ratio to reading the same value with the
  client library from the media pool (DRAM emptied by a restart before each);
* `ls -l` time of a session directory with 100,000 blocks (2,000 with --quick), and
  the daemon's own `ls` admin call for the same session (`kvtier ls`), as a ratio.

Needs root and /dev/fuse.  `--json` prints every figure as one JSON object on the last line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_daemon import TOKEN, BenchDaemon
from bench_report import bench_arguments, report
from rich.console import Console

from kvtier.client.admin import AdminClient
from kvtier.client.client import Client

MiB = 1 << 20


def main() -> int:
    ap = bench_arguments(__doc__)
    ap.add_argument("--blocks", type=int, default=None,
                    help="blocks in the listed session (default 100000; 2000 with --quick)")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("bench_fuse: needs root and /dev/fuse (it mounts the admin tree)")
    nblocks = args.blocks or (2_000 if args.quick else 100_000)
    work = tempfile.mkdtemp(prefix="kvtier-fuse-", dir=args.dir)
    fs = os.path.join(work, "fs")
    d = BenchDaemon(work, dram=2048 * MiB, pool=(2048 + nblocks * 8 // 1024) * MiB,
                    segment=256 * MiB, populate=False, ack="memory",
                    extra=f'[fuse]\nmountpoint = "{fs}"\n')
    fig: dict[str, float] = {"blocks_listed": nblocks}
    try:
        d.start()
        big = np.random.default_rng(1).integers(0, 256, 64 * MiB, dtype=np.uint8)
        with Client.connect(d.sock, "bench", TOKEN, arena_size=256 * MiB) as c:
            c.put("big", b"B" * 16, [big])
            console.print(f"writing {nblocks} small blocks")
            slot = c.allocator.alloc(4096)
            futs = []
            for i in range(nblocks):
                futs.append(c.submit(c.put_request("many", i.to_bytes(8, "little") * 2, slot,
                                                   [4096])))
                if len(futs) >= 64:
                    for f in futs:
                        c._wait(f)
                    futs = []
            for f in futs:
                c._wait(f)
        t0 = time.perf_counter()
        while d.backlog():  # written behind to the media pool
            time.sleep(0.5)
        console.print(f"written behind in {time.perf_counter() - t0:.0f} s")
        cat_s, lib_s = [], []
        path = os.path.join(fs, "tenants", "bench", "sessions", "big", "blocks",
                            (b"B" * 16).hex())
        for _ in range(3):
            d.stop()  # DRAM gone: both read the media pool
            d.start()
            t0 = time.perf_counter()
            out = subprocess.run(["cat", path], capture_output=True, check=True).stdout
            cat_s.append(time.perf_counter() - t0)
            assert big.tobytes() in out
            d.stop()
            d.start()
            with Client.connect(d.sock, "bench", TOKEN, arena_size=256 * MiB) as c:
                t0 = time.perf_counter()
                got = c.get(b"B" * 16)
                lib_s.append(time.perf_counter() - t0)
                assert len(got) == 64 * MiB
        fig["cat_64mib_bytes_per_s"] = round(len(out) / min(cat_s))
        fig["client_get_64mib_bytes_per_s"] = round(64 * MiB / min(lib_s))
        fig["cat_ratio_to_client_get"] = round(min(lib_s) / min(cat_s), 3)
        sess = os.path.join(fs, "tenants", "bench", "sessions", "many", "blocks")
        t0 = time.perf_counter()
        listing = subprocess.run(["ls", "-l", sess], capture_output=True, check=True,
                                 text=True).stdout
        fig["ls_l_session_s"] = round(time.perf_counter() - t0, 3)
        assert len(listing.splitlines()) == nblocks + 1  # "total" line
        t0 = time.perf_counter()
        with AdminClient(d.sock) as a:
            n = len(a.call("ls", tenant="bench", session="many"))
        fig["admin_ls_session_s"] = round(time.perf_counter() - t0, 3)
        fig["ls_l_ratio_to_admin_ls"] = round(fig["admin_ls_session_s"] / fig["ls_l_session_s"], 3)
        assert n == nblocks
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(console, "kvtier admin tree" + (" (--quick)" if args.quick else ""), fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
