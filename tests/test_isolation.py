"""QoS isolation through a real daemon: one tenant's saturating writes (with the media
pool's cleaner running under them) against another tenant's interactive GETs.

The I/O scheduler gives the reads a thread at once (never behind a write) and lets one
write at a time share the device with them; the pool cleans and checkpoints without its
metadata lock held across I/O, so a read never waits for a segment being cleaned; and a
media GET's worker thread posts its completion itself, instead of waiting for the trio
loop (busy with the writer's requests) to run the GET's task again.

Beside other CPU-heavy processes on a 2-core machine every thread waits for a core, the
daemon's and this test's alike, and the storm phase (one more busy process: the writer)
waits more.  Interleaved with the GETs, two controls measure that in the same phase: a
LOOKUP of an absent key (the same request path through the daemon, without I/O) and the
lateness of the test's own 2 ms sleeps.  The goal allows the GET the extra per-hop delay
they show, so that CPU hogs beside the suite are not taken for a failure of the daemon's
isolation, while a GET that waits on alice's I/O (behind a write, behind the cleaner)
still is: the LOOKUPs do no I/O and would not absorb it.  Beside one and two busy-loop
processes on 2 cores (2026-12-04): 6 of 6 runs passed, where the bare 2x bound failed 2
of 4 beside one (docs/results/isolation-under-cpu-hog.md); the LOOKUPs' p99 grew under
the storm about as much as the GETs' (idle 0.93 -> 2.20 ms vs 1.41 -> 2.57 ms, no hog).

Measured here on 2 cores, the reads' p99 under the load over idle: 1.40x-1.81x in 12
runs with the completion posted by the worker (before: 1.60x-2.09x in 5 runs of 1200
GETs, 1.26x-2.25x in 25 runs of 400; with the cleaning under the lock 2.1x-2.9x; before
the I/O scheduler 4.1x).  The test holds p99 and median to the issue's 2x plus the
controls' allowance, on one measurement (it used to take a second one where the first
missed: a retry, which the controls made unnecessary)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import DeadlineError

HERE = Path(__file__).resolve().parent
N = 800  # GETs per attempt: 200 per phase (a p99 of 400 samples was too noisy)
ATTEMPTS = 1  # one measurement decides (see the docstring)
VALUE = 64 << 10


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def latencies(c: Client, lo: int, n: int) -> dict[str, np.ndarray]:
    """GET n values never read before (each from the media pool), one every 2 ms.

    Also returns, for each, the controls of the same moment: how long a LOOKUP of an absent
    key took (the same request path through the daemon, no I/O: its thread hand-offs
    only), and how late the 2 ms sleep woke up (this thread's wait for a core)."""
    out, null, late = [], [], []
    for i in range(lo, lo + n):
        t = time.perf_counter()
        v = c.get(key(i))
        out.append(time.perf_counter() - t)
        assert len(v) == VALUE and v[0] == i % 251
        t = time.perf_counter()
        c.lookup([b"absent-key-00000"])
        null.append(time.perf_counter() - t)
        t = time.perf_counter()
        time.sleep(0.002)
        late.append(max(0.0, time.perf_counter() - t - 0.002))
    return {"get": np.array(out), "lookup": np.array(null), "late": np.array(late)}


# A media GET crosses this many thread wake-ups (client -> event loop -> request task ->
# I/O worker -> client; docs/results/isolation-under-cpu-hog.md), a LOOKUP two fewer (no
# I/O worker): each may wait for a core as long as any thread of the machine does.
HOPS = 4
LOOKUP_HOPS = 2


def within_goal(busy: dict[str, np.ndarray], idle: dict[str, np.ndarray],
                q: float) -> tuple[bool, float, float]:
    """Whether the q-th percentile of the GETs under the write storm is at most 2x idle,
    plus the scheduling delay the machine itself added in the storm phase, measured by
    the controls at that percentile (storm minus idle): the LOOKUPs' per hop and the
    sleeps' lateness per hop, whichever is larger, times the GET's hops.  That is the
    daemon's isolation goal without the 2-core machine's CPU contention from other
    processes (CPU hogs beside the suite, which slow every thread alike).
    Returns (ok, ratio, allowance in seconds)."""
    def delta(name: str) -> float:
        return max(0.0, float(np.percentile(busy[name], q) - np.percentile(idle[name], q)))

    b, i = np.percentile(busy["get"], q), np.percentile(idle["get"], q)
    extra = HOPS * max(delta("lookup") / LOOKUP_HOPS, delta("late"))
    return bool(b <= 2 * i + extra), float(b / i), extra


def test_interactive_gets_keep_their_p99_under_another_tenants_write_storm(
        tmp_path: Path) -> None:
    d = Daemon(tmp_path, pool_size="384M", segment_size="4M", dram_size="128M",
               dram_segment="4M", tenants={"alice": {"quota": "160M"}, "bob": {}}).start()
    writer = None
    try:
        with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as c:
            for i in range(2 * N * ATTEMPTS):  # per attempt: N idle, N loaded
                c.put("b", key(i), [np.full(VALUE, i % 251, np.uint8)])
        d.stop()
        d.start()  # bob's values are on the media pool only
        with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as c:
            writer = subprocess.Popen([sys.executable, str(HERE / "flood_writer.py"), d.socket,
                                       "alice", TOKENS["alice"], "64", "8"],
                                      stdout=subprocess.PIPE, text=True)
            assert writer.stdout is not None and writer.stdout.readline().strip() == "READY"
            ratios = []
            for attempt in range(ATTEMPTS):
                # Idle and loaded phases alternate (the writer stopped and continued), so
                # both see the same machine.
                phases: dict[str, list[dict[str, np.ndarray]]] = {"idle": [], "busy": []}
                written = cleaned = 0
                seconds = 0.0
                for phase in range(4):
                    lo = attempt * 2 * N + phase * N // 2
                    if phase % 2 == 0:
                        writer.send_signal(signal.SIGSTOP)
                        time.sleep(0.2)  # its requests in flight finish
                        phases["idle"].append(latencies(c, lo, N // 2))
                        writer.send_signal(signal.SIGCONT)
                        time.sleep(0.2)
                    else:
                        before = d.admin("status")["media"]["counters"]
                        t0 = time.monotonic()
                        phases["busy"].append(latencies(c, lo, N // 2))
                        after = d.admin("status")
                        seconds += time.monotonic() - t0
                        now = after["media"]["counters"]
                        written += now["user_bytes"] - before["user_bytes"]
                        cleaned += now["cleaned_segments"] - before["cleaned_segments"]
                busy, idle = ({k: np.concatenate([m[k] for m in phases[p]])
                               for k in phases[p][0]} for p in ("busy", "idle"))
                ok99, r99, extra99 = within_goal(busy, idle, 99)
                ok50, r50, extra50 = within_goal(busy, idle, 50)
                print("p50/p99 ms, idle -> storm: " + "; ".join(
                    f"{k} " + " ".join(f"{np.percentile(idle[k], q) * 1e3:.2f}->"
                                       f"{np.percentile(busy[k], q) * 1e3:.2f}"
                                       for q in (50, 99)) for k in idle))
                print(f"bob GET p99 under alice's writes {r99:.2f}x idle (allowance for the "
                      f"machine's own scheduling delay {extra99 * 1e3:.2f} ms), median "
                      f"{r50:.2f}x ({extra50 * 1e3:.2f} ms); alice wrote "
                      f"{written / seconds / 1e6:.0f} MB/s, the cleaner freed {cleaned} "
                      f"segments")
                assert written / seconds > 50e6 and cleaned > 0  # the load was there
                ratios.append((round(r99, 2), round(r50, 2), round(extra99 * 1e3, 2),
                               round(extra50 * 1e3, 2), ok99 and ok50))
                if ok99 and ok50:
                    break
        # the goal, on the last measurement: (p99, median) under load at most 2x
        # idle, beyond what the machine's scheduling added to every thread alike
        assert ratios[-1][-1], ("(p99 x, median x, p99 allowance ms, median allowance ms, "
                                f"ok) under load over idle: {ratios}")
        assert after["io"]["low_class_nice"] == 10  # writes ran at a lower CPU priority
        io = after["io"]["classes"]
        assert io["interactive"]["tenants"]["bob"]["waited"] == 0  # never behind a write
        assert io["write"]["tenants"]["alice"]["requests"] > 0
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        d.stop()


def test_a_get_that_cannot_get_a_thread_by_its_deadline_says_so_at_once(
        tmp_path: Path) -> None:
    d = Daemon(tmp_path, pool_size="512M", segment_size="16M", dram_size="256M",
               dram_segment="16M", tenants={"alice": {}, "bob": {}},
               extra="[limits]\nio_threads = 1\n").start()
    try:
        with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as c:
            for i in range(200):
                c.put("b", key(i), [np.full(VALUE, i % 251, np.uint8)])
        d.stop()
        d.start()  # on media only: each GET needs the one I/O thread
        big = np.full(12 << 20, 3, np.uint8)
        stop = threading.Event()

        def write_storm() -> None:  # 12 MiB PUTs hold the thread for milliseconds
            with Client.connect(d.socket, "alice", TOKENS["alice"],
                                arena_size=64 << 20) as w:
                i = 0
                while not stop.is_set():
                    w.put("a", key(1000 + i % 8), [big])
                    i += 1

        t = threading.Thread(target=write_storm)
        t.start()
        missed = None
        try:
            with Client.connect(d.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as c:
                time.sleep(0.2)
                for i in range(200):
                    t0 = time.perf_counter()
                    try:
                        c.get(key(i), deadline_ms=1)
                    except DeadlineError:
                        assert time.perf_counter() - t0 < 0.5  # told early, not late
                        missed = i
                        break
                assert missed is not None, "no GET missed a 1 ms deadline behind 12 MiB writes"
                # Without a deadline the same value is served.
                assert c.get(key(missed)) == np.full(VALUE, missed % 251, np.uint8).tobytes()
        finally:
            stop.set()
            t.join()
        st = d.admin("status")["io"]["classes"]["interactive"]["tenants"]["bob"]
        assert st["deadline_missed"] == 1
    finally:
        d.stop()
