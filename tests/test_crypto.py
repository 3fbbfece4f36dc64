"""Client-side encryption through a real daemon: nothing in the clear at rest, tampering
caught by the client, crypto-erase on purge, key rotation, the keyring's permissions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.admin import AdminClient
from kvtier.client.client import Client
from kvtier.client.crypto import OVERHEAD, DecryptError, FrameCipher, Keyring
from kvtier.client.errors import KvtierError

# 60 kB that occur nowhere else (not periodic): found by a scan if ever stored in the clear
PATTERN = np.random.default_rng(7).integers(0, 256, 60_000, dtype=np.uint8).tobytes()


def _k(s: str) -> bytes:
    return s.encode().ljust(16, b".")


def test_nothing_is_stored_in_the_clear(tmp_path: Path) -> None:
    d = Daemon(tmp_path, ack="memory").start()
    try:
        kr = Keyring(str(tmp_path / "keyring.json"))
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            cipher = FrameCipher(c, kr, "alice")
            cipher.put("s", _k("secret"), [PATTERN, PATTERN[:1000]])
            c.put("s", _k("control"), [b"CONTROL-" + PATTERN[:4000]])  # not encrypted
            assert cipher.get("s", _k("secret")) == [PATTERN, PATTERN[:1000]]
            sealed = c.get(_k("secret"))
            assert len(sealed) == len(PATTERN) + 1000 + 2 * OVERHEAD
            dram = bytes(c.dram)
            assert dram.find(b"CONTROL-" + PATTERN[:64]) >= 0  # the scan would see it
            assert dram.find(PATTERN[:64]) == dram.find(b"CONTROL-" + PATTERN[:64]) + 8
            cipher.close()
    finally:
        d.stop()  # write-behind flushed: the media pool has everything
    raw = (tmp_path / "pool0.img").read_bytes()
    assert raw.find(b"CONTROL-" + PATTERN[:64]) >= 0
    start = 0
    while (i := raw.find(PATTERN[:64], start)) >= 0:  # only the unencrypted control value
        assert raw[i - 8:i] == b"CONTROL-", "plaintext of an encrypted value found on media"
        start = i + 1
    assert (os.stat(tmp_path / "keyring.json").st_mode & 0o777) == 0o600


def test_tampered_swapped_and_moved_frames_are_rejected(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    kr = Keyring(str(tmp_path / "keyring.json"))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"]) as c:
        cipher = FrameCipher(c, kr, "alice")
        frames = [b"frame-zero" * 100, b"frame-one" * 100]
        sealed = cipher.seal("s", _k("v"), frames)
        bad = bytearray(sealed[1])
        bad[OVERHEAD + 5] ^= 1
        c.put("s", _k("v"), [sealed[0], bytes(bad)])
        with pytest.raises(DecryptError, match="frame 1: authentication failed"):
            cipher.get("s", _k("v"))
        c.put("s", _k("v"), [sealed[1], sealed[0]])  # swapped
        with pytest.raises(DecryptError, match="frame 0"):
            cipher.get("s", _k("v"))
        c.put("s", _k("w"), sealed)  # moved under another key
        with pytest.raises(DecryptError, match="frame 0"):
            cipher.get("s", _k("w"))
        c.put("s", _k("v"), sealed)
        assert cipher.get("s", _k("v")) == frames
        cipher.close()
    # Another tenant's keys are invisible: bob cannot even find alice's data key.
    with Client.connect(daemon.socket, "bob", TOKENS["bob"]) as b:
        other = FrameCipher(b, kr, "alice")
        with pytest.raises(DecryptError, match="gone"):
            other.open_many("s", _k("v"), sealed)
        other.close()


def test_purge_crypto_erases_and_rotation_keeps_old_data_readable(daemon: Daemon,
                                                                   tmp_path: Path) -> None:
    daemon.start()
    kr = Keyring(str(tmp_path / "keyring.json"))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"]) as c:
        cipher = FrameCipher(c, kr, "alice", scope="session")
        cipher.put("s1", _k("a"), [PATTERN])
        kept = c.get(_k("a"))  # an attacker's copy of the ciphertext
        kr.rotate("alice")  # new data keys are wrapped by KEK generation 2
        cipher.put("s2", _k("b"), [b"second" * 10])
        cipher.forget()
        assert cipher.get("s1", _k("a")) == [PATTERN]  # generation 1 still unwraps
        assert cipher.get("s2", _k("b")) == [b"second" * 10]
        with AdminClient(daemon.socket) as adm:
            adm.call("purge", tenant="alice", session="s1")
        cipher.forget()
        c.put("s1", _k("a"), [kept])  # the ciphertext comes back; its key does not
        with pytest.raises(DecryptError, match="gone"):
            cipher.get("s1", _k("a"))
        assert cipher.get("s2", _k("b")) == [b"second" * 10]
        cipher.close()
    daemon.stop()
    daemon.start()
    with Client.connect(daemon.socket, "alice", TOKENS["alice"]) as c:
        cipher = FrameCipher(c, kr, "alice", scope="session")
        with pytest.raises(DecryptError, match="gone"):
            cipher.get("s1", _k("a"))
        assert cipher.get("s2", _k("b")) == [b"second" * 10]
        cipher.close()


def test_a_keyring_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring(str(path))
    os.chmod(path, 0o644)
    with pytest.raises(KvtierError, match="chmod 600"):
        Keyring(str(path))


def test_the_encryption_policy_is_explicit_visible_and_enforced(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from kvtier.client.gpu import KVLayout, KVSaver

    d = Daemon(tmp_path, tenants={"alice": {"encryption": "on", "key_scope": "session"},
                                  "bob": {"encryption": "off"}}).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            assert (a.encryption, a.key_scope) == ("on", "session")
            assert (b.encryption, b.key_scope) == ("off", "tenant")
            layout = KVLayout(2, 2, 8, torch.float32, chunk_tokens=4)
            with pytest.raises(KvtierError, match='encryption = "on"'):
                KVSaver(a, layout, b"f" * 16)
            KVSaver(b, layout, b"f" * 16).close()  # plaintext is bob's operator's choice
            cipher = FrameCipher(a, Keyring(str(tmp_path / "kr.json")), "alice")
            assert cipher.scope == "session"  # the tenant's policy
            KVSaver(a, layout, b"f" * 16, cipher=cipher).close()
            cipher.close()
        with AdminClient(d.socket) as adm:
            pol = {t["id"]: t["encryption"] for t in adm.call("status")["daemon"]["tenants"]}
        assert pol == {"alice": "on", "bob": "off"}
    finally:
        d.stop()
    import json
    start = json.loads((tmp_path / "audit.log").read_text().splitlines()[0])
    assert {t["id"]: t["encryption"] for t in start["tenants"]} == {"alice": "on", "bob": "off"}


def test_storing_a_tenant_data_key_is_audited(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    kr = Keyring(str(tmp_path / "keyring.json"))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"]) as c:
        cipher = FrameCipher(c, kr, "alice", scope="tenant")
        cipher.put("s1", _k("a"), [PATTERN])
        cipher.put("s2", _k("b"), [PATTERN])  # the same tenant-scope key: stored once
        kid = cipher._dk_where("s1")[1]
        cipher.close()
    daemon.stop()
    import json

    recs = [json.loads(x) for x in (daemon.dir / "audit.log").read_text().splitlines()]
    stored = [r for r in recs if r["event"] == "data_key_stored"]
    assert [(r["tenant"], r["key"]) for r in stored] == [("alice", kid.hex())]


def test_the_data_key_is_read_with_a_nearly_full_arena(daemon: Daemon, tmp_path: Path) -> None:
    """A loader holds most of the arena while its first frame's data key is fetched: that
    read is small (it asked for a quarter of the arena, and failed at long context)."""
    daemon.start()
    kr = Keyring(str(tmp_path / "keyring.json"))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20) as c:
        sealed = FrameCipher(c, kr, "alice").seal("s", _k("v"), [b"x" * 1000])
        held = c.allocator.alloc(7 << 20)
        fresh = FrameCipher(c, kr, "alice")  # nothing cached: the key comes from kvtierd
        assert fresh.open_many("s", _k("v"), sealed) == [b"x" * 1000]
        c.allocator.free(held)
        fresh.close()
