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

`provision_pool` checks what it can before the first call that changes the target (the
key files by SPDK's own rules, since SPDK parses a key only when a host is allowed with
it; the bdev's description; conflicts in the target's state), and a run that fails
midway takes back what it did, newest first (`SpdkTarget.rollback`), but for a transport
it created: SPDK has no call that deletes one.

The calls block (a Unix socket round trip), so the daemon makes them from a worker thread
(`open_media_pool` runs in `trio.to_thread`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from kvtier.daemon.config import IO_UNIT_SIZE, MAX_IO_SIZE, PoolConfig
from kvtier.daemon.errors import StoreError
from kvtier.daemon.nvmf import psk

log = logging.getLogger("kvtierd.spdk")


class SpdkError(StoreError):
    """An SPDK JSON-RPC call failed; the message names the call and SPDK's answer."""


@dataclass
class Changes:
    """What a provisioning run changed on the target (`made`, in words) and how to take
    each change back (`undo`: the inverse JSON-RPC calls, in the order they became due)."""

    made: list[str] = field(default_factory=list)
    undo: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changes that cannot be taken back

    def add(self, what: str) -> None:
        log.info("spdk: %s", what)
        self.made.append(what)

    def revert_with(self, what: str, method: str, **params: Any) -> None:
        """Register the call that undoes a change just made (`what` names the undoing)."""
        self.undo.append((method, params, what))


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

    def key_conflict(self, name: str, path: str) -> str | None:
        """Why keyring key `name` cannot be the pool's key at `path`, or None."""
        for k in self.call("keyring_get_keys"):
            if k.get("name") == name and k.get("path") not in (None, path):
                return f"SPDK key {name} is {k.get('path')}, the pool's PSK file is {path}"
        return None

    def namespace_conflict(self, nqn: str, bdev: str, nsid: int) -> str | None:
        """Why `bdev` cannot be namespace `nsid` of subsystem `nqn`, or None."""
        sub = self.subsystem(nqn) or {}
        for ns in sub.get("namespaces", []):
            if ns.get("bdev_name") == bdev and int(ns.get("nsid", 0)) != nsid:
                return (f"{nqn}: bdev {bdev} is namespace {ns.get('nsid')}, the pool is "
                        f"configured for namespace {nsid}")
            if ns.get("bdev_name") != bdev and int(ns.get("nsid", 0)) == nsid:
                return f"{nqn}: namespace {nsid} is bdev {ns.get('bdev_name')}, not {bdev}"
        return None

    # -- ensure ---------------------------------------------------------------------------
    # Each changing call that succeeds registers its inverse in `ch` (`revert_with`), so a
    # run that fails midway can take back what it did (`rollback`).

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
        # SPDK has no call that deletes a transport; one serving no listener is idle.
        ch.kept.append(f"the {trtype} transport (SPDK cannot delete a transport; it serves "
                       f"nothing without a listener)")

    def ensure_bdev(self, ch: Changes, spec: dict[str, Any]) -> str:
        """Create the bdev `spec` describes unless it exists; returns the bdev's name."""
        check_bdev_spec(spec)
        kind, name = spec["kind"], spec["name"]
        bdev = f"{name}n1" if kind == "nvme" else name
        if self.bdev_exists(bdev):
            return bdev
        if kind == "aio":
            self.call("bdev_aio_create", filename=spec["filename"], name=name,
                      block_size=spec["block_size"])
        elif kind == "malloc":
            bs = spec["block_size"]
            self.call("bdev_malloc_create", name=name, num_blocks=spec["size"] // bs,
                      block_size=bs)
        else:
            self.call("bdev_nvme_attach_controller", name=name, trtype=spec["trtype"],
                      traddr=spec["traddr"])
        ch.add(f"created {kind} bdev {bdev}")
        ch.revert_with(f"deleted {kind} bdev {bdev}", _BDEV_DELETE[kind], name=name)
        return bdev

    def ensure_key(self, ch: Changes, name: str, path: str) -> None:
        """A file-based key in SPDK's keyring (`keyring_file_add_key`): the PSK file, in
        the interchange format, where the target can read it and nobody else can."""
        why = self.key_conflict(name, path)
        if why is not None:
            raise SpdkError(why)
        if any(k.get("name") == name for k in self.call("keyring_get_keys")):
            return
        self.call("keyring_file_add_key", name=name, path=path)
        ch.add(f"added key {name} ({path}) to the keyring")
        ch.revert_with(f"removed key {name} from the keyring", "keyring_file_remove_key",
                       name=name)

    def ensure_subsystem(self, ch: Changes, nqn: str, *, serial: str,
                         hosts: list[str], psk: str | None = None) -> dict[str, Any]:
        """The subsystem with `hosts` allowed (with keyring key `psk` for TLS, if given).
        A host allowed earlier with another key (or none) is allowed again with this one."""
        sub = self.subsystem(nqn)
        if sub is None:
            self.call("nvmf_create_subsystem", nqn=nqn, serial_number=serial,
                      allow_any_host=False)
            ch.add(f"created subsystem {nqn}")
            ch.revert_with(f"deleted subsystem {nqn}", "nvmf_delete_subsystem", nqn=nqn)
            sub = self.subsystem(nqn) or {"hosts": [], "namespaces": [], "listen_addresses": []}
        have = {h.get("nqn"): h for h in sub.get("hosts", [])}
        for h in hosts:
            if h in have and (psk is None or have[h].get("psk", psk) == psk):
                continue
            if h in have:
                self.call("nvmf_subsystem_remove_host", nqn=nqn, host=h)
                old = have[h].get("psk")
                ch.revert_with(f"allowed host {h} on {nqn} again as it was",
                               "nvmf_subsystem_add_host", nqn=nqn, host=h,
                               **({"psk": old} if old else {}))
            if psk is None:
                self.call("nvmf_subsystem_add_host", nqn=nqn, host=h)
                ch.add(f"allowed host {h} on {nqn}")
            else:
                self.call("nvmf_subsystem_add_host", nqn=nqn, host=h, psk=psk)
                ch.add(f"allowed host {h} on {nqn} with TLS key {psk}")
            ch.revert_with(f"removed host {h} from {nqn}", "nvmf_subsystem_remove_host",
                           nqn=nqn, host=h)
        return sub

    def ensure_namespace(self, ch: Changes, nqn: str, bdev: str, nsid: int) -> None:
        why = self.namespace_conflict(nqn, bdev, nsid)
        if why is not None:
            raise SpdkError(why)
        sub = self.subsystem(nqn) or {}
        if any(ns.get("bdev_name") == bdev for ns in sub.get("namespaces", [])):
            return
        self.call("nvmf_subsystem_add_ns", nqn=nqn, namespace={"bdev_name": bdev, "nsid": nsid})
        ch.add(f"added {bdev} as namespace {nsid} of {nqn}")
        ch.revert_with(f"removed namespace {nsid} from {nqn}", "nvmf_subsystem_remove_ns",
                       nqn=nqn, nsid=nsid)

    def ensure_listener(self, ch: Changes, nqn: str, address: str, port: int, *,
                        secure: bool = False) -> None:
        """A TCP listener (with `secure`, a secure channel: TLS before anything else).
        A listener whose secure_channel differs is replaced."""
        sub = self.subsystem(nqn) or {}
        where = {"trtype": "TCP", "adrfam": "IPv4", "traddr": address, "trsvcid": str(port)}
        for la in sub.get("listen_addresses", []):
            if (str(la.get("trtype", "")).upper() == "TCP" and la.get("traddr") == address
                    and str(la.get("trsvcid")) == str(port)):
                was = bool(la.get("secure_channel", secure))
                if was == secure:
                    return
                self.call("nvmf_subsystem_remove_listener", nqn=nqn, listen_address=where)
                ch.revert_with(f"restored the listener {address}:{port} of {nqn}",
                               "nvmf_subsystem_add_listener", nqn=nqn, listen_address=where,
                               **({"secure_channel": True} if was else {}))
                break
        if secure:
            self.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=where,
                      secure_channel=True)
            ch.add(f"listening for {nqn} on {address}:{port} (secure channel: TLS)")
        else:
            self.call("nvmf_subsystem_add_listener", nqn=nqn, listen_address=where)
            ch.add(f"listening for {nqn} on {address}:{port}")
        ch.revert_with(f"stopped listening for {nqn} on {address}:{port}",
                       "nvmf_subsystem_remove_listener", nqn=nqn, listen_address=where)

    def rollback(self, ch: Changes) -> tuple[list[str], list[str]]:
        """Take back what `ch` recorded, newest first: (what was undone, what could not be,
        with SPDK's answer).  Every undo is tried, whatever the ones before did."""
        done: list[str] = []
        failed: list[str] = []
        for method, params, what in reversed(ch.undo):
            try:
                self.call(method, **params)
                done.append(what)
                log.info("spdk: rollback: %s", what)
            except SpdkError as e:
                failed.append(f"{what}: {e}")
                log.error("spdk: rollback: could not undo (%s): %s", what, e)
        ch.undo.clear()
        return done, failed

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
                self.call(_BDEV_DELETE[kind], name=name)
                ch.add(f"deleted {kind} bdev {bdev}")
        return ch


_BDEV_DELETE = {"aio": "bdev_aio_delete", "malloc": "bdev_malloc_delete",
                "nvme": "bdev_nvme_detach_controller"}


def check_bdev_spec(spec: dict[str, Any]) -> None:
    kind, name = spec.get("kind"), spec.get("name")
    if kind not in _BDEV_DELETE:
        raise SpdkError(f"bdev kind {kind!r} is not one kvtier provisions")
    if kind == "malloc" and spec["size"] % spec["block_size"]:
        raise SpdkError(f"malloc bdev {name}: size {spec['size']} is not a multiple of the "
                        f"block size {spec['block_size']}")


def check_key_files(p: PoolConfig) -> tuple[str, str] | None:
    """(keyring name, path SPDK reads) of pool `p`'s PSK, after checking what can be checked
    here before anything changes on the target; None without TLS.

    SPDK's keyring takes only an absolute path (`keyring_file_check_path`), and the target
    parses the key only when a host is allowed with it, after the keyring, the bdev and
    the subsystem exist -- so a key file SPDK would refuse is refused here, by SPDK's rule
    (`psk.read_file`).  The node's copy (`provision.psk_path`) is checked too when it is
    on this machine (the RPC socket is a Unix socket, so SPDK usually is), and must hold
    the same key; one only the node sees is SPDK's to check, and a refusal is rolled back."""
    n = p.nvmf
    assert n is not None and n.provision is not None
    if not n.psk_file:
        return None
    pv = n.provision
    name = pv.get("psk_name") or f"kvtier-{p.name}"
    path = pv.get("psk_path") or n.psk_file
    if not os.path.isabs(path):
        which = "provision.psk_path" if pv.get("psk_path") else "psk_file"
        raise SpdkError(f"pool {p.name}: {which} {path!r} is relative; SPDK's keyring takes "
                        f"only absolute paths (\"Non-absolute paths are not allowed\")")
    try:
        mine = psk.read_file(n.psk_file)
        if n.psk is not None and mine != n.psk:
            raise SpdkError(f"pool {p.name}: {n.psk_file} no longer holds the key the pool "
                            f"was configured with")
        if path != n.psk_file and os.path.lexists(path) and psk.read_file(path) != mine:
            raise SpdkError(f"pool {p.name}: {path} (provision.psk_path) holds another key "
                            f"than {n.psk_file} (psk_file): the TLS handshake would fail")
    except psk.PskError as e:
        raise SpdkError(f"pool {p.name}: {e}; nothing was changed on the target") from None
    return name, path


def provision_pool(p: PoolConfig) -> Changes:
    """Make the SPDK target serve pool `p`'s namespace (idempotent).

    Everything that can be checked is checked before the first changing call: the pool's
    key files by SPDK's rules, the bdev's description, and the target's state for a
    conflict (a keyring key of the same name for another file, the namespace taken).  A
    call that fails after that (SPDK refusing the node's key file, a listener's port in
    use, ...) is answered by taking back what this run did, newest first, and the error
    says what was undone and what was not: the TCP transport stays if this run created it
    (SPDK has no call to delete one; without a listener it serves nothing), and an undo
    SPDK refuses is named so that `kvtier pool decommission` or SPDK's rpc.py can finish."""
    n = p.nvmf
    if n is None or n.provision is None:
        raise SpdkError(f"pool {p.name}: no [pool.provision] section")
    pv = n.provision
    check_bdev_spec(pv["bdev"])
    key = check_key_files(p)
    ch = Changes()
    with SpdkTarget(pv["rpc"], timeout_s=pv["timeout_s"]) as t:
        bdev_spec = pv["bdev"]
        bdev_name = f"{bdev_spec['name']}n1" if bdev_spec["kind"] == "nvme" else bdev_spec["name"]
        for why in (t.key_conflict(*key) if key else None,
                    t.namespace_conflict(n.subnqn, bdev_name, n.nsid)):
            if why is not None:
                raise SpdkError(f"pool {p.name}: {why}; nothing was changed on the target")
        try:
            t.ensure_transport(ch, max_io_size=pv.get("max_io_size", MAX_IO_SIZE),
                               io_unit_size=pv.get("io_unit_size", IO_UNIT_SIZE))
            if key is not None:  # first: the change SPDK is likeliest to refuse
                t.ensure_key(ch, *key)
            bdev = t.ensure_bdev(ch, bdev_spec)
            t.ensure_subsystem(ch, n.subnqn, serial=pv["serial_number"],
                               hosts=pv["allow_hosts"], psk=key[0] if key else None)
            t.ensure_namespace(ch, n.subnqn, bdev, n.nsid)
            t.ensure_listener(ch, n.subnqn, n.address, n.port, secure=key is not None)
        except Exception as e:  # whatever failed, what this run did is taken back
            what = str(e) if isinstance(e, SpdkError) else f"{type(e).__name__}: {e}"
            if not ch.made and not ch.undo:
                raise SpdkError(f"{what}; nothing was changed on the target") from None
            done, failed = t.rollback(ch)
            msg = f"{what}; rolled back {'; '.join(done) if done else 'nothing'}"
            if ch.kept:
                msg += f"; kept {'; '.join(ch.kept)}"
            if failed:
                msg += f"; COULD NOT UNDO: {'; '.join(failed)}"
            raise SpdkError(msg) from None if isinstance(e, SpdkError) else e
    return ch


def decommission_pool(p: PoolConfig, *, delete_bdev: bool = False) -> Changes:
    """Remove pool `p`'s subsystem from the target (and its bdev with `delete_bdev`)."""
    n = p.nvmf
    if n is None or n.provision is None:
        raise SpdkError(f"pool {p.name}: no [pool.provision] section")
    with SpdkTarget(n.provision["rpc"], timeout_s=n.provision["timeout_s"]) as t:
        return t.decommission(n.subnqn, n.provision["bdev"] if delete_bdev else None)
