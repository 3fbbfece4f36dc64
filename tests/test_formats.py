"""Round trips and corruption detection for every on-disk structure (docs/FORMAT.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon import record
from kvtier.daemon.blockdev import aligned_buffer
from kvtier.daemon.errors import CorruptionError, FormatError, StoreError, VersionError
from kvtier.daemon.index import ROW
from kvtier.daemon.record import Kind, RecordHeader
from kvtier.daemon.segment import SegKind, SegmentHeader, decode_segment_header
from kvtier.daemon.superblock import SB_SIZE, Superblock, decode_superblock

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                max_size=40).filter(lambda s: 0 < len(s.encode()) <= 255)
headers = st.builds(
    RecordHeader,
    kind=st.sampled_from(list(Kind)),
    lsn=st.integers(0, 2**64 - 1), epoch=st.integers(0, 2**64 - 1),
    created_us=st.integers(0, 2**63), expiry_us=st.integers(0, 2**63),
    key=st.sampled_from([16, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    tenant=names, session=names, key_generation=st.integers(0, 2**32 - 1),
).flatmap(lambda h: st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**32 - 1)),
                             max_size=50).map(lambda fr: _with_frames(h, fr)))


def _with_frames(h: RecordHeader, fr: list[tuple[int, int]]) -> RecordHeader:
    h.frame_lengths = [a for a, _ in fr]
    h.frame_crcs = [b for _, b in fr]
    return h


@given(h=headers)
def test_record_header_round_trip(h: RecordHeader) -> None:
    buf = aligned_buffer(record.header_blocks(h.nframes, h.tenant, h.session, 4096) * 4096)
    n = record.encode_into(h, buf)
    assert n == record.header_len(h.nframes, h.tenant, h.session)
    back = record.decode(buf, where="t")
    assert back == h


@given(h=headers, data=st.data())
def test_record_header_any_bit_flip_is_detected(h: RecordHeader, data: st.DataObject) -> None:
    buf = aligned_buffer(record.header_blocks(h.nframes, h.tenant, h.session, 4096) * 4096)
    n = record.encode_into(h, buf)
    bit = data.draw(st.integers(0, n * 8 - 1))
    buf[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(StoreError):
        record.decode(buf, where="t")


def test_record_header_from_future_version_is_named() -> None:
    h = RecordHeader(Kind.PUT, 1, 1, 0, 0, b"k" * 16, "t", "s")
    buf = aligned_buffer(4096)
    record.encode_into(h, buf)
    buf[4] = 9
    with pytest.raises(VersionError, match="version 9"):
        record.decode(buf, where="t")


@given(gen=st.integers(0, 2**63), segs=st.lists(st.integers(0, 2**32 - 1), max_size=64),
       lsn=st.integers(0, 2**63))
def test_superblock_round_trip_and_bit_flips(gen: int, segs: list[int], lsn: int) -> None:
    sb = Superblock(4096, 1 << 30, 1 << 26, 15, 1 << 20, b"u" * 16, 123, gen, lsn, 99, 7,
                    segs)
    buf = aligned_buffer(SB_SIZE)
    sb.encode_into(buf)
    assert decode_superblock(buf, where="t") == sb
    for bit in (0, 70, 8 * 100, 8 * SB_SIZE - 1):
        b2 = aligned_buffer(SB_SIZE)
        b2[:] = buf
        b2[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(StoreError):
            decode_superblock(b2, where="t")


def test_superblock_errors_name_the_problem() -> None:
    buf = aligned_buffer(SB_SIZE)
    with pytest.raises(FormatError, match="no kvtier superblock"):
        decode_superblock(buf, where="dev")
    Superblock(4096, 1 << 30, 1 << 26, 15, 1 << 20, b"u" * 16, 1).encode_into(buf)
    buf[8] = 2
    with pytest.raises(VersionError, match="version 2"):
        decode_superblock(buf, where="dev")


def test_segment_header_round_trip_and_corruption() -> None:
    h = SegmentHeader(SegKind.META, b"p" * 16, 42, 1000, 0xFFFFFFFF, 7)
    buf = aligned_buffer(4096)
    h.encode_into(buf)
    assert decode_segment_header(buf, where="s") == h
    buf[30] ^= 4
    with pytest.raises(CorruptionError):
        decode_segment_header(buf, where="s")
    assert decode_segment_header(aligned_buffer(4096), where="s") is None


@given(n=st.integers(0, 200), tenants=st.lists(names, max_size=5))
def test_checkpoint_round_trip(n: int, tenants: list[str]) -> None:
    rng = np.random.default_rng(n)
    rows = np.zeros(n, dtype=ROW)
    rows["k0"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    rows["blocks"] = rng.integers(1, 100, n)
    segs = np.zeros(9, dtype=ckpt.SEG_TABLE)
    segs["epoch"] = np.arange(9)
    state = ckpt.CheckpointState(77, 5, tenants, ["s1", "s2"], rows, segs, {"a": 1})
    data = ckpt.encode(state)
    back = ckpt.decode(memoryview(data), where="c")
    assert back.next_lsn == 77 and back.tenants == tenants and back.extra == {"a": 1}
    assert back.rows.tobytes() == rows.tobytes() and back.segments.tobytes() == segs.tobytes()
    with pytest.raises(CorruptionError):
        ckpt.decode(memoryview(data)[: len(data) - 1 - n * 52], where="c")
