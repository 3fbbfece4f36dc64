"""Child process for test_daemon_crash.py: puts through kvtierd until the daemon dies.

Prints "ACK <key-hex> <seed> <size>" after each acknowledged put (ack = media).
Stops after MAX_PUTS puts so that a test's pool never has to evict.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError

MAX_PUTS = 400


def value(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def main() -> None:
    sock, tenant, token, worker, round_no = sys.argv[1:6]
    base = int(round_no) * 10_000_000 + int(worker) * 100_000
    try:
        with Client.connect(sock, tenant, token, arena_size=16 << 20, timeout=10) as c:
            for i in range(MAX_PUTS):
                seed = base + i
                key = hashlib.sha256(b"storm%d" % seed).digest()[:16]
                size = [8192, 60_000, 250_000][i % 3]
                c.put(f"w{worker}", key, np.array_split(value(seed, size), 2))
                print(f"ACK {key.hex()} {seed} {size}", flush=True)
    except KvtierError:
        pass  # the daemon was killed under us


if __name__ == "__main__":
    main()
