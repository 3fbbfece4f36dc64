"""`NvmfDevice`: a `BlockDevice` over one NVMe-oF/TCP namespace.

The pool engine is synchronous and runs in worker threads (the daemon calls it through
`trio.to_thread` with its I/O limiter).  The NVMe/TCP host is asynchronous.  So the device
runs the host in its own trio loop on a dedicated thread -- the reactor, in SPDK's words --
and each `readv_into`/`writev`/`flush` hands its request to that loop and blocks its
worker thread until the completion.  The hand-off is batched: requests go onto one
pending list, and only the first of a batch wakes the loop (one `run_sync_soon`), which
starts every request on the list as a task of its own nursery; a request's thread waits
on an event of its own (no per-request system task or result queue, which
`trio.from_thread.run` would cost).  Requests from many worker threads are in flight at
once, spread over the I/O queues; network I/O never runs on the daemon's control loop.

Reads land in the caller's buffers (no alignment needed over TCP); a read whose start or end
is not on an LBA boundary reads the edge blocks into a small buffer and copies only the
bytes asked for.  Writes must be LBA-aligned (the pool writes whole blocks).

While the connection is down, I/O fails at once with a `DeviceError` and the host
reconnects in the background: no caller waits for a reconnect, so the pool's lock (held
over segment header writes) is never held across one.  `health()` reads the controller's
counters without going through the host's loop, so it answers whatever the target does;
`wait_state` lets a caller that holds no lock wait for the connection to come back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import trio

from kvtier.daemon.blockdev import DeviceCaps, aligned_buffer, no_memory_view
from kvtier.daemon.errors import DeviceError
from kvtier.daemon.nvmf.host import Controller, NvmfTargetConfig
from kvtier.daemon.nvmf.queue import slice_views


class _Request:
    """One I/O handed from a worker thread to the host's loop."""

    __slots__ = ("args", "done", "error", "fn")

    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.error: BaseException | None = None


class NvmfDevice:
    def __init__(self, cfg: NvmfTargetConfig, *, name: str = "nvmf",
                 pool_block_size: int = 4096, size_limit: int | None = None) -> None:
        self.cfg = cfg
        self._name = name
        self._ctrl = Controller(cfg, name)
        self._state_cv = threading.Condition()
        self._ctrl.on_state = self._state_changed
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._pending: list[_Request] = []
        self._pending_lock = threading.Lock()
        self._wake_asked = False  # a _drain is queued on the loop for the pending list
        self._ended = False  # the loop is gone: nothing more is drained
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"nvmf-{name}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(cfg.connect_timeout_s + 5):
            raise DeviceError(f"{name}: NVMe-oF host thread did not start")
        if self._startup_error is not None:
            self._thread.join(5)
            err = self._startup_error
            raise err if isinstance(err, DeviceError) else DeviceError(f"{name}: {err}")
        lba = self._ctrl.lba_size
        self.pool_block_size = max(pool_block_size, lba)
        if self.pool_block_size % lba:
            self.close()
            raise DeviceError(f"{name}: pool block size {pool_block_size} is not a multiple "
                              f"of the namespace's LBA size {lba}")
        size = self._ctrl.size
        if size_limit:
            if size_limit > size:
                self.close()
                raise DeviceError(f"{name}: configured size {size_limit} exceeds the "
                                  f"namespace's {size} bytes")
            size = size_limit
        self._size = size - size % self.pool_block_size
        self._caps = DeviceCaps(pool_block_size=self.pool_block_size)

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:
            if not self._ready.is_set():
                self._startup_error = _unwrap(e)
                self._ready.set()
        finally:
            with self._pending_lock:
                self._ended = True
                left, self._pending = self._pending, []
            for r in left:
                self._closed_under(r)

    async def _main(self) -> None:
        self._closing = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(self._ctrl.run)
            async with trio.open_nursery() as requests:
                self._nursery = requests
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._closing.wait()
                n.cancel_scope.cancel()

    def _closed_under(self, r: _Request) -> None:
        r.error = DeviceError(f"{self.name}: device is closed")
        r.done.set()

    def _drain(self) -> None:
        """On the host's loop: start every pending request (one wake-up for a batch)."""
        with self._pending_lock:
            reqs, self._pending = self._pending, []
            self._wake_asked = False
        nursery = self._nursery
        for r in reqs:
            try:
                assert nursery is not None
                nursery.start_soon(self._serve, r)
            except RuntimeError:  # the nursery is closed: the device is going away
                self._closed_under(r)

    async def _serve(self, r: _Request) -> None:
        try:
            await r.fn(*r.args)
        except trio.Cancelled:
            r.error = DeviceError(f"{self.name}: device is closed")
            raise
        except BaseException as e:
            r.error = e
        finally:
            r.done.set()

    # -- BlockDevice ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def block_size(self) -> int:
        return 1  # TCP needs no buffer alignment; offsets are handled here

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

    @property
    def lba_size(self) -> int:
        return self._ctrl.lba_size

    @property
    def name(self) -> str:
        return f"nvmf:{self._name}"

    def _call(self, fn: Any, *args: Any) -> None:
        token = self._token
        if token is None:
            raise DeviceError(f"{self.name}: device is closed")
        r = _Request(fn, args)
        with self._pending_lock:
            if self._ended:
                raise DeviceError(f"{self.name}: device is closed")
            self._pending.append(r)
            wake = not self._wake_asked
            self._wake_asked = True
        if wake:
            try:
                token.run_sync_soon(self._drain)
            except trio.RunFinishedError:
                with self._pending_lock:
                    left, self._pending = self._pending, []
                    self._wake_asked = False
                for x in left:
                    self._closed_under(x)
        r.done.wait()
        e = r.error
        if e is None:
            return
        if isinstance(e, BaseExceptionGroup):
            raise _unwrap(e) from None
        raise e

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self._size:
            raise DeviceError(f"{self.name}: I/O range [{offset}, {offset + length}) outside "
                              f"device of {self._size} bytes")

    def readv_into(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in bufs)
        self._check(offset, total)
        if not total:
            return
        lba = self._ctrl.lba_size
        head = offset % lba
        end = offset + total
        tail = -end % lba
        if not head and not tail:
            self._call(self._ctrl.readv, offset, list(bufs))
            return
        # edges: whole blocks into small buffers, only the bytes asked for copied out
        a0, a1 = offset - head, end + tail
        if a1 - a0 <= 2 * lba:
            tmp = aligned_buffer(a1 - a0)
            self._call(self._ctrl.readv, a0, [tmp])
            _scatter(tmp[head:head + total], bufs)
            return
        first = aligned_buffer(lba) if head else None
        last = aligned_buffer(lba) if tail else None
        mid_start = a0 + lba if head else offset
        mid_end = a1 - lba if tail else end
        views = ([first] if first is not None else []) + \
            slice_views(bufs, mid_start - offset, mid_end - mid_start) + \
            ([last] if last is not None else [])
        self._call(self._ctrl.readv, a0, views)
        if first is not None:
            _scatter(first[head:], slice_views(bufs, 0, lba - head))
        if last is not None:
            _scatter(last[:lba - tail], slice_views(bufs, mid_end - offset, lba - tail))

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        total = sum(b.nbytes for b in bufs)
        self._check(offset, total)
        lba = self._ctrl.lba_size
        if offset % lba or total % lba:
            raise DeviceError(f"{self.name}: write [{offset}, {offset + total}) is not "
                              f"aligned to the {lba}-byte LBA size")
        if total:
            self._call(self._ctrl.writev, offset, list(bufs))

    def flush(self) -> None:
        self._call(self._ctrl.flush)

    def view(self, offset: int, length: int) -> memoryview:
        raise no_memory_view(self)

    def health(self) -> dict[str, Any]:
        """State and counters (Health's fields and the namespace's), without waiting on the
        host's loop or the target."""
        h = self._ctrl.health.as_dict()
        h.update(kind="nvmf", address=f"{self.cfg.address}:{self.cfg.port}",
                 subnqn=self.cfg.subnqn, nsid=self.cfg.nsid, lba_size=self._ctrl.lba_size,
                 io_queues=self._ctrl.io_queues, queue_depth=self.cfg.queue_depth,
                 max_io=self._ctrl.max_io, namespace_bytes=self._ctrl.size,
                 io_timeout_s=self.cfg.io_timeout_s)
        return h

    @property
    def state(self) -> str:
        return self._ctrl.state

    def _state_changed(self, state: str) -> None:
        with self._state_cv:
            self._state_cv.notify_all()

    def wait_state(self, *states: str, timeout: float) -> bool:
        """Block until the connection's state is one of `states` ("live", "reconnecting");
        False after `timeout` seconds.  Never call it holding a lock other threads need."""
        with self._state_cv:
            return self._state_cv.wait_for(lambda: self._ctrl.state in states, timeout)

    def wait_live(self, timeout: float) -> bool:
        return self.wait_state("live", timeout=timeout)

    def close(self) -> None:
        token, self._token = self._token, None
        if token is not None and self._closing is not None:
            try:
                trio.from_thread.run_sync(self._closing.set, trio_token=token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)


def _scatter(src: memoryview, dst: Sequence[memoryview]) -> None:
    pos = 0
    for d in dst:
        n = d.nbytes
        d[:] = src[pos:pos + n]
        pos += n


def _unwrap(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            if isinstance(x, DeviceError):
                return x
    return e
