"""DRAM policies: reuse statistics, and eviction by predicted next use against LRU on a
trace (a real DRAM pool, a simulated clock), and pre-promotion through a real daemon."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.protocol import Tier
from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.config import ConfigError, load_config
from kvtier.daemon.policy import LruPolicy, ReusePolicy, make_policy
from kvtier.daemon.pool import Pool
from kvtier.daemon.reuse import ReuseStats, predict
from kvtier.daemon.tiers import TieredStore

KiB = 1 << 10
VALUE = 64 * KiB


def k(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}/{i}".encode()).digest()[:16]


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_prediction_formula() -> None:
    # Due in the future: at last + interval.  Late: recedes twice as fast as it is late.
    assert predict(100.0, 90.0, 30.0) == 120.0
    assert predict(130.0, 90.0, 30.0) == 130.0 + 2 * 10.0
    # No interval known anywhere: recency.
    assert predict(100.0, 90.0, None) == 120.0


def test_expectations_of_turns_and_hints_last_until_read() -> None:
    clock = Clock()
    st = ReuseStats(clock=clock, grace_s=5.0)
    a = [k("a", i) for i in range(4)]
    st.turn("t", "a", a, 3)  # reads the 3 stored keys now, will write the 4th
    keys, nexts = st.key_predictions("t")
    assert sorted(keys) == sorted(a[:3]) and nexts == [clock.t] * 3
    st.read("t", a[:2])
    st.put("t", "a", a[3], 100)
    assert st.key_predictions("t")[0] == [a[2]]
    st.expect("t", a, clock.t + 2)  # a hint: all of a within 2 s
    st.put("t", "a", a[3], 100)  # ...but a[3] is written, not read: no longer expected
    keys, nexts = st.key_predictions("t")
    assert sorted(keys) == sorted(a[:3]) and max(nexts) == clock.t + 2
    clock.t += 2 + 5.1  # past the grace period: expectations nobody met are dropped
    assert st.key_predictions("t")[0] == []


def test_stats_learn_intervals_prior_and_shared_prefixes() -> None:
    clock = Clock()
    start = clock.t
    st = ReuseStats(clock=clock, max_sessions=3)
    system = [k("system", i) for i in range(4)]
    for turn in range(3):
        st.turn("t", "a", [*system, *(k("a", i) for i in range(turn + 1))], 0)
        clock.t += 10
        st.turn("t", "b", [*system, k("b", 0)], 0)
        clock.t += 20
    # a's turns are 30 s apart, and so are b's; the system prompt is used every 10-20 s.
    assert st.next_use("t", "a") == pytest.approx(start + 60 + 30)  # its last turn + 30
    assert st.next_use("t", "b") == pytest.approx(start + 70 + 30)
    st.turn("t", "c", [k("c", 0)], 0)  # one turn: the tenant's median interval is its prior
    assert st.next_use("t", "c") == pytest.approx(clock.t + 30)
    keys, nexts = st.key_predictions("t")
    assert sorted(keys) == sorted(system) and all(n > clock.t for n in nexts)
    st.put("t", "c", k("c", 1), 1000)
    assert [s for _, s, _ in st.sessions("t")] == ["a", "b", "c"]
    st.turn("t", "d", [])  # a fourth session: the least recently used (a) is forgotten
    assert st.next_use("t", "a") is None and st.next_use("t", "d") is not None
    st.forget("t", "d")
    assert st.next_use("t", "d") is None
    d = st.describe()
    assert d["sessions"] == 2 and d["shared_keys"] == 4 and d["returning_turns"] == 4


def replay(policy: str, *, sessions: int = 12, turns: int = 8, chunks: int = 6,
           dram_segments: int = 24) -> float:
    """Multi-turn chat, each session back every `sessions * 10` s (staggered): a cyclic
    reuse pattern larger than DRAM.  Values missing in DRAM are promoted, the turn's new
    chunk is written.  Returns the share of values read that DRAM held."""
    clock = Clock()
    stats = ReuseStats(clock=clock)
    dram = TieredStore.create_dram(dram_segments * 256 * KiB, 256 * KiB, populate=False)
    dram.clock = clock
    if policy == "reuse":
        dram.evictor = ReusePolicy(stats).victim
    else:
        dram.evictor = LruPolicy(stats).victim
    val = np.zeros(VALUE - 8192, np.uint8)  # a record (header + payload) of 64 KiB
    hits = reads = 0
    for turn in range(turns):
        for s in range(sessions):
            name = f"s{s}"
            keys = [k(name, i) for i in range(chunks + turn)]
            stats.turn("t", name, keys)
            for key in keys[:-1]:
                reads += 1
                if dram.contains("t", key):
                    hits += 1
                    dram.get_into("t", key, np.empty(VALUE, np.uint8))
                else:
                    dram.put("t", name, key, [val])
            dram.put("t", name, keys[-1], [val])
            stats.put("t", name, keys[-1], val.nbytes)
            clock.t += 10
    dram.close(checkpoint=False)
    return hits / reads


def test_reuse_eviction_beats_lru_on_a_cyclic_chat_trace() -> None:
    lru, reuse = replay("lru"), replay("reuse")
    # LRU evicts exactly the session that comes back next: it hits (almost) nothing.
    assert lru < 0.1
    assert reuse > lru + 0.25, (lru, reuse)


def test_plan_promotes_a_session_due_back_once_and_only_if_worth_it(tmp_path: Path) -> None:
    clock = Clock()
    stats = ReuseStats(clock=clock)
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=32 << 20),
                        segment_size=1 << 20)
    media.clock = clock
    dram = TieredStore.create_dram(12 << 20, 1 << 20, populate=False)
    dram.clock = clock
    store = TieredStore({"t": dram}, media)
    policy = ReusePolicy(stats, horizon_s=30)
    dram.evictor = policy.victim
    val = np.zeros(VALUE * 4, np.uint8)
    a = [k("a", i) for i in range(6)]
    for _ in range(2):  # turns 20 s apart; a's values are on media only
        stats.turn("t", "a", a, 0)
        for key in a:
            media.put("t", "a", key, [val])
            stats.put("t", "a", key, val.nbytes)
        clock.t += 20
    clock.t -= 20 - 5  # 5 s after its last turn: due back in 15 s, within the horizon
    (p,) = policy.plan(store, clock.t)
    assert p.session == "a" and p.keys == a and p.due == pytest.approx(clock.t + 15)
    assert policy.plan(store, clock.t) == []  # queued a moment ago: not again
    for key in p.keys:
        assert store.promote_bytes("t", key) > 0
    clock.t += 1
    assert policy.plan(store, clock.t) == []  # all in DRAM now
    store.drams["t"].close(checkpoint=False)
    media.close()


def test_policy_config_and_bad_values(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[policy]\nname = "lru"\nhorizon_s = "2m"\n')
    c = load_config(str(cfg))
    assert c.policy.name == "lru" and c.policy.horizon_s == 120
    assert c.redacted()["policy"]["name"] == "lru"
    for body, what in (('name = "mru"', "policy.name"), ("fill = 1.5", "policy.fill"),
                       ("tracked_keys = 0", "policy.tracked_keys"), ("speed = 1", "speed")):
        cfg.write_text(f'state_dir = "{tmp_path}"\n[policy]\n{body}\n')
        with pytest.raises(ConfigError, match=what.replace(".", r"\.")):
            load_config(str(cfg))
    with pytest.raises(ValueError, match="unknown DRAM policy"):
        make_policy("mru", ReuseStats())


def sessions_in_dram(c: Client, session: str, n: int) -> int:
    return sum(t == Tier.DRAM for t in c.lookup([k(session, i) for i in range(n)])[1])


@pytest.mark.parametrize("policy", ["reuse", "lru"])
def test_a_session_due_back_is_in_dram_for_its_turn(tmp_path: Path, policy: str) -> None:
    """Session `a` has turns 1 s apart; after its second, other sessions write more than
    DRAM holds.  With the reuse policy `a` is in DRAM when it is due back (kept, or
    promoted again); with LRU it was evicted."""
    d = Daemon(tmp_path, dram_size="16M", dram_segment="1M", tenants={"alice": {}},
               extra=f'[policy]\nname = "{policy}"\n').start()
    val = np.full(VALUE * 4, 7, np.uint8)  # 256 KiB values: a session of 8 is 2 MiB
    a = [k("a", i) for i in range(8)]
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
            c.lookup(a, session="a")
            for key in a:
                c.put("a", key, [val])
            time.sleep(1.0)
            assert c.lookup(a, session="a")[0] == 8  # turn 2: due back 1 s from now
            due = time.monotonic() + 1.0
            for key in a:
                c.get(key)
            for other in range(3):  # 3 x 6 MiB of one-turn sessions: more than DRAM
                name = f"o{other}"
                c.lookup([k(name, i) for i in range(24)], session=name)
                for i in range(24):
                    c.put(name, k(name, i), [val])
            assert time.monotonic() < due - 0.3, "the writes took too long to test anything"
            time.sleep(due - 0.15 - time.monotonic())
            in_dram = sessions_in_dram(c, "a", 8)
            st = d.admin("status")["policy"]
        assert st["name"] == policy and st["stats"]["returning_turns"] == 1
        assert st["stats"]["sessions_with_interval"] == 1
        if policy == "reuse":
            assert in_dram == 8, st
        else:
            assert in_dram < 8
    finally:
        d.stop()
