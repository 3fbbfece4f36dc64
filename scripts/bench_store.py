#!/usr/bin/env python3
"""Storage-engine benchmark: the figures of the storage-engine issue, in one run.

    scripts/bench_store.py [--quick] [--json] [--dir DIR]

* put/get throughput of 2 MiB and 16 MiB values on the O_DIRECT file backend, at queue
  depth 1 (one thread) and 4 (four threads), each as a ratio to fio (O_DIRECT, libaio,
  same block size, same queue depth, same file system, same run; medians of 3 runs
  alternating fio and kvtier, since a virtual disk's speed drifts);
* index memory per entry at 10 million entries, and batch prefix-lookup rate;
* write amplification under churn: 90% of the data expires by TTL, 10% is deleted early;
* recovery time of a pool, after a clean close and after a crash with the whole pool
  written since the last checkpoint (the worst case: a full log scan).

`--quick` shrinks data sizes to run in under a minute on 2 cores; the figures keep their
names.  `--json` prints one JSON object with every figure on the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier.daemon.blockdev import FileDevice, aligned_buffer
from kvtier.daemon.index import ROW, Index
from kvtier.daemon.pool import Pool, PoolOptions

MiB = 1 << 20
GiB = 1 << 30
REPS = 3


def key(i: int) -> bytes:
    return hashlib.blake2b(b"%d" % i, digest_size=16).digest()


# -- fio baseline ------------------------------------------------------------------------------


def fio(path: str, rw: str, bs: int, total: int, qd: int) -> float:
    """fio O_DIRECT sequential throughput in bytes/s (libaio at queue depth `qd`)."""
    if not shutil.which("fio"):
        raise SystemExit("bench_store: fio not found (scripts/test and scripts/run install it)")
    cmd = ["fio", "--name=kvtier", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           f"--size={total}", "--direct=1", "--ioengine=libaio", f"--iodepth={qd}",
           "--numjobs=1", "--output-format=json", "--end_fsync=0", "--invalidate=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["write" if rw == "write" else "read"]["bw_bytes"])


# -- pool throughput ---------------------------------------------------------------------------


def pool_throughput(path: str, vsize: int, total: int, qd: int) -> tuple[float, float]:
    """Sequential put then get throughput (bytes/s) with `qd` threads."""
    n = total // vsize
    seg = max(64 * MiB, 4 * vsize)
    per_seg = (seg - 4096) // (vsize + 8192)
    size = (-(-n // per_seg) + 6) * seg + MiB  # + reserve: nothing gets evicted
    if os.path.exists(path):
        os.unlink(path)
    pool = Pool.format(FileDevice(path, create_size=size), segment_size=seg,
                       options=PoolOptions(checkpoint_every_bytes=1 << 62))
    bufs = []
    for t in range(qd):
        b = aligned_buffer(vsize)
        np.frombuffer(b, np.uint8)[:] = np.random.default_rng(t).integers(0, 256, vsize,
                                                                            dtype=np.uint8)
        bufs.append(b)
    layer = 8
    fb = vsize // layer

    def frames(b: memoryview) -> list[memoryview]:
        return [b[i * fb:(i + 1) * fb] for i in range(layer)]

    def run(fn: Callable[[int, memoryview], None]) -> float:
        nxt = iter(range(n))
        lock = threading.Lock()
        failed: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                while not failed:
                    with lock:
                        i = next(nxt, None)
                    if i is None:
                        return
                    fn(i, bufs[t])
            except BaseException as e:
                failed.append(e)

        t0 = time.perf_counter()
        ths = [threading.Thread(target=worker, args=(t,)) for t in range(qd)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        if failed:
            raise failed[0]
        return n * vsize / (time.perf_counter() - t0)

    put = run(lambda i, b: pool.put("bench", "s", key(i), frames(b)) and None)
    get = run(lambda i, b: pool.get_into("bench", key(i), b) and None)
    assert pool.counters.bounced_bytes == 0, "data path bounced through a copy"
    pool.close()
    os.unlink(path)
    return put, get


# -- index -----------------------------------------------------------------------------------


def index_figures(n: int) -> dict[str, float]:
    rng = np.random.default_rng(7)
    rows = np.zeros(n, dtype=ROW)
    rows["k0"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    rows["k1"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    rows["blocks"] = 1
    rows["loc"] = np.arange(n)
    ix = Index()
    t0 = time.perf_counter()
    ix.bulk_load(rows)
    load_s = time.perf_counter() - t0
    per_entry = ix.nbytes / n
    # A 128k-token prompt in 256-token chunks: 512 chained keys per lookup.
    batch = 512
    starts = rng.integers(0, n - batch, 400)
    t0 = time.perf_counter()
    for s in starts:
        r = ix.lookup_many(0, rows["k0"][s:s + batch], rows["k1"][s:s + batch])
        miss = np.flatnonzero(r < 0)
        assert len(miss) == 0
    rate = len(starts) * batch / (time.perf_counter() - t0)
    del rows
    return {"index_entries": n, "index_bytes_per_entry": round(per_entry, 2),
            "index_load_seconds": round(load_s, 2),
            "prefix_lookup_keys_per_s": round(rate)}


def pool_lookup_rate(path: str, n: int) -> float:
    """Prefix lookups through the Pool API (key splitting included) on a pool of n entries."""
    if os.path.exists(path):
        os.unlink(path)
    pool = Pool.format(FileDevice(path, create_size=(n * 8192 // (64 * MiB) + 8) * 64 * MiB
                                  + MiB), segment_size=64 * MiB)
    keys = [key(i) for i in range(n)]
    for k in keys:
        pool.put("bench", "s", k, [b"x"])
    batch = 512
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 1.0:
        s = (reps * 997) % (n - batch)
        assert pool.lookup_prefix("bench", keys[s:s + batch]) == batch
        reps += 1
    rate = reps * batch / (time.perf_counter() - t0)
    pool.close()
    os.unlink(path)
    return rate


# -- write amplification under churn ------------------------------------------------------------


class SimClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def churn_wa(path: str, pool_bytes: int, vsize: int, passes: float) -> dict[str, float]:
    """Fill the pool `passes` times over; 90% of values expire by TTL, 10% deleted early."""
    if os.path.exists(path):
        os.unlink(path)
    clock = SimClock()
    seg = 16 * MiB
    pool = Pool.format(FileDevice(path, create_size=pool_bytes + MiB), segment_size=seg,
                       clock=clock, options=PoolOptions(expiry_bucket_s=60))
    rng = np.random.default_rng(3)
    buf = aligned_buffer(vsize)
    n = int(passes * pool_bytes / vsize)
    # Arrival rate so that live data ~ 60% of the pool at a mean TTL of 600 s.
    live_target = 0.6 * pool_bytes / vsize
    dt = 600.0 / live_target
    pending_deletes: list[tuple[float, bytes]] = []
    next_sweep = clock.now
    for i in range(n):
        clock.now += dt
        k = key(10_000_000 + i)
        ttl = float(rng.uniform(300, 900))
        pool.put("churn", f"s{i % 64}", k, [buf], ttl_s=ttl)
        if rng.random() < 0.10:
            pending_deletes.append((clock.now + rng.uniform(0, ttl), k))
        while pending_deletes and pending_deletes[0][0] <= clock.now:
            pool.delete("churn", pending_deletes.pop(0)[1])
        pending_deletes.sort()
        if clock.now >= next_sweep:
            pool.sweep()
            next_sweep = clock.now + 30
    c = pool.counters
    out = {"churn_write_amplification": round(c.write_amplification, 4),
           "churn_user_bytes": c.user_bytes, "churn_clean_bytes": c.clean_bytes,
           "churn_evicted_entries": c.evicted_entries,
           "churn_freed_segments": c.freed_segments,
           "churn_cleaned_segments": c.cleaned_segments}
    pool.close()
    os.unlink(path)
    return out


# -- recovery --------------------------------------------------------------------------------------


def recovery(path: str, pool_bytes: int, progress: Progress) -> dict[str, float]:
    if os.path.exists(path):
        os.unlink(path)
    seg = 64 * MiB
    pool = Pool.format(FileDevice(path, create_size=pool_bytes + MiB), segment_size=seg,
                       options=PoolOptions(checkpoint_every_bytes=1 << 62))
    vsize = 16 * MiB
    buf = aligned_buffer(vsize)
    np.frombuffer(buf, np.uint8)[:] = 7
    fb = vsize // 28
    frames = [buf[i * fb:(i + 1) * fb] for i in range(28)]
    # Fill every segment outside the reserve, with no checkpoint on the way.
    per_seg = (seg - 4096) // (vsize + 8192)
    n = (pool.sb.segment_count - 4) * per_seg
    task = progress.add_task("recovery: filling pool", total=n)
    for i in range(n):
        pool.put("rec", f"s{i % 16}", key(20_000_000 + i), frames)
        progress.advance(task)
    written = pool.counters.user_bytes
    pool.dev.close()  # crash: nothing since format is checkpointed
    t0 = time.perf_counter()
    p2 = Pool.open(FileDevice(path))
    crash_s = time.perf_counter() - t0
    scanned = p2.recovery.bytes_scanned
    entries = p2.index.count
    assert entries == n, f"recovered {entries} of {n}"
    p2.close()  # clean close: checkpoint
    t0 = time.perf_counter()
    p3 = Pool.open(FileDevice(path))
    clean_s = time.perf_counter() - t0
    p3.close(checkpoint=False)
    os.unlink(path)
    return {"recovery_pool_bytes": pool_bytes, "recovery_data_bytes": written,
            "recovery_entries": entries,
            "recovery_after_crash_full_scan_s": round(crash_s, 3),
            "recovery_scan_bytes_per_s": round(scanned / crash_s),
            "recovery_after_clean_close_s": round(clean_s, 4)}


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run (< 1 minute)")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    ap.add_argument("--dir", default=None, help="directory for pool and fio files "
                    "(default: a temp dir under the current directory)")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    base = args.dir or os.getcwd()
    work = tempfile.mkdtemp(prefix="kvtier-bench-", dir=base)
    fig: dict[str, Any] = {"quick": args.quick}
    try:
        tput_total = 128 * MiB if args.quick else 1 * GiB
        with Progress(console=console, transient=True) as prog:
            cases = [(v, qd) for v in (2 * MiB, 16 * MiB) for qd in (1, 4)]
            task = prog.add_task("throughput vs fio", total=len(cases))
            fiofile = os.path.join(work, "fio.dat")
            for vsize, qd in cases:
                tag = f"{vsize // MiB}mib_qd{qd}"
                # The virtual disk's speed drifts by tens of percent from run to run:
                # alternate fio and kvtier runs and compare medians.
                runs: dict[str, list[float]] = {"fw": [], "fr": [], "pw": [], "pr": []}
                for _ in range(REPS):
                    runs["fw"].append(fio(fiofile, "write", vsize, tput_total, qd))
                    runs["fr"].append(fio(fiofile, "read", vsize, tput_total, qd))
                    os.unlink(fiofile)
                    pw, pr = pool_throughput(os.path.join(work, "tput.pool"), vsize,
                                             tput_total, qd)
                    runs["pw"].append(pw)
                    runs["pr"].append(pr)
                fw, fr, pw, pr = (float(np.median(runs[k])) for k in ("fw", "fr", "pw", "pr"))
                fig[f"put_{tag}_bytes_per_s"] = round(pw)
                fig[f"get_{tag}_bytes_per_s"] = round(pr)
                fig[f"fio_write_{tag}_bytes_per_s"] = round(fw)
                fig[f"fio_read_{tag}_bytes_per_s"] = round(fr)
                fig[f"put_{tag}_ratio_to_fio"] = round(pw / fw, 3)
                fig[f"get_{tag}_ratio_to_fio"] = round(pr / fr, 3)
                prog.advance(task)
            prog.add_task("index: 10M entries", total=None)
            fig.update(index_figures(10_000_000))
            fig["pool_prefix_lookup_entries"] = 20_000 if args.quick else 100_000
            fig["pool_prefix_lookup_keys_per_s"] = round(pool_lookup_rate(
                os.path.join(work, "lookup.pool"), fig["pool_prefix_lookup_entries"]))
            prog.add_task("write amplification under churn", total=None)
            fig.update(churn_wa(os.path.join(work, "churn.pool"),
                                256 * MiB if args.quick else 2 * GiB, 256 * 1024,
                                3.0 if args.quick else 4.0))
            fig.update(recovery(os.path.join(work, "rec.pool"),
                                512 * MiB if args.quick else 10 * GiB, prog))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = Table(title="kvtier storage engine" + (" (--quick)" if args.quick else ""))
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in fig.items():
        if k.endswith("bytes_per_s"):
            v = f"{v / 1e9:.2f} GB/s"
        t.add_row(k, str(v))
    console.print(t)
    if args.json:
        print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
