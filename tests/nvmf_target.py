"""A small NVMe/TCP target for the tests: the stand-in for SPDK's nvmf_tgt where SPDK is
not installed.

File-backed namespaces behind NVMe-oF subsystems, reached over TCP:

* the transport: ICReq/ICResp with header and data digests, CapsuleCmd with in-capsule
  data, R2T-driven writes, C2HData in PDUs of at most `max_c2h` bytes with SPDK's
  "SUCCESS in the last C2HData" optimisation (`c2h_success`), C2HTermReq on a protocol
  error;
* the controller: fabrics Connect (admin and I/O queues, host allow-list), Property
  Get/Set (CC.EN -> CSTS.RDY), Identify controller/namespace, Set Features (number of
  queues), Keep Alive with the KATO enforced, Read/Write/Flush with MDTS;
* a subset of SPDK's JSON-RPC on a Unix socket (`--rpc-socket`) so that provisioning
  through `kvtier.daemon.spdk` runs against it in CI: transports, aio/malloc bdevs,
  subsystems, namespaces, hosts and listeners, with SPDK's method names and parameters;
* TLS 1.3 with PSKs (`kvtier.daemon.nvmf.tls`, server side): a listener made a secure
  channel takes the handshake before ICReq and accepts the identities of the hosts that
  have a PSK there (SPDK's `keyring_file_add_key`, `nvmf_subsystem_add_host --psk`,
  `nvmf_subsystem_add_listener --secure-channel`); a host with a PSK must connect over
  TLS, as itself;
* key files read by SPDK's own rules, not the host's (so that a host that accepts what SPDK
  refuses fails here too): `keyring_file_add_key` wants an absolute path to a file with
  no group/other permission bits, owned by the target's uid (SPDK's `keyring_file`
  module), and the key is parsed as `nvme_tcp_parse_interchange_psk` does -- the whole
  file, whose last byte must be the closing ':' -- when a host is allowed with it and at
  every handshake;
* faults for the tests: SIGUSR1 toggles a stall (commands are taken but never answered),
  SIGUSR2 resets every connection (RST), and SIGKILL is SIGKILL.

Run: `python tests/nvmf_target.py --file pool.img --size 64M --port 4420` (a namespace
and subsystem from the command line), or `--rpc-socket PATH` and provision through it.
It prints "listening <port>" (one line per listener) once it accepts connections.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kvtier.daemon.nvmf import nvme, psk
from kvtier.daemon.nvmf.pdu import (
    CONTROLLER_RECEIVES,
    DGST_DATA,
    DGST_HEADER,
    FLAG_LAST_PDU,
    FLAG_SUCCESS,
    R2T,
    C2HData,
    CapsuleCmd,
    CapsuleResp,
    Fes,
    H2CData,
    ICReq,
    ICResp,
    Pdu,
    PduReader,
    ProtocolError,
    TermReq,
    encode,
    encode_pdu,
)
from kvtier.daemon.nvmf.tls import TlsError, TlsSession

MQES = 128
MAX_IO_QUEUES = 127
IN_CAPSULE = 4096
SCT_GENERIC, SCT_CMD = 0, 1
SPDK_TLS_PSK_MAX_LEN = 200


# -- key files, as SPDK reads them ---------------------------------------------------------------

class KeyRefused(Exception):
    """What SPDK refuses a key file with: an errno and the line SPDK logs."""

    def __init__(self, err: int, log: str) -> None:
        super().__init__(log)
        self.errno = err


def keyring_check_path(path: str) -> int:
    """SPDK's keyring_file_check_path: the file's size, or KeyRefused."""
    if not path.startswith("/"):
        raise KeyRefused(errno.EPERM, f"Non-absolute paths are not allowed: {path}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise KeyRefused(e.errno or errno.EIO,
                         f"Could not stat key file '{path}': {e.strerror}") from None
    if st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise KeyRefused(errno.EPERM, f"Invalid permissions for key file '{path}': "
                                      f"0{st.st_mode:o}")
    return st.st_size


def keyring_get_key(path: str) -> bytes:
    """SPDK's keyring_file_get_key into a SPDK_TLS_PSK_MAX_LEN buffer: the file as it is."""
    size = keyring_check_path(path)
    if size > SPDK_TLS_PSK_MAX_LEN:
        raise KeyRefused(errno.ENOBUFS, f"Invalid key size: {size} > {SPDK_TLS_PSK_MAX_LEN}")
    with open(path, "rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise KeyRefused(errno.EIO, "Could not load key")
    return data


def parse_interchange_psk(buf: bytes) -> tuple[bytes, int]:
    """SPDK's nvme_tcp_parse_interchange_psk over a NUL-terminated buffer: (configured PSK,
    hash), or KeyRefused with SPDK's message.  (`%02hhx` is taken as one or two hex
    digits; SPDK's sscanf would also skip whitespace there.)"""
    s = buf.split(b"\0", 1)[0]
    m = re.match(rb"NVMeTLSkey-1:([0-9a-fA-F]{1,2})", s)
    if m is None or not s or s[-1:] != b":":
        raise KeyRefused(errno.EINVAL, "Invalid format of PSK interchange!")
    if len(s) >= SPDK_TLS_PSK_MAX_LEN:
        raise KeyRefused(errno.EINVAL, "PSK interchange exceeds maximum "
                                       f"{SPDK_TLS_PSK_MAX_LEN} characters!")
    hash_id = int(m.group(1), 16)
    if hash_id not in (0, 1, 2):
        raise KeyRefused(errno.EINVAL, "Invalid PSK length!")
    tokens = [t for t in s.split(b":") if t]  # strtok_r: empty tokens are skipped
    if len(tokens) < 3:
        raise KeyRefused(errno.EINVAL, "Could not get base64 string from PSK interchange!")
    try:
        raw = base64.b64decode(tokens[2], validate=True)
    except (binascii.Error, ValueError):
        raise KeyRefused(errno.EINVAL, "Could not decode base64 PSK!") from None
    size = {1: 32, 2: 48}.get(hash_id) or {36: 32, 52: 48}.get(len(raw), 0)
    if len(raw) != size + 4:
        raise KeyRefused(errno.EINVAL, "Invalid key: unsupported key length")
    if zlib.crc32(raw[:size]) != struct.unpack("<I", raw[size:])[0]:
        raise KeyRefused(errno.EINVAL, "CRC-32 checksums do not match!")
    return raw[:size], hash_id


def spdk_read_psk(path: str) -> psk.ConfiguredPsk:
    """The key in `path` as SPDK's keyring and parser read it (KeyRefused if they would not)."""
    key, hash_id = parse_interchange_psk(keyring_get_key(path))
    return psk.ConfiguredPsk(key, hash_id)


@dataclass
class Namespace:
    bdev: str
    path: str
    lba_size: int
    nblocks: int
    fd: int = -1

    def open(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)


@dataclass
class Subsystem:
    nqn: str
    serial: str = "KVTIER-TEST"
    allow_any_host: bool = True
    hosts: set[str] = field(default_factory=set)
    host_psk: dict[str, str] = field(default_factory=dict)  # host NQN -> keyring key name
    namespaces: dict[int, Namespace] = field(default_factory=dict)
    listeners: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class Controller:
    cntlid: int
    subsystem: Subsystem
    hostnqn: str
    kato_ms: int
    cc: int = 0
    io_queues: int = MAX_IO_QUEUES
    last_keep_alive: float = field(default_factory=time.monotonic)
    connections: list[Connection] = field(default_factory=list)


class Target:
    def __init__(self, *, mdts_shift: int = 5, max_c2h: int = 131072,
                 c2h_success: bool = True, maxh2cdata: int = 131072) -> None:
        self.mdts_shift = mdts_shift  # MDTS = 4 KiB << shift (default 128 KiB, as SPDK)
        self.max_c2h = max_c2h
        self.c2h_success = c2h_success
        self.maxh2cdata = maxh2cdata
        self.subsystems: dict[str, Subsystem] = {}
        self.bdevs: dict[str, Namespace] = {}
        self.transports: list[dict[str, Any]] = []
        self.controllers: dict[int, Controller] = {}
        self.stalled = False
        self._next_cntlid = 1
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, int], socket.socket] = {}
        self.secure: set[tuple[str, int]] = set()  # listeners that are secure channels
        self.keys: dict[str, str] = {}  # keyring: key name -> interchange-format key file
        self._conns: set[Connection] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._watchdog, daemon=True).start()

    # -- configuration --------------------------------------------------------------------

    def add_bdev(self, name: str, path: str, lba_size: int = 4096) -> Namespace:
        size = os.path.getsize(path)
        ns = Namespace(name, path, lba_size, size // lba_size)
        ns.open()
        self.bdevs[name] = ns
        return ns

    def add_subsystem(self, nqn: str, **kw: Any) -> Subsystem:
        sub = Subsystem(nqn, **kw)
        self.subsystems[nqn] = sub
        return sub

    def listen(self, addr: str, port: int, secure: bool = False) -> int:
        key = (addr, port)
        if key in self._listeners:
            return port
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(64)
        port = s.getsockname()[1]
        self._listeners[(addr, port)] = s
        if secure:
            self.secure.add((addr, port))
        threading.Thread(target=self._accept, args=(s, (addr, port)), daemon=True).start()
        return port

    def unlisten(self, addr: str, port: int) -> None:
        s = self._listeners.pop((addr, port), None)
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            except OSError:
                pass
            s.close()
        self.secure.discard((addr, port))

    def tls_keys(self) -> dict[str, tuple[bytes, str]]:
        """The TLS identities this target accepts, with their keys: every host given a PSK
        on a subsystem (keys re-read from their files, as SPDK's keyring_file does)."""
        out = {}
        for sub in self.subsystems.values():
            for host, name in sub.host_psk.items():
                try:
                    k = spdk_read_psk(self.keys[name])
                except KeyRefused as e:  # SPDK fails this host's handshake: so do we
                    print(f"key {name}: {e}", file=sys.stderr, flush=True)
                    continue
                ident, key = k.tls_psk(host, sub.nqn)
                out[ident] = (key, k.suite)
        return out

    def reset_connections(self) -> None:
        for c in list(self._conns):
            c.abort()

    def _accept(self, s: socket.socket, where: tuple[str, int]) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except OSError:
                return
            c = Connection(self, conn, secure=where in self.secure)
            self._conns.add(c)
            threading.Thread(target=c.run, daemon=True).start()

    def _watchdog(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                dead = [c for c in self.controllers.values()
                        if c.kato_ms and now - c.last_keep_alive > c.kato_ms / 1000 * 1.5]
            for ctrl in dead:
                for conn in list(ctrl.connections):
                    conn.abort()
                with self._lock:
                    self.controllers.pop(ctrl.cntlid, None)

    def new_controller(self, sub: Subsystem, hostnqn: str, kato_ms: int) -> Controller:
        with self._lock:
            ctrl = Controller(self._next_cntlid, sub, hostnqn, kato_ms)
            self._next_cntlid += 1
            self.controllers[ctrl.cntlid] = ctrl
            return ctrl


class Connection:
    def __init__(self, target: Target, sock: socket.socket, secure: bool = False) -> None:
        self.t = target
        self.sock = sock
        self.secure = secure
        self.tls: TlsSession | None = None
        self._tls_lock = threading.RLock()  # one OpenSSL object, read and written by threads
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = PduReader(CONTROLLER_RECEIVES, sink=self._sink, max_data=4 << 20)
        self.hdgst = self.ddgst = False
        self.hpda = 0
        self.ctrl: Controller | None = None
        self.qid = -1
        self.sqhd = 0
        self.sqsize = 0
        self.connected = False
        self.icreq_seen = False
        self.pending: dict[int, tuple[nvme.Sqe, memoryview, int]] = {}  # cid -> write
        self.capsule_buf: memoryview | None = None
        self._send_lock = threading.Lock()

    def abort(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.shutdown(socket.SHUT_RD)  # wakes the reader; its close() sends RST
        except OSError:
            pass

    def send(self, segs: list[bytes | memoryview]) -> None:
        if self.tls is not None:
            with self._send_lock:
                with self._tls_lock:
                    for seg in segs:
                        self.tls.write(seg)
                    out = self.tls.take_output()
                self.sock.sendall(out)
            return
        with self._send_lock:
            while segs:
                n = self.sock.sendmsg(segs)
                while n:
                    s = segs[0]
                    ln = len(s)
                    if n >= ln:
                        n -= ln
                        segs = segs[1:]
                    else:
                        segs[0] = memoryview(s)[n:]
                        n = 0

    def _handshake(self) -> bool:
        tls = TlsSession(client=False, keys=self.t.tls_keys())
        while True:
            try:
                done = tls.handshake()
            except TlsError:
                self.sock.sendall(tls.take_output())  # the alert says why
                return False
            self.sock.sendall(tls.take_output())
            if done:
                self.tls = tls
                return True
            data = self.sock.recv(65536)
            if not data:
                return False
            tls.receive_bytes(data)

    def _recv(self, buf: memoryview) -> int:
        if self.tls is None:
            return self.sock.recv_into(buf)
        while True:
            with self._tls_lock:
                n = self.tls.read_into(buf)
            if n:
                return n
            data = self.sock.recv(1 << 18)
            if not data:
                return 0
            with self._tls_lock:
                self.tls.receive_bytes(data)

    def run(self) -> None:
        try:
            if self.secure and not self._handshake():
                return
            while True:
                buf = self.reader.buffer()
                n = self._recv(buf)
                if n == 0:
                    return
                try:
                    got = self.reader.feed(n)
                    if got is not None:
                        self.handle(got.pdu, got.flags, got.data_ok)
                except ProtocolError as e:
                    head, _ = encode(TermReq(int(e.fes), e.fei, from_host=False))
                    self.send([head])
                    return
        except (OSError, TlsError):
            return
        finally:
            self.t._conns.discard(self)
            if self.ctrl is not None and self in self.ctrl.connections:
                self.ctrl.connections.remove(self)
            try:
                self.sock.close()
            except OSError:
                pass

    # -- receive ----------------------------------------------------------------------------

    def _sink(self, pdu: Pdu, length: int) -> list[memoryview]:
        if isinstance(pdu, CapsuleCmd):
            if length > IN_CAPSULE + 1024:
                raise ProtocolError(Fes.DATA_LIMIT_EXCEEDED, 4, "in-capsule data too large")
            self.capsule_buf = memoryview(bytearray(length))
            return [self.capsule_buf]
        if isinstance(pdu, H2CData):
            w = self.pending.get(pdu.cccid)
            if w is None:
                raise ProtocolError(Fes.INVALID_HEADER_FIELD, 8, "H2CData without R2T")
            _, buf, asked = w
            if pdu.datao + length > asked:
                raise ProtocolError(Fes.DATA_OUT_OF_RANGE, 12, "H2CData beyond R2T")
            return [buf[pdu.datao:pdu.datao + length]]
        raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0, "unexpected data")

    def handle(self, pdu: Pdu, flags: int, data_ok: bool) -> None:
        if isinstance(pdu, ICReq):
            if self.icreq_seen:
                raise ProtocolError(Fes.SEQUENCE_ERROR, 0, "second ICReq")
            self.icreq_seen = True
            dgst = pdu.dgst & (DGST_HEADER | DGST_DATA)
            self.hpda = pdu.hpda
            self.send(encode_pdu(ICResp(0, 0, dgst, self.t.maxh2cdata)))
            self.hdgst = bool(dgst & DGST_HEADER)
            self.ddgst = bool(dgst & DGST_DATA)
            self.reader.set_digests(self.hdgst, self.ddgst)
            return
        if not self.icreq_seen:
            raise ProtocolError(Fes.SEQUENCE_ERROR, 0, "PDU before ICReq")
        if isinstance(pdu, TermReq):
            raise OSError("host terminated")
        if isinstance(pdu, CapsuleCmd):
            data = self.capsule_buf
            self.capsule_buf = None
            sqe = nvme.Sqe.parse(pdu.sqe)
            if not data_ok:
                self.complete(sqe.cid, nvme.status_field(0, 0x22))
                return
            self.command(sqe, data)
            return
        if isinstance(pdu, H2CData):
            sqe, buf, asked = self.pending[pdu.cccid]
            if flags & FLAG_LAST_PDU and pdu.datao + pdu.datal == asked:
                if not data_ok:
                    del self.pending[pdu.cccid]
                    self.complete(sqe.cid, nvme.status_field(0, 0x22))
                    return
                if asked < buf.nbytes:
                    n = min(self.t.maxh2cdata * 4, buf.nbytes - asked)
                    self.pending[pdu.cccid] = (sqe, buf, asked + n)
                    self.send(encode_pdu(R2T(sqe.cid, sqe.cid, asked, n), hdgst=self.hdgst))
                    return
                del self.pending[pdu.cccid]
                self.finish_write(sqe, buf)
            return
        raise ProtocolError(Fes.INVALID_HEADER_FIELD, 0, f"unexpected {pdu.type.name}")

    # -- commands ---------------------------------------------------------------------------

    def complete(self, cid: int, status: int = 0, dw0: int = 0, dw1: int = 0) -> None:
        if self.t.stalled:
            return
        self.sqhd = (self.sqhd + 1) % max(self.sqsize, 1)
        cqe = nvme.Cqe(dw0, dw1, self.sqhd, max(self.qid, 0), cid, status)
        self.send(encode_pdu(CapsuleResp(cqe.pack()), hdgst=self.hdgst))

    def command(self, sqe: nvme.Sqe, data: memoryview | None) -> None:
        if sqe.opcode == nvme.Opcode.FABRICS:
            self.fabrics(sqe, data)
            return
        if not self.connected or self.ctrl is None:
            self.complete(sqe.cid, nvme.status_field(0, 0x0C))  # command sequence error
            return
        if self.qid == 0:
            self.admin(sqe)
        else:
            self.io(sqe, data)

    def fabrics(self, sqe: nvme.Sqe, data: memoryview | None) -> None:
        raw = struct.pack("<6I", *sqe.cdw)
        if sqe.fctype == nvme.Fctype.CONNECT:
            _, qid, sqsize, _, kato = struct.unpack_from("<HHHBxI", raw, 0)
            if data is None or data.nbytes < nvme.CONNECT_DATA_LEN:
                self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x82, True))
                return
            _, cntlid, subnqn, hostnqn = nvme.parse_connect_data(data)
            sub = self.t.subsystems.get(subnqn)
            if sub is None or not sub.namespaces:
                self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x82, True), dw0=256 << 16)
                return
            if not sub.allow_any_host and hostnqn not in sub.hosts:
                self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x84, True))
                return
            if hostnqn in sub.host_psk and (
                    self.tls is None or self.tls.peer_identity.split(" ")[1:] != [hostnqn,
                                                                                   subnqn]):
                # A host with a PSK connects over TLS, as the host its identity names.
                self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x84, True))
                return
            if sqsize + 1 > MQES:
                self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x82, True), dw0=44)
                return
            if qid == 0:
                ctrl = self.t.new_controller(sub, hostnqn, kato)
            else:
                found = self.t.controllers.get(cntlid)
                if found is None or found.hostnqn != hostnqn or qid > found.io_queues:
                    self.complete(sqe.cid, nvme.status_field(SCT_CMD, 0x82, True))
                    return
                if not found.cc & nvme.CC_EN:
                    self.complete(sqe.cid, nvme.status_field(0, 0x0C))
                    return
                ctrl = found
            self.ctrl, self.qid, self.sqsize, self.connected = ctrl, qid, sqsize + 1, True
            ctrl.connections.append(self)
            self.complete(sqe.cid, 0, dw0=ctrl.cntlid)
            return
        if not self.connected or self.ctrl is None or self.qid != 0:
            self.complete(sqe.cid, nvme.status_field(0, 0x0C))
            return
        attrib, ofst, value = raw[0], struct.unpack_from("<I", raw, 4)[0], \
            struct.unpack_from("<Q", raw, 8)[0]
        ctrl = self.ctrl
        if sqe.fctype == nvme.Fctype.PROPERTY_GET:
            regs = {nvme.REG_CAP: (MQES - 1) | (20 << 24) | (1 << 37),
                    nvme.REG_VS: 0x00010400, nvme.REG_CC: ctrl.cc,
                    nvme.REG_CSTS: nvme.CSTS_RDY if ctrl.cc & nvme.CC_EN else 0}
            if ofst not in regs:
                self.complete(sqe.cid, nvme.status_field(0, 0x02, True))
                return
            v = regs[ofst] if attrib & 1 else regs[ofst] & 0xFFFFFFFF
            self.complete(sqe.cid, 0, v & 0xFFFFFFFF, v >> 32)
            return
        if sqe.fctype == nvme.Fctype.PROPERTY_SET:
            if ofst != nvme.REG_CC:
                self.complete(sqe.cid, nvme.status_field(0, 0x02, True))
                return
            ctrl.cc = value & 0xFFFFFFFF
            self.complete(sqe.cid)
            return
        self.complete(sqe.cid, nvme.status_field(0, 0x01, True))

    def admin(self, sqe: nvme.Sqe) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        ctrl.last_keep_alive = time.monotonic()
        if sqe.opcode == nvme.Opcode.KEEP_ALIVE:
            self.complete(sqe.cid)
        elif sqe.opcode == nvme.Opcode.IDENTIFY:
            cns = sqe.cdw[0] & 0xFF
            if cns == nvme.Cns.CONTROLLER:
                body = nvme.build_identify_controller(
                    serial=ctrl.subsystem.serial, model="kvtier test target",
                    firmware="1.0", mdts_shift=self.t.mdts_shift, cntlid=ctrl.cntlid,
                    ioccsz=64 + IN_CAPSULE, maxcmd=MQES, nn=max(ctrl.subsystem.namespaces,
                                                                 default=0),
                    subnqn=ctrl.subsystem.nqn)
            elif cns == nvme.Cns.NAMESPACE:
                ns = ctrl.subsystem.namespaces.get(sqe.nsid)
                if ns is None:
                    self.complete(sqe.cid, nvme.status_field(0, 0x0B, True))
                    return
                body = nvme.build_identify_namespace(ns.nblocks, ns.lba_size)
            else:
                self.complete(sqe.cid, nvme.status_field(0, 0x02, True))
                return
            self.send_data(sqe.cid, memoryview(body))
        elif sqe.opcode == nvme.Opcode.SET_FEATURES and sqe.cdw[0] & 0xFF == 0x07:
            want = min((sqe.cdw[1] & 0xFFFF) + 1, MAX_IO_QUEUES)
            ctrl.io_queues = want
            self.complete(sqe.cid, 0, dw0=((want - 1) << 16) | (want - 1))
        else:
            self.complete(sqe.cid, nvme.status_field(0, 0x01, True))

    def io(self, sqe: nvme.Sqe, data: memoryview | None) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        ns = ctrl.subsystem.namespaces.get(sqe.nsid)
        if ns is None:
            self.complete(sqe.cid, nvme.status_field(0, 0x0B, True))
            return
        if sqe.opcode == nvme.Opcode.FLUSH:
            os.fdatasync(ns.fd)
            self.complete(sqe.cid)
            return
        if sqe.opcode not in (nvme.Opcode.READ, nvme.Opcode.WRITE):
            self.complete(sqe.cid, nvme.status_field(0, 0x01, True))
            return
        nbytes = sqe.nlb * ns.lba_size
        if sqe.slba + sqe.nlb > ns.nblocks:
            self.complete(sqe.cid, nvme.status_field(0, 0x80, True))
            return
        if nbytes > (4096 << self.t.mdts_shift) or sqe.sgl_length != nbytes:
            self.complete(sqe.cid, nvme.status_field(0, 0x02, True))
            return
        if sqe.opcode == nvme.Opcode.READ:
            buf = memoryview(bytearray(nbytes))
            os.preadv(ns.fd, [buf], sqe.slba * ns.lba_size)
            self.send_data(sqe.cid, buf)
            return
        if data is not None:
            self.finish_write(sqe, data)
            return
        buf = memoryview(bytearray(nbytes))
        n = min(self.t.maxh2cdata * 4, nbytes)
        self.pending[sqe.cid] = (sqe, buf, n)
        self.send(encode_pdu(R2T(sqe.cid, sqe.cid, 0, n), hdgst=self.hdgst))

    def finish_write(self, sqe: nvme.Sqe, buf: memoryview) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        ns = ctrl.subsystem.namespaces[sqe.nsid]
        if buf.nbytes != sqe.nlb * ns.lba_size:
            self.complete(sqe.cid, nvme.status_field(0, 0x0F, True))
            return
        os.pwritev(ns.fd, [buf], sqe.slba * ns.lba_size)
        self.complete(sqe.cid)

    def send_data(self, cid: int, buf: memoryview) -> None:
        if self.t.stalled:
            return
        off = 0
        total = buf.nbytes
        while off < total:
            n = min(self.t.max_c2h, total - off)
            last = off + n == total
            flags = FLAG_LAST_PDU if last else 0
            if last and self.t.c2h_success:
                flags |= FLAG_SUCCESS
            self.send(encode_pdu(C2HData(cid, off, n), flags=flags, hdgst=self.hdgst,
                                 ddgst=self.ddgst, data=[buf[off:off + n]], pda=self.hpda))
            off += n
        if not self.t.c2h_success:
            self.complete(cid)


# -- SPDK JSON-RPC subset ---------------------------------------------------------------------

class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Rpc:
    """SPDK's JSON-RPC method names and parameters, for what kvtier provisions."""

    def __init__(self, target: Target, workdir: str) -> None:
        self.t = target
        self.workdir = workdir
        self.calls: list[str] = []  # every method asked for, in order (tests read it)

    def call(self, method: str, p: dict[str, Any]) -> Any:
        self.calls.append(method)
        fn = getattr(self, "m_" + method, None)
        if fn is None:
            raise RpcError(-32601, "Method not found")
        return fn(p)

    def m_spdk_get_version(self, p: dict[str, Any]) -> Any:
        return {"version": "kvtier-test-target", "fields": {"major": 0, "minor": 0}}

    def m_nvmf_create_transport(self, p: dict[str, Any]) -> Any:
        tr = str(p.get("trtype", "")).upper()
        if tr != "TCP":
            raise RpcError(-32602, f"Invalid parameters: transport {tr!r} not supported")
        if any(t["trtype"] == "TCP" for t in self.t.transports):
            raise RpcError(-32602, "Invalid parameters: transport TCP already exists")
        if "max_io_size" in p:  # the MDTS controllers report from now on
            n = int(p["max_io_size"])
            if n < 4096 or n & (n - 1):
                raise RpcError(-32602, f"Invalid parameters: max_io_size {n}")
            self.t.mdts_shift = (n // 4096).bit_length() - 1
        self.t.transports.append({"trtype": "TCP", "max_queue_depth": MQES,
                                  "in_capsule_data_size": IN_CAPSULE,
                                  "max_io_size": 4096 << self.t.mdts_shift})
        return True

    def m_nvmf_get_transports(self, p: dict[str, Any]) -> Any:
        return list(self.t.transports)

    def m_bdev_aio_create(self, p: dict[str, Any]) -> Any:
        name = p["name"]
        if name in self.t.bdevs:
            raise RpcError(-17, "File exists")
        if not os.path.exists(p["filename"]):
            raise RpcError(-2, "No such file or directory")
        self.t.add_bdev(name, p["filename"], int(p.get("block_size", 512)))
        return name

    def m_bdev_malloc_create(self, p: dict[str, Any]) -> Any:
        name = p.get("name") or f"Malloc{len(self.t.bdevs)}"
        if name in self.t.bdevs:
            raise RpcError(-17, "File exists")
        path = os.path.join(self.workdir, f"{name}.malloc")
        with open(path, "wb") as f:
            f.truncate(int(p["num_blocks"]) * int(p["block_size"]))
        self.t.add_bdev(name, path, int(p["block_size"]))
        return name

    def _delete_bdev(self, p: dict[str, Any]) -> Any:
        ns = self.t.bdevs.pop(p["name"], None)
        if ns is None:
            raise RpcError(-19, "No such device")
        for sub in self.t.subsystems.values():
            for nsid in [k for k, v in sub.namespaces.items() if v is ns]:
                del sub.namespaces[nsid]
        return True

    m_bdev_aio_delete = _delete_bdev
    m_bdev_malloc_delete = _delete_bdev

    def m_bdev_get_bdevs(self, p: dict[str, Any]) -> Any:
        out = [{"name": n.bdev, "block_size": n.lba_size, "num_blocks": n.nblocks,
                "product_name": "AIO disk"} for n in self.t.bdevs.values()]
        if p.get("name"):
            out = [b for b in out if b["name"] == p["name"]]
            if not out:
                raise RpcError(-19, "No such device")
        return out

    def _sub(self, p: dict[str, Any]) -> Subsystem:
        sub = self.t.subsystems.get(p["nqn"])
        if sub is None:
            raise RpcError(-32602, f"Invalid parameters: subsystem {p['nqn']} not found")
        return sub

    def m_nvmf_create_subsystem(self, p: dict[str, Any]) -> Any:
        if p["nqn"] in self.t.subsystems:
            raise RpcError(-32602, "Invalid parameters: subsystem already exists")
        self.t.add_subsystem(p["nqn"], serial=p.get("serial_number", "KVTIER"),
                             allow_any_host=bool(p.get("allow_any_host", False)))
        return True

    def m_nvmf_delete_subsystem(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        for addr in sub.listeners:
            if not any(addr in s.listeners for s in self.t.subsystems.values() if s is not sub):
                self.t.unlisten(*addr)
        del self.t.subsystems[sub.nqn]
        return True

    def m_nvmf_subsystem_add_ns(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        name = p["namespace"]["bdev_name"]
        ns = self.t.bdevs.get(name)
        if ns is None:
            raise RpcError(-32602, f"Invalid parameters: bdev {name} not found")
        nsid = int(p["namespace"].get("nsid", 0)) or (max(sub.namespaces, default=0) + 1)
        if nsid in sub.namespaces:
            raise RpcError(-32602, "Invalid parameters: nsid in use")
        sub.namespaces[nsid] = ns
        return nsid

    def m_nvmf_subsystem_remove_ns(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        if sub.namespaces.pop(int(p["nsid"]), None) is None:
            raise RpcError(-32602, "Invalid parameters: no such namespace")
        return True

    def m_nvmf_subsystem_add_host(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        if p["host"] in sub.hosts:
            raise RpcError(-32602, "Invalid parameters: host already allowed")
        if p.get("psk") is not None:
            if p["psk"] not in self.t.keys:
                raise RpcError(-32602, f"Invalid parameters: key {p['psk']} not found")
            try:  # SPDK's TCP transport loads and parses the key when the host is added
                spdk_read_psk(self.t.keys[p["psk"]])
            except KeyRefused as e:
                raise RpcError(-32603, f"Internal error (key {p['psk']}: {e})") from None
            sub.host_psk[p["host"]] = p["psk"]
        sub.hosts.add(p["host"])
        return True

    def m_nvmf_subsystem_remove_host(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        sub.hosts.discard(p["host"])
        sub.host_psk.pop(p["host"], None)
        return True

    def m_keyring_file_add_key(self, p: dict[str, Any]) -> Any:
        name, path = p["name"], p["path"]
        if name in self.t.keys:
            raise RpcError(-17, "File exists")
        try:  # SPDK checks the path and the file's mode and owner here, not its content
            keyring_check_path(path)
        except KeyRefused as e:
            raise RpcError(-e.errno, f"{os.strerror(e.errno)} ({e})") from None
        self.t.keys[name] = path
        return True

    def m_keyring_file_remove_key(self, p: dict[str, Any]) -> Any:
        if self.t.keys.pop(p["name"], None) is None:
            raise RpcError(-19, "No such device")
        return True

    def m_keyring_get_keys(self, p: dict[str, Any]) -> Any:
        return [{"name": n, "module": "keyring_file", "path": path, "removed": False,
                 "probed": True, "refcnt": 1} for n, path in sorted(self.t.keys.items())]

    def m_nvmf_subsystem_allow_any_host(self, p: dict[str, Any]) -> Any:
        self._sub(p).allow_any_host = bool(p.get("allow_any_host", False))
        return True

    def m_nvmf_subsystem_add_listener(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        la = p["listen_address"]
        if str(la.get("trtype", "")).upper() != "TCP" or not self.t.transports:
            raise RpcError(-32602, "Invalid parameters: no TCP transport")
        addr = (la["traddr"], int(la["trsvcid"]))
        self.t.listen(*addr, secure=bool(p.get("secure_channel", False)))
        sub.listeners.add(addr)
        return True

    def m_nvmf_subsystem_remove_listener(self, p: dict[str, Any]) -> Any:
        sub = self._sub(p)
        la = p["listen_address"]
        addr = (la["traddr"], int(la["trsvcid"]))
        sub.listeners.discard(addr)
        self.t.unlisten(*addr)
        return True

    def m_nvmf_get_subsystems(self, p: dict[str, Any]) -> Any:
        return [{
            "nqn": s.nqn, "subtype": "NVMe", "serial_number": s.serial,
            "allow_any_host": s.allow_any_host,
            "hosts": [{"nqn": h, **({"psk": s.host_psk[h]} if h in s.host_psk else {})}
                      for h in sorted(s.hosts)],
            "listen_addresses": [{"trtype": "TCP", "adrfam": "IPv4", "traddr": a,
                                  "trsvcid": str(port),
                                  "secure_channel": (a, port) in self.t.secure}
                                 for a, port in sorted(s.listeners)],
            "namespaces": [{"nsid": k, "bdev_name": v.bdev, "name": v.bdev}
                           for k, v in sorted(s.namespaces.items())],
        } for s in self.t.subsystems.values()]


def serve_rpc(rpc: Rpc, path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def client(c: socket.socket) -> None:
        dec = json.JSONDecoder()
        buf = ""
        with c:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk.decode()
                while buf.strip():
                    try:
                        req, end = dec.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    rid = req.get("id")
                    try:
                        result = rpc.call(req["method"], req.get("params") or {})
                        resp: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": result}
                    except RpcError as e:
                        resp = {"jsonrpc": "2.0", "id": rid,
                                "error": {"code": e.code, "message": str(e)}}
                    except (KeyError, TypeError, ValueError) as e:
                        resp = {"jsonrpc": "2.0", "id": rid,
                                "error": {"code": -32602, "message": f"Invalid parameters: {e}"}}
                    except OSError as e:
                        resp = {"jsonrpc": "2.0", "id": rid,
                                "error": {"code": -(e.errno or 5), "message": str(e)}}
                    c.sendall(json.dumps(resp).encode())

    def loop() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=client, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="backing file of namespace 1 (created with --size)")
    ap.add_argument("--size", default="64M")
    ap.add_argument("--lba-size", type=int, default=4096)
    ap.add_argument("--nqn", default="nqn.2016-06.io.kvtier:test")
    ap.add_argument("--host", action="append", default=[],
                    help="allowed host NQN (repeat); default: any host")
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rpc-socket", help="serve SPDK's JSON-RPC subset here")
    ap.add_argument("--psk-file", help="TLS: the --host hosts' PSK (interchange format); "
                                       "the listener becomes a secure channel")
    ap.add_argument("--mdts-shift", type=int, default=5)
    ap.add_argument("--max-c2h", type=int, default=131072)
    ap.add_argument("--no-c2h-success", action="store_true")
    a = ap.parse_args()
    t = Target(mdts_shift=a.mdts_shift, max_c2h=a.max_c2h, c2h_success=not a.no_c2h_success)
    signal.signal(signal.SIGUSR1, lambda *_: setattr(t, "stalled", not t.stalled))
    signal.signal(signal.SIGUSR2, lambda *_: t.reset_connections())
    if a.rpc_socket:
        serve_rpc(Rpc(t, os.path.dirname(os.path.abspath(a.rpc_socket))), a.rpc_socket)
        print(f"rpc {a.rpc_socket}", flush=True)
    if a.file:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(a.size[:-1]) * units[a.size[-1].upper()] if a.size[-1].isalpha() \
            else int(a.size)
        if not os.path.exists(a.file):
            with open(a.file, "wb") as f:
                f.truncate(size)
        t.add_bdev("bdev0", a.file, a.lba_size)
        sub = t.add_subsystem(a.nqn, allow_any_host=not a.host, hosts=set(a.host))
        sub.namespaces[1] = t.bdevs["bdev0"]
        t.transports.append({"trtype": "TCP"})
        if a.psk_file:
            if not a.host:
                ap.error("--psk-file needs --host")
            try:
                spdk_read_psk(os.path.abspath(a.psk_file))
            except KeyRefused as e:
                ap.error(f"--psk-file: {e}")
            t.keys["key0"] = os.path.abspath(a.psk_file)
            sub.host_psk = {h: "key0" for h in a.host}
        port = t.listen(a.addr, a.port, secure=bool(a.psk_file))
        sub.listeners.add((a.addr, port))
        print(f"listening {port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
