"""kvtierd as a service: the trio main loop.

One nursery owns everything: the control-socket listener, one task per connection, the
write-behind and promotion workers, the sweeper/checkpointer, the metrics endpoint and
the signal watcher.  Blocking engine calls run in `limits.io_threads` worker threads,
handed out by the I/O scheduler (`iosched.py`: classes, fair queueing between tenants).
SIGTERM/SIGINT stop accepting, let requests in flight finish (bounded), flush
write-behind, checkpoint the pools and remove the socket.
"""

from __future__ import annotations

import array
import collections
import errno
import functools
import hashlib
import logging
import math
import mmap
import os
import secrets
import signal
import socket
import struct
import time
from typing import Any

import trio

from kvtier.client.protocol import (
    CQE_SIZE,
    FD_ORDER,
    KEYS_SESSION,
    MAX_ADMIN_REPLY,
    PROTOCOL_VERSION,
    SQE_SIZE,
    CtrlParser,
    Msg,
    ProtocolError,
    encode_ctrl,
    init_ring,
    ring_bytes,
)
from kvtier.daemon import cpuprio
from kvtier.daemon.admin_view import AdminView
from kvtier.daemon.audit import AttemptRecorder, AuditLog
from kvtier.daemon.config import Config, check_runtime, parse_token_hash, verify_token
from kvtier.daemon.connection import ClientConnection, ConnectionResources, DropClient
from kvtier.daemon.errors import StoreError
from kvtier.daemon.iosched import IoClass, IoScheduler
from kvtier.daemon.metrics import Metrics, serve_metrics
from kvtier.daemon.policy import PLAN_EVERY_S, make_policy
from kvtier.daemon.pool_open import open_media_pool
from kvtier.daemon.prefetch import Hint, PrefetchScheduler
from kvtier.daemon.qos import QoS
from kvtier.daemon.reuse import ReuseStats
from kvtier.daemon.tiers import TieredStore

log = logging.getLogger("kvtierd")

DRAIN_TIMEOUT_S = 5.0
LOCKOUT_FIRST_S = 0.5  # a uid past limits.auth_failures_before_lockout waits this, doubling
LOCKOUT_MAX_S = 60.0
MAX_TRACKED_UIDS = 4096
REFUSED_HOLD_S = 1.0  # a connection refused before HELLO is answered after this long ...
REFUSED_HOLD_MAX = 128  # ... while no more than this many are held (then at once)
WAITING_FOR_HELLO = "too many connections waiting for HELLO"
LISTEN_BACKLOG = 1024  # connects waiting for accept (a flood must not fill it for others)
AUDIT_SYNC_S = 1.0
CHECKPOINT_EVERY_S = 60.0
_SO_PEERCRED = struct.Struct("3i")


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), addr)
        except OSError as e:
            log.warning("sd_notify(%s) failed: %s", state, e)


class Service:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.io = IoScheduler(cfg.limits.io_threads, starvation_s=cfg.limits.starvation_s,
                              weights={t.id: t.weight for t in cfg.tenants},
                              observe=self.metrics.observe_io,
                              low_class_nice=cfg.limits.low_class_nice)
        if cfg.limits.low_class_nice and self.io.low_class_nice_off:
            log.warning("write and background work run at the readers' CPU priority: %s",
                        self.io.low_class_nice_off)
        self.sessions: dict[int, ClientConnection] = {}
        self._next_client = 1
        lim = cfg.limits
        # The control socket's defences: connections that have not finished HELLO (in all,
        # per uid), and the scrypt token checks -- at most `hello_threads` at once, and one
        # at a time per uid, so one uid's flood queues behind itself.
        self._unauthenticated = 0
        self._unauthenticated_by_uid: dict[int, int] = {}
        self._token_checks = trio.CapacityLimiter(lim.hello_threads)
        self._uid_token_locks: dict[int, tuple[trio.Lock, int]] = {}
        # failed HELLOs in a row by uid, and until when the uid is locked out
        self._uid_failures: dict[int, tuple[int, float]] = {}
        # connections refused before HELLO, answered when their time is up
        self._held: collections.deque[tuple[float, trio.socket.SocketType]] = \
            collections.deque()
        self._held_wake = trio.Event()
        self._dummy_hash = _dummy_token_hash(cfg)
        self.started = time.time()
        self.audit: AuditLog | None = None
        self.store: TieredStore | None = None
        self.admin_view: AdminView | None = None
        self.prefetch: PrefetchScheduler | None = None
        self.qos: QoS | None = None
        pc = cfg.policy
        self.reuse = ReuseStats(max_sessions=pc.tracked_sessions, max_keys=pc.tracked_keys)
        self.policy = make_policy(pc.name, self.reuse, horizon_s=pc.horizon_s, fill=pc.fill)
        self._wake = trio.Event()
        self._wake_asked = False  # a wake-up of the background worker is on its way
        self._stopping = False
        self.socket_path = cfg.socket
        self.metrics_port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        # What `kvtierd check-config` checks of the filesystem, as the daemon's own user:
        # a missing pool directory is an error, never created.
        await trio.to_thread.run_sync(check_runtime, cfg)
        audit = await trio.to_thread.run_sync(AuditLog,
                                              os.path.join(cfg.state_dir, "audit.log"))
        self.audit = audit
        self.attempts = AttemptRecorder(audit)
        audit.record("start", pid=os.getpid(), config=cfg.source,
                          tenants=[{"id": t.id, "allowed_uids": t.allowed_uids,
                                    "retention_s": t.retention_s, "encryption": t.encryption,
                                    "key_scope": t.key_scope} for t in cfg.tenants])
        media = await trio.to_thread.run_sync(open_media_pool, cfg)
        shares = cfg.dram_shares()  # ConfigError if a tenant's share is too small
        drams = await trio.to_thread.run_sync(TieredStore.create_drams, shares,
                                              cfg.dram_segment_size, cfg.dram_populate)
        token = trio.lowlevel.current_trio_token()

        def wake_background() -> None:  # from any thread: a value to write behind
            # One wake-up in flight at a time: every put asking the event loop through
            # run_sync_soon (a lock and a socket write each) showed in the profile of
            # saves with many PUTs in flight.  Cleared by the worker before it drains.
            if not self._wake_asked:
                self._wake_asked = True
                token.run_sync_soon(lambda: self._wake.set())

        self.store = TieredStore(drams, media, ack=cfg.ack, notify=wake_background)
        self.store.on_purge = self.reuse.forget
        # what the admin socket's commands and the FUSE tree show and change: one view
        self.admin_view = AdminView(cfg, self.store, self.stats, audit.record)
        for dram in drams.values():
            dram.evictor = self.policy.victim
        self.metrics.bind(self.store, lambda: len(self.sessions),
                          lambda: {c.name.lower(): self.io.queued(c) for c in IoClass},
                          lambda: {t: q.throttled_s for t, q in self._qos_tenants().items()},
                          audit.describe)
        self.prefetch = PrefetchScheduler(self.store, self.io,
                                          workers=cfg.limits.prefetch_threads)
        self.qos = QoS.from_config(cfg.tenants, self.store.media.tenant_bytes,
                                   functools.partial(self.io.run, IoClass.WRITE, "(quota)"))
        quotas = sum(t.quota or 0 for t in cfg.tenants)
        if quotas > media.capacity_bytes:
            log.warning("tenant quotas add up to %d bytes, more than the media pool's %d: "
                        "a tenant within its quota can make the pool evict others' values",
                        quotas, media.capacity_bytes)
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._background_worker)
                nursery.start_soon(self._maintenance)
                nursery.start_soon(self._audit_sync)
                await nursery.start(self.prefetch.run)
                nursery.start_soon(self._plan_promotions)
                if cfg.metrics_port:
                    self.metrics_port = await nursery.start(
                        serve_metrics, self.metrics, cfg.metrics_address, cfg.metrics_port)
                if cfg.fuse_mountpoint:
                    from kvtier.fuse.tree import AdminTree, serve_tree

                    tree = AdminTree(cfg, self.admin_view, self.metrics.render,
                                     functools.partial(self.io.run, IoClass.INTERACTIVE,
                                                       "admin"), audit.record,
                                     audit_ok=audit.retry)
                    await nursery.start(serve_tree, tree, cfg.fuse_mountpoint)
                nursery.start_soon(self._answer_held)
                nursery.start_soon(self._accept_loop, listener)
                log.info("kvtierd ready: socket %s, media %s, dram %d MiB over %d tenants, "
                         "ack=%s", self.socket_path, media.dev.name, cfg.dram_size >> 20,
                         len(drams), cfg.ack)
                sd_notify("READY=1")
                task_status.started(self)
        finally:
            sd_notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                await self._shutdown(listener)

    async def _listen(self) -> trio.socket.SocketType:
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            # A socket left by a crashed daemon: reuse the path only if nobody answers.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)
            else:
                probe.close()
                raise StoreError(f"{path}: another kvtierd is already listening there")
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o666)  # tenants authenticate with tokens and uids, not file modes
        sock.listen(LISTEN_BACKLOG)
        return sock

    async def _shutdown(self, listener: trio.socket.SocketType) -> None:
        listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        if self.store is not None:
            store = self.store
            with trio.move_on_after(60):
                await trio.to_thread.run_sync(store.flush_all)
            for pool in (store.media,):
                await trio.to_thread.run_sync(pool.close)
        if self.audit is not None:
            self.attempts.flush(final=True)
            self.audit.record("stop", pid=os.getpid())
            await trio.to_thread.run_sync(self.audit.close)
        log.info("kvtierd stopped")

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("signal %s: draining", signal.Signals(sig).name)
                self._stopping = True
                with trio.move_on_after(DRAIN_TIMEOUT_S):
                    while any(s.ops_in_flight() for s in self.sessions.values()):
                        await trio.sleep(0.01)
                scope.cancel()
                return

    # -- background work ---------------------------------------------------------------------------

    async def _background_worker(self) -> None:
        """Write-behind, and handing partial reads' promotions to the prefetch queue:
        woken by the store, never blocking the loop."""
        assert self.store is not None
        store = self.store
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._wake_asked = False  # after this, a new value asks again (and is drained)
            while True:
                n = await self.io.run(IoClass.BACKGROUND, "", store.flush_some, 16)
                todo = store.take_promotions()
                by_tenant: dict[str, list[bytes]] = {}
                for tenant, key in todo:
                    by_tenant.setdefault(tenant, []).append(key)
                assert self.prefetch is not None
                for tenant, keys in by_tenant.items():
                    self.prefetch.background(tenant, keys)
                if not n and not todo:
                    break

    async def _plan_promotions(self) -> None:
        """Queue what the DRAM policy expects to be read soon (nothing, for `lru`)."""
        assert self.store is not None and self.prefetch is not None
        store, prefetch, policy = self.store, self.prefetch, self.policy
        limiter = trio.CapacityLimiter(1)
        queued: dict[tuple[str, str], Hint] = {}  # a session's promotion still under way
        while True:
            await trio.sleep(PLAN_EVERY_S)
            now = self.reuse.clock()
            queued = {k: h for k, h in queued.items() if not h.done.is_set()}
            for p in await trio.to_thread.run_sync(policy.plan, store, now, limiter=limiter):
                if (p.tenant, p.session) not in queued:
                    queued[(p.tenant, p.session)] = prefetch.background(
                        p.tenant, p.keys, due_in_s=p.due - now)

    async def _audit_sync(self) -> None:
        """fsync the audit log in batches: at most AUDIT_SYNC_S of records at risk.  While
        the log is degraded, try to write its gap record as often: the service comes back
        by itself once there is room again."""
        assert self.audit is not None
        audit = self.audit
        while True:
            await trio.sleep(AUDIT_SYNC_S)
            await trio.to_thread.run_sync(self.attempts.flush)
            was = audit.degraded
            if was:
                await trio.to_thread.run_sync(audit.retry)
            ok = await trio.to_thread.run_sync(audit.sync)
            if was and not audit.degraded:
                log.warning("audit log writable again: connects and admin changes accepted")
            elif audit.degraded and (not was or not ok):
                log.error("audit log degraded (%s): new connections and admin changes are "
                          "refused until it can be written", audit.degraded)

    def _apply_retention(self) -> None:
        """Purge each session whose newest value is older than its tenant's retention
        period (blocking).  Whole sessions: a session-scope data key lives in its session
        and must not go while newer values it encrypts remain; the tenant-scope keys'
        session (`~keys`) lives as long as the tenant."""
        assert self.store is not None and self.audit is not None
        now = self.store.media.clock()
        for t in self.cfg.tenants:
            if t.retention_s is None:
                continue
            newest: dict[str, float] = {}
            for e in self.store.media.entries(t.id):
                newest[e.session] = max(newest.get(e.session, 0), e.created)
            for session, last in newest.items():
                if session == KEYS_SESSION or last >= now - t.retention_s:
                    continue
                n = self.store.purge_session(t.id, session)
                self.audit.record("retention_purge", tenant=t.id, session=session, values=n,
                                  retention_s=t.retention_s)
                log.info("retention: purged session %s/%s (%d values, idle > %.0f s)", t.id,
                         session, n, t.retention_s)

    async def _maintenance(self) -> None:
        assert self.store is not None
        store = self.store
        last_ckpt = trio.current_time()
        while True:
            await trio.sleep(self.cfg.limits.sweep_interval_s)
            for pool in store.pools():
                await self.io.run(IoClass.BACKGROUND, "", pool.sweep)
            await self.io.run(IoClass.BACKGROUND, "", self._apply_retention)
            if trio.current_time() - last_ckpt >= CHECKPOINT_EVERY_S:
                # Written without the pool's lock: reads and puts go on meanwhile (one
                # already running, e.g. started by a put, makes this one unnecessary).
                await self.io.run(IoClass.BACKGROUND, "", store.media.checkpoint_concurrently)
                last_ckpt = trio.current_time()

    # -- connections -------------------------------------------------------------------------------

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        log.error("accept: %s; backing off", e)
                        await trio.sleep(0.1)
                        continue
                    raise
                pid, uid, _gid = _SO_PEERCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size))
                lim = self.cfg.limits
                if self._unauthenticated >= lim.max_unauthenticated or \
                        self._unauthenticated_by_uid.get(uid, 0) >= \
                        lim.max_unauthenticated_per_uid:
                    # Refused here, without a task of its own, and answered only after
                    # REFUSED_HOLD_S (while there is room to hold it): a flood of connects
                    # then waits on its own sockets instead of spinning through accept,
                    # which costs the connected clients' requests event-loop time.
                    self.metrics.hello_refused.inc()
                    if len(self._held) < REFUSED_HOLD_MAX:
                        self._held.append((trio.current_time() + REFUSED_HOLD_S, conn))
                        self._held_wake.set()
                    else:
                        _refuse_now(conn, "busy", WAITING_FOR_HELLO)
                    continue
                # counted here, before the next accept looks at the count
                self._unauthenticated += 1
                self._unauthenticated_by_uid[uid] = \
                    self._unauthenticated_by_uid.get(uid, 0) + 1
                nursery.start_soon(self._connection, conn, pid, uid)

    async def _answer_held(self) -> None:
        """Refuse the connections held by the accept loop once their time is up."""
        while True:
            if not self._held:
                await self._held_wake.wait()
                self._held_wake = trio.Event()
                continue
            due, _ = self._held[0]
            await trio.sleep_until(due)
            while self._held and self._held[0][0] <= trio.current_time():
                _refuse_now(self._held.popleft()[1], "busy", WAITING_FOR_HELLO)

    async def _connection(self, conn: trio.socket.SocketType, pid: int, uid: int) -> None:
        with conn:
            lim = self.cfg.limits
            parser = CtrlParser()
            authenticated = trio.Event()  # set once HELLO (or ADMIN) is answered
            try:
                with trio.fail_after(lim.control_timeout_s):
                    msg, body = await _read_msg(conn, parser)
                if msg == Msg.ADMIN:
                    self._authenticated(uid, authenticated)
                    await self._admin(conn, parser, uid, body)
                elif msg == Msg.HELLO:
                    await self._client(conn, parser, pid, uid, body, authenticated)
                else:
                    raise ProtocolError(f"expected HELLO or ADMIN, got {msg.name}")
            except (ProtocolError, DropClient) as e:
                log.warning("connection from pid %d uid %d dropped: %s", pid, uid, e)
                await _send_error(conn, "protocol", str(e))
            except trio.TooSlowError:
                log.warning("connection from pid %d uid %d: no complete control message in "
                            "%.0f s", pid, uid, lim.control_timeout_s)
            except (ConnectionError, EOFError):
                pass
            except Exception:
                # Whatever one connection does, it must not take the others down.
                log.exception("connection from pid %d uid %d failed", pid, uid)
            finally:
                self._authenticated(uid, authenticated)

    def _authenticated(self, uid: int, done: trio.Event) -> None:
        """The connection no longer counts as unauthenticated (once)."""
        if done.is_set():
            return
        done.set()
        self._unauthenticated -= 1
        left = self._unauthenticated_by_uid[uid] - 1
        if left:
            self._unauthenticated_by_uid[uid] = left
        else:
            del self._unauthenticated_by_uid[uid]

    async def _check_token(self, uid: int, stored: str | None, token: Any) -> bool:
        """One scrypt check, the same work whether the tenant exists or not (`stored`
        None: a dummy hash of the same parameters), in the bounded pool, one at a time per
        uid."""
        lock, users = self._uid_token_locks.get(uid, (trio.Lock(), 0))
        self._uid_token_locks[uid] = (lock, users + 1)
        try:
            async with lock:
                ok = await trio.to_thread.run_sync(
                    _verify_token_lowered, token if isinstance(token, str) else "",
                    stored if stored is not None else self._dummy_hash,
                    self.io.low_class_nice, limiter=self._token_checks)
        finally:
            lock, users = self._uid_token_locks[uid]
            if users > 1:
                self._uid_token_locks[uid] = (lock, users - 1)
            else:
                del self._uid_token_locks[uid]
        ok = ok and stored is not None and isinstance(token, str)
        if ok:
            self._uid_failures.pop(uid, None)
        else:
            n, _ = self._uid_failures.pop(uid, (0, 0.0))
            if len(self._uid_failures) >= MAX_TRACKED_UIDS:  # forget the oldest
                del self._uid_failures[next(iter(self._uid_failures))]
            n += 1
            over = n - self.cfg.limits.auth_failures_before_lockout
            until = trio.current_time() + min(LOCKOUT_MAX_S, LOCKOUT_FIRST_S * 2 ** (over - 1)) \
                if over > 0 else 0.0
            self._uid_failures[uid] = (n, until)
        return ok

    def _locked_out(self, uid: int) -> float:
        """Seconds this uid must still wait before its next token check (0: none).  Scrypt
        is memory-hard on purpose: on a small machine each check slows everyone's requests
        (cache and memory bandwidth, not just a core), so a uid that keeps failing gets
        none for a while -- and a uid that fails does not delay the others."""
        f = self._uid_failures.get(uid)
        return max(0.0, f[1] - trio.current_time()) if f is not None else 0.0

    async def _client(self, conn: trio.socket.SocketType, parser: CtrlParser, pid: int,
                      uid: int, hello: dict[str, Any], authenticated: trio.Event) -> None:
        cfg, lim = self.cfg, self.cfg.limits
        assert self.store is not None and self.audit is not None
        if self._stopping:
            await _send_error(conn, "shutting_down", "kvtierd is shutting down")
            return
        if hello.get("version") != PROTOCOL_VERSION:
            await _send_error(conn, "version", f"protocol version {hello.get('version')!r} "
                                               f"not supported (this daemon speaks "
                                               f"{PROTOCOL_VERSION})")
            return
        wait = self._locked_out(uid)
        if wait:
            # Answered when the lockout ends, not at once: the connection keeps one of the
            # uid's few unauthenticated slots meanwhile, so a flood of HELLOs waits instead
            # of spinning through the event loop.
            self.metrics.hello_refused.inc()
            await trio.sleep(min(wait, lim.control_timeout_s))
            await _send_error(conn, "busy", f"too many failed HELLOs from uid {uid}: try "
                                            f"again")
            return
        tenant_id, token = hello.get("tenant"), hello.get("token")
        tenant = cfg.tenant(tenant_id) if isinstance(tenant_id, str) else None
        ok = await self._check_token(uid, tenant.token_hash if tenant is not None else None,
                                     token)
        if not ok or tenant is None:
            self.metrics.auth_failures.inc()
            self._audit("auth_failure", tenant=str(tenant_id)[:300], pid=pid, uid=uid,
                        reason="unknown tenant or wrong token")
            log.warning("auth failure: tenant %r from pid %d uid %d", str(tenant_id)[:100],
                        pid, uid)
            await _send_error(conn, "auth", "unknown tenant or wrong token")
            return
        if tenant.allowed_uids is not None and uid not in tenant.allowed_uids:
            self.metrics.auth_failures.inc()
            self._audit("auth_failure", tenant=tenant.id, pid=pid, uid=uid,
                        reason="uid not allowed")
            log.warning("uid %d not allowed for tenant %s (pid %d)", uid, tenant.id, pid)
            await _send_error(conn, "auth", f"uid {uid} is not allowed for tenant {tenant.id}")
            return
        self._authenticated(uid, authenticated)
        if len(self.sessions) >= lim.max_clients:
            await _send_error(conn, "busy", f"too many clients ({lim.max_clients})")
            return
        cap = cfg.max_clients_of(tenant)
        if sum(1 for c in self.sessions.values() if c.tenant == tenant.id) >= cap:
            await _send_error(conn, "busy", f"tenant {tenant.id} has {cap} clients connected "
                                            f"already (its max_clients)")
            return
        arena_size = hello.get("arena_size") or lim.arena_default
        entries = hello.get("ring_entries") or lim.ring_entries
        if not isinstance(arena_size, int) or not 4096 <= arena_size <= lim.arena_max or \
                arena_size % 4096:
            await _send_error(conn, "limits", f"arena_size must be a multiple of 4096 in "
                                              f"[4096, {lim.arena_max}], got {arena_size!r}")
            return
        if not isinstance(entries, int) or not 1 <= entries <= lim.ring_entries or \
                entries & (entries - 1):
            await _send_error(conn, "limits", f"ring_entries must be a power of two in "
                                              f"[1, {lim.ring_entries}], got {entries!r}")
            return
        client_id = self._next_client
        self._next_client += 1
        # Audited before the client gets anything: a connect the log cannot hold is refused
        # (the audit log's promise: every client that touched data is on it).
        if not self.audit.record("connect", client=client_id, tenant=tenant.id, pid=pid,
                                 uid=uid):
            log.error("client of tenant %s (pid %d) refused: the audit log cannot be "
                      "written (%s)", tenant.id, pid, self.audit.degraded)
            await _send_error(conn, "audit", f"the audit log cannot be written "
                                             f"({self.audit.degraded}); new connections are "
                                             f"refused until it can")
            return
        assert self.prefetch is not None and self.qos is not None  # set up before accepting
        res, fds = _make_resources(arena_size, entries, f"kvtier-{tenant.id}")
        # Closed once HELLO_OK is sent (or not): the memfds, whose maps keep the memory, and
        # the DRAM fd; the eventfds belong to `res`.
        transient = fds[:3]
        session: ClientConnection | None = None
        try:
            # The tenant's own DRAM tier, writable: MAP reads values from there and RESERVE
            # has the client write a value's frames there itself (no copy by the daemon).
            # A tenant can damage only its own values this way, which their CRCs and
            # headers expose (docs/SECURITY.md); no other tenant's memory is ever mapped.
            dram_fd = os.open(f"/proc/self/fd/{self.store.dram_fd(tenant.id)}",
                              os.O_RDWR | os.O_CLOEXEC)
            transient.append(dram_fd)
            session = ClientConnection(
                client_id=client_id, tenant=tenant.id, uid=uid, pid=pid, store=self.store,
                res=res, ring_entries=entries, inflight=lim.inflight_per_client, io=self.io,
                record=self.metrics.record,
                stats=functools.partial(self.tenant_stats, tenant.id),
                stalled_timeout_s=lim.stalled_client_timeout_s, audit=self._audit,
                audit_ok=self.audit.retry, attempt=self.attempts.attempt,
                prefetch=self.prefetch, qos=self.qos, reuse=self.reuse)
            self.sessions[client_id] = session  # before HELLO_OK: the slot is taken now
            try:
                await _send_fds(conn, encode_ctrl(Msg.HELLO_OK, {
                    "version": PROTOCOL_VERSION, "client_id": client_id,
                    "arena_size": arena_size, "ring_entries": entries, "sqe_size": SQE_SIZE,
                    "cqe_size": CQE_SIZE, "dram_size": self.store.dram(tenant.id).dev.size,
                    "encryption": tenant.encryption, "key_scope": tenant.key_scope,
                    "fds": list(FD_ORDER)}), [*fds, dram_fd])
            finally:
                _close_all(transient)
            self.metrics.connects.inc()
            log.info("client %d connected: tenant %s pid %d uid %d arena %d MiB", client_id,
                     tenant.id, pid, uid, arena_size >> 20)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_control, conn, parser,
                                       nursery.cancel_scope)
                    await session.serve()
            except* DropClient as group:
                reason = str(_leaf(group))
                log.warning("client %d (%s, pid %d) dropped: %s", client_id, tenant.id, pid,
                            reason)
                self.metrics.drops.inc()
                await _send_error(conn, "protocol", reason)
        finally:
            self.sessions.pop(client_id, None)
            _close_all(transient)
            if session is not None:
                session.release_maps()
                session.release_reservations()
                log.info("client %d disconnected after %d ops", client_id, session.ops)
            res.close()

    async def _watch_control(self, conn: trio.socket.SocketType, parser: CtrlParser,
                             scope: trio.CancelScope) -> None:
        """The control socket after HELLO: EOF or BYE ends the session, and so does a
        message left half-sent for `control_timeout_s`."""
        timeout = self.cfg.limits.control_timeout_s
        try:
            while True:
                m = parser.next_message()
                if m is not None:
                    if m[0] == Msg.BYE:
                        break
                    continue
                # no deadline between messages; `timeout` once one has begun
                with trio.fail_at(trio.current_time() + timeout if parser.pending()
                                  else math.inf):
                    data = await conn.recv(65536)
                if not data:
                    break
                parser.feed(data)
        except trio.TooSlowError:
            log.warning("a client left a control message half-sent for %.0f s: closed",
                        timeout)
        except (ConnectionError, ProtocolError):
            pass
        scope.cancel()

    # -- admin -------------------------------------------------------------------------------------

    async def _admin(self, conn: trio.socket.SocketType, parser: CtrlParser, uid: int,
                     first: dict[str, Any]) -> None:
        if uid not in self.cfg.admin_uids:
            log.warning("admin request from uid %d refused", uid)
            self._audit("admin_denied", uid=uid, cmd=str(first.get("cmd"))[:100])
            await _send_error(conn, "denied", f"uid {uid} is not an admin")
            return
        body: dict[str, Any] | None = first
        while body is not None:
            try:
                assert self.audit is not None
                if _admin_change(body) and not await self.io.run(
                        IoClass.INTERACTIVE, "admin", self.audit.retry):
                    reply = encode_ctrl(Msg.ERROR, {
                        "code": "audit", "message": f"the audit log cannot be written "
                        f"({self.audit.degraded}): changes are refused until it can"})
                else:
                    if body.get("cmd") == "limits":  # token buckets live on the trio clock
                        result = self._admin_limits(body, uid)
                    else:
                        result = await self.io.run(IoClass.INTERACTIVE, "admin",
                                                   self._admin_cmd, body, uid)
                    reply = encode_ctrl(Msg.ADMIN_OK, {"result": result}, MAX_ADMIN_REPLY)
                await _sendall(conn, reply)
            except (StoreError, ValueError, KeyError) as e:
                await _sendall(conn, encode_ctrl(Msg.ERROR, {"code": "admin", "message": str(e)}))
            try:
                msg, body = await _read_msg(conn, parser)
            except EOFError:
                return
            if msg != Msg.ADMIN:
                return

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _admin_limits(self, body: dict[str, Any], uid: int) -> Any:
        """Show, or change live, a tenant's quota and rate limits (`kvtier limits`)."""
        assert self.qos is not None
        tenant = body.get("tenant")
        if not isinstance(tenant, str) or self.cfg.tenant(tenant) is None:
            raise ValueError(f"no tenant {tenant!r} in the configuration")
        now = self.qos.tenants[tenant].describe()  # every configured tenant has an entry
        changes = _limit_changes(body)
        for k, v in changes.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{k} must be a positive integer or null (unlimited), "
                                 f"got {v!r}")
        if changes:
            new = {k: changes.get(k, now[k]) for k in ("quota", "bandwidth", "iops")}
            self.qos.set_limits(tenant, **new)
            self._audit("policy_change", uid=uid, tenant=tenant, before={k: now[k] for k in new},
                        after=new)
            log.info("tenant %s: limits now %s (uid %d)", tenant, new, uid)
        return self.qos.tenants[tenant].describe()

    def _admin_cmd(self, body: dict[str, Any], uid: int) -> Any:
        """One admin command, answered from the view the FUSE tree shows too."""
        v = self.admin_view
        assert v is not None
        cmd = body.get("cmd")
        tenant, session = _opt_str(body, "tenant"), _opt_str(body, "session")
        if cmd == "status":
            return v.status()
        if cmd == "ls":
            if session is None:
                return v.usage(tenant)
            return v.blocks(_str(body, "tenant"), session)
        if cmd == "info":
            if session is None:
                return v.tenant_info(_str(body, "tenant"))
            return v.session_info(_str(body, "tenant"), session)
        if cmd == "stat":
            return v.block_info(_str(body, "tenant"), _str(body, "key"))
        if cmd == "pools":
            return {name: v.pool_info(name) for name in v.pools()}
        if cmd == "segments":
            return v.segments(_str(body, "pool"))
        if cmd == "delete":
            v.delete(_str(body, "tenant"), _str(body, "key"), uid=uid, via="socket")
            return {"deleted": 1}
        if cmd == "purge":
            return {"purged": v.purge(_str(body, "tenant"), session, uid=uid, via="socket")}
        raise ValueError(f"unknown admin command {cmd!r}")

    def _qos_tenants(self) -> dict[str, Any]:
        return self.qos.tenants if self.qos is not None else {}

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """What a client's STATS answers: its own tenant only -- its entries and bytes, its
        DRAM tier, its clients.  Nothing of other tenants, not even that they exist; the
        daemon-wide status is the admin's (`stats`)."""
        assert self.store is not None
        dram = self.store.drams.get(tenant)
        return {"tenant": tenant, "ack": self.store.ack,
                "media": self.store.media.tenant_usage(tenant),
                "dram": dram.stats() if dram is not None else None,
                "daemon": {"metrics_port": self.metrics_port,
                           "clients": [{"id": s.id, "pid": s.pid, "uid": s.uid, "ops": s.ops,
                                        "errors": s.errors}
                                       for s in self.sessions.values() if s.tenant == tenant]}}

    def stats(self) -> dict[str, Any]:
        assert self.store is not None
        st = self.store.stats()
        st["daemon"] = {"pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                        "socket": self.socket_path, "metrics_port": self.metrics_port,
                        "clients": [{"id": s.id, "tenant": s.tenant, "pid": s.pid,
                                     "uid": s.uid, "ops": s.ops, "errors": s.errors}
                                    for s in self.sessions.values()],
                        "config": self.cfg.source,
                        "tenants": [{"id": t.id, "encryption": t.encryption,
                                     "key_scope": t.key_scope, "retention_s": t.retention_s}
                                    for t in self.cfg.tenants]}
        if self.qos is not None:
            st["qos"] = self.qos.describe()
        if self.audit is not None:
            st["audit"] = self.audit.describe()
        st["policy"] = self.policy.describe()
        st["io"] = self.io.describe()
        if self.prefetch is not None:
            st["prefetch"] = dict(vars(self.prefetch.stats), queued=self.prefetch.queued,
                                  rate_bytes_per_s=round(self.prefetch.rate),
                                  workers=self.prefetch.workers)
        return st


# -- helpers ---------------------------------------------------------------------------------------


def _verify_token_lowered(token: str, stored: str, nice: int) -> bool:
    """A token check at background CPU priority: a flood of them must not take the cores
    from the requests of clients already connected."""
    if not nice:
        return verify_token(token, stored)
    with cpuprio.lowered(nice):
        return verify_token(token, stored)


def _dummy_token_hash(cfg: Config) -> str:
    """A hash nobody's token matches, with the scrypt parameters of the configured tenants
    (the first one's): checking a token against it costs what checking a wrong token of
    a real tenant costs, so HELLO's timing does not tell which tenant names exist."""
    n, r, p = 2**14, 8, 1
    if cfg.tenants:  # the config checked every hash (parse_token_hash) already
        n, r, p, _salt, _h = parse_token_hash(cfg.tenants[0].token_hash)
    h = hashlib.sha256(secrets.token_bytes(32)).hexdigest()  # matches no scrypt output
    return f"scrypt${n}${r}${p}${secrets.token_bytes(16).hex()}${h}"


def _make_resources(arena_size: int, entries: int,
                    name: str) -> tuple[ConnectionResources, list[int]]:
    fds: list[int] = []
    try:
        sq_fd = os.memfd_create(f"{name}-sq", os.MFD_CLOEXEC)
        fds.append(sq_fd)
        cq_fd = os.memfd_create(f"{name}-cq", os.MFD_CLOEXEC)
        fds.append(cq_fd)
        arena_fd = os.memfd_create(f"{name}-arena", os.MFD_CLOEXEC)
        fds.append(arena_fd)
        os.ftruncate(sq_fd, ring_bytes(entries, SQE_SIZE))
        os.ftruncate(cq_fd, ring_bytes(entries, CQE_SIZE))
        os.ftruncate(arena_fd, arena_size)
        sq_map = mmap.mmap(sq_fd, ring_bytes(entries, SQE_SIZE))
        cq_map = mmap.mmap(cq_fd, ring_bytes(entries, CQE_SIZE))
        arena_map = mmap.mmap(arena_fd, arena_size)
        init_ring(memoryview(sq_map), entries, SQE_SIZE)
        init_ring(memoryview(cq_map), entries, CQE_SIZE)
        sq_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fds.append(sq_efd)
        cq_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fds.append(cq_efd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return ConnectionResources(sq_map, cq_map, arena_map, sq_efd, cq_efd), fds


async def _read_msg(conn: trio.socket.SocketType, parser: CtrlParser) -> tuple[Msg, dict[str, Any]]:
    while True:
        m = parser.next_message()
        if m is not None:
            return m
        data = await conn.recv(65536)
        if not data:
            raise EOFError
        parser.feed(data)


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{name} must be a string, got {v!r}")
    return v


def _str(body: dict[str, Any], name: str) -> str:
    v = _opt_str(body, name)
    if v is None:
        raise ValueError(f"this admin command needs a {name}")
    return v


def _admin_change(body: dict[str, Any]) -> bool:
    """Whether an admin command changes something (refused while it cannot be audited)."""
    cmd = body.get("cmd")
    return cmd in ("purge", "delete") or (cmd == "limits" and bool(_limit_changes(body)))


def _limit_changes(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in ("quota", "bandwidth", "iops") if k in body}


def _close_all(fds: list[int]) -> None:
    """Close each fd once: the list is emptied."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _leaf(e: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def _sendall(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await conn.send(view)
        view = view[n:]


async def _send_fds(conn: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    await conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 array.array("i", fds).tobytes())])


def _refuse_now(conn: trio.socket.SocketType, code: str, message: str) -> None:
    """Send an ERROR without waiting (what does not fit the socket buffer is dropped) and
    close the connection."""
    with conn:
        try:
            os.write(conn.fileno(), encode_ctrl(Msg.ERROR, {"code": code, "message": message}))
        except OSError:
            pass  # the peer's problem: it is closed either way


async def _send_error(conn: trio.socket.SocketType, code: str, message: str) -> None:
    try:
        await _sendall(conn, encode_ctrl(Msg.ERROR, {"code": code, "message": message}))
    except OSError:
        pass

