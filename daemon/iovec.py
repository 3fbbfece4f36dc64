"""Aligned iovec plans: O_DIRECT I/O between device ranges and arbitrary caller buffers.

O_DIRECT wants every iovec's address and length aligned to the device block.  Caller
buffers (arena slots, numpy arrays) usually are page-aligned, so the bulk of a transfer
goes straight between the device and caller memory; only pieces that are misaligned
(a frame boundary inside a block, a tail shorter than a block, bytes to skip at the
start of a frame-range read) travel through a small bounce buffer.  `bounced` counts the
bytes that were copied, so benchmarks can show the data path stayed zero-copy.

A *piece* is either a memoryview (bytes to transfer) or an int: that many filler bytes
(zeros when writing, discarded when reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.daemon.blockdev import BlockDevice, aligned_buffer, buffer_address

Piece = memoryview | int


@dataclass
class IoPlan:
    """iovecs for one vectored call plus the copies to make through the bounce buffer."""

    iovecs: list[memoryview]
    # (caller buffer, offset in bounce buffer): copy caller->bounce before a write,
    # bounce->caller after a read.
    copies: list[tuple[memoryview, int]] = field(default_factory=list)
    bounce: memoryview | None = None
    bounced: int = 0

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.iovecs)


def build_plan(pieces: Sequence[Piece], align: int) -> IoPlan:
    """Lay `pieces` back to back into iovecs legal for a device of alignment `align`.

    The total length of `pieces` must be a multiple of `align` (callers pad with an int
    piece).  With align == 1 every buffer piece goes direct.
    """
    total = sum(p if isinstance(p, int) else p.nbytes for p in pieces)
    if total % align:
        raise ValueError(f"transfer of {total} bytes is not a multiple of {align}")
    if align == 1:
        iovecs: list[memoryview] = []
        fill: memoryview | None = None
        for p in pieces:
            if isinstance(p, int):
                if p:
                    if fill is None or fill.nbytes < p:
                        fill = aligned_buffer(p)
                    iovecs.append(fill[:p])
            elif p.nbytes:
                iovecs.append(p)
        return IoPlan(iovecs)

    # First pass: decide which byte ranges go direct, to size the bounce buffer.
    direct: list[bool] = []
    pos = 0
    bounce_len = 0
    for p in pieces:
        n = p if isinstance(p, int) else p.nbytes
        ok = (not isinstance(p, int) and pos % align == 0 and n >= align
              and buffer_address(p) % align == 0)
        direct.append(ok)
        if ok:
            bounce_len += n % align
        else:
            bounce_len += n
        pos += n
    # Each bounce run is padded up to alignment at most once per piece boundary.
    bounce = aligned_buffer(bounce_len + align * (len(pieces) + 1)) if bounce_len else None

    plan = IoPlan([], bounce=bounce)
    run_start = -1  # start of the current bounce run inside `bounce`
    bpos = 0  # bytes used in `bounce`

    def close_run() -> None:
        nonlocal run_start
        if run_start >= 0:
            assert bounce is not None
            plan.iovecs.append(bounce[run_start:bpos])
            run_start = -1

    for p, ok in zip(pieces, direct, strict=True):
        if ok:
            assert isinstance(p, memoryview)
            n = p.nbytes - p.nbytes % align
            close_run()
            plan.iovecs.append(p[:n])
            rest: Piece = p[n:]
        else:
            rest = p
        n_rest = rest if isinstance(rest, int) else rest.nbytes
        if n_rest == 0:
            continue
        assert bounce is not None
        if run_start < 0:
            run_start = bpos
        if isinstance(rest, int):
            bounce[bpos:bpos + rest] = b"\0" * rest if rest <= 4096 else bytes(rest)
        else:
            plan.copies.append((rest, bpos))
            plan.bounced += n_rest
        bpos += n_rest
        if (bpos - run_start) % align == 0:
            close_run()
    close_run()
    return plan


def write_pieces(dev: BlockDevice, offset: int, pieces: Sequence[Piece]) -> int:
    """Write `pieces` at `offset`; returns the number of bytes that were bounced."""
    plan = build_plan(pieces, dev.block_size)
    if plan.bounce is not None:
        for src, at in plan.copies:
            plan.bounce[at:at + src.nbytes] = src
    dev.writev(offset, plan.iovecs)
    return plan.bounced


def read_pieces(dev: BlockDevice, offset: int, pieces: Sequence[Piece]) -> int:
    """Read into `pieces` from `offset`; returns the number of bytes that were bounced."""
    plan = build_plan(pieces, dev.block_size)
    dev.readv_into(offset, plan.iovecs)
    if plan.bounce is not None:
        for dst, at in plan.copies:
            dst[:] = plan.bounce[at:at + dst.nbytes]
    return plan.bounced
