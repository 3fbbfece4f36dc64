"""`kvtier.client.client`: the connection inference processes talk to kvtierd through.

`Client` (exported as `kvtier.client.Client`) holds one connection: the control socket,
the submission and completion rings, the client's shared arena and the tenant's DRAM
mapping (`dram`: `map`/`unmap` read values there, `reserve`/`commit` write them there with
no copy by the daemon); `PendingMap` is a MAP submitted with
`map_submit`, awaited later.  The wire format is `kvtier.client.protocol`
(docs/PROTOCOL.md).

    with Client.connect("/run/kvtier/kvtier.sock", "tenant", token) as c:
        c.put("session-1", key, [layer0, layer1], ttl_s=3600)
        n = c.lookup(chain_keys)[0]             # longest stored prefix
        with c.get_slot(key) as (view, frame_lengths):
            ...                                 # bytes in the shared arena, no copy

Thread-safe: any thread may call the sync methods; `submit()` is non-blocking and returns
a `concurrent.futures.Future`.  One background thread reaps completions.  Values move
through the client's own shared arena: data already in an arena slot is stored without a
copy (`put_slot`), and `get_slot` leaves a value in the arena for the caller to use in
place (e.g. a CUDA-registered arena copied straight to the GPU).
"""

from __future__ import annotations

import json
import mmap
import os
import select
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvtier.client.arena import ArenaAllocator, Slot
from kvtier.client.errors import (
    DisconnectedError,
    HandshakeError,
    KvtierError,
    TimeoutError_,
    error_for,
)
from kvtier.client.protocol import (
    ALL_FRAMES,
    CQE_SIZE,
    FD_ORDER,
    MAP_ENTRY,
    NOT_MAPPED,
    PROTOCOL_VERSION,
    SQE_SIZE,
    Completion,
    CtrlParser,
    Flag,
    Msg,
    Op,
    ProtocolError,
    Request,
    Ring,
    Status,
    Tier,
    decode_completion,
    encode_ctrl,
    ring_bytes,
)

DEFAULT_TIMEOUT = 60.0
SPIN_S = 200e-6  # spin this long on the completion ring before sleeping
# How long the thread driving the completion ring sleeps on it before it looks again (at
# its deadline and whether the connection failed).
DRIVER_HANDOFF_S = 0.05


def _as_bytes(buf: Any) -> memoryview:
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise ValueError("buffers must be C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


class PendingMap:
    """A submitted MAP: `result()` waits for it and returns (offset, length) | None per key."""

    def __init__(self, client: Client, fut: Future[Completion], slot: Slot, n: int,
                 table_at: int) -> None:
        self._client, self._fut, self._slot, self._n, self._at = client, fut, slot, n, table_at

    def result(self) -> list[tuple[int, int] | None]:
        try:
            comp = self._client._wait(self._fut)
            if comp.status != Status.OK:
                raise error_for(comp.status, f"map: {Status(comp.status).name}")
            table = np.frombuffer(self._slot.view[self._at:], dtype="<u8",
                                  count=2 * self._n).reshape(self._n, 2)
            return [None if int(off) == NOT_MAPPED else (int(off), int(ln))
                    for off, ln in table.tolist()]
        finally:
            self._client.allocator.free(self._slot)


class Client:
    def __init__(self, sock: socket.socket, hello: dict[str, Any], fds: list[int],
                 timeout: float) -> None:
        self._sock = sock
        self.timeout = timeout
        self.client_id: int = hello["client_id"]
        self.arena_size: int = hello["arena_size"]
        self.ring_entries: int = hello["ring_entries"]
        fdmap = dict(zip(FD_ORDER, fds, strict=True))
        try:
            self._sq_map = mmap.mmap(fdmap["sq"], ring_bytes(self.ring_entries, SQE_SIZE))
            self._cq_map = mmap.mmap(fdmap["cq"], ring_bytes(self.ring_entries, CQE_SIZE))
            # Fault the arena in now: first touches of fresh shared pages run near 1 GB/s.
            self._arena_map = mmap.mmap(fdmap["arena"], self.arena_size,
                                        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE",
                                                                        0x8000))
            # The tenant's own DRAM tier: MAP returns offsets into it, for copies straight
            # from there (e.g. to a GPU), and RESERVE offsets to write a value's frames at.
            self.dram_size: int = hello["dram_size"]
            # The tenant's policy: "on" means frames must be sealed (kvtier.client.crypto).
            self.encryption: str = hello.get("encryption", "on")
            self.key_scope: str = hello.get("key_scope", "tenant")
            try:
                self._dram_map = mmap.mmap(fdmap["dram"], self.dram_size,
                                           flags=mmap.MAP_SHARED,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
                self.dram_writable = True
            except PermissionError:  # a daemon from before RESERVE sends it read-only
                self._dram_map = mmap.mmap(fdmap["dram"], self.dram_size,
                                           flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                self.dram_writable = False
        finally:
            for name in ("sq", "cq", "arena", "dram"):
                os.close(fdmap[name])
        self._sq_efd = fdmap["sq_eventfd"]
        self._cq_efd = fdmap["cq_eventfd"]
        self.sq = Ring(memoryview(self._sq_map), SQE_SIZE)
        self.cq = Ring(memoryview(self._cq_map), CQE_SIZE)
        self.arena = memoryview(self._arena_map)
        self.dram = memoryview(self._dram_map)
        self.allocator = ArenaAllocator(self.arena)
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()  # one thread reaps the completion ring at a time
        # Threads in `_wait` (the reaper stands aside while there are any: one of them drives
        # the ring), whether one of them drives it now, and the condition the others sleep on.
        self._waiters = 0
        self._no_waiters = threading.Event()
        self._no_waiters.set()
        self._driving = False
        self._drive_cv = threading.Condition(threading.Lock())
        self._space = threading.Semaphore(self.ring_entries)
        self._futures: dict[int, Future[Completion]] = {}
        self._next_tag = 1
        self._closed = False
        self._error: KvtierError | None = None
        self._close_hooks: list[Callable[[], None]] = []
        self._reaper = threading.Thread(target=self._reap, name="kvtier-reaper", daemon=True)
        self._reaper.start()

    # -- connection ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, socket_path: str, tenant: str, token: str, *,
                arena_size: int = 64 << 20, ring_entries: int = 256,
                timeout: float = DEFAULT_TIMEOUT) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as e:
            sock.close()
            raise DisconnectedError(f"cannot connect to kvtierd at {socket_path}: "
                                    f"{e.strerror}") from e
        try:
            sock.sendall(encode_ctrl(Msg.HELLO, {
                "version": PROTOCOL_VERSION, "tenant": tenant, "token": token,
                "arena_size": arena_size, "ring_entries": ring_entries}))
            parser = CtrlParser()
            fds: list[int] = []
            while True:
                m = parser.next_message()
                if m is not None:
                    break
                data, got, _flags, _addr = socket.recv_fds(sock, 65536, len(FD_ORDER))
                fds.extend(got)
                if not data:
                    raise HandshakeError("kvtierd closed the connection during HELLO")
                parser.feed(data)
            msg, body = m
            if msg == Msg.ERROR:
                for fd in fds:
                    os.close(fd)
                raise HandshakeError(f"kvtierd refused the connection: {body.get('message')}")
            if msg != Msg.HELLO_OK or len(fds) != len(FD_ORDER):
                for fd in fds:
                    os.close(fd)
                raise HandshakeError(f"unexpected handshake reply {msg.name} with "
                                     f"{len(fds)} descriptors")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return cls(sock, body, fds, timeout)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` when the client closes, before its shared memory is released
        (e.g. cudaHostUnregister of the arena)."""
        self._close_hooks.append(fn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for fn in reversed(self._close_hooks):
            fn()
        try:
            self._sock.sendall(encode_ctrl(Msg.BYE, {}))
        except OSError:
            pass
        self._fail_all(DisconnectedError("client closed"))
        os.eventfd_write(self._cq_efd, 1)  # wake the reaper
        self._reaper.join(timeout=5)
        self._sock.close()
        for fd in (self._sq_efd, self._cq_efd):
            os.close(fd)
        self._release_shared_memory()

    def _release_shared_memory(self) -> None:
        """Unmap the rings, the arena and the DRAM mapping now rather than whenever the
        garbage collector reaches this object (the close hooks' closures make it part of a
        cycle): until then the daemon's memfds stay alive in this process, and after a
        daemon restart that is the whole of the old DRAM tier, resident (CUDA registration
        faults every page in).  A mapping that some tensor or view made from it still uses
        cannot be unmapped safely: it stays until that is dropped, with a ResourceWarning."""
        self._close_hooks.clear()
        self.__dict__.pop("_dram_tensor", None)  # kvtier.client.gpu's view of the DRAM
        self.sq.detach()
        self.cq.detach()
        busy = []
        for name, view, mapping in (("submission ring", self.sq.buf, self._sq_map),
                                    ("completion ring", self.cq.buf, self._cq_map),
                                    ("arena", self.arena, self._arena_map),
                                    ("DRAM mapping", self.dram, self._dram_map)):
            try:
                view.release()
                mapping.close()
            except BufferError:
                busy.append(name)
        if busy:
            warnings.warn(f"kvtier client {self.client_id} closed while buffers made from its "
                          f"{', '.join(busy)} are still alive: that shared memory stays "
                          "mapped until they are dropped", ResourceWarning, stacklevel=3)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submission and completion ---------------------------------------------------------------

    def submit(self, req: Request) -> Future[Completion]:
        """Queue a request; the future resolves to its completion (any status)."""
        if not self._space.acquire(timeout=self.timeout):
            raise TimeoutError_("submission ring stayed full")
        fut: Future[Completion] = Future()
        with self._lock:
            if self._closed or self._error:
                self._space.release()
                raise self._error or DisconnectedError("client is closed")
            req.tag = self._next_tag
            self._next_tag += 1
            self._futures[req.tag] = fut
            if not self.sq.try_push(req.encode()):
                del self._futures[req.tag]
                self._space.release()
                raise KvtierError("submission ring full despite free credits")
        os.eventfd_write(self._sq_efd, 1)
        return fut

    def _reap(self) -> None:
        """The completion ring's deliverer of last resort: it drains whatever no waiting
        thread drains itself (futures only called back, or waited on with `result()`), and
        fails everything when the daemon goes away."""
        poller = select.poll()
        poller.register(self._cq_efd, select.POLLIN)
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLHUP)
        parser = CtrlParser()
        while not self._closed:
            for fd, ev in poller.poll(500):
                if fd != self._cq_efd and ev & (select.POLLIN | select.POLLHUP):
                    try:
                        data = self._sock.recv(65536)
                    except OSError:
                        data = b""
                    reason = "kvtierd closed the connection"
                    if data:
                        parser.feed(data)
                        m = parser.next_message()
                        if m and m[0] == Msg.ERROR:
                            reason = f"kvtierd dropped the connection: {m[1].get('message')}"
                    with self._drain_lock:
                        self._drain()
                    self._fail_all(DisconnectedError(reason))
                    return
            # While a thread waits in `_wait`, it drives the ring and drains for everyone:
            # this thread takes over when the last waiter leaves.
            self._no_waiters.wait()
            with self._drain_lock:
                if self._waiters:
                    # One came meanwhile: it drives, and a wakeup reset here, between its
                    # last look at the ring and its sleep, would be its wakeup lost.
                    continue
                self._consume_wakeups()
                self._drain()

    def _consume_wakeups(self) -> None:
        """Reset the completion eventfd; only with `_drain_lock` held and followed by a
        drain, so that no thread sleeps on a wakeup another thread swallowed."""
        try:
            os.eventfd_read(self._cq_efd)
        except BlockingIOError:
            pass

    def _drain(self) -> int:
        """Deliver every completion in the ring; returns how many."""
        n = 0
        while True:
            try:
                raw = self.cq.try_pop()
            except ProtocolError as e:
                self._fail_all(DisconnectedError(f"completion ring corrupt: {e}"))
                return n
            if raw is None:
                if n:  # waiters sleeping on the condition look at their futures again
                    with self._drive_cv:
                        self._drive_cv.notify_all()
                return n
            n += 1
            comp = decode_completion(raw)
            with self._lock:
                fut = self._futures.pop(comp.tag, None)
            self._space.release()
            if fut is not None:
                fut.set_result(comp)

    def _fail_all(self, err: KvtierError) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
            futs = list(self._futures.values())
            self._futures.clear()
        for f in futs:
            if not f.done():
                f.set_exception(err)
        with self._drive_cv:
            self._drive_cv.notify_all()

    def _wait(self, fut: Future[Completion]) -> Completion:
        """Wait for a completion.  First spin briefly on the completion ring (shared memory,
        no syscall) and reap it in this thread; then sleep on the ring's eventfd in this
        thread, draining for every thread, unless another waiting thread does so already.
        The waiting thread is the one the daemon's eventfd wakes: its completion does not
        pass through the reaper thread (two wakeups, each a scheduling delay on a busy
        machine)."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._waiters += 1
            self._no_waiters.clear()
        try:
            spin_until = time.perf_counter() + SPIN_S
            while not fut.done() and time.perf_counter() < spin_until:
                if self.cq.nonempty_hint() and self._drain_lock.acquire(blocking=False):
                    try:
                        self._drain()
                    finally:
                        self._drain_lock.release()
            while not fut.done() and time.monotonic() < deadline:
                with self._drive_cv:
                    if self._driving:  # another thread drains for this one: wait to be told
                        self._drive_cv.wait(max(0.0, deadline - time.monotonic()))
                        continue
                    self._driving = True
                try:
                    hung_up = self._drive(fut, deadline)
                finally:
                    with self._drive_cv:
                        self._driving = False
                        self._drive_cv.notify_all()
                if hung_up:  # the reaper reads the socket and fails every request
                    break
        finally:
            with self._lock:
                self._waiters -= 1
                if not self._waiters:
                    self._no_waiters.set()
        return fut.result(timeout=max(0.0, deadline - time.monotonic()))

    def _drive(self, fut: Future[Completion], deadline: float) -> bool:
        """Sleep on the completion eventfd and drain until `fut` is done or `deadline`
        passes (`_drain` tells the other waiting threads of what arrived).  True: the control
        socket has something to say (the daemon went away)."""
        poller = select.poll()
        poller.register(self._cq_efd, select.POLLIN)
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLHUP)
        while True:
            with self._drain_lock:
                self._consume_wakeups()
                self._drain()
            left = deadline - time.monotonic()
            if fut.done() or self._error is not None or left <= 0:
                return False
            for fd, _ev in poller.poll(min(left, DRIVER_HANDOFF_S) * 1000):
                if fd != self._cq_efd:
                    return True

    def _call(self, req: Request, what: str) -> Completion:
        return self.wait(self.submit(req), what)

    # -- operations -------------------------------------------------------------------------------

    def put(self, session: str, key: bytes, frames: Sequence[Any], *,
            ttl_s: int = 0) -> Tier:
        """Store a value (list of frames).  Frames are copied into an arena slot."""
        views = [_as_bytes(f) for f in frames]
        total = sum(v.nbytes for v in views)
        slot = self.allocator.alloc(max(total + 8 * len(views), 1))  # data + frame table
        try:
            pos = 0
            for v in views:
                slot.view[pos:pos + v.nbytes] = v
                pos += v.nbytes
            return self.put_slot(session, key, slot, [v.nbytes for v in views], ttl_s=ttl_s)
        finally:
            self.allocator.free(slot)

    def put_slot(self, session: str, key: bytes, slot: Slot, frame_lengths: Sequence[int], *,
                 ttl_s: int = 0) -> Tier:
        """Store frames that are already laid out back to back in an arena slot (no copy)."""
        return Tier(self._call(self.put_request(session, key, slot, frame_lengths, ttl_s),
                               "put").flags)

    def put_request(self, session: str, key: bytes, slot: Slot, frame_lengths: Sequence[int],
                    ttl_s: int = 0) -> Request:
        total = int(sum(frame_lengths))
        if total > slot.size:
            raise ValueError(f"frames of {total} bytes exceed the slot of {slot.size}")
        req = Request(Op.PUT, 0, key=bytes(key), session=session, data_off=slot.offset,
                      data_len=total, count=len(frame_lengths), ttl=ttl_s)
        if len(frame_lengths) > 1:
            table = slot.view[total:]
            need = 8 * len(frame_lengths)
            if table.nbytes < need:
                raise ValueError(f"slot needs {need} spare bytes after the data for the frame "
                                 f"table (allocate {total + need})")
            np.frombuffer(table[:need], dtype="<u8")[:] = frame_lengths
            req.aux_off = slot.offset + total
        return req

    @contextmanager
    def get_slot(self, key: bytes, *, size: int | None = None, frames: tuple[int, int] | None
                 = None, max_frames: int = 1024, deadline_ms: int = 0,
                 ) -> Iterator[tuple[memoryview, list[int]]]:
        """Read a value into an arena slot and lend it: (bytes, frame lengths) in place.

        With `deadline_ms`, a read the daemon cannot start within that many milliseconds
        fails at once with DeadlineError instead of arriving late."""
        cap = size or self.arena_size // 4
        slot = self.allocator.alloc(cap + 8 * max_frames)
        try:
            comp = self._call(self.get_request(key, slot, cap, frames, max_frames,
                                               deadline_ms), "get")
            table = np.frombuffer(slot.view[cap:cap + 8 * max_frames], dtype="<u8")
            fl = table[:min(comp.aux, max_frames)].tolist()
            yield slot.view[:comp.result], fl
        finally:
            self.allocator.free(slot)

    def get_request(self, key: bytes, slot: Slot, cap: int,
                    frames: tuple[int, int] | None = None, max_frames: int = 0,
                    deadline_ms: int = 0) -> Request:
        a, b = frames if frames is not None else (0, ALL_FRAMES)
        return Request(Op.GET, 0, key=bytes(key), data_off=slot.offset, data_len=cap,
                       frame_a=a, frame_b=b, count=max_frames, aux_off=slot.offset + cap,
                       ttl=deadline_ms)

    def get(self, key: bytes, *, frames: tuple[int, int] | None = None,
            size: int | None = None, deadline_ms: int = 0) -> bytes:
        """Convenience: the value as bytes (one copy out of the arena)."""
        with self.get_slot(key, size=size, frames=frames, deadline_ms=deadline_ms) as (view, _):
            return bytes(view)

    def get_into(self, key: bytes, out: Any, *, frames: tuple[int, int] | None = None) -> int:
        """Read a value into `out` (one copy out of the arena); returns bytes read."""
        dst = _as_bytes(out)
        with self.get_slot(key, size=dst.nbytes, frames=frames) as (view, _):
            dst[:view.nbytes] = view
            return view.nbytes

    def lookup(self, keys: Sequence[bytes], *, session: str | None = None
               ) -> tuple[int, list[Tier]]:
        """Longest stored prefix of a chained key list, and the tier of each key.

        With `session`, the lookup also tells the daemon that this session's turn starts
        (the prompt's keys): its reuse statistics learn when the session comes back and
        what it reads, to keep or bring it in DRAM ahead of its next turn.  Look up without
        a session for anything else (e.g. checking what is stored before a save)."""
        if not keys:
            return 0, []
        klen = len(keys[0])
        if any(len(k) != klen for k in keys):
            raise ValueError("all keys of a lookup must have the same length")
        n = len(keys)
        slot = self.allocator.alloc(n * klen + n)
        try:
            slot.view[:n * klen] = b"".join(keys)
            comp = self._call(Request(Op.LOOKUP, 0, flags=Flag.KEYLIST, key=bytes(klen),
                                      session=session or "", count=n, data_off=slot.offset,
                                      data_len=n * klen, aux_off=slot.offset + n * klen),
                              "lookup")
            tiers = [Tier(b) for b in bytes(slot.view[n * klen:n * klen + n])]
            return comp.result, tiers
        finally:
            self.allocator.free(slot)

    # -- values written in place, in the tenant's DRAM tier ----------------------------------

    def reserve_request(self, session: str, key: bytes, frame_lengths: Sequence[int],
                        table: Slot | None = None, ttl_s: int = 0) -> Request:
        """A RESERVE of a value of `frame_lengths`; `table`, an arena slot of 8 bytes per
        frame, carries the frame table when there is more than one frame."""
        total = int(sum(frame_lengths))
        req = Request(Op.RESERVE, 0, key=bytes(key), session=session, data_len=total,
                      count=len(frame_lengths), ttl=ttl_s)
        if len(frame_lengths) > 1:
            need = 8 * len(frame_lengths)
            if table is None or table.size < need:
                raise ValueError(f"a RESERVE of {len(frame_lengths)} frames needs a {need}-byte "
                                 f"arena slot for its frame table")
            np.frombuffer(table.view[:need], dtype="<u8")[:] = frame_lengths
            req.aux_off = table.offset
        return req

    def commit_request(self, key: bytes, offset: int, *, abort: bool = False,
                       crcs: Slot | None = None, frames: int = 0) -> Request:
        """A COMMIT (or with `abort`, giving up) of the reservation at `offset`.  With
        `crcs`, an arena slot holding the `frames` frames' CRC32Cs (u32, little-endian)
        as computed where the bytes were written: the daemon then stores those and does
        not read the frames (a wrong one makes the value CORRUPT where it is checked)."""
        if crcs is None or abort:
            return Request(Op.COMMIT, 0, flags=Flag.ABORT if abort else 0, key=bytes(key),
                           data_off=offset)
        if frames <= 0 or crcs.size < 4 * frames:
            raise ValueError(f"CRCs of {frames} frames need a slot of {4 * frames} bytes")
        return Request(Op.COMMIT, 0, flags=Flag.CRCS, key=bytes(key), data_off=offset,
                       count=frames, aux_off=crcs.offset)

    def reserve(self, session: str, key: bytes, frame_lengths: Sequence[int], *,
                ttl_s: int = 0) -> int:
        """Place a value in this tenant's DRAM tier: the offset in `dram` where its frames
        go, back to back.  Write them there, then `commit(key, offset)` (or `abort`)."""
        table = self.allocator.alloc(max(8 * len(frame_lengths), 8))
        try:
            return self._call(self.reserve_request(session, key, frame_lengths, table, ttl_s),
                              "reserve").result
        finally:
            self.allocator.free(table)

    def commit(self, key: bytes, offset: int) -> Tier:
        """Store the value reserved at `offset`, as written there; the tier holding it
        when acknowledged (as `put`)."""
        return Tier(self._call(self.commit_request(key, offset), "commit").flags)

    def abort(self, key: bytes, offset: int) -> None:
        """Give up the reservation at `offset` (the key's older value, if any, stays)."""
        self._call(self.commit_request(key, offset, abort=True), "abort")

    def put_in_place(self, session: str, key: bytes, frames: Sequence[Any], *,
                     ttl_s: int = 0) -> Tier:
        """`put` through the DRAM tier: reserve, write the frames there, commit -- one copy
        (this one) instead of the arena's and the daemon's."""
        views = [_as_bytes(f) for f in frames]
        off = self.reserve(session, key, [v.nbytes for v in views], ttl_s=ttl_s)
        try:
            pos = off
            for v in views:
                self.dram[pos:pos + v.nbytes] = v
                pos += v.nbytes
        except BaseException:
            self.abort(key, off)
            raise
        return self.commit(key, off)

    def map(self, keys: Sequence[bytes], frames: tuple[int, int] | None = None,
            ) -> list[tuple[int, int] | None]:
        """Pin values held in this tenant's DRAM tier; for each key (offset, length) of its
        payload (or frames [a, b)) in `self.dram`, or None where the key is not in DRAM.

        The bytes stay exactly the value's until `unmap` (or until the client closes).
        """
        return self.map_submit(keys, frames).result() if keys else []

    def map_submit(self, keys: Sequence[bytes],
                   frames: tuple[int, int] | None = None) -> PendingMap:
        """`map` without waiting: submit now, `.result()` later (so a loader can start
        copying the first batch while the daemon pins the next)."""
        if not keys:
            raise ValueError("map of no keys")
        klen = len(keys[0])
        if any(len(k) != klen for k in keys):
            raise ValueError("all keys of a map must have the same length")
        n = len(keys)
        slot = self.allocator.alloc(n * klen + n * MAP_ENTRY.size)
        try:
            slot.view[:n * klen] = b"".join(keys)
            a, b = frames if frames is not None else (0, ALL_FRAMES)
            fut = self.submit(Request(Op.MAP, 0, flags=Flag.KEYLIST, key=bytes(klen), count=n,
                                      data_off=slot.offset, data_len=n * klen,
                                      aux_off=slot.offset + n * klen, frame_a=a, frame_b=b))
        except BaseException:
            self.allocator.free(slot)
            raise
        return PendingMap(self, fut, slot, n, n * klen)

    def unmap(self, offsets: Sequence[int]) -> int:
        """Release pins taken by `map` (one per offset returned)."""
        if not offsets:
            return 0
        n = len(offsets)
        slot = self.allocator.alloc(8 * n)
        try:
            np.frombuffer(slot.view, dtype="<u8", count=n)[:] = offsets
            return self._call(Request(Op.UNMAP, 0, count=n, data_off=slot.offset,
                                      data_len=8 * n), "unmap").result
        finally:
            self.allocator.free(slot)

    def delete(self, key: bytes) -> bool:
        return bool(self._call(Request(Op.DELETE, 0, key=bytes(key)), "delete").result)

    def purge_session(self, session: str) -> int:
        return self._call(Request(Op.PURGE_SESSION, 0, session=session), "purge").result

    def prefetch(self, keys: Sequence[bytes] = (), *, session: str | None = None,
                 deadline_ms: int = 1000) -> tuple[int, bool]:
        """Ask the daemon to promote keys (or a whole session) to DRAM before the deadline.

        Returns (values promoted, whether the deadline was met).
        """
        if session is not None:
            fut = self.submit(Request(Op.PREFETCH, 0, flags=Flag.SESSION, session=session,
                                      ttl=deadline_ms))
            comp = fut.result(timeout=self.timeout)
        else:
            klen = len(keys[0]) if keys else 16
            slot = self.allocator.alloc(max(len(keys) * klen, 1))
            try:
                slot.view[:len(keys) * klen] = b"".join(keys)
                comp = self.submit(Request(Op.PREFETCH, 0, flags=Flag.KEYLIST,
                                           key=bytes(klen), count=len(keys),
                                           data_off=slot.offset, data_len=len(keys) * klen,
                                           ttl=deadline_ms)).result(timeout=self.timeout)
            finally:
                self.allocator.free(slot)
        if comp.status not in (Status.OK, Status.DEADLINE):
            raise error_for(comp.status, f"prefetch: {Status(comp.status).name}")
        return comp.result, comp.status == Status.OK

    def prefetch_submit(self, keys: Sequence[bytes], *, deadline_ms: int = 1000
                        ) -> Future[Completion]:
        """A PREFETCH hint without waiting: the daemon starts promoting `keys` to DRAM and
        the future resolves when it is done or the deadline passed (status OK or
        DEADLINE).  For a scheduler that hints as soon as it sees a request."""
        if not keys:
            raise ValueError("prefetch of no keys")
        klen = len(keys[0])
        if any(len(k) != klen for k in keys):
            raise ValueError("all keys of a prefetch must have the same length")
        slot = self.allocator.alloc(len(keys) * klen)
        try:
            slot.view[:len(keys) * klen] = b"".join(keys)
            fut = self.submit(Request(Op.PREFETCH, 0, flags=Flag.KEYLIST, key=bytes(klen),
                                      count=len(keys), data_off=slot.offset,
                                      data_len=len(keys) * klen, ttl=deadline_ms))
        except BaseException:
            self.allocator.free(slot)
            raise
        # The daemon reads the key list when it takes the request, not at completion:
        # the slot is released once the request completes.
        fut.add_done_callback(lambda _f: self.allocator.free(slot))
        return fut

    def wait(self, fut: Future[Completion], what: str = "request") -> Completion:
        """Wait for a submitted request (spinning briefly on the completion ring first);
        raises the error its status names unless it is OK."""
        try:
            comp = self._wait(fut)
        except TimeoutError:
            raise TimeoutError_(f"{what}: no completion within {self.timeout} s") from None
        if comp.status != Status.OK:
            raise error_for(comp.status, f"{what}: {Status(comp.status).name}")
        return comp

    def stats(self) -> dict[str, Any]:
        slot = self.allocator.alloc(1 << 20)
        try:
            comp = self._call(Request(Op.STATS, 0, data_off=slot.offset, data_len=1 << 20),
                              "stats")
            result: dict[str, Any] = json.loads(bytes(slot.view[:comp.result]))
            return result
        finally:
            self.allocator.free(slot)
