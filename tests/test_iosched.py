"""The I/O scheduler on trio's mock clock: strict priority between classes, the
anti-starvation bound, fair queueing between tenants, deadlines, cancellation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from kvtier.daemon.iosched import DeadlineMissed, IoClass, IoScheduler


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def hold(sched: IoScheduler, cls: IoClass, tenant: str, order: list[str], name: str,
               seconds: float = 0.001, cost: int = 4096) -> None:
    async with sched.slot(cls, tenant, cost):
        order.append(name)
        await trio.sleep(seconds)


def test_strict_priority_between_classes() -> None:
    order: list[str] = []

    async def main() -> None:
        sched = IoScheduler(1, starvation_s=10)
        async with trio.open_nursery() as n:
            n.start_soon(hold, sched, IoClass.BACKGROUND, "t", order, "first", 0.1)
            await trio.sleep(0.01)
            for cls in (IoClass.BACKGROUND, IoClass.WRITE, IoClass.PREFETCH,
                        IoClass.INTERACTIVE):
                n.start_soon(hold, sched, cls, "t", order, cls.name.lower())
                await trio.sleep(0.001)
            await trio.sleep(0.01)
            assert sched.queued() == 4 and sched.busy == 1
        assert sched.busy == 0

    run(main)
    assert order == ["first", "interactive", "prefetch", "write", "background"]


def test_a_lower_class_waits_at_most_about_the_starvation_bound() -> None:
    served: dict[str, float] = {}

    async def main() -> None:
        sched = IoScheduler(1, starvation_s=0.05)
        t0 = trio.current_time()

        async def interactive_stream() -> None:
            async with trio.open_nursery() as n:
                for i in range(200):  # 1 s of back-to-back interactive work
                    n.start_soon(hold, sched, IoClass.INTERACTIVE, "a", [], f"i{i}", 0.005)

        async def background() -> None:
            await trio.sleep(0.002)
            async with sched.slot(IoClass.BACKGROUND, "b"):
                served["background"] = trio.current_time() - t0

        async with trio.open_nursery() as n:
            n.start_soon(interactive_stream)
            n.start_soon(background)
        st = sched.stats[(IoClass.BACKGROUND, "b")]
        assert st.starvation_grants == 1 and st.waited == 1

    run(main)
    assert 0.05 <= served["background"] <= 0.05 + 0.02


def test_fair_queueing_between_tenants_by_weight() -> None:
    order: list[str] = []

    async def main() -> None:
        sched = IoScheduler(1, weights={"heavy": 2.0})
        async with trio.open_nursery() as n:
            n.start_soon(hold, sched, IoClass.WRITE, "x", order, "x", 0.1)
            await trio.sleep(0.01)
            for _ in range(12):  # a deep queue of one tenant...
                n.start_soon(hold, sched, IoClass.WRITE, "busy", order, "busy")
                await trio.sleep(0.0001)
            # ...does not make the request of another wait behind all of it
            n.start_soon(hold, sched, IoClass.WRITE, "light", order, "light")
            await trio.sleep(0.0001)
            for _ in range(12):
                n.start_soon(hold, sched, IoClass.WRITE, "heavy", order, "heavy")
                await trio.sleep(0.0001)

    run(main)
    assert order.index("light") <= 3
    # busy (weight 1) and heavy (weight 2) both backlogged: heavy gets ~2 of every 3
    both = [x for x in order if x in ("busy", "heavy")][2:14]
    assert both.count("heavy") >= 7, order


def test_a_request_past_its_deadline_leaves_the_queue_at_once() -> None:
    async def main() -> None:
        sched = IoScheduler(1)
        async with trio.open_nursery() as n:
            n.start_soon(hold, sched, IoClass.WRITE, "t", [], "long", 1.0)
            await trio.sleep(0.01)
            t0 = trio.current_time()
            with pytest.raises(DeadlineMissed, match="before the deadline"):
                async with sched.slot(IoClass.INTERACTIVE, "t", deadline=t0 + 0.05):
                    raise AssertionError("granted despite the deadline")
            assert trio.current_time() - t0 == pytest.approx(0.05)
            assert sched.queued() == 0 and sched.busy == 1
        assert sched.busy == 0
        assert sched.stats[(IoClass.INTERACTIVE, "t")].deadline_missed == 1
        d = sched.describe()
        assert d["classes"]["interactive"]["tenants"]["t"]["deadline_missed"] == 1

    run(main)


def test_cancelled_waiters_never_leak_a_slot() -> None:
    async def main() -> None:
        sched = IoScheduler(2)
        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(hold, sched, IoClass.WRITE, "t", [], "w", 0.1)
            await trio.sleep(0.01)
            with trio.move_on_after(0.02):  # the client goes away while queued
                async with sched.slot(IoClass.INTERACTIVE, "t"):
                    raise AssertionError("granted while both slots were busy")
        assert sched.busy == 0 and sched.queued() == 0
        # a waiter granted at the moment its scope is cancelled gives the slot back
        with trio.CancelScope() as cs:
            async with trio.open_nursery() as n:
                n.start_soon(hold, sched, IoClass.WRITE, "t", [], "w", 0.01)
                n.start_soon(hold, sched, IoClass.WRITE, "t", [], "w", 0.01)
                await trio.sleep(0.005)
                n.start_soon(hold, sched, IoClass.WRITE, "t", [], "w", 0.01)
                await trio.sleep(0.0051)
                cs.cancel()
        assert sched.busy == 0

    run(main)


def test_run_executes_in_a_worker_thread() -> None:
    async def main() -> None:
        sched = IoScheduler(2)
        assert await sched.run(IoClass.BACKGROUND, "", sum, [1, 2, 3]) == 6
        assert sched.stats[(IoClass.BACKGROUND, "")].requests == 1

    trio.run(main)
    with pytest.raises(ValueError, match="at least one slot"):
        IoScheduler(0)


def _my_nice() -> int:
    import os
    import threading
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_write_and_background_work_run_at_a_lower_cpu_priority() -> None:
    seen: dict[str, list[int]] = {}

    async def main() -> None:
        sched = IoScheduler(2, low_class_nice=7)
        if sched.low_class_nice_off:  # not root, or no CAP_SYS_NICE here
            pytest.skip(f"this process may not renice threads: {sched.low_class_nice_off}")
        assert sched.low_class_nice == 7
        base = _my_nice()
        for _ in range(3):  # the same worker threads, taken in turn by every class
            for cls in IoClass:
                nice = await sched.run(cls, "t", _my_nice)
                seen.setdefault(cls.name.lower(), []).append(nice - base)
        assert sched.describe()["low_class_nice"] == 7

    trio.run(main)
    assert seen == {"interactive": [0] * 3, "prefetch": [0] * 3, "write": [7] * 3,
                    "background": [7] * 3}


def test_without_the_right_to_renice_back_it_is_off_and_says_why() -> None:
    """Without CAP_SYS_NICE and with the default RLIMIT_NICE (0), a thread can lower its
    priority but not raise it back: the scheduler must not use it then."""
    import shutil
    import subprocess
    import sys
    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is part of Debian's base system"
    code = ("from kvtier.daemon.iosched import IoScheduler; s = IoScheduler(2, "
            "low_class_nice=10); print(s.low_class_nice, s.low_class_nice_off)")
    # No capabilities survive the exec (an empty bounding set), even for root.
    out = subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all",
                          sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0 ") and "LimitNICE=+0" in out.stdout, out.stdout
    bad = subprocess.run([sys.executable, "-c", "from kvtier.daemon.iosched import "
                          "IoScheduler; print(IoScheduler(2, low_class_nice=25)"
                          ".low_class_nice_off)"], capture_output=True, text=True)
    assert "nice must be in 1..19, got 25" in bad.stdout
