"""Aligned iovec plans: any mix of buffers round-trips through an O_DIRECT file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.daemon.blockdev import FileDevice, MemDevice, aligned_buffer, buffer_address
from kvtier.daemon.errors import DeviceError
from kvtier.daemon.iovec import build_plan, read_pieces, write_pieces

B = 4096


def _piece(kind: str, n: int, rng: np.random.Generator) -> memoryview:
    data = rng.integers(0, 256, n + 1, dtype=np.uint8)
    if kind == "aligned":
        buf = aligned_buffer(n)
        buf[:] = data[:n].tobytes()
        return buf
    # misaligned by one byte inside a bytearray
    ba = bytearray(data.tobytes())
    return memoryview(ba)[1:]


pieces_st = st.lists(st.tuples(st.sampled_from(["aligned", "odd"]),
                               st.integers(0, 3 * B + 17)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def filedev(tmp_path_factory: pytest.TempPathFactory) -> FileDevice:
    return FileDevice(str(tmp_path_factory.mktemp("iov") / "dev"), create_size=1 << 20)


@given(spec=pieces_st, lead=st.integers(0, B - 1))
def test_write_then_read_pieces_round_trip(filedev: FileDevice, spec: list[tuple[str, int]],
                                           lead: int) -> None:
    rng = np.random.default_rng(len(spec) * 7919 + lead)
    src = [_piece(k, n, rng) for k, n in spec]
    total = lead + sum(p.nbytes for p in src)
    pad = -total % B
    write_pieces(filedev, 0, [lead, *src, pad] if lead else [*src, pad])
    dst = [_piece(k, p.nbytes, rng) for (k, _), p in zip(spec, src, strict=True)]
    read_pieces(filedev, 0, [lead, *dst, pad] if lead else [*dst, pad])
    for a, b in zip(src, dst, strict=True):
        assert bytes(a) == bytes(b)


def test_aligned_buffers_go_direct() -> None:
    a, b = aligned_buffer(8 * B), aligned_buffer(2 * B + 100)
    plan = build_plan([a, b, B - 100], B)
    assert plan.bounced == 100  # only b's tail crossed the bounce buffer
    assert any(buffer_address(v) == buffer_address(a) for v in plan.iovecs)
    for v in plan.iovecs:
        assert v.nbytes % B == 0 and buffer_address(v) % B == 0


def test_odd_total_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        build_plan([aligned_buffer(100)], B)


def test_filedevice_rejects_misaligned_direct_io(filedev: FileDevice) -> None:
    if not filedev.direct:
        pytest.skip("file system without O_DIRECT")
    with pytest.raises(DeviceError, match="not aligned"):
        filedev.writev(0, [memoryview(bytearray(B + 1))[1:]])
    with pytest.raises(DeviceError, match="not aligned"):
        filedev.writev(100, [aligned_buffer(B)])
    with pytest.raises(DeviceError, match="outside device"):
        filedev.readv_into(filedev.size, [aligned_buffer(B)])


def test_memdevice_round_trip_and_bounds() -> None:
    d = MemDevice(1 << 16)
    d.writev(10, [memoryview(b"hello"), memoryview(b" world")])
    out = bytearray(11)
    d.readv_into(10, [memoryview(out)])
    assert bytes(out) == b"hello world"
    assert bytes(d.view(10, 5)) == b"hello"
    with pytest.raises(DeviceError, match="outside device"):
        d.writev((1 << 16) - 2, [memoryview(b"abc")])
    d.close()


def test_filedevice_bad_paths_and_sizes(tmp_path) -> None:
    with pytest.raises(DeviceError, match="no such file"):
        FileDevice(str(tmp_path / "missing"))
    with pytest.raises(DeviceError, match="parent directory"):
        FileDevice(str(tmp_path / "no" / "dir" / "x"), create_size=1 << 20)
    with pytest.raises(DeviceError, match="not a multiple of the block size"):
        FileDevice(str(tmp_path / "odd"), create_size=(1 << 20) + 1)
    p = tmp_path / "short"
    p.write_bytes(b"x" * 5000)
    with pytest.raises(DeviceError, match="not a multiple of the block size"):
        FileDevice(str(p))
    with pytest.raises(DeviceError, match="not a regular file"):
        FileDevice(str(tmp_path))
