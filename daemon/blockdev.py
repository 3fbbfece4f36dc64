"""Block devices: the media a pool lives on.

A `BlockDevice` moves bytes between device offsets and caller-provided buffers with
vectored I/O (`readv_into`, `writev`).  Two backends live here:

* `FileDevice` -- a regular file or a block device, opened with O_DIRECT.  Offsets,
  lengths and buffer addresses must be aligned to `block_size`; `iovec.py` builds
  aligned iovec lists from arbitrary caller buffers (bouncing only the misaligned
  edges).
* `MemDevice` -- a memfd mapped into this process: the DRAM tier's backing store.  It has
  no alignment rule; reads are one memcpy into the caller's buffer.

No method returns payload `bytes`: reads land in memory the caller owns.

What a device can do beyond moving bytes is said, not probed: `caps` (a `DeviceCaps`) gives
the pool block size a pool on it uses and whether `view` hands out the device's memory
itself (memfd pools: reads without a copy, MAP); `health()` is the device's state and
counters where it has any to report (an NVMe-oF namespace), None where it has none.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kvtier.daemon.errors import DeviceError

IOV_MAX = 1024
_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268


def buffer_address(buf: memoryview) -> int:
    """Address of the first byte of a (contiguous) buffer, read-only buffers included."""
    if buf.nbytes == 0:
        return 0
    arr = np.frombuffer(buf, dtype=np.uint8)
    return int(arr.ctypes.data)


def aligned_buffer(nbytes: int) -> memoryview:
    """A zeroed, page-aligned, writable buffer (anonymous mmap) of at least 1 byte."""
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(m)[:nbytes]


def as_bytes_view(buf: object) -> memoryview:
    """View any contiguous buffer as flat unsigned bytes (no copy)."""
    mv = memoryview(buf)  # type: ignore[arg-type]
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


@dataclass(frozen=True, slots=True)
class DeviceCaps:
    """What a device offers a pool beyond vectored I/O."""

    pool_block_size: int = 4096  # the pool block size `Pool.format` uses on it
    memory_view: bool = False  # `view()` returns the device's own memory (no copy)


class BlockDevice(Protocol):
    """What a pool needs from its media."""

    @property
    def size(self) -> int: ...

    @property
    def caps(self) -> DeviceCaps: ...

    @property
    def block_size(self) -> int:
        """Alignment of offsets, lengths and buffer addresses for I/O (1 = none)."""
        ...

    @property
    def name(self) -> str: ...

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill `bufs` in order from `offset`; short reads are errors."""
        ...

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Write `bufs` back to back at `offset`; returns when the write completed."""
        ...

    def flush(self) -> None:
        """Make completed writes durable against power loss."""
        ...

    def view(self, offset: int, length: int) -> memoryview:
        """The device's memory at [offset, offset + length), where `caps.memory_view`;
        other devices raise DeviceError."""
        ...

    def health(self) -> dict[str, Any] | None:
        """State and counters of the device, or None if it has none to report."""
        ...

    def close(self) -> None: ...


def no_memory_view(dev: BlockDevice) -> DeviceError:
    """The error `view()` raises on a device without `caps.memory_view`."""
    return DeviceError(f"{dev.name}: not a memory-backed device (no view)")


def _check_range(dev: BlockDevice, offset: int, length: int) -> None:
    if offset < 0 or offset + length > dev.size:
        raise DeviceError(
            f"{dev.name}: I/O range [{offset}, {offset + length}) outside device of "
            f"{dev.size} bytes"
        )


class FileDevice:
    """A file or block device opened with O_DIRECT (`direct=True`) or buffered.

    With `direct="auto"` O_DIRECT is used where the file system supports it (tmpfs, for
    one, does not) and buffered I/O with `fdatasync` otherwise; `self.direct` says which.
    """

    def __init__(self, path: str, *, direct: bool | str = "auto", block_size: int = 4096,
                 create_size: int | None = None) -> None:
        self._path = path
        if block_size <= 0 or block_size & (block_size - 1) or block_size < 512:
            raise DeviceError(f"{path}: block size {block_size} is not a power of two >= 512")
        exists = os.path.exists(path)
        if os.path.isdir(path):
            raise DeviceError(f"{path}: is a directory, not a regular file or block device")
        if not exists and create_size is None:
            raise DeviceError(f"{path}: no such file or device")
        if not exists:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise DeviceError(f"{path}: parent directory {parent} does not exist")
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if exists else os.O_CREAT)
        want_direct = direct is True or direct == "auto"
        fd = -1
        self.direct = False
        if want_direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL or direct is True:
                    raise DeviceError(f"{path}: cannot open with O_DIRECT: {e.strerror}") from e
        if fd < 0:
            try:
                fd = os.open(path, flags, 0o600)
            except OSError as e:
                raise DeviceError(f"{path}: cannot open: {e.strerror}") from e
        self._fd = fd
        try:
            st = os.fstat(fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if not self.is_block_device and not stat.S_ISREG(st.st_mode):
                raise DeviceError(f"{path}: not a regular file or block device")
            if self.is_block_device:
                buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
                self._size: int = int(struct.unpack("<Q", buf)[0])
                lbs = struct.unpack("<i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
                if block_size % lbs:
                    raise DeviceError(
                        f"{path}: block size {block_size} is not a multiple of the device's "
                        f"logical block size {lbs}")
            else:
                if create_size is not None and st.st_size == 0:
                    if create_size % block_size:
                        raise DeviceError(
                            f"{path}: size {create_size} is not a multiple of the block size "
                            f"{block_size}")
                    try:
                        os.posix_fallocate(fd, 0, create_size)
                    except OSError as e:
                        raise DeviceError(
                            f"{path}: cannot allocate {create_size} bytes: {e.strerror}") from e
                    st = os.fstat(fd)
                self._size = int(st.st_size)
            if self._size % block_size:
                raise DeviceError(
                    f"{path}: size {self._size} is not a multiple of the block size {block_size}")
        except BaseException:
            os.close(fd)
            raise
        self._block_size = block_size if self.direct else 1
        self.pool_block_size = block_size
        self._caps = DeviceCaps(pool_block_size=block_size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def name(self) -> str:
        return self._path

    @property
    def fd(self) -> int:
        return self._fd

    def _check_aligned(self, offset: int, bufs: Sequence[memoryview]) -> None:
        a = self._block_size
        if a == 1:
            return
        if offset % a:
            raise DeviceError(f"{self._path}: offset {offset} not aligned to {a}")
        for b in bufs:
            if b.nbytes % a or buffer_address(b) % a:
                raise DeviceError(
                    f"{self._path}: O_DIRECT buffer of {b.nbytes} bytes at "
                    f"{buffer_address(b):#x} not aligned to {a}")

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in bufs)
        _check_range(self, offset, total)
        self._check_aligned(offset, bufs)
        pending = [b for b in bufs if b.nbytes]
        while pending:
            batch = pending[:IOV_MAX]
            want = sum(b.nbytes for b in batch)
            try:
                got = os.preadv(self._fd, batch, offset)
            except OSError as e:
                raise DeviceError(f"{self._path}: read at {offset}: {e.strerror}") from e
            if got <= 0:
                raise DeviceError(f"{self._path}: short read at {offset} ({got} of {want})")
            offset += got
            pending = _advance(pending, got)

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in bufs)
        _check_range(self, offset, total)
        self._check_aligned(offset, bufs)
        pending = [b for b in bufs if b.nbytes]
        while pending:
            batch = pending[:IOV_MAX]
            try:
                got = os.pwritev(self._fd, batch, offset)
            except OSError as e:
                raise DeviceError(f"{self._path}: write at {offset}: {e.strerror}") from e
            if got <= 0:
                raise DeviceError(f"{self._path}: short write at {offset}")
            offset += got
            pending = _advance(pending, got)

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise DeviceError(f"{self._path}: fdatasync: {e.strerror}") from e

    def view(self, offset: int, length: int) -> memoryview:
        raise no_memory_view(self)

    def health(self) -> dict[str, Any] | None:
        return None

    def drop_cache(self) -> None:
        """Ask the kernel to drop cached pages of this file (buffered mode)."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes from a list of buffers (after a partial transfer)."""
    out: list[memoryview] = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


class MemDevice:
    """A memfd mapped into this process: DRAM that can later be shared by fd."""

    def __init__(self, size: int, *, name: str = "kvtier-dram", block_size: int = 4096,
                 populate: bool = False) -> None:
        """`populate` faults every page in now (MAP_POPULATE): a first write to a fresh
        memfd page costs a page fault, which caps first-touch copies near 1 GB/s."""
        if size <= 0 or size % block_size:
            raise DeviceError(f"{name}: size {size} is not a positive multiple of {block_size}")
        self._name = name
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0x8000) if populate else 0)
            self._map = mmap.mmap(self._fd, size, flags=flags)
        except OSError as e:
            os.close(self._fd)
            raise DeviceError(f"{name}: cannot create memfd of {size} bytes: {e.strerror}") from e
        self._mv = memoryview(self._map)
        self._size = size
        self.pool_block_size = block_size
        self._caps = DeviceCaps(pool_block_size=block_size, memory_view=True)

    @property
    def size(self) -> int:
        return self._size

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

    @property
    def block_size(self) -> int:
        return 1

    @property
    def name(self) -> str:
        return f"memfd:{self._name}"

    @property
    def fd(self) -> int:
        return self._fd

    def view(self, offset: int, length: int) -> memoryview:
        """Direct view of device memory (the DRAM tier serves reads from here)."""
        _check_range(self, offset, length)
        return self._mv[offset:offset + length]

    # numpy copies release the GIL for large buffers (a memoryview assignment does not).

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        _check_range(self, offset, sum(b.nbytes for b in bufs))
        for b in bufs:
            n = b.nbytes
            if n:
                np.copyto(np.frombuffer(b, np.uint8),
                          np.frombuffer(self._mv, np.uint8, n, offset))
            offset += n

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        _check_range(self, offset, sum(b.nbytes for b in bufs))
        dev = np.frombuffer(self._mv, np.uint8)
        for b in bufs:
            n = b.nbytes
            if n:
                np.copyto(dev[offset:offset + n], np.frombuffer(b, np.uint8))
            offset += n

    def flush(self) -> None:
        return None

    def health(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        if self._fd >= 0:
            self._mv.release()
            self._map.close()
            os.close(self._fd)
            self._fd = -1
