"""The NVMe/TCP host over trio: one controller association, its queues, and recovery.

An *association* is what one connection attempt builds: the admin queue (ICReq, fabrics
Connect with the keep-alive timeout, CC.EN and CSTS.RDY through Property Set/Get,
Identify controller and namespace, Set Features for the number of I/O queues), then N
I/O queues, each its own TCP connection running `queue.HostQueue`.  Every queue has a
receiver task that `recv_into`s wherever the state machine says, so read data lands in the
caller's buffers, and a sender task that writes the PDUs posted to it with `sendmsg`
straight from the caller's buffers.  A transfer is split at MDTS and its pieces are
submitted as one batch over the queues, round robin; its caller wakes once, at the end.

`Controller.run` owns associations: it builds one, keeps it alive with Keep Alive at half
the KATO, and when anything fails (a connection reset or closed, a protocol error, a
command past its timeout, the target gone) it tears the association down at once -- every
command in flight fails with an `NvmfError` that says what happened -- and builds a new one
with exponential backoff, in the background.  Requests that arrive while there is no live
association fail at once (`NvmfError`, "not connected"): a caller never waits for a
reconnect, so one that holds a lock (the pool writes segment headers under its own) never
holds it across an outage.  Losing the connection, the reconnect attempts (rate-limited)
and getting it back are logged once per change and counted in `Health`; `last_error` is
the error of the current outage ("" while live), `recent_errors` the last few with their
times.  A command whose waiter goes away (timeout or cancellation) always takes the
association down with it: an NVMe command cannot be recalled, and a late C2HData must not
land in a buffer its caller has since reused, nor a late R2T send one.

With a PSK configured (`NvmfTargetConfig.psk`), every queue's connection is a TLS 1.3
channel first (`kvtier.daemon.nvmf.tls`, the identity and key of `kvtier.daemon.nvmf.psk`):
the handshake runs before ICReq, the sender encrypts the PDUs it would have written
(straight out of the caller's buffers into TLS records) and the receiver decrypts straight
into wherever the state machine says.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from kvtier.daemon.blockdev import IOV_MAX
from kvtier.daemon.errors import DeviceError
from kvtier.daemon.nvmf import nvme
from kvtier.daemon.nvmf.psk import ConfiguredPsk
from kvtier.daemon.nvmf.queue import Completed, Connected, HostQueue, Send, Terminated

# Plain data, kept out of this trio module so that the config need not import it;
# re-exported here (`X as X`) for the users that import them from `host`.
from kvtier.daemon.nvmf.target_config import NvmfTargetConfig as NvmfTargetConfig
from kvtier.daemon.nvmf.target_config import default_hostnqn as default_hostnqn
from kvtier.daemon.nvmf.tls import TlsError, TlsSession

ADMIN_DEPTH = 32
ADMIN_QID = 0
TLS_FLUSH = 1 << 20  # plaintext bytes encrypted before the records go out
TLS_RECV = 1 << 18  # ciphertext read from the socket at a time
RETRY_LOG_INTERVAL_S = 10.0  # at most one log line per this long for failed reconnects
RECENT_ERRORS = 8  # errors kept, with their times, in Health.recent_errors

log = logging.getLogger("kvtierd.nvmf")


class NvmfError(DeviceError):
    """An NVMe-oF request failed: transport, timeout, or an NVMe status."""


class NvmeStatusError(NvmfError):
    def __init__(self, message: str, cqe: nvme.Cqe) -> None:
        super().__init__(message)
        self.cqe = cqe


@dataclass
class Health:
    """The controller's state and counters.  Written by the host's trio thread only; read
    from any thread without a lock (each field is replaced whole), so `kvtier status`
    never waits on the device."""

    state: str = "connecting"  # "connecting" (first attach), "live", "reconnecting"
    connects: int = 0  # associations built
    reconnects: int = 0  # associations built after a loss
    connection_losses: int = 0  # live associations lost
    reconnect_attempts: int = 0  # failed attempts to build one after a loss
    io_refused: int = 0  # requests failed at once because there was no live association
    last_error: str = ""  # what the current outage is about; "" while live
    last_error_at: float = 0.0  # wall time of the newest error (kept once live again)
    recent_errors: tuple[dict[str, Any], ...] = ()  # the newest RECENT_ERRORS: {at, error}
    down_since: float = 0.0  # wall time the connection was lost; 0 while live
    commands: int = 0
    errors: int = 0
    timeouts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    tls: str = ""  # the secure channel of the last queue connected, "" without TLS
    since: float = field(default_factory=time.time)  # of the current state

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["recent_errors"] = [dict(e) for e in self.recent_errors]
        return d


class _Batch:
    """Commands submitted together (the MDTS pieces of one transfer): one wake-up for all."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.event = trio.Event()
        self.results: list[Completed | None] = [None] * n
        self.error: str | None = None

    def complete(self, i: int, ev: Completed) -> None:
        self.results[i] = ev
        self.left -= 1
        if self.left == 0:
            self.event.set()

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.event.set()


class _Queue:
    """One queue: a TCP connection, its state machine, a receiver and a sender task.

    Everything this side sends (capsules, H2CData answering R2Ts) is posted to the
    queue's outbox; the sender task writes whatever has gathered with one `sendmsg`
    (whole PDUs, never interleaved), so neither submitters nor the receiver wait on the
    socket, and commands submitted together leave together."""

    def __init__(self, assoc: _Association, qid: int, depth: int, in_capsule: int | None,
                 max_data: int) -> None:
        cfg = assoc.cfg
        self.assoc = assoc
        self.qid = qid
        self.hq = HostQueue(qid, depth, header_digest=cfg.header_digest,
                            data_digest=cfg.data_digest, in_capsule=in_capsule,
                            max_data=max_data)
        self.sock: trio.socket.SocketType | None = None
        self.tls: TlsSession | None = None
        self.waiters: dict[int, tuple[_Batch, int]] = {}
        self.slots = trio.Semaphore(depth)  # taken per command, given back on completion
        self.outbox: list[bytes | memoryview] = []
        self._posted = trio.Event()
        self.connected = trio.Event()

    async def open(self, nursery: trio.Nursery) -> None:
        cfg = self.assoc.cfg
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = s
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await s.connect((cfg.address, cfg.port))
        except OSError as e:
            raise NvmfError(f"cannot connect to {cfg.address}:{cfg.port}: "
                            f"{e.strerror or e}") from e
        if cfg.psk is not None:
            await self._handshake(cfg.psk)
        nursery.start_soon(self.receive)
        nursery.start_soon(self.sender)
        self.post(self.hq.start().segments)
        await self.connected.wait()
        if self.assoc.failed is not None:
            raise NvmfError(self.assoc.failed)

    async def _handshake(self, key: ConfiguredPsk) -> None:
        """TLS 1.3 with the PSK, before anything NVMe/TCP is sent."""
        cfg = self.assoc.cfg
        sock = self.sock
        assert sock is not None
        ident, tls_key = key.tls_psk(cfg.hostnqn, cfg.subnqn)
        where = f"TLS with {cfg.address}:{cfg.port} (identity {ident!r})"
        try:
            tls = TlsSession(client=True, identity=ident, key=tls_key, suite=key.suite)
            self.tls = tls
            with trio.fail_after(cfg.connect_timeout_s):
                while not tls.handshake():
                    await _send_all(sock, tls.take_output())
                    data = await sock.recv(1 << 16)
                    if not data:
                        raise NvmfError(f"{where}: the target closed the connection during "
                                        f"the handshake (is its listener a secure channel, "
                                        f"and this host's PSK configured there?)")
                    tls.receive_bytes(data)
                await _send_all(sock, tls.take_output())  # the client's Finished
            self.assoc.ctrl.health.tls = f"TLS 1.3 {tls.cipher}, PSK identity {ident}"
        except TlsError as e:
            raise NvmfError(f"{where}: {e}") from None
        except trio.TooSlowError:
            raise NvmfError(f"{where}: no handshake within {cfg.connect_timeout_s:g} s "
                            f"(does the target expect TLS on this port?)") from None
        except OSError as e:
            raise NvmfError(f"{where}: {_why(e)}") from None

    def post(self, segments: Sequence[bytes | memoryview]) -> None:
        """Queue whole PDUs for the sender task (references to the caller's buffers)."""
        self.outbox.extend(segments)
        self._posted.set()

    async def sender(self) -> None:
        sock = self.sock
        assert sock is not None
        tls = self.tls
        try:
            while True:
                await self._posted.wait()
                self._posted = trio.Event()
                if tls is not None:
                    await self._send_tls(sock, tls)
                    continue
                while self.outbox:
                    segs, self.outbox = self.outbox, []
                    while segs:
                        n = await sock.sendmsg(segs[:IOV_MAX])
                        i = 0
                        while n:
                            ln = len(segs[i])
                            if n >= ln:
                                n -= ln
                                i += 1
                            else:
                                segs[i] = memoryview(segs[i])[n:]
                                n = 0
                        del segs[:i]
        except (OSError, trio.ClosedResourceError) as e:
            self.assoc.fail(f"queue {self.qid}: send failed: {_why(e)}")
        except TlsError as e:
            self.assoc.fail(f"queue {self.qid}: {e}")

    async def _send_tls(self, sock: trio.socket.SocketType, tls: TlsSession) -> None:
        """Encrypt what is posted (whole PDUs, in order) and send the records; also what
        the TLS layer itself has to say (a reply the receiver's reads produced)."""
        while self.outbox or tls.pending_output():
            segs, self.outbox = self.outbox, []
            size = 0
            for seg in segs:
                tls.write(seg)
                size += len(seg)
                if size >= TLS_FLUSH:  # bounded ciphertext in memory: send as it grows
                    await _send_all(sock, tls.take_output())
                    size = 0
            await _send_all(sock, tls.take_output())

    async def receive(self) -> None:
        sock = self.sock
        assert sock is not None
        hq = self.hq
        tls = self.tls
        raw = memoryview(bytearray(TLS_RECV)) if tls is not None else None
        try:
            while True:
                if tls is None:
                    n = await sock.recv_into(hq.buffer())
                else:
                    assert raw is not None
                    n = tls.read_into(hq.buffer())  # decrypted straight into place
                    if tls.pending_output():
                        self._posted.set()
                    if n == 0:
                        k = await sock.recv_into(raw)
                        # ACK at once.  Against SPDK's TLS socket each 1 MiB read took
                        # ~43 ms (23 MiB/s) with delayed ACKs, the signature of a sender
                        # whose last small segment waits for the ACK (Nagle); with quick
                        # ACKs 654 MiB/s.  Plain NVMe/TCP is unaffected.
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                        if k:
                            tls.receive_bytes(raw[:k])
                            continue
                if n == 0:
                    self.assoc.fail(f"queue {self.qid}: connection closed by the target")
                    return
                for ev in hq.received(n):
                    if isinstance(ev, Completed):
                        w = self.waiters.pop(ev.cid, None)
                        if w is not None:
                            self.slots.release()
                            w[0].complete(w[1], ev)
                    elif isinstance(ev, Send):
                        self.post(ev.segments)
                    elif isinstance(ev, Connected):
                        self.connected.set()
                    elif isinstance(ev, Terminated):
                        if ev.send is not None:
                            with trio.move_on_after(0.5):
                                try:
                                    if tls is not None:
                                        tls.write(ev.send.segments[0])
                                        await _send_all(sock, tls.take_output())
                                    else:
                                        await sock.send(ev.send.segments[0])
                                except (OSError, TlsError):
                                    pass
                        self.assoc.fail(ev.reason)
                        return
        except (OSError, trio.ClosedResourceError) as e:
            self.assoc.fail(f"queue {self.qid}: connection lost: {_why(e)}")
        except TlsError as e:
            self.assoc.fail(f"queue {self.qid}: {e}")
        except Exception as e:  # a bug here must not kill the controller: fail loudly
            self.assoc.fail(f"queue {self.qid}: receive failed: {type(e).__name__}: {e}")

    def close(self, reason: str) -> None:
        if self.sock is not None:
            self.sock.close()
        self.hq.terminate()
        for batch, _ in self.waiters.values():
            batch.fail(reason)
            self.slots.release()  # wakes submitters blocked on a slot: they see the failure
        self.waiters.clear()
        self.connected.set()


async def _send_all(sock: trio.socket.SocketType, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class _Association:
    def __init__(self, ctrl: Controller, nursery: trio.Nursery) -> None:
        self.ctrl = ctrl
        self.cfg = ctrl.cfg
        self.nursery = nursery
        self.failed: str | None = None
        self.failed_event = trio.Event()
        self.admin: _Queue | None = None
        self.io: list[_Queue] = []
        self._rr = 0
        self.cntlid = 0
        self.mdts = 0
        self.lba_size = 0
        self.nblocks = 0
        self.in_capsule = 0
        self.max_io = 0

    def fail(self, reason: str) -> None:
        """Tear the association down now (synchronously: no buffer is touched after)."""
        if self.failed is not None:
            return
        self.failed = reason
        for q in ([self.admin] if self.admin else []) + self.io:
            q.close(reason)
        self.failed_event.set()

    async def command(self, q: _Queue, sqe: bytearray, what: str, *,
                      data_out: Sequence[memoryview] = (),
                      data_in: Sequence[memoryview] = (),
                      timeout: float | None = None) -> nvme.Cqe:
        cqes = await self.batch([(q, sqe, data_out, data_in)], what, timeout=timeout)
        return cqes[0]

    async def batch(self, items: Sequence[tuple[_Queue, bytearray, Sequence[memoryview],
                                                Sequence[memoryview]]],
                    what: str, *, timeout: float | None = None) -> list[nvme.Cqe]:
        """Submit commands (queue, SQE, data out, data in) together and wait for all.

        Capsules go to each queue's sender task (commands posted together leave in one
        `sendmsg`); a command slot is taken per command and given back by the receiver on
        completion; the caller wakes once, when the last command completes."""
        h = self.ctrl.health
        timeout = self.cfg.io_timeout_s if timeout is None else timeout
        b = _Batch(len(items))
        submitted = 0
        finished = False
        try:
            with trio.move_on_after(timeout) as cs:
                for i, (q, sqe, data_out, data_in) in enumerate(items):
                    try:
                        q.slots.acquire_nowait()
                    except trio.WouldBlock:
                        await q.slots.acquire()
                    if self.failed is not None:
                        raise NvmfError(f"{self.ctrl.name}: {what}: {self.failed}")
                    cid, send = q.hq.submit(sqe, data_out=data_out, data_in=data_in)
                    q.waiters[cid] = (b, i)
                    q.post(send.segments)
                    submitted += 1
                await b.event.wait()
            finished = b.event.is_set()
        finally:
            if not finished and submitted:
                if cs.cancelled_caught:
                    h.timeouts += 1
                self.fail(f"{what} timed out after {timeout:g} s" if cs.cancelled_caught
                          else f"{what} abandoned by its caller")
        if not finished:
            raise NvmfError(f"{self.ctrl.name}: {what} failed: "
                            f"{self.failed or f'no slot within {timeout:g} s'}")
        h.commands += len(items)
        if b.error is not None:
            h.errors += 1
            raise NvmfError(f"{self.ctrl.name}: {what} failed: {b.error}")
        out: list[nvme.Cqe] = []
        for r in b.results:
            assert r is not None
            if r.error is not None:
                h.errors += 1
                raise NvmfError(f"{self.ctrl.name}: {what} failed: {r.error}")
            if not r.cqe.ok:
                h.errors += 1
                raise NvmeStatusError(f"{self.ctrl.name}: {what}: {r.cqe.describe()}", r.cqe)
            out.append(r.cqe)
        return out

    async def establish(self) -> None:
        cfg = self.cfg
        admin = _Queue(self, ADMIN_QID, ADMIN_DEPTH, None, 1 << 16)
        self.admin = admin
        await admin.open(self.nursery)
        # the admin queue's receiver must be ours before Connect
        cqe = await self._connect(admin, 0xFFFF, ADMIN_DEPTH, cfg.kato_ms)
        self.cntlid = cqe.dw0 & 0xFFFF
        cap = nvme.Cap.parse((await self._get(nvme.REG_CAP, True)).value64)
        await self.command(admin, nvme.property_set_cmd(nvme.REG_CC, nvme.CC_IOSQES_IOCQES),
                           "Property Set CC")
        await self.command(admin, nvme.property_set_cmd(
            nvme.REG_CC, nvme.CC_IOSQES_IOCQES | nvme.CC_EN), "Property Set CC.EN")
        deadline = trio.current_time() + max(cap.timeout_ms / 1000, 0.5)
        while True:
            csts = (await self._get(nvme.REG_CSTS, False)).dw0
            if csts & nvme.CSTS_CFS:
                raise NvmfError(f"{self.ctrl.name}: controller fatal status (CSTS.CFS)")
            if csts & nvme.CSTS_RDY:
                break
            if trio.current_time() > deadline:
                raise NvmfError(f"{self.ctrl.name}: controller not ready after "
                                f"{cap.timeout_ms} ms (CSTS.RDY never set)")
            await trio.sleep(0.01)
        ident = memoryview(bytearray(nvme.IDENTIFY_LEN))
        await self.command(admin, nvme.identify_cmd(nvme.Cns.CONTROLLER), "Identify controller",
                           data_in=[ident])
        ic = nvme.IdentifyController.parse(ident, cap.mpsmin)
        if cfg.nsid > ic.nn:
            raise NvmfError(f"{self.ctrl.name}: namespace {cfg.nsid} does not exist "
                            f"(the subsystem has {ic.nn})")
        await self.command(admin, nvme.identify_cmd(nvme.Cns.NAMESPACE, cfg.nsid),
                           "Identify namespace", data_in=[ident])
        ns = nvme.IdentifyNamespace.parse(ident)
        if ns.lba_size < 512 or ns.metadata_size:
            raise NvmfError(f"{self.ctrl.name}: namespace {cfg.nsid} has LBA size "
                            f"{ns.lba_size} with {ns.metadata_size} bytes of metadata; "
                            f"kvtier needs >= 512-byte blocks without metadata")
        self.lba_size, self.nblocks = ns.lba_size, ns.nsze
        self.mdts = ic.mdts
        self.in_capsule = max(ic.ioccsz - nvme.SQE_LEN, 0)
        # the largest request: MDTS, bounded so one command's data fits a queue's budget
        self.max_io = min(ic.mdts or (1 << 20), 1 << 20)
        self.max_io -= self.max_io % self.lba_size
        cqe = await self.command(admin, nvme.set_number_of_queues_cmd(cfg.queues),
                                 "Set Features (number of queues)")
        granted = min((cqe.dw0 & 0xFFFF) + 1, (cqe.dw0 >> 16) + 1)
        nq = min(cfg.queues, granted)
        depth = min(cfg.queue_depth, cap.mqes - 1)
        for qid in range(1, nq + 1):
            q = _Queue(self, qid, depth, self.in_capsule, self.max_io)
            await q.open(self.nursery)
            await self._connect(q, self.cntlid, depth + 1, 0)
            self.io.append(q)

    async def _connect(self, q: _Queue, cntlid: int, sqsize: int, kato_ms: int) -> nvme.Cqe:
        cfg = self.cfg
        data = nvme.connect_data(cfg.hostid, cntlid, cfg.subnqn, cfg.hostnqn)
        return await self.command(q, nvme.connect_cmd(q.qid, sqsize, kato_ms),
                                  f"Connect (queue {q.qid})",
                                  data_out=[memoryview(data)], timeout=cfg.connect_timeout_s)

    async def _get(self, reg: int, size8: bool) -> nvme.Cqe:
        assert self.admin is not None
        return await self.command(self.admin, nvme.property_get_cmd(reg, size8),
                                  f"Property Get {reg:#x}")

    async def keep_alive(self) -> None:
        assert self.admin is not None
        period = self.cfg.kato_ms / 2000
        while True:
            await trio.sleep(period)
            try:
                await self.command(self.admin, nvme.keep_alive_cmd(), "Keep Alive")
            except NvmfError as e:
                self.fail(f"keep alive failed: {e}")
                return

    def pick(self) -> _Queue:
        """The next I/O queue, round robin (a transfer's pieces spread over all queues)."""
        q = self.io[self._rr]
        self._rr = (self._rr + 1) % len(self.io)
        return q


class Controller:
    """A namespace on an NVMe-oF target, reached through associations built on demand."""

    def __init__(self, cfg: NvmfTargetConfig, name: str) -> None:
        if not 1 <= cfg.queues <= 64:
            raise NvmfError(f"{name}: queues {cfg.queues} out of range 1..64")
        if not 1 <= cfg.queue_depth <= 1024:
            raise NvmfError(f"{name}: queue depth {cfg.queue_depth} out of range 1..1024")
        self.cfg = cfg
        self.name = name
        self.health = Health()
        # Called (on the host's thread) after every change of `health.state`.
        self.on_state: Callable[[str], None] | None = None
        self._assoc: _Association | None = None
        self._down_at = 0.0  # monotonic time of the loss, for the durations logged
        self._attempts = 0  # failed reconnect attempts in the current outage
        self._retry_logged_at: float | None = None  # monotonic; None: none logged yet
        self._retries_unlogged = 0
        self.lba_size = 0
        self.nblocks = 0
        self.max_io = 0
        self.io_queues = 0

    @property
    def size(self) -> int:
        return self.lba_size * self.nblocks

    @property
    def live(self) -> bool:
        assoc = self._assoc
        return assoc is not None and assoc.failed is None

    @property
    def state(self) -> str:
        """`health.state`, except "reconnecting" from the moment an association fails
        (`run` records the loss a moment later, on the host's thread)."""
        st = self.health.state
        return "reconnecting" if st == "live" and not self.live else st

    # -- state changes (each logged once, and counted) ------------------------------------

    def _set_state(self, state: str) -> None:
        h = self.health
        if h.state != state:
            h.state, h.since = state, time.time()
        if self.on_state is not None:
            self.on_state(state)

    def _record_error(self, error: str) -> None:
        h = self.health
        now = time.time()
        h.last_error, h.last_error_at = error, now
        h.recent_errors = (*h.recent_errors[-(RECENT_ERRORS - 1):],
                           {"at": round(now, 3), "error": error})

    def _lost(self, reason: str) -> None:
        h = self.health
        h.connection_losses += 1
        h.down_since = time.time()
        self._down_at = time.monotonic()
        self._attempts = self._retries_unlogged = 0
        self._retry_logged_at = None
        self._record_error(reason)
        self._set_state("reconnecting")
        log.warning("%s: lost the connection to %s: %s; reconnecting in the background "
                    "(I/O fails until it is back)", self.name, self.cfg.where, reason)

    def _retry_failed(self, error: str) -> None:
        self.health.reconnect_attempts += 1
        self._attempts += 1
        self._record_error(error)
        now = time.monotonic()
        # One line for the first failed attempt, then at most one per interval: an outage
        # of hours at a 2 s backoff must not write thousands of lines.
        if self._retry_logged_at is None or now - self._retry_logged_at >= RETRY_LOG_INTERVAL_S:
            more = (f" ({self._retries_unlogged} more failed since the last report)"
                    if self._retries_unlogged else "")
            log.warning("%s: still reconnecting to %s: attempt %d failed, down %.1f s%s: %s",
                        self.name, self.cfg.where, self._attempts, now - self._down_at, more,
                        error)
            self._retry_logged_at, self._retries_unlogged = now, 0
        else:
            self._retries_unlogged += 1
            log.debug("%s: reconnect attempt %d failed: %s", self.name, self._attempts, error)

    def _now_live(self, first: bool) -> None:
        h = self.health
        h.connects += 1
        if not first:
            h.reconnects += 1
            log.warning("%s: the connection to %s is back after %.1f s (%d failed attempts)",
                        self.name, self.cfg.where, time.monotonic() - self._down_at,
                        self._attempts)
        h.last_error, h.down_since = "", 0.0  # history stays in recent_errors
        self._set_state("live")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        first = True
        backoff = 0.05
        while True:
            fatal: NvmfError | None = None
            async with trio.open_nursery() as nursery:
                assoc = _Association(self, nursery)
                error: str | None = None
                try:
                    with trio.fail_after(self.cfg.connect_timeout_s):
                        await assoc.establish()
                except trio.TooSlowError:
                    error = f"no answer within {self.cfg.connect_timeout_s:g} s"
                except NvmfError as e:
                    error = str(e)
                if error is None and not first and \
                        (assoc.lba_size, assoc.nblocks) != (self.lba_size, self.nblocks):
                    error = (f"namespace changed from {self.nblocks} x {self.lba_size} to "
                             f"{assoc.nblocks} x {assoc.lba_size} bytes; not using it")
                if error is not None:
                    assoc.fail(error)
                    nursery.cancel_scope.cancel()
                    if first:
                        self._record_error(error)
                        fatal = NvmfError(f"{self.name}: cannot attach {self.cfg.where}: {error}")
                    else:
                        self._retry_failed(error)
                else:
                    self.lba_size, self.nblocks = assoc.lba_size, assoc.nblocks
                    self.max_io, self.io_queues = assoc.max_io, len(assoc.io)
                    self._assoc = assoc
                    backoff = 0.05
                    self._now_live(first)
                    if first:
                        first = False
                        task_status.started()
                    nursery.start_soon(assoc.keep_alive)
                    await assoc.failed_event.wait()
                    self._assoc = None
                    self._lost(assoc.failed or "association failed")
                    nursery.cancel_scope.cancel()
            if fatal is not None:
                raise fatal
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.cfg.reconnect_max_s)

    async def _association(self, what: str) -> _Association:
        """The live association, or NvmfError at once: a request never waits for a
        reconnect (its caller may hold a lock others need; see the module docstring)."""
        assoc = self._assoc
        if assoc is not None and assoc.failed is None:
            return assoc
        h = self.health
        h.io_refused += 1
        # Just failed, not yet seen by `run`: the association's own reason is the newest.
        why = (assoc.failed if assoc is not None else None) or h.last_error or "connecting"
        down = f" for {time.time() - h.down_since:.1f} s" if h.down_since else ""
        raise NvmfError(f"{self.name}: {what}: not connected to {self.cfg.where} "
                        f"(down{down}: {why}); reconnecting in the background")

    # -- I/O --------------------------------------------------------------------------------

    def _pieces(self, offset: int,
                bufs: Sequence[memoryview]) -> list[tuple[int, list[memoryview]]]:
        """Split a transfer at MDTS: [(byte offset, views)], each at most `max_io`."""
        out: list[tuple[int, list[memoryview]]] = []
        cur: list[memoryview] = []
        cur_len = 0
        start = offset
        for b in bufs:
            v = b
            while v.nbytes:
                take = min(v.nbytes, self.max_io - cur_len)
                cur.append(v[:take])
                cur_len += take
                v = v[take:]
                if cur_len == self.max_io:
                    out.append((start, cur))
                    start += cur_len
                    cur, cur_len = [], 0
        if cur_len:
            out.append((start, cur))
        return out

    async def _transfer(self, write: bool, offset: int, bufs: Sequence[memoryview]) -> None:
        views = [b for b in bufs if b.nbytes]
        nbytes = sum(v.nbytes for v in views)
        lba = self.lba_size
        if offset % lba or nbytes % lba:
            raise NvmfError(f"{self.name}: I/O [{offset}, {offset + nbytes}) not aligned to "
                            f"the {lba}-byte LBA size")
        if offset + nbytes > self.size:
            raise NvmfError(f"{self.name}: I/O [{offset}, {offset + nbytes}) beyond the "
                            f"namespace's {self.size} bytes")
        if not nbytes:
            return
        what = f"{'write' if write else 'read'} of {nbytes} bytes at {offset}"
        assoc = await self._association(what)
        nsid = self.cfg.nsid
        items: list[tuple[_Queue, bytearray, Sequence[memoryview], Sequence[memoryview]]] = []
        for off, piece in self._pieces(offset, views):
            n = sum(v.nbytes for v in piece)
            q = assoc.pick()
            if write:
                items.append((q, nvme.write_cmd(nsid, off // lba, n // lba), piece, []))
            else:
                items.append((q, nvme.read_cmd(nsid, off // lba, n // lba), [], piece))
        await assoc.batch(items, what)
        if write:
            self.health.bytes_written += nbytes
        else:
            self.health.bytes_read += nbytes

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        await self._transfer(False, offset, bufs)

    async def writev(self, offset: int, bufs: Sequence[memoryview]) -> None:
        await self._transfer(True, offset, bufs)

    async def flush(self) -> None:
        assoc = await self._association("flush")
        await assoc.command(assoc.pick(), nvme.flush_cmd(self.cfg.nsid), "flush")
