"""Crash safety: SIGKILL a writer at random points, reopen, check every acknowledged op.

Each round a child process (crash_writer.py) opens the pool and overwrites, deletes and
purges keys of a working set until it is killed at a random moment -- mid-put,
mid-checkpoint, mid-clean.  After every kill the pool is reopened (recovery) and:
  * every key is exactly as its last acknowledged operation left it: the acknowledged
    value, byte for byte, or absent after an acknowledged delete or purge;
  * the one operation in flight at the kill (the writer announces each before doing it)
    may have happened or not, and the test learns which;
  * any value served at all is whole (its embedded seed regenerates it byte for byte).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from crash_writer import SLOTS, slot_key, value

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.pool import Pool

ROUNDS = int(os.environ.get("KVTIER_CRASH_ROUNDS", "24"))
HERE = Path(__file__).parent


def _check_whole(pool: Pool, key: bytes) -> int:
    """Read `key` and check it regenerates from its embedded seed; returns the seed."""
    info = pool.stat("crash", key)
    buf = np.empty(info.record_bytes, dtype=np.uint8)
    r = pool.get_into("crash", key, buf)
    seed = int.from_bytes(buf[:8].tobytes(), "little")
    size = int.from_bytes(buf[8:16].tobytes(), "little")
    assert size == r.nbytes
    assert np.array_equal(buf[: r.nbytes], value(seed, size)), f"torn value {key.hex()}"
    return seed


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = str(tmp_path / "crash.pool")
    Pool.format(FileDevice(path, create_size=96 << 20), segment_size=1 << 20).close()
    rnd = random.Random(1234)
    # key hex -> acknowledged state: ("put", seed, session) or ("gone",)
    acked: dict[str, tuple[str, int, str]] = {}
    total_puts = 0
    replayed = 0
    env = dict(os.environ, PYTHONPATH=str(HERE))
    for rnd_no in range(1, ROUNDS + 1):
        child = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), path,
                                  str(rnd_no)], stdout=subprocess.PIPE, env=env, text=True)
        time.sleep(rnd.uniform(0.4, 1.4))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL, "writer died before the kill"
        pending: list[str] | None = None  # the last WILL line not yet acknowledged
        for line in out.splitlines():
            p = line.split()
            if p[0] == "WILL":
                pending = p[1:]
                continue
            pending = None
            if p[0] == "PUT":
                acked[p[1]] = ("put", int(p[2]), p[4])
                total_puts += 1
            elif p[0] == "DEL":
                acked[p[1]] = ("gone", 0, "")
            elif p[0] == "PURGE":
                for k, v in list(acked.items()):
                    if v[0] == "put" and v[2] == p[1]:
                        acked[k] = ("gone", 0, "")
        # The op in flight at the kill may or may not have happened: its keys are exempt.
        in_flight: set[str] = set()
        if pending is not None:
            if pending[0] == "PURGE":
                in_flight = {k for k, v in acked.items() if v[0] == "put" and v[2] == pending[1]}
            else:
                in_flight = {pending[1]}

        pool = Pool.open(FileDevice(path))
        replayed += pool.recovery.records_replayed
        for s in range(SLOTS):
            key = slot_key(s)
            khex = key.hex()
            state = acked.get(khex)
            present = pool.contains("crash", key)
            if present:
                seed = _check_whole(pool, key)
            if state is None or khex in in_flight:
                # Either outcome of the in-flight op is correct; learn which one happened
                # (a present value was already checked whole above).
                acked[khex] = ("put", seed, f"s{s % 5}") if present else ("gone", 0, "")
                continue
            # Every other key is exactly as its last acknowledged operation left it.
            if state[0] == "gone":
                assert not present, f"deleted or purged {khex} resurrected"
            else:
                assert present, f"acknowledged put of {khex} lost"
                assert seed == state[1], f"{khex}: seed {seed}, acknowledged {state[1]}"
        pool.close()
    assert total_puts > ROUNDS * 20, f"only {total_puts} puts acknowledged"
    assert replayed > 0, "recovery never had to replay the log"
