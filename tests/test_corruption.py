"""Corruption on the media is detected with a clear error and never served as data."""

from __future__ import annotations

import hashlib

import pytest

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.errors import CorruptionError
from kvtier.daemon.pool import Pool
from kvtier.daemon.superblock import SB_B_OFFSET

MiB = 1 << 20
KEY = hashlib.sha256(b"victim").digest()[:16]


def _flip(path: str, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def _pool_with_value(path: str) -> tuple[int, bytes]:
    pool = Pool.format(FileDevice(path, create_size=16 * MiB), segment_size=MiB)
    frames = [bytes([i]) * 10_000 for i in range(1, 4)]
    r = pool.put("t", "s", KEY, frames)
    pool.close()
    return r.offset, b"".join(frames)


def test_flipped_payload_bit_is_detected(pool_path: str) -> None:
    off, _ = _pool_with_value(pool_path)
    _flip(pool_path, off + 4096 + 15_000)  # inside frame 1
    pool = Pool.open(FileDevice(pool_path))
    with pytest.raises(CorruptionError, match="checksum mismatch in frame 1"):
        pool.get_into("t", KEY, bytearray(30_000))
    # Frames that are intact are still served on their own.
    out = bytearray(10_000)
    pool.get_into("t", KEY, out, frames=(2, 3))
    assert out == bytes([3]) * 10_000
    with pytest.raises(CorruptionError, match="frame 1"):
        pool.get_into("t", KEY, bytearray(10_000), frames=(1, 2))


def test_flipped_header_bit_is_detected(pool_path: str) -> None:
    off, _ = _pool_with_value(pool_path)
    _flip(pool_path, off + 40)  # the header's expiry field
    pool = Pool.open(FileDevice(pool_path))
    with pytest.raises(CorruptionError, match="header checksum mismatch"):
        pool.get_into("t", KEY, bytearray(30_000))


@pytest.mark.parametrize("copy_offset,survivor", [(0, "B"), (SB_B_OFFSET, "A")])
def test_damaged_superblock_copy_falls_back_to_the_other(pool_path: str, copy_offset: int,
                                                        survivor: str) -> None:
    _, want = _pool_with_value(pool_path)
    _flip(pool_path, copy_offset + 20)
    pool = Pool.open(FileDevice(pool_path))
    assert pool.recovery.superblock_used == survivor
    assert any("superblock checksum mismatch" in w for w in pool.recovery.warnings)
    out = bytearray(len(want))
    pool.get_into("t", KEY, out)
    assert out == want
    pool.close()  # rewrites both copies
    assert Pool.open(FileDevice(pool_path)).recovery.warnings == []


def test_both_superblocks_damaged_is_a_clear_error(pool_path: str) -> None:
    _pool_with_value(pool_path)
    _flip(pool_path, 20)
    _flip(pool_path, SB_B_OFFSET + 20)
    with pytest.raises(CorruptionError, match="both superblock copies are damaged"):
        Pool.open(FileDevice(pool_path))


def test_torn_record_after_checkpoint_is_cut_not_served(pool_path: str) -> None:
    pool = Pool.format(FileDevice(pool_path, create_size=16 * MiB), segment_size=MiB)
    pool.checkpoint()
    r1 = pool.put("t", "s", KEY, [b"a" * 50_000])
    k2 = hashlib.sha256(b"second").digest()[:16]
    pool.put("t", "s", k2, [b"b" * 50_000])
    pool.dev.close()  # crash: no checkpoint covers the two puts
    _flip(pool_path, r1.offset + 4096 + 30_000)  # tear the first record's payload
    pool = Pool.open(FileDevice(pool_path))
    assert pool.recovery.torn_records >= 1
    assert not pool.contains("t", KEY)
    out = bytearray(50_000)
    pool.get_into("t", k2, out)  # the record after the torn one survives
    assert out == b"b" * 50_000


def test_damaged_checkpoint_is_reported(pool_path: str) -> None:
    pool = Pool.format(FileDevice(pool_path, create_size=16 * MiB), segment_size=MiB)
    pool.put("t", "s", KEY, [b"x" * 100])
    pool.close()
    seg = pool.sb.ckpt_segments[0]
    _flip(pool_path, pool.sb.data_offset + seg * MiB + 4096 + 30)
    with pytest.raises(CorruptionError, match="checkpoint checksum mismatch"):
        Pool.open(FileDevice(pool_path))
