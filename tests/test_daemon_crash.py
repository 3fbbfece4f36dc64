"""SIGKILL kvtierd during a put storm: after restart every acknowledged put is there."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import TOKENS, Daemon
from storm_writer import value

from kvtier.client.client import Client

HERE = Path(__file__).parent
ROUNDS = 3
WRITERS = 3


def test_sigkill_daemon_during_put_storm(tmp_path: Path) -> None:
    # 3 writers x 3 rounds x MAX_PUTS records of 12-252 KiB on media: about 400 MB.
    d = Daemon(tmp_path, ack="media", pool_size="640M")
    rnd = random.Random(7)
    acked: dict[str, tuple[int, int]] = {}
    env = dict(os.environ, PYTHONPATH=str(HERE))
    for r in range(ROUNDS):
        d.start()
        writers = [subprocess.Popen([sys.executable, str(HERE / "storm_writer.py"), d.socket,
                                     "alice", TOKENS["alice"], str(w), str(r)],
                                    stdout=subprocess.PIPE, text=True, env=env)
                   for w in range(WRITERS)]
        # Start the clock once every writer is storming (imports and connects take a
        # while on a loaded machine); keep each first acknowledgement.
        first = [w.stdout.readline() if w.stdout else "" for w in writers]
        time.sleep(rnd.uniform(0.2, 0.8))
        d.stop(signal.SIGKILL)
        n_round = 0
        for w, line0 in zip(writers, first, strict=True):
            # Not communicate(timeout=...): it reads the pipe's fd directly and loses what
            # readline() above had read ahead into the text buffer -- acknowledged puts
            # went unchecked, and a line cut at its newline failed the parse.  The writer
            # prints at most MAX_PUTS short lines, well under a pipe's capacity.
            w.wait(timeout=60)
            assert w.stdout is not None
            out = w.stdout.read()
            for line in (line0 + out).splitlines():
                _, khex, seed, size = line.split()
                acked[khex] = (int(seed), int(size))
                n_round += 1
        assert n_round > 10, "the storm acknowledged almost nothing"
        d.start()  # recovery
        with Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
            for khex, (seed, size) in acked.items():
                got = c.get(bytes.fromhex(khex), size=size)
                assert got == value(seed, size).tobytes(), khex
            # puts in flight at the kill may have landed too; none were lost
            assert c.stats()["media"]["entries"] >= len(acked)
        d.stop()
    assert len(acked) > 50
