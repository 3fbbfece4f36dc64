"""A fault-injecting block device for crash tests (after LevelDB's fault-injection env).

`FaultDevice` is an in-memory `BlockDevice` that models a disk with a volatile write
cache:

* every completed `writev` lands in the cache: it is kept, in issue order, as one entry
  (offset, bytes) per call in `pending`, and reads see it at once (as a real disk serves
  reads from its cache);
* `flush()` makes everything written before it durable (it empties `pending`);
* `power_cut(mode, rng)` is the power going out: what is in the cache is lost, kept or
  torn according to `mode`, and what remains is the *durable image* (`image()`), the
  only thing a new device -- recovery -- sees:

  - "drop_all": every write since the last flush is lost;
  - "drop_random": each write since the last flush is independently kept or lost (the
    cache wrote its entries back in any order: reordering), with one keep probability
    drawn per cut, so some cuts keep almost everything and some almost nothing;
  - "tear": like "drop_random", and besides some writes land in part, at 512-byte sector
    granularity: each sector of a torn write holds the new bytes, the old ones, or
    garbage (the sector that was being written when the power went);
  - "kill": not a power cut but the process dying (SIGKILL): every write that returned
    stays (the device, or the kernel's page cache, has it and keeps it); only a write in
    flight at that moment (see `crash_at_io`) may land in part.

Crash points: with `crash_at_io = N` the N-th I/O event (a write or a flush, counted from
1, `io_events`) cuts the power itself, in `crash_mode` with `rng`: a write is first
issued (it joins the cache, so it may land, or land in part), a flush never takes effect;
then `PowerLoss` is raised, which no pool code catches, so the operation in flight stops
there as if the process had died with the power.  After a cut the device refuses all I/O
(`PowerLoss`); `reopen()` is a fresh device over the durable image.

I/O errors: with `fail_write_at = N` the N-th write (`writes`, counted from 1) raises
`DeviceError`; `fail_landed` says what reached the cache nonetheless: "none" (the device
refused it), "torn" (some sectors) or "all" (it completed, but the error came back
anyway: an NVMe-oF command whose answer timed out).  `fail_flush_at = N` fails the N-th
flush: nothing becomes durable by it (the cache keeps what it had).  `crash_if(kind,
offset)` is a crash point by content: called for every write ("write", its offset) and
flush ("flush", -1), it cuts the power when it returns True.

`may_tear(image, write)`, if given, is asked at a cut before a write is torn; False makes
that write land whole or not at all (a test excludes a case it checks elsewhere).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvtier.daemon.blockdev import DeviceCaps, buffer_address, no_memory_view
from kvtier.daemon.errors import DeviceError

SECTOR = 512
MODES = ("drop_all", "drop_random", "tear", "kill")


class PowerLoss(Exception):
    """The power went out at a crash point: the process is gone with it.

    Deliberately not a StoreError: nothing in the pool catches it, so the operation that
    was running stops where the device stopped."""


@dataclass(slots=True)
class PendingWrite:
    offset: int
    data: bytes


class FaultDevice:
    """An in-memory block device with a volatile write cache (see the module docstring).

    `image` is the initial durable content (bytes) or a size (zeroed).  `block_size` is
    the I/O alignment enforced like `FileDevice` with O_DIRECT enforces it (offsets,
    lengths and buffer addresses; 1 models buffered I/O), `pool_block_size` the pool block
    size `Pool.format` uses.
    """

    def __init__(self, image: bytes | bytearray | int, *, block_size: int = 4096,
                 pool_block_size: int = 4096, name: str = "faultdev",
                 crash_at_io: int | None = None, crash_mode: str = "drop_all",
                 rng: random.Random | None = None, fail_write_at: int | None = None,
                 fail_landed: str = "none", fail_flush_at: int | None = None,
                 crash_if: Callable[[str, int], bool] | None = None,
                 may_tear: Callable[[bytearray, PendingWrite], bool] | None = None) -> None:
        if isinstance(image, int):
            self._durable = bytearray(image)
        else:
            self._durable = bytearray(image)
        if len(self._durable) % pool_block_size:
            raise ValueError(f"size {len(self._durable)} is not a multiple of "
                             f"{pool_block_size}")
        if crash_mode not in MODES:
            raise ValueError(f"crash mode {crash_mode!r} not one of {MODES}")
        if fail_landed not in ("none", "torn", "all"):
            raise ValueError(f"fail_landed {fail_landed!r}: none, torn or all")
        self._live = bytearray(self._durable)  # durable image + the cache: what reads see
        self._mv = memoryview(self._live)
        self.pending: list[PendingWrite] = []
        self._block_size = block_size
        self.pool_block_size = pool_block_size
        self._caps = DeviceCaps(pool_block_size=pool_block_size)
        self._name = name
        self.crash_at_io = crash_at_io
        self.crash_mode = crash_mode
        self.rng = rng or random.Random(0)
        self.fail_write_at = fail_write_at
        self.fail_landed = fail_landed
        self.fail_flush_at = fail_flush_at
        self.crash_if = crash_if
        self.may_tear = may_tear
        self.writes = 0  # writev calls (failed ones included)
        self.flushes = 0  # flushes that completed (each made everything before it durable)
        self.flush_calls = 0
        self.io_events = 0  # writes + flush calls: the clock of `crash_at_io`
        self.bytes_written = 0
        self.dead = False
        self.cut: dict[str, int] = {}  # what the last cut did: kept / dropped / torn writes

    # -- BlockDevice -----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._durable)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

    @property
    def name(self) -> str:
        return self._name

    def _check(self, offset: int, bufs: Sequence[memoryview]) -> int:
        if self.dead:
            raise PowerLoss(f"{self._name}: the power is out")
        total = sum(b.nbytes for b in bufs)
        if offset < 0 or offset + total > self.size:
            raise DeviceError(f"{self._name}: I/O range [{offset}, {offset + total}) outside "
                              f"device of {self.size} bytes")
        a = self._block_size
        if a > 1:
            if offset % a:
                raise DeviceError(f"{self._name}: offset {offset} not aligned to {a}")
            for b in bufs:
                if b.nbytes % a or buffer_address(b) % a:
                    raise DeviceError(f"{self._name}: buffer of {b.nbytes} bytes at "
                                      f"{buffer_address(b):#x} not aligned to {a}")
        return total

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        self._check(offset, bufs)
        for b in bufs:
            n = b.nbytes
            if n:
                b.cast("B")[:] = self._mv[offset:offset + n]
            offset += n

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = self._check(offset, bufs)
        self.writes += 1
        self.io_events += 1
        data = b"".join(bytes(b) for b in bufs)
        if self.fail_write_at is not None and self.writes == self.fail_write_at:
            if self.fail_landed == "all":
                self._cache(offset, data)
            elif self.fail_landed == "torn":
                self._tear_into_live(offset, data)
            raise DeviceError(f"{self._name}: write at {offset}: injected I/O error "
                              f"(write {self.writes}, {total} bytes, landed: "
                              f"{self.fail_landed})")
        self._cache(offset, data)
        if (self.crash_at_io is not None and self.io_events == self.crash_at_io) or \
                (self.crash_if is not None and self.crash_if("write", offset)):
            # The write was issued and the power went: it is the write in flight.
            self.power_cut(self.crash_mode, self.rng, in_flight=True)
            raise PowerLoss(f"{self._name}: power cut during write {self.writes} at {offset}")

    def flush(self) -> None:
        if self.dead:
            raise PowerLoss(f"{self._name}: the power is out")
        self.flush_calls += 1
        self.io_events += 1
        if (self.crash_at_io is not None and self.io_events == self.crash_at_io) or \
                (self.crash_if is not None and self.crash_if("flush", -1)):
            self.power_cut(self.crash_mode, self.rng)
            raise PowerLoss(f"{self._name}: power cut during flush {self.flush_calls}")
        if self.fail_flush_at is not None and self.flush_calls == self.fail_flush_at:
            raise DeviceError(f"{self._name}: flush: injected I/O error "
                              f"(flush {self.flush_calls})")
        for w in self.pending:
            self._durable[w.offset:w.offset + len(w.data)] = w.data
        self.pending.clear()
        self.flushes += 1

    def view(self, offset: int, length: int) -> memoryview:
        raise no_memory_view(self)

    def health(self) -> dict[str, object] | None:
        return None

    def close(self) -> None:
        return None

    # -- the cache -------------------------------------------------------------------------

    def _cache(self, offset: int, data: bytes) -> None:
        self._live[offset:offset + len(data)] = data
        self.pending.append(PendingWrite(offset, data))
        self.bytes_written += len(data)

    def _tear_into_live(self, offset: int, data: bytes) -> None:
        """A failed write that reached the media in part: some of its sectors."""
        img = bytearray(self._live)
        self._tear(img, PendingWrite(offset, data), self.rng)
        a, b = _sector_span(offset, len(data))
        torn = bytes(img[a:b])
        self._live[a:b] = torn
        self.pending.append(PendingWrite(a, torn))

    @staticmethod
    def _tear(img: bytearray, w: PendingWrite, rng: random.Random) -> None:
        """Apply `w` to `img` in part: per 512-byte sector new bytes, old bytes or garbage;
        at least one sector is not the new bytes (when the write has more than one)."""
        a, b = _sector_span(w.offset, len(w.data))
        new = bytearray(img[a:b])
        new[w.offset - a:w.offset - a + len(w.data)] = w.data
        nsec = (b - a) // SECTOR
        fates = [rng.choices(("new", "old", "garbage"), (0.5, 0.35, 0.15))[0]
                 for _ in range(nsec)]
        if nsec > 1 and all(f == "new" for f in fates):
            fates[rng.randrange(nsec)] = rng.choice(("old", "garbage"))
        for i, fate in enumerate(fates):
            lo, hi = a + i * SECTOR, a + (i + 1) * SECTOR
            if fate == "new":
                img[lo:hi] = new[i * SECTOR:(i + 1) * SECTOR]
            elif fate == "garbage":
                img[lo:hi] = rng.randbytes(SECTOR)

    # -- power ------------------------------------------------------------------------------

    def power_cut(self, mode: str, rng: random.Random, *, in_flight: bool = False) -> bytes:
        """Cut the power (or, for "kill", end the process): settle the cache into the
        durable image per `mode` and return it.  `in_flight`: the last pending write was
        still being written (for "kill" the only one that may be torn or lost)."""
        if mode not in MODES:
            raise ValueError(f"crash mode {mode!r} not one of {MODES}")
        if self.dead:
            return self.image()
        img = self._durable
        keep_p = rng.random()
        tear_p = rng.uniform(0.1, 0.5)
        kept = dropped = torn = refused = 0
        last = len(self.pending) - 1
        for i, w in enumerate(self.pending):
            if mode == "kill":
                fate = "keep"
                if in_flight and i == last:
                    fate = rng.choice(("keep", "drop", "tear"))
            elif mode == "drop_all":
                fate = "drop"
            elif mode == "drop_random":
                fate = "keep" if rng.random() < keep_p else "drop"
            else:  # tear
                r = rng.random()
                fate = "tear" if r < tear_p else ("keep" if rng.random() < keep_p else "drop")
            if fate == "tear" and self.may_tear is not None and not self.may_tear(img, w):
                fate = rng.choice(("keep", "drop"))
                refused += 1
            if fate == "keep":
                img[w.offset:w.offset + len(w.data)] = w.data
                kept += 1
            elif fate == "tear":
                self._tear(img, w, rng)
                torn += 1
            else:
                dropped += 1
        self.cut = {"kept": kept, "dropped": dropped, "torn": torn, "tear_refused": refused}
        self.pending.clear()
        self._mv.release()
        self._live = bytearray(img)  # only the durable image is left
        self._mv = memoryview(self._live)
        self.dead = True
        return self.image()

    def kill(self) -> bytes:
        """The process died between operations (SIGKILL): every completed write stays."""
        return self.power_cut("kill", self.rng)

    def image(self) -> bytes:
        """The durable image (after a cut: everything that is left)."""
        return bytes(self._durable)

    def reopen(self, **kw: object) -> FaultDevice:
        """A fresh device over the durable image, as recovery sees it after the cut (the
        same geometry, `may_tear` and `crash_mode`; `kw` sets other arguments)."""
        args: dict[str, object] = {"block_size": self._block_size,
                                   "pool_block_size": self.pool_block_size,
                                   "name": self._name, "may_tear": self.may_tear,
                                   "crash_mode": self.crash_mode, "rng": self.rng}
        args.update(kw)
        return FaultDevice(self.image(), **args)  # type: ignore[arg-type]


def _sector_span(offset: int, n: int) -> tuple[int, int]:
    a = offset - offset % SECTOR
    b = offset + n
    b += -b % SECTOR
    return a, b
