"""CPU priority of worker threads by I/O class.

The I/O scheduler decides which request gets a worker thread; once they run, the kernel's
CPU scheduler decides which thread gets a core.  On a machine with few cores, writes and
cleaning (CRCs, copies) then take CPU time an interactive read is waiting for.  So a
worker thread runs `write` and `background` work at a higher nice value and goes back to
its own before it takes the next request.

On Linux, `setpriority(PRIO_PROCESS, tid, n)` sets the nice value of the one thread `tid`
(setpriority(2), NOTES).  Going back down needs CAP_SYS_NICE or an RLIMIT_NICE that
allows it (systemd: `LimitNICE=+0`); `probe` tries both directions once, on a thread of
its own, and says why not if it cannot -- then the daemon runs without it rather than
leave threads stuck at the lower priority.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

MAX_NICE = 19


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _set_thread_nice(nice: int) -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def probe(nice: int) -> str | None:
    """None if a thread of this process can go to `nice` and back; else the reason."""
    if not 0 < nice <= MAX_NICE:
        return f"nice must be in 1..{MAX_NICE}, got {nice}"
    out: list[str | None] = []

    def attempt() -> None:
        base = _thread_nice()
        try:
            _set_thread_nice(min(MAX_NICE, base + nice))
        except OSError as e:
            out.append(f"cannot lower a thread's priority: {e.strerror}")
            return
        try:
            _set_thread_nice(base)
        except OSError as e:
            out.append(f"a thread cannot return to nice {base} ({e.strerror}): give "
                       f"kvtierd CAP_SYS_NICE or an RLIMIT_NICE that allows it "
                       f"(systemd: LimitNICE=+{base})")
            return
        out.append(None)

    t = threading.Thread(target=attempt, name="kvtier-nice-probe")
    t.start()
    t.join()
    return out[0] if out else "the probe thread failed"


@contextmanager
def lowered(nice: int) -> Iterator[None]:
    """Run the block at `nice` above the calling thread's own priority."""
    base = _thread_nice()
    _set_thread_nice(min(MAX_NICE, base + nice))
    try:
        yield
    finally:
        _set_thread_nice(base)
