"""Who delivers a completion: the thread that waits for it, not the reaper thread.

A request that outlasts the client's spin (here a 16 MiB PUT acknowledged by the media
pool) used to come back through the reaper thread: the reaper woke on the completion
eventfd, drained the ring and set the future, and only then was the waiting thread woken.
Two wakeups, each a scheduling delay on a busy machine; measured beside a CPU hog in
test_isolation's storm, the slow GETs spent 45 of their 200 excess ms between the daemon's
post and the client's return (12 ms with the waiting thread driving the ring)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import DisconnectedError

ROUNDS = 6


def test_the_waiting_thread_drains_its_own_completion(tmp_path: Path) -> None:
    d = Daemon(tmp_path, pool_size="512M", segment_size="32M").start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=64 << 20) as c:
            drained_by: list[str] = []
            drain = c._drain

            def recording_drain() -> None:
                before = len(c._futures)
                drain()
                if len(c._futures) < before:
                    drained_by.append(threading.current_thread().name)

            c._drain = recording_drain  # type: ignore[method-assign]
            value = np.random.default_rng(0).integers(0, 256, 16 << 20, np.uint8)
            waited = []
            for i in range(ROUNDS):
                drained_by.clear()
                c.put("s", i.to_bytes(16, "little"), [value])
                waited.append(list(drained_by))
            me = threading.current_thread().name
            # Each round's PUT outlasted the spin (a 16 MiB copy and write); one round may
            # land in the instant between the spin and the wait.
            assert sum(w == [me] for w in waited) >= ROUNDS - 1, waited
            assert c.get((ROUNDS - 1).to_bytes(16, "little")) == value.tobytes()
    finally:
        d.stop()


def test_a_waiter_learns_of_a_dead_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
            c.put("s", bytes(16), [b"x" * 4096])
            d.proc.kill()  # type: ignore[union-attr]
            d.proc.wait()  # type: ignore[union-attr]
            with pytest.raises(DisconnectedError):
                for _ in range(100):  # the reaper may not have seen the hangup yet
                    c.get(bytes(16))
    finally:
        d.stop()


def test_threads_waiting_together_all_get_their_completions(tmp_path: Path) -> None:
    """One thread drives, the others sleep on the condition: completions drained by the
    driver, by a spinning thread or by the reaper all reach their waiters (a waiter left
    asleep would raise TimeoutError after the client's 10 s)."""
    d = Daemon(tmp_path, pool_size="512M", segment_size="32M").start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=64 << 20,
                            timeout=10) as c:
            errors: list[BaseException] = []

            def worker(w: int) -> None:
                try:
                    for i in range(12):
                        size = (4096, 1 << 20, 4 << 20)[(w + i) % 3]
                        v = np.full(size, (w * 31 + i) % 251, np.uint8)
                        k = (w * 1000 + i).to_bytes(16, "little")
                        c.put("s", k, [v])
                        # sized GETs: four default ones (a quarter of the arena each) next to
                        # the PUTs' slots do not fit the 64 MiB arena at once (ArenaFullError
                        # in a CI run, whenever all four threads got there together)
                        assert c.get(k, size=size) == v.tobytes()
                except BaseException as e:  # reported by the main thread
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert not any(t.is_alive() for t in threads)
            assert not c._waiters and c._no_waiters.is_set() and not c._driving
    finally:
        d.stop()
