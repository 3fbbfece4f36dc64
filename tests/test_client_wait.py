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
