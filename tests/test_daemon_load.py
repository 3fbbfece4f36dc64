"""Eight client processes at once for a bounded time: exact values, no errors, stable RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness import TOKENS, Daemon

HERE = Path(__file__).parent
CLIENTS = 8


def _run_clients(d: Daemon, seconds: float) -> list[tuple[int, int]]:
    env = dict(os.environ, PYTHONPATH=str(HERE))
    procs = [subprocess.Popen([sys.executable, str(HERE / "client_worker.py"), d.socket,
                               ["alice", "bob"][i % 2], TOKENS[["alice", "bob"][i % 2]], str(i),
                               str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for i in range(CLIENTS)]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=seconds + 120)
        assert p.returncode == 0, se[-2000:]
        _, puts, gets = so.split()
        out.append((int(puts), int(gets)))
    return out


def _settled_rss(d: Daemon) -> int:
    """The daemon's RSS once it has torn down every session (their arenas unmapped)."""
    deadline = time.monotonic() + 20
    while d.admin("status")["daemon"]["clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not d.admin("status")["daemon"]["clients"], "sessions were not torn down"
    assert d.proc is not None
    with open(f"/proc/{d.proc.pid}/maps") as f:
        leftover = [line for line in f if "-arena" in line or "-sq" in line or "-cq" in line]
    assert not leftover, f"client memory still mapped: {leftover[:3]}"
    return d.rss_kib()


def test_eight_clients_concurrently(tmp_path: Path) -> None:
    d = Daemon(tmp_path, pool_size="512M", dram_size="128M").start()
    try:
        # Warm-up rounds: DRAM and the pool fill, and the allocator reaches its high-water
        # mark (measured: anonymous memory plateaus after two or three rounds).
        rounds = [_run_clients(d, 3.0) for _ in range(3)]
        rss_warm = _settled_rss(d)
        rounds += [_run_clients(d, 3.0) for _ in range(2)]
        rss_end = _settled_rss(d)
        assert all(p > 5 and g > 5 for r in rounds for p, g in r), rounds
        st = d.admin("status")
        assert st["tiers"]["misses"] == 0
        assert not st["daemon"]["clients"]  # every session was torn down
        # Stable: two more rounds of the same load do not grow the daemon.
        assert rss_end < rss_warm * 1.10 + 16 * 1024, (rss_warm, rss_end)
        assert "Traceback" not in d.log.read_text()
    finally:
        assert d.stop() == 0
