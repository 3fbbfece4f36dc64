"""The pool's upkeep without its metadata lock: cleaning ahead and concurrent checkpoints.

A device that stalls the I/O of one thread (the one doing upkeep) shows that readers and
writers of the same pool go on meanwhile, and that a put racing a move of the same key
wins, at once and after a crash-style reopen."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvtier.daemon.blockdev import FileDevice, aligned_buffer
from kvtier.daemon.pool import Pool, PoolOptions

KiB, MiB = 1 << 10, 1 << 20
VALUE = 96 * KiB
UPKEEP = "upkeep"  # the thread whose device I/O stalls


class StallingDevice(FileDevice):
    """A file device on which every read and write of more than one block by the thread
    named UPKEEP first calls `stall(op)` (sleeps, or waits for an event).  One-block
    writes (segment headers, written under the lock when a segment opens) go through."""

    stall: Callable[[str], None] = staticmethod(lambda op: None)

    def _maybe_stall(self, op: str, bufs: Sequence[memoryview]) -> None:
        if threading.current_thread().name == UPKEEP and \
                sum(memoryview(b).nbytes for b in bufs) > self.block_size:
            self.stall(op)

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._maybe_stall("read", bufs)
        super().readv_into(offset, bufs)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._maybe_stall("write", bufs)
        super().writev(offset, bufs)


def key(i: int) -> bytes:
    return hashlib.sha256(b"k%d" % i).digest()[:16]


def val(i: int, gen: int = 0) -> np.ndarray:
    return np.full(VALUE, (i * 7 + gen) % 251, np.uint8)


def read(pool: Pool, i: int) -> np.ndarray:
    out = aligned_buffer(VALUE)
    n = pool.get_into("t", key(i), out).nbytes
    return np.frombuffer(out, np.uint8)[:n].copy()


def filled_pool(path: str) -> tuple[Pool, StallingDevice]:
    """A pool whose sealed segments are half dead (every other key overwritten), so the
    cleaner has live records to move; then clean_ahead is set so high that upkeep is due
    (while filling, no put cleans ahead)."""
    dev = StallingDevice(path, create_size=24 * MiB)
    pool = Pool.format(dev, segment_size=MiB, options=PoolOptions(clean_ahead=-64))
    for i in range(60):
        pool.put("t", "s", key(i), [val(i)])
    for i in range(0, 60, 2):
        pool.put("t", "s", key(i), [val(i, 1)])
    assert pool.counters.cleaned_segments == 0
    pool.opt.clean_ahead = 64
    return pool, dev


def in_upkeep_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), name=UPKEEP)
    t.start()
    return t, out


def test_cleaning_ahead_moves_records_while_readers_and_writers_go_on(
        pool_path: str) -> None:
    pool, dev = filled_pool(pool_path)
    before = pool.counters.cleaned_ahead
    dev.stall = lambda op: time.sleep(0.05)  # each of the cleaner's reads and writes
    t, out = in_upkeep_thread(pool.clean_ahead)
    time.sleep(0.02)
    worst = 0.0
    for i in range(1, 60, 2):  # live values, some in the segment being cleaned
        t0 = time.perf_counter()
        assert np.array_equal(read(pool, i), val(i))
        worst = max(worst, time.perf_counter() - t0)
    t0 = time.perf_counter()
    pool.put("t", "s", key(100), [val(100)])
    put_s = time.perf_counter() - t0
    busy = t.is_alive()
    t.join()
    assert busy, "the cleaning finished before the reads: the test proved nothing"
    assert out == [1] and pool.counters.cleaned_ahead == before + 1
    # The reads never waited for the cleaner's stalled I/O (>= 50 ms per record).
    assert worst < 0.04 and put_s < 0.04, (worst, put_s)
    for i in range(60):
        assert np.array_equal(read(pool, i), val(i, 1 if i % 2 == 0 else 0))
    pool.close()


def test_a_put_racing_a_move_of_its_key_wins_now_and_after_a_reopen(
        pool_path: str) -> None:
    pool, dev = filled_pool(pool_path)
    gate, writing = threading.Event(), threading.Event()

    def stall(op: str) -> None:  # hold the first record's copy before it is written
        if op == "write" and not writing.is_set():
            writing.set()
            assert gate.wait(10)
    dev.stall = stall
    t, out = in_upkeep_thread(pool.clean_ahead)
    assert writing.wait(10)
    # Which record is being moved?  The live keys of the victim all still read back; put a
    # new generation of every live key now, so the one in flight is superseded.
    for i in range(1, 60, 2):
        pool.put("t", "s", key(i), [val(i, 5)])
    gate.set()
    t.join()
    assert out == [1]
    for i in range(1, 60, 2):
        assert np.array_equal(read(pool, i), val(i, 5))
    pool.dev.close()  # no close(): no final checkpoint, as a crash leaves it
    reopened = Pool.open(FileDevice(pool_path))
    for i in range(1, 60, 2):
        assert np.array_equal(read(reopened, i), val(i, 5))
    reopened.close()


def test_a_concurrent_checkpoint_lets_puts_and_reads_through_and_recovers(
        pool_path: str) -> None:
    pool, dev = filled_pool(pool_path)
    dev.stall = lambda op: time.sleep(0.05)
    n0 = pool.counters.checkpoints
    t, out = in_upkeep_thread(pool.checkpoint_concurrently)
    time.sleep(0.02)
    t0 = time.perf_counter()
    for i in range(200, 210):
        pool.put("t", "s", key(i), [val(i)])
        assert np.array_equal(read(pool, i), val(i))
    took = time.perf_counter() - t0
    second = pool.checkpoint_concurrently()  # one at a time: refused, not run twice
    busy = t.is_alive()
    t.join()
    assert busy and out == [True] and pool.counters.checkpoints == n0 + 1
    assert second is False
    assert took < 0.2, took  # ten puts and reads, none behind the stalled checkpoint
    pool.dev.close()
    reopened = Pool.open(FileDevice(pool_path))
    for i in list(range(60)) + list(range(200, 210)):
        want = val(i, 1) if i < 60 and i % 2 == 0 else val(i)
        assert np.array_equal(read(reopened, i), want)
    reopened.close()
