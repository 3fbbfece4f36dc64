"""Prefetch hints through a real daemon: promotion before the deadline, the most urgent
hint first, and a late hint that still finishes its work."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.protocol import Tier

KiB = 1 << 10


def k(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}{i}".encode()).digest()[:16]


def connect(d: Daemon) -> Client:
    return Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=16 << 20)


def on_media_only(d: Daemon, values: dict[str, tuple[int, int]]) -> None:
    """Store values (session -> (count, size)), then restart: DRAM starts empty."""
    with connect(d) as c:
        for s, (n, size) in values.items():
            for i in range(n):
                c.put(s, k(s, i), [np.full(size, i % 251, np.uint8)])
    d.stop()
    d.start()


def test_a_hint_promotes_a_session_before_its_deadline(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        on_media_only(d, {"s": (40, 256 * KiB)})
        keys = [k("s", i) for i in range(40)]
        with connect(d) as c:
            assert c.lookup(keys)[1] == [Tier.POOL] * 40
            assert c.prefetch(session="s", deadline_ms=20_000) == (40, True)
            assert c.lookup(keys)[1] == [Tier.DRAM] * 40
            assert c.get(keys[7]) == np.full(256 * KiB, 7, np.uint8).tobytes()
        pf = d.admin("status")["prefetch"]
        assert pf["hints"] == 1 and pf["hints_met"] == 1 and pf["values"] == 40
        assert pf["bytes"] == 40 * 256 * KiB and pf["rate_bytes_per_s"] > 0
    finally:
        d.stop()


def test_the_most_urgent_hint_is_served_first(tmp_path: Path) -> None:
    d = Daemon(tmp_path, dram_size="256M", pool_size="512M").start()
    try:
        on_media_only(d, {"big": (120, 1024 * KiB), "urgent": (4, 256 * KiB)})
        done: dict[str, float] = {}

        def hint(tag: str, n: int, deadline_ms: int) -> None:
            with connect(d) as c:
                c.prefetch([k(tag, i) for i in range(n)], deadline_ms=deadline_ms)
                done[tag] = time.monotonic()

        big = threading.Thread(target=hint, args=("big", 120, 60_000))
        # The urgent hint's client connects before the race: on a loaded machine a HELLO
        # (and faulting in a fresh arena) took longer than the big hint's remaining
        # promotions, which then finished first with no urgent hint to yield to.
        with connect(d) as urgent:
            big.start()
            deadline = time.monotonic() + 10
            while (queued := d.admin("status")["prefetch"]["queued"]) < 60:
                # the big hint is queued, at least half of it still waiting
                assert time.monotonic() < deadline and big.is_alive(), "big hint never queued"
            urgent.prefetch([k("urgent", i) for i in range(4)], deadline_ms=5_000)
            done["urgent"] = time.monotonic()
            left = d.admin("status")["prefetch"]["queued"]
        big.join()
        assert done["urgent"] < done["big"], (queued, left)
        assert left > 0  # the big hint still had keys waiting when the urgent one was done
        with connect(d) as c:
            assert c.lookup([k("big", i) for i in range(120)])[0] == 120
    finally:
        d.stop()


def test_a_hint_past_its_deadline_says_so_and_still_finishes(tmp_path: Path) -> None:
    d = Daemon(tmp_path, dram_size="256M", pool_size="512M").start()
    try:
        on_media_only(d, {"s": (60, 1024 * KiB)})
        keys = [k("s", i) for i in range(60)]
        with connect(d) as c:
            n, met = c.prefetch(keys, deadline_ms=1)
            assert not met and n < 60
            deadline = time.monotonic() + 20
            while c.lookup(keys)[1] != [Tier.DRAM] * 60:  # promotion went on after the answer
                assert time.monotonic() < deadline, c.lookup(keys)[1].count(Tier.DRAM)
                time.sleep(0.05)
    finally:
        d.stop()


def test_promotion_yields_to_interactive_reads_within_a_bound(tmp_path: Path) -> None:
    """Strict priority for GETs reading the pool, with an anti-starvation bound: a real
    store, the scheduler in a trio loop, an interactive read held open meanwhile."""
    import trio

    from kvtier.daemon.blockdev import FileDevice
    from kvtier.daemon.iosched import IoScheduler
    from kvtier.daemon.pool import Pool
    from kvtier.daemon.prefetch import PrefetchScheduler
    from kvtier.daemon.tiers import TieredStore

    MiB = 1 << 20
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=64 * MiB),
                        segment_size=4 * MiB)
    store = TieredStore(TieredStore.create_drams({"t": 32 * MiB}, 4 * MiB, False), media)
    for i in range(10):
        media.put("t", "s", k("y", i), [bytes(100_000)])
    sched = PrefetchScheduler(store, IoScheduler(2), workers=1, max_yield_s=0.2)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(sched.run)
            store.interactive_media_reads += 1  # a GET is reading the pool
            t0 = trio.current_time()
            r = await sched.hint("t", [k("y", i) for i in range(5)], 30.0)
            held = trio.current_time() - t0
            store.interactive_media_reads -= 1
            t0 = trio.current_time()
            r2 = await sched.hint("t", [k("y", i) for i in range(5, 10)], 30.0)
            free = trio.current_time() - t0
            n.cancel_scope.cancel()
        assert r.promoted == 5 and r.met and r2.promoted == 5 and r2.met
        assert held >= 5 * 0.2 * 0.9  # each promotion waited out the bound, then went on
        assert free < held / 3  # nothing to yield to: no waiting
        assert sched.stats.yielded_s >= 0.9

    trio.run(main)
    assert store.lookup("t", [k("y", i) for i in range(10)])[1].tolist() == [1] * 10


def test_a_partial_get_promotes_the_whole_value_in_the_background(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        frames = [np.full(100_000, i, np.uint8) for i in range(4)]
        with connect(d) as c:
            c.put("s", k("p", 0), frames)
        d.stop()
        d.start()
        with connect(d) as c:
            assert c.get(k("p", 0), frames=(1, 3)) == b"".join(f.tobytes() for f in frames[1:3])
            deadline = time.monotonic() + 10
            while c.lookup([k("p", 0)])[1] != [Tier.DRAM]:
                assert time.monotonic() < deadline, "never promoted"
                time.sleep(0.05)
            assert c.get(k("p", 0)) == b"".join(f.tobytes() for f in frames)
    finally:
        d.stop()


def _store_with(tmp_path: Path, values: int, size: int, frames: int = 1):  # type: ignore[no-untyped-def]
    """A real TieredStore over a file pool holding `values` values (on media only)."""
    from kvtier.daemon.blockdev import FileDevice
    from kvtier.daemon.pool import Pool
    from kvtier.daemon.tiers import TieredStore

    MiB = 1 << 20
    seg = max(4 * MiB, 2 * size)
    room = seg * (values * size // seg + 6)
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=MiB + room),
                        segment_size=seg)
    store = TieredStore(TieredStore.create_drams({"t": room}, seg, False), media)
    per = size // frames
    for i in range(values):
        media.put("t", "s", k("v", i), [np.full(per, (i + f) % 251, np.uint8)
                                         for f in range(frames)])
    return store


def test_a_hinted_key_its_client_has_read_already_is_not_read_again(tmp_path: Path) -> None:
    """A hint that arrives after its client started reading: the keys already read from
    the media (here in part, one layer group's frames, as the GPU loader does) are dropped
    from the hint instead of read a second time; the others are promoted."""
    import trio

    from kvtier.daemon.iosched import IoScheduler
    from kvtier.daemon.prefetch import PrefetchScheduler

    store = _store_with(tmp_path, 10, 256 * KiB, frames=2)
    buf = bytearray(256 * KiB)
    for i in range(4):  # the client reads frame 0 of values 0..3 from the media
        r, tier = store.get_into("t", k("v", i), buf, frames=(0, 1))
        assert tier == Tier.POOL and buf[:r.nbytes] == bytes([i % 251]) * (128 * KiB)
    read0 = store.media.counters.bytes_read
    sched = PrefetchScheduler(store, IoScheduler(4), workers=2)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(sched.run)
            r = await sched.hint("t", [k("v", i) for i in range(10)], 30.0)
            n.cancel_scope.cancel()
        assert (r.keys, r.promoted, r.met) == (10, 6, True)

    trio.run(main)
    assert sched.stats.superseded == 4
    assert store.lookup("t", [k("v", i) for i in range(10)])[1].tolist() == [2] * 4 + [1] * 6
    # Six whole values (record headers included) and nothing else came off the media.
    moved = store.media.counters.bytes_read - read0
    assert 6 * 256 * KiB <= moved < 7 * 256 * KiB
    # The rest of a superseded value is still served, from the media.
    r, tier = store.get_into("t", k("v", 2), buf, frames=(1, 2))
    assert tier == Tier.POOL and buf[:r.nbytes] == bytes([3]) * (128 * KiB)


def test_a_get_during_the_promotion_of_its_key_waits_for_it(tmp_path: Path) -> None:
    """Single flight: a GET that misses DRAM while a prefetch is reading the same value
    from the media waits for that read and is served from DRAM (one media read)."""
    MiB = 1 << 20
    store = _store_with(tmp_path, 1, 32 * MiB)
    read0 = store.media.counters.bytes_read
    key = k("v", 0)
    th = threading.Thread(target=store.promote_bytes, args=("t", key))
    th.start()
    deadline = time.monotonic() + 10
    while not store._promoting:  # the promotion has started reading
        assert th.is_alive() or store.lookup("t", [key])[1][0] == 1, "promotion never started"
        assert time.monotonic() < deadline
    buf = bytearray(32 * MiB)
    r, tier = store.get_into("t", key, buf)
    th.join()
    assert tier == Tier.DRAM and r.nbytes == 32 * MiB
    assert buf[:: MiB] == bytes(32)
    assert store.single_flight_waits == 1
    assert store.media.counters.bytes_read - read0 < 33 * MiB  # read once
