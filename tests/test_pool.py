"""The pool through its public API, on a real O_DIRECT file and on NVMe/TCP namespaces.

Tests that take `media_path` run on a file, on a namespace of the test NVMe/TCP target
(tests/nvmf_target.py), and on a namespace of a real SPDK nvmf_tgt when one is present
(KVTIER_SPDK_BIN), the last two through kvtier's own host (`NvmfDevice`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import FakeClock
from nvmf_support import NO_SPDK, SPDK_BIN, InProcessTarget, NvmfPath, SpdkProcess

from kvtier.daemon.blockdev import FileDevice, MemDevice, aligned_buffer
from kvtier.daemon.errors import (
    DeviceError,
    FormatError,
    InvalidArgument,
    NotFound,
    PoolFullError,
    ValueTooLargeError,
    VersionError,
)
from kvtier.daemon.nvmf.device import NvmfDevice
from kvtier.daemon.pool import Pool, PoolOptions

MiB = 1 << 20


def key(i: int, n: int = 16) -> bytes:
    return hashlib.sha256(f"key{i}".encode()).digest()[:n]


def payload(i: int, n: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture(scope="module")
def nvmf_target() -> InProcessTarget:
    return InProcessTarget()


@pytest.fixture(scope="module")
def spdk_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpdkProcess]:
    t = SpdkProcess(str(tmp_path_factory.mktemp("spdk")))
    yield t
    t.close()


@pytest.fixture(params=["file", "nvmf", pytest.param(
    "spdk", marks=pytest.mark.skipif(not SPDK_BIN, reason=NO_SPDK))])
def media_path(request: pytest.FixtureRequest, pool_path: str) -> str:
    if request.param == "file":
        return pool_path
    p = NvmfPath(pool_path)
    p.target = request.getfixturevalue("nvmf_target" if request.param == "nvmf"
                                       else "spdk_target")
    return p


def open_pool(path: str, size: int, seg: int = MiB, clock: FakeClock | None = None,
              **opts: object) -> Pool:
    dev: FileDevice | NvmfDevice
    if isinstance(path, NvmfPath):
        dev = path.target.device(path, size)
    else:
        dev = FileDevice(path, create_size=size)
    kw = {"clock": clock} if clock else {}
    return Pool.format(dev, segment_size=seg, options=PoolOptions(**opts), **kw)  # type: ignore[arg-type]


def reopen(pool: Pool, clock: FakeClock | None = None, **opts: object) -> Pool:
    """Reopen the same file as a crash would leave it: no close, no final checkpoint."""
    kw = {"clock": clock} if clock else {}
    dev = pool.dev
    dev.close()
    if isinstance(dev, NvmfDevice):
        return Pool.open(NvmfDevice(dev.cfg), options=PoolOptions(**opts), **kw)  # type: ignore[arg-type]
    return Pool.open(FileDevice(dev.name), options=PoolOptions(**opts), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [4096, 4096 * 3 + 5, 2 * MiB, 16 * MiB, 64 * MiB])
def test_round_trip_sizes(media_path: str, size: int) -> None:
    pool = open_pool(media_path, 4 * 64 * MiB + 4 * 68 * MiB, seg=68 * MiB)
    val = payload(size, size)
    nframes = 4 if size >= 4 * 4096 else 1
    frames = np.array_split(val, nframes)
    pool.put("t", "s", key(size), frames)
    out = aligned_buffer(size)
    r = pool.get_into("t", key(size), out)
    assert r.nbytes == size and r.frame_lengths == [len(f) for f in frames]
    assert np.array_equal(np.frombuffer(out, np.uint8), val)
    if size >= 2 * MiB:
        assert r.bounced <= 4096  # payload went straight into the caller's buffer
    pool.close()


def test_frame_range_reads_read_only_those_bytes(media_path: str) -> None:
    pool = open_pool(media_path, 32 * MiB)
    frames = [payload(i, 4096 * (i + 1) + (i * 37)) for i in range(6)]
    pool.put("t", "s", key(1), frames)
    for a, b in [(0, 1), (2, 4), (5, 6), (0, 6), (3, 3)]:
        want = np.concatenate(frames[a:b]) if b > a else np.zeros(0, np.uint8)
        out = bytearray(len(want) + 10)
        before = pool.counters.bytes_read
        r = pool.get_into("t", key(1), out, frames=(a, b))
        assert r.nbytes == len(want) and bytes(out[: r.nbytes]) == want.tobytes()
        assert pool.counters.bytes_read - before == len(want)
    with pytest.raises(InvalidArgument, match=r"frame range \[4, 9\)"):
        pool.get_into("t", key(1), bytearray(10), frames=(4, 9))
    pool.close()


def test_prefix_lookup_and_tenant_namespaces(media_path: str) -> None:
    pool = open_pool(media_path, 32 * MiB)
    chain = [key(i) for i in range(40)]
    for k in chain[:25]:
        pool.put("alice", "s", k, [b"x" * 100])
    pool.put("alice", "s", chain[30], [b"y"])  # a hole after the prefix
    assert pool.lookup_prefix("alice", chain) == 25
    assert pool.lookup_prefix("bob", chain) == 0
    assert pool.lookup_prefix("alice", []) == 0
    assert not pool.contains("bob", chain[0])
    with pytest.raises(NotFound):
        pool.get_into("bob", chain[0], bytearray(100))
    pool.delete("alice", chain[10])
    assert pool.lookup_prefix("alice", chain) == 10
    pool.close()


def test_expiry_is_never_served_and_segments_die_whole(media_path: str,
                                                        clock: FakeClock) -> None:
    pool = open_pool(media_path, 64 * MiB, clock=clock, expiry_bucket_s=60)
    for i in range(60):
        pool.put("t", "s", key(i), [payload(i, 100_000)], ttl_s=30 if i % 2 else 600)
    clock.advance(31)
    for i in range(60):
        assert pool.contains("t", key(i)) == (i % 2 == 0)
    with pytest.raises(NotFound):
        pool.get_into("t", key(1), bytearray(100_000))
    pool = reopen(pool, clock)  # an expired record is not resurrected by recovery
    assert not pool.contains("t", key(1)) and pool.contains("t", key(0))
    clock.advance(600)
    freed_before = pool.counters.freed_segments
    assert pool.sweep() == 30
    assert pool.counters.freed_segments > freed_before
    assert pool.counters.clean_bytes == 0  # freed whole, nothing copied
    assert pool.index.count == 0
    pool.close()


def test_deletes_and_purges_survive_restart(media_path: str) -> None:
    pool = open_pool(media_path, 64 * MiB)
    for i in range(30):
        pool.put("a", f"s{i % 3}", key(i), [payload(i, 5000)])
        pool.put("b", "s0", key(i), [payload(i + 100, 5000)])
    assert pool.delete("a", key(0)) and not pool.delete("a", key(0))
    assert pool.purge_session("a", "s1") == 10
    assert pool.purge_tenant("b") == 30
    assert pool.purge_session("a", "nope") == 0
    pool = reopen(pool)
    for i in range(30):
        alive = i != 0 and i % 3 != 1
        assert pool.contains("a", key(i)) == alive, i
        assert not pool.contains("b", key(i))
    out = bytearray(5000)
    pool.get_into("a", key(2), out)
    assert out == payload(2, 5000).tobytes()
    # ...and a second restart (from the checkpoint recovery wrote) agrees.
    pool = reopen(pool)
    assert pool.index.count == 19
    pool.close()


def test_overwrite_replaces_value_and_frees_old_space(media_path: str) -> None:
    pool = open_pool(media_path, 32 * MiB)
    pool.put("t", "s", key(1), [b"a" * 10000])
    r = pool.put("t", "s", key(1), [b"b" * 20000])
    assert r.replaced
    out = bytearray(20000)
    pool.get_into("t", key(1), out)
    assert out == b"b" * 20000
    assert (pool.live == pool.segment_live_blocks()).all()
    assert pool.index.count == 1
    pool = reopen(pool)
    pool.get_into("t", key(1), out)
    assert out == b"b" * 20000
    pool.close()


def test_cleaning_moves_live_records_and_counts_write_amplification(media_path: str) -> None:
    pool = open_pool(media_path, 32 * MiB, seg=MiB)
    for i in range(200):
        pool.put("t", "s", key(i), [payload(i, 60_000)])
    for i in range(200):
        if i % 4:
            pool.delete("t", key(i))
    assert pool.clean(max_segments=100) > 0
    assert pool.counters.clean_bytes > 0
    assert pool.counters.write_amplification > 1.0
    assert (pool.live == pool.segment_live_blocks()).all()
    pool = reopen(pool)
    for i in range(0, 200, 4):
        out = bytearray(60_000)
        pool.get_into("t", key(i), out)
        assert out == payload(i, 60_000).tobytes()
    assert pool.index.count == 50
    pool.close()


def test_full_pool_evicts_least_recently_used(media_path: str, clock: FakeClock) -> None:
    pool = open_pool(media_path, 12 * MiB, seg=MiB, clock=clock)
    # Fill well past capacity; keep touching key(0) so it stays hot.
    for i in range(400):
        clock.advance(1)
        pool.put("t", "s", key(i), [payload(i, 100_000)])
        pool.get_into("t", key(0), bytearray(100_000))
    assert pool.counters.evicted_entries > 0
    assert pool.contains("t", key(0))  # hot key survived
    assert pool.contains("t", key(399))  # newest survived
    # LRU works per segment: key(0)'s neighbours share its fate; a cold segment goes.
    assert not pool.contains("t", key(30))
    pool.close()


def test_bad_input_errors_name_the_problem(media_path: str, tmp_path) -> None:
    pool = open_pool(media_path, 16 * MiB, seg=MiB)
    with pytest.raises(InvalidArgument, match="16 or 32 bytes"):
        pool.put("t", "s", b"short", [b"x"])
    with pytest.raises(InvalidArgument, match="at least one frame"):
        pool.put("t", "s", key(1), [])
    with pytest.raises(InvalidArgument, match="tenant name"):
        pool.put("", "s", key(1), [b"x"])
    with pytest.raises(InvalidArgument, match="ttl must be positive"):
        pool.put("t", "s", key(1), [b"x"], ttl_s=-1)
    with pytest.raises(ValueTooLargeError, match="does not fit in a segment"):
        pool.put("t", "s", key(1), [bytes(2 * MiB)])
    pool.put("t", "s", key(1), [b"x" * 9000])
    with pytest.raises(InvalidArgument, match="too small"):
        pool.get_into("t", key(1), bytearray(10))
    with pytest.raises(InvalidArgument, match="read-only"):
        pool.get_into("t", key(1), b"\0" * 9000)
    pool.close()
    with pytest.raises(InvalidArgument, match="at least 4"):
        Pool.format(FileDevice(str(tmp_path / "tiny"), create_size=2 * MiB), segment_size=MiB)
    with pytest.raises(InvalidArgument, match="segment size"):
        Pool.format(FileDevice(str(tmp_path / "s"), create_size=8 * MiB), segment_size=5000)
    with pytest.raises(FormatError, match="not a kvtier pool"):
        Pool.open(FileDevice(str(tmp_path / "blank"), create_size=8 * MiB))
    with pytest.raises(DeviceError, match="no such file"):
        Pool.open(FileDevice(str(tmp_path / "missing")))


def test_pool_of_another_format_version_is_refused(pool_path: str) -> None:
    pool = open_pool(pool_path, 16 * MiB)
    pool.close()
    with open(pool_path, "r+b") as f:
        for off in (0, 512 * 1024):
            f.seek(off + 8)
            f.write((7).to_bytes(2, "little"))
    with pytest.raises(VersionError, match="version 7"):
        Pool.open(FileDevice(pool_path))


def test_truncated_device_is_refused(pool_path: str) -> None:
    pool = open_pool(pool_path, 16 * MiB)
    pool.close()
    os.truncate(pool_path, 8 * MiB)
    with pytest.raises(FormatError, match="formatted for"):
        Pool.open(FileDevice(pool_path))


def test_full_pool_evicts_or_refuses_loudly() -> None:
    pool = Pool.format(MemDevice(8 * MiB), segment_size=MiB)
    for i in range(100):
        pool.put("t", "s", key(i), [payload(i, 900_000)])
    assert pool.counters.evicted_entries > 0
    for i in range(100):  # what is still there reads back exact
        if pool.contains("t", key(i)):
            out = bytearray(900_000)
            pool.get_into("t", key(i), out)
            assert out == payload(i, 900_000).tobytes()
    strict = Pool.format(MemDevice(8 * MiB), segment_size=MiB, options=PoolOptions(evict=False))
    with pytest.raises(PoolFullError, match=r"pool full .*eviction is off"):
        for i in range(100):
            strict.put("t", "s", key(i), [payload(i, 900_000)])
    assert strict.counters.evicted_entries == 0
    assert all(strict.contains("t", key(j)) for j in range(i))


def test_memdevice_pool_works_the_same() -> None:
    pool = Pool.format(MemDevice(16 * MiB), segment_size=MiB)
    pool.put("t", "s", key(1, 32), [b"abc", b"defg"])
    out = bytearray(7)
    assert pool.get_into("t", key(1, 32), out).frame_lengths == [3, 4]
    assert out == b"abcdefg"
    assert pool.stat("t", key(1, 32)).nframes == 2
    assert [e.session for e in pool.entries("t")] == ["s"]
