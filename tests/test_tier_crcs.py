"""Frame CRCs cross tiers with the value: a copy between the DRAM tier and the media pool
hands on the CRC32Cs its source record holds (checked by the read, where it checks)
instead of computing them again over the whole payload (item 13 of #22).

CRC passes are counted at `crc32c.crc32c` itself, over frame-sized buffers only (record
headers, segment headers and checkpoints are small), so every pass over a value's bytes
is seen, whichever module makes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from kvtier.client.protocol import Tier
from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.pool import Pool
from kvtier.daemon.tiers import TieredStore

MiB = 1 << 20
FRAME = 100_000
NFRAMES = 3
KEY = bytes(range(16))


def frames() -> list[np.ndarray]:
    return [np.full(FRAME, 7 * i + 1, np.uint8) for i in range(NFRAMES)]


def value() -> bytes:
    return b"".join(f.tobytes() for f in frames())


def store(tmp_path: Path, ack: str) -> tuple[TieredStore, Pool]:
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=64 * MiB),
                        segment_size=4 * MiB)
    return TieredStore(TieredStore.create_drams({"t": 32 * MiB}, 4 * MiB, False), media,
                       ack=ack), media


def count_payload_passes(monkeypatch: Any) -> list[int]:
    """Patch crc32c.crc32c to note every pass over a frame-sized buffer (its length)."""
    passes: list[int] = []
    real = crc32c.crc32c

    def counting(data: Any, *args: Any) -> int:
        n = memoryview(data).nbytes
        if n >= FRAME:
            passes.append(n)
        return int(real(data, *args))

    monkeypatch.setattr(crc32c, "crc32c", counting)
    return passes


def test_a_promotion_on_get_takes_the_crcs_the_media_read_checked(tmp_path: Path,
                                                                  monkeypatch: Any) -> None:
    ts, media = store(tmp_path, "media")
    media.put("t", "s", KEY, frames())  # on the media pool only
    passes = count_payload_passes(monkeypatch)
    out = memoryview(bytearray(NFRAMES * FRAME))
    r, tier = ts.get_into("t", KEY, out)
    assert tier == Tier.POOL and r.nbytes == NFRAMES * FRAME
    assert ts.counters.promotions == 1
    # One pass per frame: the media read's check; the DRAM record reuses its CRCs.
    assert passes == [FRAME] * NFRAMES
    assert list(r.frame_crcs) == [crc32c.crc32c(f) for f in frames()]
    monkeypatch.undo()
    dram = ts.dram("t")
    assert dram.scrub() == []  # the DRAM record's frame table matches its frames
    out2 = memoryview(bytearray(NFRAMES * FRAME))
    assert ts.get_dram_into("t", KEY, out2).nbytes == NFRAMES * FRAME
    assert bytes(out2) == value()


def test_a_prefetch_promotion_takes_the_crcs_the_media_read_checked(tmp_path: Path,
                                                                    monkeypatch: Any) -> None:
    ts, media = store(tmp_path, "media")
    media.put("t", "s", KEY, frames())
    passes = count_payload_passes(monkeypatch)
    assert ts.promote_bytes("t", KEY) == NFRAMES * FRAME
    assert passes == [FRAME] * NFRAMES
    monkeypatch.undo()
    assert ts.dram("t").scrub() == []


def test_write_behind_takes_the_crcs_of_the_dram_record(tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    ts, media = store(tmp_path, "memory")
    passes = count_payload_passes(monkeypatch)
    assert ts.put("t", "s", KEY, frames()) == Tier.DRAM
    assert passes == [FRAME] * NFRAMES  # the DRAM record's CRCs
    ts.flush_all()
    assert ts.counters.writebehind_flushed == 1
    # Written behind with the DRAM record's CRCs: no second pass over the value.
    assert passes == [FRAME] * NFRAMES
    monkeypatch.undo()
    assert media.scrub() == []
    out = memoryview(bytearray(NFRAMES * FRAME))
    assert media.get_into("t", KEY, out).nbytes == NFRAMES * FRAME  # verifies every frame
    assert bytes(out) == value()
