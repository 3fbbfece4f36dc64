"""Child process for test_crash.py: writes to a pool until it is killed.

Keys come from a working set of SLOTS keys, overwritten again and again, so segments
fill with dead versions and the cleaner and checkpoints run while the child is killed.
Before each operation it prints what it is about to do, and after it returns it prints
the acknowledgement, each line flushed:
    WILL <PUT|DEL> <key-hex> / WILL PURGE <session>
    PUT <key-hex> <seed> <size> <session>   the put returned
    DEL <key-hex>                           the delete returned
    PURGE <session>                         the purge returned
So the one operation that may have happened without its acknowledgement being printed is
the last WILL line (if no acknowledgement follows it).
A value starts with its seed and size, so any value found can be checked.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.pool import Pool, PoolOptions

SLOTS = 150


def slot_key(slot: int) -> bytes:
    return hashlib.sha256(b"slot%d" % slot).digest()[:16]


def value(seed: int, size: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data[:16] = np.frombuffer(seed.to_bytes(8, "little") + size.to_bytes(8, "little"),
                              np.uint8)
    return data


def main() -> None:
    path, round_no = sys.argv[1], int(sys.argv[2])
    pool = Pool.open(FileDevice(path), options=PoolOptions(checkpoint_every_bytes=3 << 20,
                                                           evict=False))
    rng = np.random.default_rng(round_no)
    out = sys.stdout
    i = 0
    while True:
        i += 1
        seed = round_no * 1_000_000 + i
        slot = int(rng.integers(SLOTS))
        key = slot_key(slot)
        size = int(rng.choice([3000, 40_000, 200_000, 700_000]))
        session = f"s{slot % 5}"
        out.write(f"WILL PUT {key.hex()} {session}\n")
        out.flush()
        pool.put("crash", session, key, np.array_split(value(seed, size), 3))
        out.write(f"PUT {key.hex()} {seed} {size} {session}\n")
        out.flush()
        r = rng.random()
        if r < 0.08:
            k = slot_key(int(rng.integers(SLOTS)))
            out.write(f"WILL DEL {k.hex()}\n")
            out.flush()
            pool.delete("crash", k)
            out.write(f"DEL {k.hex()}\n")
            out.flush()
        elif r < 0.09:
            s = f"s{int(rng.integers(5))}"
            out.write(f"WILL PURGE {s}\n")
            out.flush()
            pool.purge_session("crash", s)
            out.write(f"PURGE {s}\n")
            out.flush()


if __name__ == "__main__":
    main()
