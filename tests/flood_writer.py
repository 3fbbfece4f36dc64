"""Child process for test_isolation.py: one tenant's saturating write load.

PUTs 1 MiB values over a rotating set of keys, `depth` at a time, until killed: every
round overwrites the last, so the media pool fills with dead space and its cleaner runs
alongside the writes.  Prints "READY" once the first round is stored.
"""

from __future__ import annotations

import sys

import numpy as np

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError
from kvtier.client.protocol import Op, Request


def main() -> None:
    sock, tenant, token, nkeys, depth = sys.argv[1:6]
    value_size = 1 << 20
    with Client.connect(sock, tenant, token, arena_size=64 << 20, timeout=30) as c:
        slots = [c.allocator.alloc(value_size) for _ in range(int(depth))]
        for s in slots:
            np.frombuffer(s.view, np.uint8)[:] = 7
        i = 0
        pending = []
        try:
            while True:
                for s in slots:
                    key = (i % int(nkeys)).to_bytes(16, "little")
                    pending.append(c.submit(Request(Op.PUT, 0, key=key, session="flood",
                                                    data_off=s.offset, data_len=value_size)))
                    i += 1
                for f in pending:
                    f.result(timeout=60)
                pending.clear()
                if i == int(nkeys):
                    print("READY", flush=True)
        except KvtierError:
            pass


if __name__ == "__main__":
    main()
