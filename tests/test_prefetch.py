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
        big.start()
        deadline = time.monotonic() + 10
        while d.admin("status")["prefetch"]["queued"] < 60:  # the big hint is queued
            assert time.monotonic() < deadline and big.is_alive(), "big hint never queued"
        hint("urgent", 4, 5_000)
        big.join()
        assert done["urgent"] < done["big"]
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
