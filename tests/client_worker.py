"""Child process for test_daemon_load.py: puts and gets its own keys until told to stop.

Each value embeds (worker, seq, size) so any value read back can be checked exactly.
Prints "OK <puts> <gets>" at the end, or a traceback and exits 1.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

from kvtier.client.client import Client


def value(worker: int, seq: int, size: int) -> np.ndarray:
    v = np.random.default_rng(worker * 1_000_003 + seq).integers(0, 256, size, dtype=np.uint8)
    v[:12] = np.frombuffer(np.array([worker, seq, size], dtype="<u4").tobytes(), np.uint8)
    return v


def main() -> None:
    sock, tenant, token, worker, seconds = sys.argv[1:6]
    w, deadline = int(worker), time.monotonic() + float(seconds)
    rng = np.random.default_rng(w)
    latest: dict[bytes, tuple[int, int]] = {}
    puts = gets = 0
    with Client.connect(sock, tenant, token, arena_size=8 << 20) as c:
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            slot_no = int(rng.integers(24))
            key = hashlib.sha256(b"w%d-%d" % (w, slot_no)).digest()[:16]
            size = int(rng.choice([4096, 65536, 300_000, 1_000_000]))
            v = value(w, seq, size)
            c.put(f"w{w}", key, np.array_split(v, 4))
            latest[key] = (seq, size)
            puts += 1
            probe = list(latest)[int(rng.integers(len(latest)))]
            pseq, psize = latest[probe]
            got = c.get(probe, size=psize)
            if got != value(w, pseq, psize).tobytes():
                raise SystemExit(f"worker {w}: wrong bytes for seq {pseq}")
            gets += 1
    print(f"OK {puts} {gets}")


if __name__ == "__main__":
    main()
