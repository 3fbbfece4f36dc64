"""Many threads on one pool: puts, gets, deletes, purges, cleaning and checkpoints at once."""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.errors import NotFound
from kvtier.daemon.pool import Pool, PoolOptions


def _val(seed: int, n: int) -> np.ndarray:
    v = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    v[:8] = np.frombuffer(seed.to_bytes(8, "little"), np.uint8)
    return v


def test_concurrent_threads_keep_values_whole_and_state_consistent(pool_path: str) -> None:
    pool = Pool.format(FileDevice(pool_path, create_size=48 << 20), segment_size=1 << 20,
                       options=PoolOptions(checkpoint_every_bytes=4 << 20))
    keys = [hashlib.sha256(b"%d" % i).digest()[:16] for i in range(40)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        seed = w * 1_000_000
        while not stop.is_set():
            seed += 1
            k = keys[int(rng.integers(len(keys)))]
            v = _val(seed, int(rng.integers(1, 90_000)))
            pool.put("t", f"s{seed % 3}", k, np.array_split(v, 2))
            if rng.random() < 0.1:
                pool.delete("t", keys[int(rng.integers(len(keys)))])
            if rng.random() < 0.02:
                pool.purge_session("t", f"s{int(rng.integers(3))}")

    def reader(r: int) -> None:
        rng = np.random.default_rng(100 + r)
        buf = np.empty(100_000, np.uint8)
        while not stop.is_set():
            k = keys[int(rng.integers(len(keys)))]
            try:
                res = pool.get_into("t", k, buf)
            except NotFound:
                continue
            seed = int.from_bytes(buf[:8].tobytes(), "little")
            assert np.array_equal(buf[: res.nbytes], _val(seed, res.nbytes))

    def maintainer() -> None:
        while not stop.is_set():
            pool.clean(max_segments=1)
            pool.checkpoint()
            pool.sweep()

    def guard(fn, *a):  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                fn(*a)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                stop.set()
        return threading.Thread(target=run)

    threads = [guard(writer, i) for i in range(3)] + [guard(reader, i) for i in range(3)]
    threads.append(guard(maintainer))
    for t in threads:
        t.start()
    stop.wait(6.0)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert pool.counters.puts > 100 and pool.counters.gets > 100
    assert (pool.live == pool.segment_live_blocks()).all()
    assert not pool._in_flight.by_key and pool._in_flight.count == 0 and not pool.pins.any()
    # What the pool says now is what it recovers to.
    before = {e.key: e.offset for e in pool.entries("t")}
    pool.dev.close()
    again = Pool.open(FileDevice(pool_path))
    assert {e.key: e.offset for e in again.entries("t")} == before
