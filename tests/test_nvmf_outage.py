"""A pool on an NVMe/TCP namespace through an outage of its target (issue 22, item 12b).

The target is killed, or stops answering, while puts that each open a segment (a header
written under the pool's lock) run at once with status calls.  While it is down: status
answers within a second, the puts all fail within about one `io_timeout` (not one per
`io_timeout`, one after the other, as when a write under the lock waited for the
reconnect), the log says the connection was lost and is being retried.  Once it is back:
the log says so, `last_error` is cleared (kept in `recent_errors`), and puts succeed.
Every wait is on an event (a log line, the device's state, the puts' end), never a sleep.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nvmf_support import TargetProcess

from kvtier.daemon.errors import StoreError
from kvtier.daemon.nvmf.device import NvmfDevice
from kvtier.daemon.pool import Pool

MiB = 1 << 20
IO_TIMEOUT = 1.5
PUTS = 6  # at once; waiting for the reconnect under the lock, they took PUTS * IO_TIMEOUT
VALUE = 600 << 10  # in 1 MiB segments: every put opens a segment (a header write)
STATUS_WITHIN = 1.0


class LogWatch(logging.Handler):
    """The messages of logger `kvtierd.nvmf`, with a wait for one containing a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._cv = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cv:
            self.lines.append(record.getMessage())
            self._cv.notify_all()

    def wait(self, text: str, timeout: float = 20.0) -> str:
        with self._cv:
            ok = self._cv.wait_for(lambda: any(text in m for m in self.lines), timeout)
        assert ok, f"no log line with {text!r} within {timeout} s: {self.lines}"
        return next(m for m in self.lines if text in m)

    def count(self, text: str) -> int:
        with self._cv:
            return sum(text in m for m in self.lines)


@pytest.fixture
def logwatch() -> Iterator[LogWatch]:
    lg = logging.getLogger("kvtierd.nvmf")
    w = LogWatch()
    old = lg.level
    lg.setLevel(logging.DEBUG)
    lg.addHandler(w)
    yield w
    lg.removeHandler(w)
    lg.setLevel(old)


def value(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, VALUE, dtype=np.uint8)


def status(pool: Pool, dev: NvmfDevice) -> tuple[float, dict[str, object], dict[str, object]]:
    """What `kvtier status` reads of the media pool (its stats, its device's health), timed."""
    t0 = time.monotonic()
    st, h = pool.stats(), dev.health()
    return time.monotonic() - t0, st, h


def concurrent_puts_and_status(pool: Pool, dev: NvmfDevice, first: int,
                               first_entries: int) -> tuple[float, list[str], list[float], int]:
    """PUTS puts at once, status calls until they are all done: (seconds until the last
    put finished, their errors, each status call's latency, status answers read while
    device I/O held the pool's lock)."""
    errors: list[str] = []
    latencies: list[float] = []
    busy = 0
    start = threading.Barrier(PUTS + 1)
    done = threading.Event()
    finished = [0]
    mu = threading.Lock()

    def put(i: int) -> None:
        start.wait()
        try:
            pool.put("t", "s", i.to_bytes(16, "big"), [value(i)])
        except StoreError as e:
            with mu:
                errors.append(str(e))
        with mu:
            finished[0] += 1
            if finished[0] == PUTS:
                done.set()

    ths = [threading.Thread(target=put, args=(first + i,)) for i in range(PUTS)]
    for th in ths:
        th.start()
    start.wait()
    t0 = time.monotonic()
    while True:
        took, st, h = status(pool, dev)
        latencies.append(took)
        busy += bool(st["lock_busy"])
        assert st["entries"] == first_entries and st["live_bytes"] >= first_entries * VALUE
        assert h["state"] in ("live", "reconnecting")
        if done.wait(0.05):  # paces the status calls; returns once the puts are done
            break
    elapsed = time.monotonic() - t0
    for th in ths:
        th.join()
    return elapsed, errors, latencies, busy


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_an_outage_never_holds_the_pool_lock(tmp_path: Path, logwatch: LogWatch,
                                             fault: str) -> None:
    target = TargetProcess(str(tmp_path / "ns.img"), 64 * MiB)
    dev = NvmfDevice(target.config(queues=2, io_timeout_s=IO_TIMEOUT, connect_timeout_s=1.0))
    try:
        pool = Pool.format(dev, segment_size=MiB)
        for i in range(3):
            pool.put("t", "s", i.to_bytes(16, "big"), [value(i)])
        took, st, h = status(pool, dev)
        assert h["state"] == "live" and h["last_error"] == "" and not st["lock_busy"]

        if fault == "kill":
            target.kill()  # the connections close: the host sees it at once
            logwatch.wait("lost the connection to")
            assert dev.wait_state("reconnecting", timeout=5)
        else:
            target.signal(signal.SIGUSR1)  # commands are taken, never answered
        elapsed, errors, latencies, busy = concurrent_puts_and_status(pool, dev, 100, 3)

        # The puts all failed, together: within one io_timeout (the stalled one, whose
        # command timed out) and a margin; waiting for the reconnect under the pool lock
        # they took PUTS * io_timeout.
        assert len(errors) == PUTS, errors
        assert elapsed < IO_TIMEOUT + 1.0 < PUTS * IO_TIMEOUT, (elapsed, errors)
        assert all("not connected" in e or "timed out" in e or "connection" in e
                   for e in errors), errors
        assert sum("not connected" in e for e in errors) >= PUTS - 1, errors
        # status answered within a second throughout (without the lock while a stalled
        # command held it)
        assert max(latencies) < STATUS_WITHIN, latencies
        if fault == "stall":
            assert busy >= 1, "no status call found the lock busy"
            logwatch.wait("lost the connection to")
        took, st, h = status(pool, dev)
        assert took < STATUS_WITHIN
        assert h["state"] == "reconnecting" and h["connection_losses"] == 1
        assert h["last_error"] and h["down_since"] and h["io_refused"] >= PUTS - 1
        # retrying, and saying so: once now, then at most every RETRY_LOG_INTERVAL_S
        logwatch.wait("still reconnecting to")
        assert logwatch.count("still reconnecting to") == 1
        assert logwatch.count("lost the connection to") == 1

        if fault == "kill":
            target.restart()
        else:
            target.signal(signal.SIGUSR1)
        assert dev.wait_live(timeout=20), dev.health()
        back = logwatch.wait("is back after")
        assert "failed attempts" in back
        h = dev.health()
        assert h["state"] == "live" and h["last_error"] == "" and h["down_since"] == 0
        assert h["reconnects"] == 1 and h["reconnect_attempts"] >= 1
        assert h["recent_errors"] and h["last_error_at"] >= h["recent_errors"][-1]["at"] - 1
        assert any("not connected" not in e["error"] for e in h["recent_errors"])

        for i in range(200, 203):  # puts succeed again, and what was stored before is there
            pool.put("t", "s", i.to_bytes(16, "big"), [value(i)])
        for i in (0, 1, 2, 200, 201, 202):
            out = bytearray(VALUE)
            assert pool.get_into("t", i.to_bytes(16, "big"), out).nbytes == VALUE
            assert out == value(i).tobytes()
        took, st, h = status(pool, dev)
        assert not st["lock_busy"] and st["entries"] == 6
        pool.close()
    finally:
        dev.close()
        target.kill()


def test_kvtier_status_answers_during_an_outage_and_puts_fail_together(tmp_path: Path) -> None:
    """The same through kvtierd: clients' PUTs (each opening a segment) and `kvtier status`
    while the target is down; the daemon's log tells the story; once it is back, PUTs are
    served and status shows no stale error."""
    from harness import Daemon
    from test_nvmf import connect, nvmf_pool_toml

    from kvtier.client.errors import KvtierError

    target = TargetProcess(str(tmp_path / "ns.img"), 64 * MiB)
    io_timeout = 1.5
    toml = nvmf_pool_toml(target.port, target.nqn).replace('io_timeout = "3s"',
                                                           f'io_timeout = "{io_timeout}s"')
    big = 5 << 19  # 2.5 MiB in 4 MiB segments: every PUT opens a segment
    d = Daemon(tmp_path / "d", pool=toml)
    d.dir.mkdir()
    clients = []
    try:
        d.start()
        clients += [connect(d) for _ in range(4)]
        def media_device() -> dict[str, object]:
            st = d.admin("status")
            md: dict[str, object] = st.get("store", st)["media_device"]
            return md

        clients[0].put("s", (1).to_bytes(16, "big"), [np.zeros(big, np.uint8)])
        target.kill()
        t0 = time.monotonic()
        while media_device()["state"] != "reconnecting":  # each call is a status round trip
            assert time.monotonic() - t0 < 10, "the daemon never saw the target go"
        errors: list[str] = []
        start = threading.Barrier(len(clients) + 1)

        def put(i: int) -> None:
            start.wait()
            try:
                clients[i].put("s", (100 + i).to_bytes(16, "big"), [np.ones(big, np.uint8)])
            except KvtierError as e:
                errors.append(str(e))

        ths = [threading.Thread(target=put, args=(i,)) for i in range(len(clients))]
        for th in ths:
            th.start()
        start.wait()
        t0 = time.monotonic()
        latencies = []
        while any(th.is_alive() for th in ths):
            s0 = time.monotonic()
            md = media_device()
            latencies.append(time.monotonic() - s0)
            assert md["state"] == "reconnecting"
        elapsed = time.monotonic() - t0
        for th in ths:
            th.join()
        assert len(errors) == len(clients) and all("IO_ERROR" in e for e in errors), errors
        assert elapsed < io_timeout + 1.0, elapsed
        assert max(latencies) < STATUS_WITHIN, latencies
        target.restart()
        t0 = time.monotonic()
        while media_device()["state"] != "live":
            assert time.monotonic() - t0 < 20, "the daemon never reconnected"
        md = media_device()
        assert md["last_error"] == "" and md["reconnects"] == 1 and md["recent_errors"]
        clients[0].put("s", (2).to_bytes(16, "big"), [np.zeros(big, np.uint8)])
        log = d.log.read_text()
        lost, retry, back = (log.find(s) for s in ("lost the connection to",
                                                    "still reconnecting to", "is back after"))
        assert 0 <= lost < retry < back, log[-3000:]
    finally:
        for c in clients:
            c.close()
        if d.proc is not None:
            d.stop()
        target.kill()
