"""NVMe/TCP over TLS 1.3 with a PSK: the key format and derivations (against fixed vectors),
the sans-IO TLS session in memory, kvtier's host against the test target's secure
listener (data, refusals, faults), and provisioning a TLS pool through the SPDK JSON-RPC
subset.  test_spdk.py runs the TLS pool against a real SPDK where one is present."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from harness import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvmf_support import HERE, HOSTNQN, TargetProcess, free_port
from nvmf_target import KeyRefused, Rpc, Target, serve_rpc, spdk_read_psk
from test_nvmf import _check_acked, connect, fault_under_writes, k, nvmf_pool_toml, rnd

from kvtier.daemon.config import ConfigError, NvmfPoolConfig, PoolConfig, load_config
from kvtier.daemon.errors import DeviceError
from kvtier.daemon.nvmf import psk
from kvtier.daemon.nvmf.device import NvmfDevice
from kvtier.daemon.nvmf.host import NvmfTargetConfig
from kvtier.daemon.nvmf.tls import TlsError, TlsSession
from kvtier.daemon.spdk import SpdkError, SpdkTarget, provision_pool

MiB = 1 << 20
# SPDK's own test key (test/nvmf/target/tls.sh: format_interchange_psk
# 00112233445566778899aabbccddeeff 1): the 32 ASCII characters are the key bytes.
SPDK_TEST_KEY = "NVMeTLSkey-1:01:MDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZwJEiQ:"
H1, C1 = "nqn.2016-06.io.spdk:host1", "nqn.2016-06.io.spdk:cnode1"


def write_key(path: Path, key: psk.ConfiguredPsk | str, mode: int = 0o600) -> str:
    path.write_text(key if isinstance(key, str) else key.interchange())
    path.chmod(mode)
    return str(path)


# -- keys -------------------------------------------------------------------------------------

def test_the_interchange_format_and_derivations_match_fixed_vectors() -> None:
    """The retained and TLS PSKs of SPDK's test key, computed independently with
    `openssl kdf ... HKDF` over the HkdfLabel bytes laid out as SPDK's nvme_tcp.h does."""
    key = psk.parse(SPDK_TEST_KEY)
    assert key.key == b"00112233445566778899aabbccddeeff" and key.hash_id == 1
    assert key.interchange() == SPDK_TEST_KEY
    assert key.suite == "TLS_AES_128_GCM_SHA256"
    assert psk.retained_psk(key, H1).hex() == \
        "1fec2d4b69d3cb88e56214d464f00b168d2a635024b7a893aa6fad2840f49f2a"
    ident, tls_key = key.tls_psk(H1, C1)
    assert ident == f"NVMe0R01 {H1} {C1}"
    assert tls_key.hex() == "45956d30221db43e664e8d6e78a79c31a81824cbd12acfdaca0e6032b335bbd9"
    # hash 00: the configured PSK is the retained PSK
    raw = psk.ConfiguredPsk(key.key, psk.HASH_NONE)
    assert psk.retained_psk(raw, H1) == key.key
    assert "0011" not in repr(key)  # the key never shows in a repr


@given(st.binary(min_size=32, max_size=32) | st.binary(min_size=48, max_size=48),
       st.booleans())
def test_keys_round_trip_through_the_interchange_format(raw: bytes, derive: bool) -> None:
    hid = (psk.HASH_SHA256 if len(raw) == 32 else psk.HASH_SHA384) if derive else 0
    key = psk.ConfiguredPsk(raw, hid)
    assert psk.parse(key.interchange()) == key
    ident, tls_key = key.tls_psk(H1, C1)
    assert len(tls_key) == len(raw) and ident.startswith("NVMe0R0" + ("1" if len(raw) == 32
                                                                       else "2"))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_a_damaged_key_is_refused(pos: int, flip: int) -> None:
    text = psk.generate().interchange()
    b64_at = len("NVMeTLSkey-1:01:")
    i = b64_at + pos % (len(text) - b64_at - 1)
    ch = chr((ord(text[i]) ^ flip) % 128)
    bad = text[:i] + ch + text[i + 1:]
    if bad == text:
        return
    try:
        got = psk.parse(bad)
    except psk.PskError:
        return
    # base64 has slack bits in its last characters: a change there may decode the same
    assert got == psk.parse(text)


@pytest.mark.parametrize("text,why", [
    ("", "interchange format"),
    ("NVMeTLSkey-1:03:" + SPDK_TEST_KEY[16:], "must be 00"),
    ("NVMeTLSkey-1:01:AAAA:", "must be 32 or 48"),
    ("NVMeTLSkey-1:01:" + "!" * 48 + ":", "not valid base64"),
    ("NVMeTLSkey-1:02:" + SPDK_TEST_KEY[16:], "48-byte key"),
    (SPDK_TEST_KEY[:-6] + "AAAAA:", "CRC-32"),
])
def test_bad_keys_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(psk.PskError, match=why):
        psk.parse(text)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k", SPDK_TEST_KEY, 0o644)
    with pytest.raises(psk.PskError, match=r"accessible to group or others.*chmod 0600"):
        psk.read_file(path)
    os.chmod(path, 0o600)
    assert psk.read_file(path).key == b"00112233445566778899aabbccddeeff"
    with pytest.raises(psk.PskError, match="No such file"):
        psk.read_file(str(tmp_path / "missing"))


@pytest.mark.parametrize("sha384", [False, True])
def test_gen_psk_writes_exactly_what_spdk_reads(tmp_path: Path, sha384: bool) -> None:
    """No newline after the key (SPDK's parser wants the closing ':' last), mode 0600, and
    read back by the host's reader and by SPDK's rule (the stand-in target's)."""
    from kvtier.cli import main

    path = str(tmp_path / "k.psk")
    assert main(["pool", "gen-psk", *(["--sha384"] if sha384 else []), path]) == 0
    raw = Path(path).read_bytes()
    assert raw.endswith(b":") and b"\n" not in raw and raw.strip() == raw
    assert os.stat(path).st_mode & 0o777 == 0o600
    key = psk.read_file(path)
    assert raw == key.interchange().encode() and len(key.key) == (48 if sha384 else 32)
    assert spdk_read_psk(path) == key


@pytest.mark.parametrize("extra", ["{}\n", "{}\n\n", "{}\r\n", "{} ", " {}", "\n{}"])
def test_a_key_file_spdk_would_refuse_is_refused_saying_how_to_fix_it(tmp_path: Path,
                                                                        extra: str) -> None:
    """A key followed by a newline (what `echo KEY > f` writes) or with whitespace around it:
    SPDK refuses it, so the reader does, at config validation, with a command that fixes
    the file in place; once fixed both read it."""
    path = write_key(tmp_path / "k.psk", extra.format(SPDK_TEST_KEY))
    with pytest.raises(psk.PskError, match=r"(newline|whitespace).* the key; SPDK's keyring "
                                           r"reads the file as it is.*rewrite it with `"):
        psk.read_file(path)
    with pytest.raises(KeyRefused, match="Invalid format of PSK interchange"):
        spdk_read_psk(path)  # the stand-in target applies SPDK's rule: it agrees
    cfg = tmp_path / "k.toml"
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y", f'psk_file = "{path}"'))
    with pytest.raises(ConfigError, match=r"pool\[0\]\.psk_file: .*the key; SPDK"):
        load_config(str(cfg))
    try:
        psk.read_file(path)
    except psk.PskError as e:
        fix = str(e).split("`")[1]
    subprocess.run(["sh", "-c", fix], check=True)
    assert psk.read_file(path).key == b"00112233445566778899aabbccddeeff"
    assert spdk_read_psk(path) == psk.parse(SPDK_TEST_KEY)
    assert os.stat(path).st_mode & 0o777 == 0o600  # fixed in place: the mode stays


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_a_key_file_another_user_owns_is_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k", SPDK_TEST_KEY)
    os.chown(path, 12345, -1)
    with pytest.raises(psk.PskError, match=r"owned by uid 12345, not by uid 0.*chown"):
        psk.read_file(path)
    with pytest.raises(KeyRefused, match="Invalid permissions"):
        spdk_read_psk(path)


# -- the TLS session, in memory ----------------------------------------------------------------

def pair(client_key: bytes, server_key: bytes, ident: str = f"NVMe0R01 {H1} {C1}",
         suite: str = "TLS_AES_128_GCM_SHA256") -> tuple[TlsSession, TlsSession]:
    c = TlsSession(client=True, identity=ident, key=client_key, suite=suite)
    s = TlsSession(client=False, keys={f"NVMe0R01 {H1} {C1}": (server_key, suite)})
    for _ in range(8):
        c.handshake()
        s.receive_bytes(c.take_output())
        s.handshake()
        c.receive_bytes(s.take_output())
        if c.established and s.established:
            c.handshake()
            break
    return c, s


def drain(tls: TlsSession, n: int) -> bytes:
    out = bytearray(n)
    got = 0
    while got < n:
        k_ = tls.read_into(memoryview(out)[got:])
        if k_ == 0:
            break
        got += k_
    return bytes(out[:got])


@pytest.mark.parametrize("suite,n", [("TLS_AES_128_GCM_SHA256", 32),
                                     ("TLS_AES_256_GCM_SHA384", 48)])
def test_sessions_carry_data_both_ways_in_records(suite: str, n: int) -> None:
    key = os.urandom(n)
    c, s = pair(key, key, suite=suite)
    assert c.established and s.established and c.cipher == suite
    assert s.peer_identity == f"NVMe0R01 {H1} {C1}"
    big = rnd(3, 5 * MiB + 17)  # many 16 KiB records, out of a read-only view
    view = memoryview(big.tobytes())
    c.write(view)
    wire = c.take_output()
    assert len(wire) > len(big) and big[:4096].tobytes() not in wire  # encrypted
    s.receive_bytes(wire)
    assert drain(s, len(big)) == big.tobytes()
    s.write(b"answer")
    c.receive_bytes(s.take_output())
    assert drain(c, 6) == b"answer"
    assert drain(c, 10) == b""  # nothing more has arrived: 0, not an error


def test_a_wrong_key_or_identity_fails_the_handshake_on_both_sides() -> None:
    with pytest.raises(TlsError, match="binder does not verify"):
        pair(os.urandom(32), os.urandom(32))
    with pytest.raises(TlsError, match="unknown PSK identity 'NVMe0R01 x y'"):
        pair(b"k" * 32, b"k" * 32, ident="NVMe0R01 x y")
    # the client hears the target's alert
    c = TlsSession(client=True, identity="NVMe0R01 x y", key=b"k" * 32)
    s = TlsSession(client=False, keys={})
    c.handshake()
    s.receive_bytes(c.take_output())
    with pytest.raises(TlsError):
        s.handshake()
    c.receive_bytes(s.take_output())
    with pytest.raises(TlsError, match="alert"):
        c.handshake()


def test_a_tampered_record_is_refused() -> None:
    key = os.urandom(32)
    c, s = pair(key, key)
    c.write(b"x" * 1000)
    wire = bytearray(c.take_output())
    wire[len(wire) // 2] ^= 1
    s.receive_bytes(wire)
    with pytest.raises(TlsError, match="read failed"):
        drain(s, 1000)


# -- the host against the test target's secure listener --------------------------------------

@pytest.fixture
def tls_target(tmp_path: Path):  # type: ignore[no-untyped-def]
    key = psk.generate()
    path = write_key(tmp_path / "psk", key)
    t = TargetProcess(str(tmp_path / "ns.img"), 64 * MiB, "--host", HOSTNQN, "--psk-file", path)
    t.key = key  # type: ignore[attr-defined]
    yield t
    t.kill()


@pytest.mark.parametrize("digests", [False, True])
def test_reads_and_writes_over_tls(tls_target: TargetProcess, digests: bool) -> None:
    dev = NvmfDevice(tls_target.config(psk=tls_target.key, header_digest=digests,  # type: ignore[attr-defined]
                                       data_digest=digests, queues=3))
    try:
        h = dev.health()
        assert h["state"] == "live" and h["tls"].startswith("TLS 1.3 TLS_AES_128_GCM_SHA256")
        data = rnd(1, 3 * MiB + 8192)
        dev.writev(4096, [memoryview(data[:MiB]), memoryview(data[MiB:])])
        out = np.zeros_like(data)
        dev.readv_into(4096, [memoryview(out)])
        assert np.array_equal(out, data)
        part = np.zeros(3 * 4096 + 7, np.uint8)
        dev.readv_into(4096 + 1, [memoryview(part)])
        assert np.array_equal(part, data[1:1 + part.size])
    finally:
        dev.close()
    with open(tls_target.path, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data.tobytes()


def test_the_secure_listener_refuses_hosts_without_the_key(tls_target: TargetProcess) -> None:
    with pytest.raises(DeviceError, match=r"TLS with 127\.0\.0\.1.*binder does not verify|"
                                          r"TLS with 127\.0\.0\.1.*alert"):
        NvmfDevice(tls_target.config(psk=psk.generate()))
    with pytest.raises(DeviceError, match="cannot attach"):
        NvmfDevice(tls_target.config())  # plaintext ICReq to a TLS listener


def test_a_tls_host_on_a_plain_listener_says_so(tmp_path: Path) -> None:
    t = TargetProcess(str(tmp_path / "ns.img"), 8 * MiB)
    try:
        with pytest.raises(DeviceError, match=r"TLS with 127\.0\.0\.1"):
            NvmfDevice(t.config(psk=psk.generate(), connect_timeout_s=1.0))
    finally:
        t.kill()


@pytest.mark.parametrize("fault", ["kill", "reset"])
def test_tls_faults_reconnect_and_lose_nothing_acknowledged(tls_target: TargetProcess,
                                                            fault: str) -> None:
    dev = NvmfDevice(tls_target.config(psk=tls_target.key, queues=2,  # type: ignore[attr-defined]
                                       io_timeout_s=3.0))
    acked, errors = fault_under_writes(tls_target, dev, fault)
    try:
        assert errors and dev.health()["state"] == "live"
        _check_acked(dev, acked)
    finally:
        dev.close()


# -- a TLS pool, provisioned ------------------------------------------------------------------

def test_a_tls_pool_is_provisioned_idempotently_and_served(tmp_path: Path) -> None:
    rpc = str(tmp_path / "spdk.sock")
    proc = subprocess.Popen([sys.executable, f"{HERE}/nvmf_target.py", "--rpc-socket", rpc],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("rpc")
        keyfile = str(tmp_path / "pool.psk")  # made by `kvtier pool gen-psk`
        cli = f"{os.path.dirname(sys.executable)}/kvtier"
        r = subprocess.run([cli, "pool", "gen-psk", "--sha384", keyfile], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0 and "48-byte PSK (TLS_AES_256_GCM_SHA384)" in r.stdout, r
        assert os.stat(keyfile).st_mode & 0o777 == 0o600
        again = subprocess.run([cli, "pool", "gen-psk", keyfile], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode != 0 and "never overwritten" in again.stderr
        port, nqn = free_port(), "nqn.2016-06.io.kvtier:tls"
        toml = nvmf_pool_toml(port, nqn, "\n".join([
            f'psk_file = "{keyfile}"', "[pool.provision]", f'rpc = "{rpc}"',
            'bdev = { kind = "malloc", name = "m0", size = "32M" }']))
        d = Daemon(tmp_path / "d", pool=toml)
        d.dir.mkdir()
        d.start()
        try:
            with connect(d) as c:
                c.put("s", k(1), [rnd(1, 100_000)])
                assert c.get(k(1)) == rnd(1, 100_000).tobytes()
            st = d.admin("status")
            md = st["store"]["media_device"] if "store" in st else st["media_device"]
            assert md["tls"].startswith("TLS 1.3 TLS_AES_256_GCM_SHA384, PSK identity "
                                        f"NVMe0R02 {HOSTNQN} {nqn}")
        finally:
            d.stop()
        cfg = load_config(str(d.config))
        assert provision_pool(cfg.pools[0]).made == []  # already so: nothing changes
        # what a plain host sees now: the target wants TLS
        from kvtier.daemon.nvmf.host import NvmfTargetConfig
        with pytest.raises(DeviceError, match="cannot attach"):
            NvmfDevice(NvmfTargetConfig("127.0.0.1", port, nqn, HOSTNQN, connect_timeout_s=2))
    finally:
        proc.kill()
        proc.wait()


READ_ONLY = {"spdk_get_version", "nvmf_get_transports", "nvmf_get_subsystems",
             "bdev_get_bdevs", "keyring_get_keys"}
TLS_NQN = "nqn.2016-06.io.kvtier:tls"


@pytest.fixture
def rpc_target(tmp_path: Path) -> Iterator[tuple[str, Rpc, Target]]:
    """The stand-in's SPDK JSON-RPC in this process: (socket, Rpc with the methods it was
    asked for in `calls`, Target)."""
    t = Target()
    rpc = Rpc(t, str(tmp_path))
    sock = str(tmp_path / "spdk.sock")
    serve_rpc(rpc, sock)
    yield sock, rpc, t
    t._stop.set()
    for addr in list(t._listeners):
        t.unlisten(*addr)


def tls_pool(rpc: str, port: int, keyfile: str, key: psk.ConfiguredPsk | None = None,
             **prov: object) -> PoolConfig:
    pv: dict[str, object] = {
        "rpc": rpc, "serial_number": "KVT0001", "allow_hosts": [HOSTNQN], "timeout_s": 10.0,
        "bdev": {"kind": "malloc", "name": "m0", "size": 8 * MiB, "block_size": 4096}, **prov}
    return PoolConfig("remote0", "nvmf", "", 0, MiB, nvmf=NvmfPoolConfig(
        "127.0.0.1", port, TLS_NQN, HOSTNQN, psk=key, psk_file=keyfile, provision=pv))


def test_provisioning_checks_the_key_files_before_it_changes_anything(
        rpc_target: tuple[str, Rpc, Target], tmp_path: Path) -> None:
    """A key file SPDK would refuse (a newline after the key, group-readable), a node copy
    holding another key, a relative path (SPDK's keyring wants absolute ones): refused
    before a single call that changes the target."""
    sock, rpc, t = rpc_target
    key = psk.generate()
    port = free_port()
    newline = write_key(tmp_path / "nl.psk", key.interchange() + "\n")
    with pytest.raises(SpdkError, match=r"a newline after the key.*printf %s.*nothing was changed"):
        provision_pool(tls_pool(sock, port, newline))
    loose = write_key(tmp_path / "loose.psk", key, 0o640)
    with pytest.raises(SpdkError, match=r"chmod 0600.*nothing was changed"):
        provision_pool(tls_pool(sock, port, loose, key))
    good = write_key(tmp_path / "good.psk", key)
    other = write_key(tmp_path / "node.psk", psk.generate())
    with pytest.raises(SpdkError, match=r"holds another key .*handshake would fail"):
        provision_pool(tls_pool(sock, port, good, key, psk_path=other))
    with pytest.raises(SpdkError, match=r"relative; SPDK's keyring takes only absolute"):
        provision_pool(tls_pool(sock, port, good, key, psk_path="node.psk"))
    assert set(rpc.calls) <= READ_ONLY, rpc.calls
    assert not (t.transports or t.bdevs or t.keys or t.subsystems)
    # What the old checks let through, SPDK's rule refuses where SPDK does: the keyring
    # takes the file (it checks mode and owner), the host allowed with it does not.
    with SpdkTarget(sock) as st:
        with pytest.raises(SpdkError, match="Operation not permitted"):
            st.call("keyring_file_add_key", name="k1", path=loose)
        st.call("keyring_file_add_key", name="k0", path=newline)
        st.call("nvmf_create_subsystem", nqn=TLS_NQN, serial_number="X")
        with pytest.raises(SpdkError, match="Invalid format of PSK interchange"):
            st.call("nvmf_subsystem_add_host", nqn=TLS_NQN, host=HOSTNQN, psk="k0")


def test_a_provisioning_that_fails_midway_takes_back_what_it_did(
        rpc_target: tuple[str, Rpc, Target], tmp_path: Path) -> None:
    """SPDK refusing a later call (the node's key file missing; the listener's port taken)
    leaves the target as it was, but for the transport SPDK cannot delete; the error says
    what was undone.  Run again once the cause is gone, it provisions a working pool."""
    sock, rpc, t = rpc_target
    key = psk.generate()
    keyfile = write_key(tmp_path / "k.psk", key)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    absent = str(tmp_path / "only-on-the-node.psk")  # not here: SPDK's to check
    with pytest.raises(SpdkError, match=r"keyring_file_add_key failed: .*No such file.*"
                                        r"rolled back nothing; kept the TCP transport"):
        provision_pool(tls_pool(sock, port, keyfile, key, psk_path=absent))
    assert t.transports and not (t.bdevs or t.keys or t.subsystems)
    rpc.calls.clear()
    p = tls_pool(sock, port, keyfile, key)
    with pytest.raises(SpdkError, match=r"nvmf_subsystem_add_listener failed: .*rolled back "
                                        r".*deleted subsystem .*deleted malloc bdev m0; "
                                        r"removed key kvtier-remote0 from the keyring$"):
        provision_pool(p)
    assert not (t.bdevs or t.keys or t.subsystems)
    assert [m for m in rpc.calls if m not in READ_ONLY] == [
        "keyring_file_add_key", "bdev_malloc_create", "nvmf_create_subsystem",
        "nvmf_subsystem_add_host", "nvmf_subsystem_add_ns", "nvmf_subsystem_add_listener",
        # the rollback, newest first
        "nvmf_subsystem_remove_ns", "nvmf_subsystem_remove_host", "nvmf_delete_subsystem",
        "bdev_malloc_delete", "keyring_file_remove_key"]
    busy.close()
    made = provision_pool(p).made
    assert made[-1] == f"listening for {TLS_NQN} on 127.0.0.1:{port} (secure channel: TLS)"
    dev = NvmfDevice(NvmfTargetConfig("127.0.0.1", port, TLS_NQN, HOSTNQN, psk=key,
                                      connect_timeout_s=3.0))
    try:
        data = rnd(4, 65536)
        dev.writev(0, [memoryview(data)])
        out = np.zeros_like(data)
        dev.readv_into(0, [memoryview(out)])
        assert np.array_equal(out, data)
    finally:
        dev.close()


def test_tls_config_errors_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    loose = write_key(tmp_path / "loose.psk", psk.generate(), 0o640)
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y", f'psk_file = "{loose}"'))
    with pytest.raises(ConfigError, match=r"pool\[0\]\.psk_file: .*chmod 0600"):
        load_config(str(cfg))
    bad = write_key(tmp_path / "bad.psk", "NVMeTLSkey-1:01:AAAA:")
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y", f'psk_file = "{bad}"'))
    with pytest.raises(ConfigError, match=r"pool\[0\]\.psk_file: .*32 or 48"):
        load_config(str(cfg))
    cfg.write_text(nvmf_pool_toml(4420, "nqn.2016-06.io.x:y", "\n".join([
        "[pool.provision]", 'psk_name = "k0"', 'bdev = { kind = "malloc", name = "m", '
        'size = "8M" }'])))
    with pytest.raises(ConfigError, match=r"psk_name: TLS keys need the pool's psk_file"):
        load_config(str(cfg))


def test_the_static_tls_config_in_spdk_conf_opens_a_tls_pool(tmp_path: Path) -> None:
    """spdk_conf/nvmf_tgt-tls.json's calls, replayed through the JSON-RPC subset with this
    machine's paths and addresses, give a target kvtierd's host reaches over TLS."""
    import json

    from kvtier.daemon.nvmf.host import NvmfTargetConfig
    from kvtier.daemon.spdk import SpdkTarget

    rpc = str(tmp_path / "spdk.sock")
    proc = subprocess.Popen([sys.executable, f"{HERE}/nvmf_target.py", "--rpc-socket", rpc],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("rpc")
        key = psk.generate()
        keyfile = write_key(tmp_path / "remote0.psk", key)
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"")
        os.truncate(disk, 16 * MiB)
        port = free_port()
        text = (Path(HERE).parent / "spdk_conf" / "nvmf_tgt-tls.json").read_text()
        for old, new in (("/etc/spdk/remote0.psk", keyfile), ("/dev/nvme0n1", str(disk)),
                         ("nqn.2014-08.org.nvmexpress:uuid:REPLACE-WITH-KVTIERD-HOSTNQN",
                          HOSTNQN), ("10.0.0.5", "127.0.0.1"), ('"4420"', f'"{port}"')):
            assert old in text
            text = text.replace(old, new)
        with SpdkTarget(rpc) as t:
            for sub in json.loads(text)["subsystems"]:
                for call in sub["config"]:
                    t.call(call["method"], **call["params"])
        dev = NvmfDevice(NvmfTargetConfig("127.0.0.1", port, "nqn.2016-06.io.spdk:kvtier0",
                                          HOSTNQN, psk=key))
        try:
            data = rnd(9, MiB)
            dev.writev(0, [memoryview(data)])
            out = np.zeros_like(data)
            dev.readv_into(0, [memoryview(out)])
            assert np.array_equal(out, data) and dev.health()["tls"]
        finally:
            dev.close()
    finally:
        proc.kill()
        proc.wait()
