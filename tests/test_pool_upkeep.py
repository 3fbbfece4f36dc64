"""The pool's upkeep without its metadata lock: cleaning ahead and concurrent checkpoints.

A device that stalls the I/O of one thread (the one doing upkeep) shows that readers and
writers of the same pool go on meanwhile, and that a put racing a move of the same key
wins, at once and after a crash-style reopen."""

from __future__ import annotations

import hashlib
import threading
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


def gated(dev: StallingDevice) -> tuple[threading.Event, threading.Event]:
    """Upkeep's first large read or write waits for `gate`; `entered` says it is there."""
    gate, entered = threading.Event(), threading.Event()

    def stall(op: str) -> None:
        entered.set()
        assert gate.wait(60)
    dev.stall = stall
    return gate, entered


def while_blocked(work: Callable[[], None], upkeep: threading.Thread) -> None:
    """Run `work` to its end while `upkeep` is held inside its I/O: had it to wait for
    upkeep it would never finish (the gate opens only afterwards)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)
    w = threading.Thread(target=run)
    w.start()
    w.join(60)
    assert not w.is_alive(), "the work waited for upkeep's stalled I/O"
    assert upkeep.is_alive(), "upkeep finished first: the test proved nothing"
    if errors:
        raise errors[0]


def test_cleaning_ahead_moves_records_while_readers_and_writers_go_on(
        pool_path: str) -> None:
    pool, dev = filled_pool(pool_path)
    before = pool.counters.cleaned_ahead
    gate, entered = gated(dev)
    t, out = in_upkeep_thread(pool.clean_ahead)
    assert entered.wait(60)

    def reads_and_a_put() -> None:
        for i in range(1, 60, 2):  # live values, some in the segment being cleaned
            assert np.array_equal(read(pool, i), val(i))
        pool.put("t", "s", key(100), [val(100)])
    while_blocked(reads_and_a_put, t)
    gate.set()
    t.join()
    assert out == [1] and pool.counters.cleaned_ahead == before + 1
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
    gate, entered = gated(dev)
    n0 = pool.counters.checkpoints
    t, out = in_upkeep_thread(pool.checkpoint_concurrently)
    assert entered.wait(60)

    def puts_and_reads() -> None:
        for i in range(200, 210):
            pool.put("t", "s", key(i), [val(i)])
            assert np.array_equal(read(pool, i), val(i))
    while_blocked(puts_and_reads, t)
    assert pool.checkpoint_concurrently() is False  # one at a time: refused, not run twice
    gate.set()
    t.join()
    assert out == [True] and pool.counters.checkpoints == n0 + 1
    pool.dev.close()
    reopened = Pool.open(FileDevice(pool_path))
    for i in list(range(60)) + list(range(200, 210)):
        want = val(i, 1) if i < 60 and i % 2 == 0 else val(i)
        assert np.array_equal(read(reopened, i), want)
    reopened.close()
