"""Provisioning an SPDK NVMe-oF target through its JSON-RPC (the `spdk` package).

`SpdkTarget` wraps `spdk.rpc.client.JSONRPCClient` with *ensure* operations that read the
target's state first and change only what is missing, so provisioning is idempotent:
running it again against a provisioned target makes no call that changes anything, and
says so (`Changes.made` is empty).  `decommission` is the reverse, just as idempotent.

What one kvtier pool needs on a storage node:

1. the TCP transport (`nvmf_create_transport`);
2. a bdev holding the data: `aio` (a file or block device), `malloc` (RAM, for tests),
   or `nvme` (a local NVMe SSD attached by PCIe address: `bdev_nvme_attach_controller`);
3. a subsystem with a host allow-list (`allow_any_host` stays off; the pool's host NQN is
   added with `nvmf_subsystem_add_host`);
4. the bdev as a namespace of it; 5. a TCP listener on the pool's address and port.

With a PSK (`psk_file` in the pool's config), the PSK file goes into SPDK's keyring
(`keyring_file_add_key`, as key `kvtier-<pool>` unless `provision.psk_name` says
otherwise; `provision.psk_path` where the target's copy lives, if not at the same path),
the hosts are allowed with that key (`nvmf_subsystem_add_host --psk`) and the listener is
a secure channel (`nvmf_subsystem_add_listener --secure-channel`): the target then
refuses a connection that does not start with TLS, and a host without the key.

The calls block (a Unix socket round trip), so the daemon makes them from a worker thread
(`open_media_pool` runs in `trio.to_thread`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from kvtier.daemon.config import IO_UNIT_SIZE, MAX_IO_SIZE, PoolConfig
from kvtier.daemon.errors import StoreError

log = logging.getLogger("kvtierd.spdk")


class SpdkError(StoreError):
    """An SPDK JSON-RPC call failed; the message names the call and SPDK's answer."""


@dataclass
class Changes:
    made: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        log.info("spdk: %s", what)
        self.made.append(what)


def _error_text(exc: Exception) -> str:
    """SPDK's code and message out of the client's multi-line exception text."""
    msg = getattr(exc, "message", str(exc))
    at = msg.rfind("response:")
    if at >= 0:
        try:
            err = json.loads(msg[at + len("response:"):])
            return f"{err.get('message', '?')} (code {err.get('code', '?')})"
        except ValueError:
            pass
    return " ".join(str(msg).split())


class SpdkTarget:
    def __init__(self, rpc: str, *, timeout_s: float = 60.0) -> None:
        try:
            from spdk.rpc.client import JSONRPCClient, JSONRPCException
        except ImportError as e:
            raise SpdkError("SPDK provisioning needs the `spdk` Python package "
                            "(pip install 'kvtier[spdk]')") from e
        self._exc = JSONRPCException
        self.rpc = rpc
        try:
            self._client = JSONRPCClient(rpc, timeout=timeout_s)
        except JSONRPCException as e:
            raise SpdkError(f"cannot reach SPDK's RPC socket {rpc}: {_error_text(e)}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SpdkTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> Any:
        try:
            return self._client.call(method, params)
        except self._exc as e:
            raise SpdkError(f"SPDK {self.rpc}: {method} failed: {_error_text(e)}") from None

    # -- state ----------------------------------------------------------------------------

    def subsystem(self, nqn: str) -> dict[str, Any] | None:
        for s in self.call("nvmf_get_subsystems"):
            if s.get("nqn") == nqn:
                return dict(s)
        return None

    def bdev_exists(self, name: str) -> bool:
        try:
            return bool(self.call("bdev_get_bdevs", name=name))
        except SpdkError:
            return False

    # -- ensure ---------------------------------------------------------------------------

    def ensure_transport(self, ch: Changes, trtype: str = "TCP", *,
                         max_io_size: int = MAX_IO_SIZE,
                         io_unit_size: int = IO_UNIT_SIZE) -> None:
        """The transport, created with `max_io_size` (the MDTS hosts see) made of
        `io_unit_size` buffers.  SPDK cannot change a transport once created: one that
        exists with other sizes is kept, with a warning that says what it costs."""
        for t in self.call("nvmf_get_transports"):
            if str(t.get("trtype", "")).upper() != trtype:
                continue
            have = int(t.get("max_io_size", 0))
            if have and have < max_io_size:
                ch.add(f"kept the existing {trtype} transport: its max_io_size is {have} "
                       f"bytes, not {max_io_size} (larger transfers are split into more "
                       f"commands; recreate the target's transport to change it)")
                log.warning("%s", ch.made[-1])
            return
        self.call("nvmf_create_transport", trtype=trtype, max_io_size=max_io_size,
                  io_unit_size=io_unit_size)
        ch.add(f"created the {trtype} transport (max_io_size {max_io_size}, "
               f"io_unit_size {io_unit_size})")

    def ensure_bdev(self, ch: Changes, spec: dict[str, Any]) -> str:
        """Create the bdev `spec` describes unless it exists; returns the bdev's name."""
        kind, name = spec["kind"], spec["name"]
        bdev = f"{name}n1" if kind == "nvme" else name
        if self.bdev_exists(bdev):
            return bdev
        if kind == "aio":
            self.call("bdev_aio_create", filename=spec["filename"], name=name,
                      block_size=spec["block_size"])
        elif kind == "malloc":
            bs = spec["block_size"]
            if spec["size"] % bs:
                raise SpdkError(f"malloc bdev {name}: size {spec['size']} is not a multiple "
                                f"of the block size {bs}")
            self.call("bdev_malloc_create", name=name, num_blocks=spec["size"] // bs,
                      block_size=bs)
        elif kind == "nvme":
            self.call("bdev_nvme_attach_controller", name=name, trtype=spec["trtype"],
                      traddr=spec["traddr"])
        else:
            raise SpdkError(f"bdev kind {kind!r} is not one kvtier provisions")
        ch.add(f"created {kind} bdev {bdev}")
        return bdev

    def ensure_key(self, ch: Changes, name: str, path: str) -> None:
        """A file-based key in SPDK's keyring (`keyring_file_add_key`): the PSK file, in
        the interchange format, where the target can read it and nobody else can."""
        for k in self.call("keyring_get_keys"):
            if k.get("name") == name:
                if k.get("path") not in (None, path):
                    raise SpdkError(f"SPDK key {name} is {k.get('path')}, the pool's PSK "
                                    f"file is {path}")
                return
        self.call("keyring_file_add_key", name=name, path=path)
        ch.add(f"added key {name} ({path}) to the keyring")

    def ensure_subsystem(self, ch: Changes, nqn: str, *, serial: str,
                         hosts: list[str], psk: str | None = None) -> dict[str, Any]:
        """The subsystem with `hosts` allowed (with keyring key `psk` for TLS, if given).
        A host allowed earlier with another key (or none) is allowed again with this one."""
        sub = self.subsystem(nqn)
        if sub is None:
            self.call("nvmf_create_subsystem", nqn=nqn, serial_number=serial,
                      allow_any_host=False)
            ch.add(f"created subsystem {nqn}")
            sub = self.subsystem(nqn) or {"hosts": [], "namespaces": [], "listen_addresses": []}
        have = {h.get("nqn"): h for h in sub.get("hosts", [])}
        for h in hosts:
            if h in have and (psk is None or have[h].get("psk", psk) == psk):
                continue
            if h in have:
                self.call("nvmf_subsystem_remove_host", nqn=nqn, host=h)
            if psk is None:
                self.call("nvmf_subsystem_add_host", nqn=nqn, host=h)
                ch.add(f"allowed host {h} on {nqn}")
            else:
                self.call("nvmf_subsystem_add_host", nqn=nqn, host=h, psk=psk)
                ch.add(f"allowed host {h} on {nqn} with TLS key {psk}")
        return sub

    def ensure_namespace(self, ch: Changes, nqn: str, bdev: str, nsid: int) -> None:
        sub = self.subsystem(nqn) or {}
        for ns in sub.get("namespaces", []):
            if ns.get("bdev_name") == bdev:
                if int(ns.get("nsid", 0)) != nsid:
                    raise SpdkError(f"{nqn}: bdev {bdev} is namespace {ns.get('nsid')}, the "
                                    f"pool is configured for namespace {nsid}")
                return
            if int(ns.get("nsid", 0)) == nsid:
                raise SpdkError(f"{nqn}: namespace {nsid} is bdev {ns.get('bdev_name')}, "
                                f"not {bdev}")
        self.call("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": bdev, "nsid": nsid})
        ch.add(f"added {bdev} as namespace {nsid} of {nqn}")

    def ensure_listener(self, ch: Changes, nqn: str, address: str, port: int, *,
                        secure: bool = False) -> None:
        """A TCP listener (with `secure`, a secure channel: TLS before anything else).
        A listener whose secure_channel differs is replaced."""
        sub = self.subsystem(nqn) or {}
        where = {"trtype": "TCP", "adrfam": "IPv4", "traddr": address, "trsvcid": str(port)}
        for la in sub.get("listen_addresses", []):
            if (str(la.get("trtype", "")).upper() == "TCP" and la.get("traddr") == address
                    and str(la.get("trsvcid")) == str(port)):
                if bool(la.get("secure_channel", secure)) == secure:
                    return
                self.call("nvmf_subsystem_remove_listener", nqn=nqn, listen_address=where)
                break
        if secure:
            self.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=where,
                      secure_channel=True)
            ch.add(f"listening for {nqn} on {address}:{port} (secure channel: TLS)")
        else:
            self.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=where)
            ch.add(f"listening for {nqn} on {address}:{port}")

    # -- reverse --------------------------------------------------------------------------

    def decommission(self, nqn: str, bdev_spec: dict[str, Any] | None) -> Changes:
        ch = Changes()
        if self.subsystem(nqn) is not None:
            self.call("nvmf_delete_subsystem", nqn=nqn)
            ch.add(f"deleted subsystem {nqn}")
        if bdev_spec is not None:
            kind, name = bdev_spec["kind"], bdev_spec["name"]
            bdev = f"{name}n1" if kind == "nvme" else name
            if self.bdev_exists(bdev):
                method = {"aio": "bdev_aio_delete", "malloc": "bdev_malloc_delete",
                          "nvme": "bdev_nvme_detach_controller"}[kind]
                self.call(method, name=name)
                ch.add(f"deleted {kind} bdev {bdev}")
        return ch


def provision_pool(p: PoolConfig) -> Changes:
    """Make the SPDK target serve pool `p`'s namespace (idempotent)."""
    n = p.nvmf
    if n is None or n.provision is None:
        raise SpdkError(f"pool {p.name}: no [pool.provision] section")
    pv = n.provision
    ch = Changes()
    with SpdkTarget(pv["rpc"], timeout_s=pv["timeout_s"]) as t:
        t.ensure_transport(ch, max_io_size=pv.get("max_io_size", MAX_IO_SIZE),
                           io_unit_size=pv.get("io_unit_size", IO_UNIT_SIZE))
        bdev = t.ensure_bdev(ch, pv["bdev"])
        key = None
        if n.psk_file:  # TLS: the same PSK file, where the target reads it
            key = pv.get("psk_name") or f"kvtier-{p.name}"
            t.ensure_key(ch, key, pv.get("psk_path") or n.psk_file)
        t.ensure_subsystem(ch, n.subnqn, serial=pv["serial_number"], hosts=pv["allow_hosts"],
                           psk=key)
        t.ensure_namespace(ch, n.subnqn, bdev, n.nsid)
        t.ensure_listener(ch, n.subnqn, n.address, n.port, secure=key is not None)
    return ch


def decommission_pool(p: PoolConfig, *, delete_bdev: bool = False) -> Changes:
    """Remove pool `p`'s subsystem from the target (and its bdev with `delete_bdev`)."""
    n = p.nvmf
    if n is None or n.provision is None:
        raise SpdkError(f"pool {p.name}: no [pool.provision] section")
    with SpdkTarget(n.provision["rpc"], timeout_s=n.provision["timeout_s"]) as t:
        return t.decommission(n.subnqn, n.provision["bdev"] if delete_bdev else None)
