"""Power-loss and I/O-error crash checking on a fault-injecting device (tests/faultdev.py).

A pool is formatted on a `FaultDevice` (a disk with a volatile write cache) and driven by
a random single-threaded workload: puts of 16 B to 90 KiB values in 1 to 5 frames (one
record spans many blocks and segments fill, get cleaned and reused), deletes, session
purges, explicit checkpoints, and checkpoints a put takes itself (`checkpoint_every_bytes`
is small), reads checked against what was acknowledged.  The power is cut at a random
I/O event -- a write (which may land, land in part, or not at all) or a flush (which then
never took effect) -- or between operations, in every mode of the device ("drop_all",
"drop_random", "tear", and "kill" for a process crash); sometimes recovery itself is cut
too.  Then the pool is opened on the durable image and checked:

* opening never fails, and a scrub finds nothing wrong;
* every key holds a state the acknowledged operations allow (below): the exact value of
  one of its puts (byte for byte, same frames, same session), or nothing;
* every value served is whole: it regenerates from the seed it embeds, so a torn or mixed
  record served as data fails the check (it must fail its CRC and be cut instead).

What "allowed" means is the pool's promise, from its code (daemon/pool.py):

* an operation is *durable* once it has returned and the device has completed a flush
  after it -- with `PoolOptions.sync` each record write is followed by one, so every
  acknowledged put, delete and purge is; without it only the flushes of a checkpoint
  (segment headers, records and the checkpoint, then each superblock copy) make
  anything durable;
* a process crash ("kill") loses nothing that was acknowledged, sync or not (a write
  that returned is on the device, which keeps it);
* the durable operations all survive; any subset of the others, and of the one in flight
  or failed, may survive too, applied in their order (replay is in LSN order).

So per key the allowed states are computed by running the operation history over a set of
states: a durable operation maps every state, any other one adds its image to the set.
Each seed runs two rounds (workload, cut, recover, check) on the same pool; with `errors`
one write per round fails with an I/O error first (nothing of it lands: a failed write
that lands whole is test_delete_after_a_failed_put_stays_deleted), and without sync
sometimes a flush.  Any write may be torn, superblock copies included (tearing the only
usable copy left a pool that did not open, about 1 seed in 300, until the copy that does
not name the current checkpoint was written first).

KVTIER_FAULT_SEEDS / KVTIER_FAULT_ERROR_SEEDS run more seeds (30 / 20 by default).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import crc32c
import numpy as np
import pytest
from faultdev import MODES, SECTOR, FaultDevice, PowerLoss

from kvtier.daemon.blockdev import aligned_buffer
from kvtier.daemon.errors import DeviceError, StoreError
from kvtier.daemon.pool import Pool, PoolOptions
from kvtier.daemon.superblock import HEADER_ZONE, SB_B_OFFSET, SB_SIZE, decode_superblock
from kvtier.daemon.tiers import TieredStore

TENANT = "fault"
KEYS = [hashlib.sha256(b"fault-key%d" % i).digest()[:16] for i in range(24)]
SESSIONS = ["s0", "s1", "s2", "s3"]
SEG = 128 << 10
NSEG = 40
SIZE = HEADER_ZONE + NSEG * SEG
OPS_PER_ROUND = 150
CRASH_WINDOW = 360  # I/O events; a round has ~200 (sync off) to ~320 (sync on)
SEEDS = int(os.environ.get("KVTIER_FAULT_SEEDS", "30"))
ERROR_SEEDS = int(os.environ.get("KVTIER_FAULT_ERROR_SEEDS", "20"))

State = tuple[int, str] | None  # (value seed, session), or absent


def value(seed: int, size: int) -> np.ndarray:
    """A value that names its own seed and size in its first 16 bytes."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data[:16] = np.frombuffer(seed.to_bytes(8, "little") + size.to_bytes(8, "little"),
                              np.uint8)
    return data


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Op:
    kind: str  # "put", "delete", "purge"
    key: bytes | None = None
    seed: int = 0
    session: str = ""
    acked: bool = False
    flushes_at_ack: int = -1  # device flushes completed when it returned


def _apply(op: Op, key: bytes, s: State) -> State:
    if op.kind == "put":
        return (op.seed, op.session) if op.key == key else s
    if op.kind == "delete":
        return None if op.key == key else s
    assert op.kind == "purge"
    return None if s is not None and s[1] == op.session else s


def allowed_states(base: State, ops: list[Op], key: bytes,
                   durable: Callable[[Op], bool]) -> set[State]:
    """Every state `key` may be in after a cut: durable ops happened, others may have."""
    states = {base}
    for op in ops:
        after = {_apply(op, key, s) for s in states}
        states = after if durable(op) else states | after
    return states


@dataclass
class Run:
    """One seed: the pool, its device, the history and what is known about values."""
    sync: bool
    mode: str
    rng: random.Random
    clock: Clock = field(default_factory=Clock)
    values: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # seed -> size, frames
    base: dict[bytes, State] = field(default_factory=dict)  # certain state at round start
    ops: list[Op] = field(default_factory=list)
    next_seed: int = 1
    stats: dict[str, int] = field(default_factory=dict)

    def options(self) -> PoolOptions:
        return PoolOptions(sync=self.sync, evict=False, checkpoint_every_bytes=384 << 10)

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n


def _frames(rng: random.Random, data: np.ndarray) -> list[np.ndarray]:
    n = rng.randint(1, min(5, data.size))
    cuts = sorted(rng.sample(range(1, data.size), n - 1)) if n > 1 else []
    return np.split(data, cuts)


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.35:
        return rng.randint(16, 2 * SECTOR)  # less than a block
    if r < 0.75:
        return rng.randint(1000, 12_000)
    return rng.randint(20_000, 90_000)  # many blocks: most of a segment


def _check_value(run: Run, key: bytes, pool: Pool) -> tuple[int, str]:
    """Read `key` whole and check it is byte-exact; its (seed, session)."""
    info = pool.stat(TENANT, key)
    buf = np.empty(info.record_bytes, dtype=np.uint8)
    r = pool.get_into(TENANT, key, buf)
    got, fl, session = buf[:r.nbytes], list(r.frame_lengths), info.session
    seed = int.from_bytes(got[:8].tobytes(), "little")
    assert seed in run.values, f"{key.hex()}: a value nobody put (seed {seed})"
    size, frames = run.values[seed]
    assert got.size == size and fl == frames, \
        f"{key.hex()}: seed {seed} read as {got.size} bytes in {fl}, put as {size} in {frames}"
    assert np.array_equal(got, value(seed, size)), f"{key.hex()}: torn or mixed value"
    return seed, session


def workload(run: Run, pool: Pool, dev: FaultDevice, nops: int) -> bool:
    """Random operations until `nops` are done (False) or the power is cut (True).

    `live` is what the running pool must answer: the acknowledged operations only (an
    operation that failed with an injected I/O error did not happen, in memory)."""
    rng = run.rng
    live = dict(run.base)
    for _ in range(nops):
        run.clock.now += rng.uniform(0.1, 3.0)
        r = rng.random()
        try:
            if r < 0.68:
                key, session = rng.choice(KEYS), rng.choice(SESSIONS)
                seed = run.next_seed
                run.next_seed += 1
                data = value(seed, _size(rng))
                frames = _frames(rng, data)
                run.values[seed] = (data.size, [f.size for f in frames])
                op = Op("put", key, seed, session)
                run.ops.append(op)
                pool.put(TENANT, session, key, frames)
                live[key] = (seed, session)
            elif r < 0.79:
                key = rng.choice(KEYS)
                op = Op("delete", key)
                run.ops.append(op)
                pool.delete(TENANT, key)
                live[key] = None
            elif r < 0.82:
                session = rng.choice(SESSIONS)
                op = Op("purge", session=session)
                run.ops.append(op)
                pool.purge_session(TENANT, session)
                live = {k: None if s is not None and s[1] == session else s
                        for k, s in live.items()}
            elif r < 0.87:
                pool.checkpoint()
                run.count("checkpoints")
                continue
            else:
                key = rng.choice(KEYS)
                want = live.get(key)
                if want is None:
                    assert not pool.contains(TENANT, key), f"{key.hex()}: should be gone"
                else:
                    assert _check_value(run, key, pool) == want
                continue
        except PowerLoss:
            return True
        except DeviceError as e:
            assert "injected" in str(e), e
            run.count("io_errors")
            continue
        op.acked = True
        op.flushes_at_ack = dev.flushes
        run.count("acked_" + op.kind)
    return False


def open_after_cut(run: Run, dev: FaultDevice) -> tuple[Pool, FaultDevice]:
    """Recovery on the durable image; sometimes the power fails again during it."""
    rng = run.rng
    while True:
        crash = rng.randint(1, 8) if rng.random() < 0.25 else None
        nxt = dev.reopen(crash_at_io=crash, crash_mode=run.mode, rng=rng)
        try:
            pool = Pool.open(nxt, clock=run.clock, options=run.options())
        except PowerLoss:
            run.count("recovery_cut")
            run.count("cut_tear_refused", nxt.cut["tear_refused"])
            dev = nxt
            continue
        nxt.crash_at_io = None
        return pool, nxt


def check(run: Run, pool: Pool, flushes_at_cut: int) -> None:
    """Every key is in an allowed state; every value is whole.  Resets the round."""
    flushes = flushes_at_cut

    def durable(op: Op) -> bool:
        return op.acked and (run.sync or run.mode == "kill" or op.flushes_at_ack < flushes)

    assert pool.scrub() == []
    present = {e.key for e in pool.entries(TENANT)}
    assert present <= set(KEYS), "keys nobody put"
    observed: dict[bytes, State] = {}
    for key in KEYS:
        got: State = _check_value(run, key, pool) if key in present else None
        allowed = allowed_states(run.base.get(key), run.ops, key, durable)
        history = [(o.kind, o.seed, o.session, o.acked, o.flushes_at_ack)
                   for o in run.ops if o.key in (key, None)]
        assert got in allowed, (
            f"sync={run.sync} mode={run.mode}: {key.hex()} is {got} after the cut; allowed "
            f"{sorted(allowed, key=str)}; history {history}; flushes at cut {flushes}")
        # Would the state have been different without the unpromised operations?
        certain = allowed_states(run.base.get(key), [o for o in run.ops if durable(o)], key,
                                 lambda o: True)
        if got not in certain:
            run.count("unpromised_kept")
        # Would "every acknowledged operation is durable" have been kept?
        if got not in allowed_states(run.base.get(key), run.ops, key, lambda o: o.acked):
            run.count("acked_lost")
        observed[key] = got
    run.count("torn_records", pool.recovery.torn_records)
    run.count("replayed", pool.recovery.records_replayed)
    run.base = observed
    run.ops = []


def superblock_usable(img: bytes | bytearray, offset: int) -> bool:
    """Whether the superblock copy at `offset` decodes and the checkpoint it names is
    intact in `img` (what recovery needs of the copy it opens from)."""
    try:
        sb = decode_superblock(memoryview(img)[offset:offset + SB_SIZE], where="check")
    except StoreError:
        return False
    per = sb.segment_size - sb.block_size
    data = b"".join(bytes(img[start:start + per]) for start in
                    (sb.data_offset + seg * sb.segment_size + sb.block_size
                     for seg in sb.ckpt_segments))[:sb.ckpt_len]
    return len(data) == sb.ckpt_len and crc32c.crc32c(data) == sb.ckpt_crc


def run_seed(sync: bool, mode: str, seed: int, *, errors: bool = False,
             block_size: int = 4096) -> Run:
    """Two rounds of workload, cut, recovery and check.  `errors`: besides, one write
    per round fails with an I/O error (nothing of it lands), and without sync sometimes
    a flush (a checkpoint's) fails.  `block_size` 1: buffered I/O (no alignment, so
    writes start and end inside sectors)."""
    run = Run(sync, mode, random.Random(f"{sync}-{mode}-{seed}-{errors}-{block_size}"))
    dev = FaultDevice(SIZE, rng=run.rng, crash_mode=mode, block_size=block_size)
    pool = Pool.format(dev, segment_size=SEG, clock=run.clock, options=run.options())
    for _round in range(2):
        # A crash point somewhere in this round's I/O, or none: then the power goes
        # between two operations, after the round.
        dev.crash_at_io = dev.io_events + run.rng.randint(1, CRASH_WINDOW)
        if errors:
            dev.fail_write_at = dev.writes + run.rng.randint(1, 200)
            if not sync and run.rng.random() < 0.5:
                dev.fail_flush_at = dev.flush_calls + run.rng.randint(1, 30)
        if not workload(run, pool, dev, OPS_PER_ROUND):
            dev.power_cut(mode, run.rng)
            run.count("cut_between_ops")
        for k, n in dev.cut.items():
            run.count("cut_" + k, n)
        pool, new_dev = open_after_cut(run, dev)
        check(run, pool, flushes_at_cut=dev.flushes)
        dev = new_dev
        dev.crash_mode = mode
    return run


def _total(runs: list[Run]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in runs:
        for k, n in r.stats.items():
            out[k] = out.get(k, 0) + n
    return out


@pytest.mark.parametrize("mode", ["drop_all", "drop_random", "tear", "kill"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_power_cut_keeps_what_the_pool_promised(sync: bool, mode: str) -> None:
    t0 = time.perf_counter()
    runs = [run_seed(sync, mode, seed) for seed in range(SEEDS)]
    tot = _total(runs)
    print(f"sync={sync} mode={mode}: {time.perf_counter() - t0:.2f} s {tot}")
    assert tot.get("acked_put", 0) > SEEDS * 100
    assert tot.get("cut_between_ops", 0) < SEEDS * 2, "crash points never inside a round"
    if mode != "drop_all":
        assert tot.get("replayed", 0) > 0, "recovery never had to replay the log"
    if mode == "tear":
        assert tot.get("cut_torn", 0) > 0
        if not sync:  # with sync only the write in flight can be torn: seldom a record
            assert tot.get("torn_records", 0) > 0
    if not sync and mode in ("drop_all", "drop_random", "tear"):
        # Without sync a power cut does lose acknowledged operations (the promise is
        # only what preceded a flush): the check above is not vacuous.
        assert tot.get("acked_lost", 0) > 0
    if mode != "drop_all":
        assert tot.get("unpromised_kept", 0) > 0, "no cut ever kept an unflushed write"
    if sync or mode == "kill":
        assert tot.get("acked_lost", 0) == 0  # implied by the check: every ack is durable


@pytest.mark.parametrize("mode", ["drop_random", "tear"])
def test_power_cut_with_buffered_io(mode: str) -> None:
    """The same on a device without alignment (buffered I/O: pieces go unbounced)."""
    runs = [run_seed(False, mode, seed, block_size=1) for seed in range(SEEDS // 3)]
    tot = _total(runs)
    assert tot.get("acked_put", 0) > SEEDS // 3 * 100 and tot.get("replayed", 0) > 0


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "nosync"])
def test_io_errors_then_power_cut(sync: bool) -> None:
    """A write (or a checkpoint's flush) fails with an I/O error: the operation fails, the
    pool goes on serving exactly what was acknowledged, and a later cut is as above."""
    t0 = time.perf_counter()
    runs = [run_seed(sync, MODES[seed % len(MODES)], seed, errors=True)
            for seed in range(ERROR_SEEDS)]
    tot = _total(runs)
    print(f"sync={sync} errors: {time.perf_counter() - t0:.2f} s {tot}")
    assert tot.get("io_errors", 0) >= ERROR_SEEDS // 2


# -- the promises of the tiers (what docs/FORMAT.md "Durability" states) -----------------------


@pytest.mark.parametrize("cut", ["kill", "drop_all"])
@pytest.mark.parametrize("ack", ["media", "memory"])
def test_ack_modes_promise(ack: str, cut: str) -> None:
    """The daemon's media pool runs without sync.  `checkpointed`: put, written behind
    (ack = memory) and covered by a checkpoint; `on_media`: put and written behind;
    `acked`: only put.  After a process crash ("kill") everything on the media pool
    survives; after a power cut only what a checkpoint covered."""
    dev = FaultDevice(SIZE)
    media = Pool.format(dev, segment_size=SEG, options=PoolOptions())
    dram = TieredStore.create_dram(HEADER_ZONE + 8 * SEG, SEG, populate=False, tenant=TENANT)
    store = TieredStore({TENANT: dram}, media, ack=ack)
    checkpointed, on_media, acked = KEYS[0], KEYS[1], KEYS[2]
    store.put(TENANT, "s", checkpointed, [value(1, 5000)])
    store.flush_all()
    assert media.checkpoint_concurrently()
    store.put(TENANT, "s", on_media, [value(2, 5000)])
    store.flush_all()
    store.put(TENANT, "s", acked, [value(3, 5000)])  # ack = memory: not written behind
    dev.power_cut(cut, dev.rng)
    dram.close(checkpoint=False)
    pool = Pool.open(dev.reopen(), options=PoolOptions())
    present = {k for k in (checkpointed, on_media, acked) if pool.contains(TENANT, k)}
    want = {checkpointed}
    if cut == "kill":
        want |= {on_media} | ({acked} if ack == "media" else set())
    assert present == want
    for k in present:
        _check_value(Run(False, cut, random.Random(0),
                         values={s: (5000, [5000]) for s in (1, 2, 3)}), k, pool)


# -- the device itself ---------------------------------------------------------------------------


def _buf(data: bytes) -> memoryview:
    b = aligned_buffer(len(data))
    b[:] = data
    return b


def _read_dev(dev: FaultDevice, offset: int, n: int) -> bytes:
    b = aligned_buffer(n)
    dev.readv_into(offset, [b])
    return bytes(b)


def test_faultdev_reads_see_the_cache_and_a_flush_makes_writes_durable() -> None:
    dev = FaultDevice(1 << 16)
    dev.writev(4096, [_buf(b"a" * 4096)])
    assert _read_dev(dev, 4096, 4096) == b"a" * 4096  # served from the cache
    assert dev.image()[4096:8192] == bytes(4096) and len(dev.pending) == 1
    dev.flush()
    dev.writev(8192, [_buf(b"b" * 4096)])
    img = dev.power_cut("drop_all", random.Random(0))
    assert img[4096:8192] == b"a" * 4096 and img[8192:12288] == bytes(4096)
    with pytest.raises(PowerLoss):
        dev.readv_into(0, [aligned_buffer(4096)])
    again = dev.reopen()
    assert _read_dev(again, 4096, 8192) == b"a" * 4096 + bytes(4096)


def test_faultdev_checks_alignment_like_o_direct() -> None:
    dev = FaultDevice(1 << 16)
    with pytest.raises(DeviceError, match="not aligned"):
        dev.writev(512, [_buf(b"x" * 4096)])
    with pytest.raises(DeviceError, match="not aligned"):
        dev.writev(0, [_buf(b"x" * 4097)[1:]])
    with pytest.raises(DeviceError, match="outside"):
        dev.writev(1 << 16, [_buf(b"x" * 4096)])
    FaultDevice(1 << 16, block_size=1).writev(3, [memoryview(b"xyz")])


def test_faultdev_drop_random_keeps_any_subset_in_any_order() -> None:
    seen: set[tuple[bool, ...]] = set()
    for seed in range(64):
        dev = FaultDevice(1 << 16)
        for i in range(3):
            dev.writev(4096 * (i + 1), [_buf(bytes([i + 1]) * 4096)])
        img = dev.power_cut("drop_random", random.Random(seed))
        kept = tuple(img[4096 * (i + 1)] == i + 1 for i in range(3))
        for i in range(3):  # each write whole or not at all
            assert img[4096 * (i + 1):4096 * (i + 2)] == (bytes([i + 1]) if kept[i] else
                                                         b"\0") * 4096
        seen.add(kept)
    assert len(seen) == 8  # later writes kept with earlier ones lost: reordering


def test_faultdev_tear_works_in_whole_sectors() -> None:
    fates: set[str] = set()
    for seed in range(32):
        dev = FaultDevice(b"\x11" * (1 << 16))
        dev.writev(8192, [_buf(b"\xab" * 8192)])
        img = dev.power_cut("tear", random.Random(seed))
        assert img[:8192] == b"\x11" * 8192 and img[16384:] == b"\x11" * (len(img) - 16384)
        for s in range(8192, 16384, SECTOR):
            sec = img[s:s + SECTOR]
            fates.add("new" if sec == b"\xab" * SECTOR else
                      "old" if sec == b"\x11" * SECTOR else "garbage")
            assert b"\xab" * 16 not in sec or sec == b"\xab" * SECTOR  # never mixed
    assert fates == {"new", "old", "garbage"}


def test_faultdev_crash_points_and_injected_errors() -> None:
    dev = FaultDevice(1 << 16, crash_at_io=3, crash_mode="kill", rng=random.Random(1))
    dev.writev(0, [_buf(b"a" * 4096)])
    dev.flush()
    with pytest.raises(PowerLoss):
        dev.writev(4096, [_buf(b"b" * 4096)])  # the third I/O event
    assert dev.dead and dev.image()[:4096] == b"a" * 4096
    with pytest.raises(PowerLoss):
        dev.flush()
    for landed, want in (("none", bytes(4096)), ("all", b"c" * 4096)):
        dev = FaultDevice(1 << 16, fail_write_at=2, fail_landed=landed)
        dev.writev(0, [_buf(b"a" * 4096)])
        with pytest.raises(DeviceError, match="injected"):
            dev.writev(4096, [_buf(b"c" * 4096)])
        assert _read_dev(dev, 4096, 4096) == want
        dev.writev(8192, [_buf(b"d" * 4096)])  # the device goes on
        assert dev.kill()[4096:12288] == want + b"d" * 4096
    dev = FaultDevice(1 << 16, fail_flush_at=1)
    dev.writev(0, [_buf(b"a" * 4096)])
    with pytest.raises(DeviceError, match="injected"):
        dev.flush()
    assert dev.flushes == 0 and len(dev.pending) == 1
    dev.flush()
    assert dev.power_cut("drop_all", random.Random(0))[:4096] == b"a" * 4096


# -- superblock copies ---------------------------------------------------------------------------


def _pool_with_data(sync: bool = False) -> tuple[Pool, FaultDevice, dict[bytes, int]]:
    dev = FaultDevice(SIZE)
    pool = Pool.format(dev, segment_size=SEG, options=PoolOptions(sync=sync))
    seeds = {}
    for i in range(4):
        pool.put(TENANT, "s", KEYS[i], [value(i + 1, 5000)])
        seeds[KEYS[i]] = i + 1
    pool.checkpoint()
    return pool, dev, seeds


def _checkpoint_cut_at(pool: Pool, dev: FaultDevice, offset: int) -> bytearray:
    """Take a checkpoint and cut the power as its superblock write at `offset` is issued
    (that write lost); returns the durable image."""
    dev.crash_mode = "drop_all"
    dev.crash_if = lambda kind, off: kind == "write" and off == offset
    with pytest.raises(PowerLoss):
        pool.checkpoint()
    return bytearray(dev.image())


def _tear_first_sector(img: bytearray, offset: int) -> None:
    img[offset:offset + SECTOR] = random.Random(offset).randbytes(SECTOR)


def _assert_holds(pool: Pool, seeds: dict[bytes, int]) -> None:
    run = Run(False, "", random.Random(0), values={s: (5000, [5000]) for s in seeds.values()})
    for k, s in seeds.items():
        assert _check_value(run, k, pool)[0] == s


@pytest.mark.parametrize("copy", [0, SB_B_OFFSET], ids=["A", "B"])
def test_torn_superblock_write_costs_nothing_when_the_copies_agree(copy: int) -> None:
    pool, dev, seeds = _pool_with_data()
    pool.put(TENANT, "s", KEYS[9], [value(9, 5000)])
    seeds[KEYS[9]] = 9
    img = _checkpoint_cut_at(pool, dev, copy)
    _tear_first_sector(img, copy)
    pool = Pool.open(FaultDevice(bytes(img)), options=PoolOptions())
    assert pool.recovery.superblock_used == ("B" if copy == 0 else "A")
    _assert_holds(pool, seeds)


@pytest.mark.parametrize("stale", ["older", "torn"])
def test_torn_superblock_write_after_a_cut_between_the_copies(stale: str) -> None:
    """A cut between a checkpoint's two superblock copies, then a cut that tears the next
    checkpoint's first superblock write: the pool still opens, with everything durable.
    (It did not: copy A was always written first, and it was the only usable one.  Now the
    copy that does not name the current checkpoint is written first.)"""
    pool, dev, seeds = _pool_with_data()
    img = _checkpoint_cut_at(pool, dev, SB_B_OFFSET)  # A names the new checkpoint, B not
    if stale == "torn":
        _tear_first_sector(img, SB_B_OFFSET)
    dev = FaultDevice(bytes(img))
    pool = Pool.open(dev, options=PoolOptions())
    assert pool.recovery.superblock_used == "A"
    _assert_holds(pool, seeds)
    img = _checkpoint_cut_at(pool, dev, 0)  # the next checkpoint; its write of A tears
    _tear_first_sector(img, 0)
    pool = Pool.open(FaultDevice(bytes(img)), options=PoolOptions())
    _assert_holds(pool, seeds)


# -- a failed put ------------------------------------------------------------------------------


def test_a_failed_put_is_superseded_by_later_acknowledged_operations() -> None:
    """A put that failed may or may not be on the media; whatever came after it wins."""
    pool, dev, seeds = _pool_with_data()
    for i, then in enumerate(("put", "delete")):
        k = KEYS[i]  # a key with a live value
        dev.fail_write_at, dev.fail_landed = dev.writes + 1, "all"
        with pytest.raises(DeviceError):
            pool.put(TENANT, "s", k, [value(100 + i, 5000)])
        assert _check_value(Run(False, "", random.Random(0),
                                values={seeds[k]: (5000, [5000])}), k, pool)[0] == seeds[k]
        if then == "put":
            pool.put(TENANT, "s", k, [value(200, 5000)])
            seeds[k] = 200
        else:
            assert pool.delete(TENANT, k)
            del seeds[k]
    pool = Pool.open(FaultDevice(dev.kill()), options=PoolOptions())
    assert not pool.contains(TENANT, KEYS[1])
    _assert_holds(pool, seeds)


@pytest.mark.parametrize("then", ["delete", "purge"])
@pytest.mark.parametrize("fails", ["write", "flush"])
def test_delete_after_a_failed_put_stays_deleted(fails: str, then: str) -> None:
    """A put whose write failed may still have reached the media whole; a delete (or
    purge) after it writes its tombstone anyway, so a restart does not bring it back."""
    dev = FaultDevice(SIZE)
    pool = Pool.format(dev, segment_size=SEG, options=PoolOptions(sync=fails == "flush"))
    pool.put(TENANT, "s0", KEYS[0], [value(1, 3000)])  # opens the DATA segment
    if fails == "write":
        dev.fail_write_at, dev.fail_landed = dev.writes + 1, "all"  # it landed anyway
    else:
        dev.fail_flush_at = dev.flush_calls + 1
    with pytest.raises(DeviceError, match="injected"):
        pool.put(TENANT, "s1", KEYS[1], [value(2, 3000)])
    assert not pool.contains(TENANT, KEYS[1])
    if then == "delete":
        assert pool.delete(TENANT, KEYS[1]) is False
    else:
        assert pool.purge_session(TENANT, "s1") == 0
    pool = Pool.open(FaultDevice(dev.kill()), options=PoolOptions())  # a process crash
    assert not pool.contains(TENANT, KEYS[1]), "deleted after its failed put, back again"
